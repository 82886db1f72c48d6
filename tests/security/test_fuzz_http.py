"""Hypothesis-generated HTTP bodies for every POST endpoint, against a real node (issue 7,
part 1): malformed and truncated JSON, deep nesting, wrong types, huge strings and
numbers, NaN and Infinity, lone surrogates (escaped, and raw as invalid UTF-8), bodies
over `server.max_http_body_bytes`, odd content types, garbage room ids in the path, and
missing, forged or valid tokens.

What may come back: a 4xx with the documented JSON error (its code matching the status,
`Retry-After` with `rate_limited`), or the endpoint's success for what happened to be
valid. Never a 5xx. Every response carries the security headers. Nothing succeeds
against a room the caller is not in. A bystander pair keeps chatting on the same node
throughout, and the node logs no traceback. `CHATD_FUZZ_EXAMPLES=N` for a longer run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import secrets
import time
import urllib.parse
from typing import Any

import aiohttp
import pytest
import yarl
from hypothesis import given
from hypothesis import strategies as st

from tests.client import PASSWORD, Api, User
from tests.harness import ChatdNodes, ValkeyProcess
from tests.security.strategies import (
    deep_values,
    hostile,
    json_values,
    mutated,
    serialize,
    strings,
    weighted,
)
from tests.security.support import (
    BASE_ENV,
    HTTP_STATUS,
    Bystanders,
    assert_log_clean,
    fuzz_examples,
    fuzz_settings,
    on_loop,
    run_given,
    summary,
)

MAX_BODY_BYTES = 65536  # config.toml default of server.max_http_body_bytes
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}

# endpoint -> (path template, body fields, success statuses)
ENDPOINTS: dict[str, tuple[str, list[str], set[int]]] = {
    "register": ("/api/v1/register", ["username", "password"], {201}),
    "login": ("/api/v1/login", ["username", "password"], {200}),
    "logout": ("/api/v1/logout", [], {204}),
    "rooms": ("/api/v1/rooms", ["kind", "name", "members"], {200, 201}),
    "members": ("/api/v1/rooms/{room}/members", ["user_id", "role"], {204}),
    "messages": ("/api/v1/rooms/{room}/messages", ["client_msg_id", "body"], {200, 201}),
}

pytestmark = [pytest.mark.filterwarnings("ignore:Generating overly large repr"),
              pytest.mark.timeout(120 + fuzz_examples() // 2)]


class World:
    """The users and rooms examples refer to."""

    def __init__(self, fuzzer: User, other: User, own: str, foreign: str,
                 bystander_ids: list[str]) -> None:
        self.fuzzer, self.other, self.own, self.foreign = fuzzer, other, own, foreign
        self.user_ids = [fuzzer.user_id, other.user_id, *bystander_ids]
        self.rooms = [own, own, foreign, secrets.token_urlsafe(20), "x", "{0}", "..",
                      "%2e%2e", "\ud800", "a/b", "\x00", "r" * 300, foreign.swapcase()]


def plausible(field: str, world: World) -> st.SearchStrategy[Any]:
    return {
        "username": st.one_of(st.from_regex(r"[a-zA-Z0-9_.-]{3,32}", fullmatch=True),
                              st.just(world.other.username),
                              st.just(world.other.username.upper())),
        "password": st.one_of(st.just(PASSWORD), st.text(min_size=8, max_size=40)),
        "kind": st.sampled_from(["group", "direct"]),
        "name": st.text(min_size=1, max_size=100),
        "members": st.lists(st.sampled_from(world.user_ids), max_size=3),
        "user_id": st.sampled_from(world.user_ids),
        "role": st.sampled_from(["member", "admin", "owner"]),
        "client_msg_id": st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
        "body": st.text(min_size=1, max_size=50),
    }[field]


def bodies(fields: list[str], world: World) -> st.SearchStrategy[tuple[str, bytes]]:
    """(kind, body bytes)"""
    shaped = st.fixed_dictionaries({f: plausible(f, world) for f in fields}).flatmap(
        lambda body: mutated(body) if body else st.just(body))
    chaotic = st.fixed_dictionaries({}, optional={f: st.one_of(plausible(f, world), hostile())
                                                  for f in fields})
    as_json = st.builds(lambda obj, ascii_only: ("object", serialize(obj, ascii_only)),
                        weighted((3, shaped), (1, chaotic)), st.booleans())
    other = st.one_of(
        st.builds(lambda obj, cut: ("truncated", serialize(obj, True)[:cut]), shaped,
                  st.integers(0, 40)),
        st.builds(lambda v: ("not an object", json.dumps(v, allow_nan=True).encode(
            "utf-8", "surrogatepass")), json_values()),
        st.builds(lambda t: ("nested", t.encode()), deep_values()),
        st.builds(lambda b: ("bytes", b), st.binary(max_size=64)),
        st.builds(lambda s: ("text", s.encode("utf-8", "surrogatepass")), strings()),
        st.builds(lambda n: ("over the limit", b'{"x":"' + b"y" * n + b'"}'),
                  st.sampled_from([MAX_BODY_BYTES - 8, MAX_BODY_BYTES, 70000, 1_000_000])),
        st.builds(lambda obj: ("utf-16", json.dumps(obj).encode("utf-16")), shaped))
    return weighted((6, as_json), (1, other))


def known_hostile(fields: list[str]) -> list[tuple[str, bytes]]:
    cases = [("nested 100000", b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
             ("nested 990", b'{"x":' + b"[" * 990 + b"]" * 990 + b"}"),
             ("NaN", b'{"x": NaN, "y": -Infinity}'),
             ("huge integer", b'{"x": ' + b"9" * 5000 + b"}")]
    valid = {"username": "someone", "password": PASSWORD, "kind": "group", "name": "n",
             "members": [], "user_id": "x", "role": "member", "client_msg_id": "c",
             "body": "b"}
    for field in fields:
        for value in (r"\ud800", r"abc\udfffdefgh", r"\ud83d\ude00\ud800x" * 3):
            text = json.dumps({f: valid[f] for f in fields})
            text = text.replace(json.dumps(valid[field]), f'"{value}"', 1)
            cases.append((f"lone surrogate in {field}", text.encode()))
    return cases


class Auth:
    """The fuzzer's current token (a fuzzed logout revokes it: then log in again)."""

    def __init__(self, api: Api, user: User) -> None:
        self.api, self.user = api, user

    async def refresh(self) -> None:
        self.user = await self.api.login(self.user.username)


async def test_fuzzed_post_bodies(valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=BASE_ENV)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        api = Api(http, node.url)
        fuzzer, other = await api.register(), await api.register()
        own = await api.group(fuzzer, [other], name="fuzzed")
        bystanders = await stack.enter_async_context(Bystanders(http, node))
        world = World(fuzzer, other, own, bystanders.room,
                      [u.user_id for u in bystanders.users])
        auth = Auth(api, fuzzer)
        stats: collections.Counter[str] = collections.Counter()
        failures: list[str] = []

        async def one(endpoint: str, room: str, token: str, content_type: str | None,
                      kind: str, body: bytes) -> None:
            template, _, success = ENDPOINTS[endpoint]
            quoted = urllib.parse.quote(room.encode("utf-8", "surrogatepass"), safe="")
            url = yarl.URL(node.url + template.format(room=quoted), encoded=True)
            headers = {"Content-Type": content_type} if content_type else {}
            if token == "valid":
                headers["Authorization"] = f"Bearer {auth.user.token}"
            elif token == "forged":
                headers["Authorization"] = f"Bearer {auth.user.token[:-4]}AAAA"
            elif token == "other":
                headers["Authorization"] = f"Bearer {world.other.token}"
            data = io.BytesIO(body) if len(body) > 1 << 20 else body  # aiohttp warns on big bytes
            async with http.post(url, data=data, headers=headers) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
                what = f"{endpoint} {token} {kind} {room[:20]!r}: {status} {text[:200]} for " \
                       f"{body[:150]!r}"
                stats[f"{endpoint}:{status}"] += 1
                for name, value in SECURITY_HEADERS.items():
                    if resp.headers.get(name) != value:
                        failures.append(f"header {name}={resp.headers.get(name)}: {what}")
                if status >= 500:
                    failures.append(f"server error: {what}")
                elif status >= 400:
                    try:
                        error = json.loads(text)["error"]
                        code = error["code"]
                        assert HTTP_STATUS[code] == status and isinstance(error["message"], str)
                        assert code != "rate_limited" or int(resp.headers["Retry-After"]) >= 1
                    except (ValueError, KeyError, TypeError, AssertionError):
                        failures.append(f"error shape: {what}")
                elif status not in success:
                    failures.append(f"unexpected success: {what}")
                elif endpoint in ("members", "messages") and room != world.own:
                    failures.append(f"succeeded against a room not the caller's: {what}")
                elif token not in ("valid", "other") and endpoint not in ("register", "login"):
                    failures.append(f"succeeded without a valid token: {what}")
            if endpoint == "logout" and status == 204 and token == "valid":
                await auth.refresh()
            if endpoint == "logout" and status == 204 and token == "other":
                world.other = await api.login(world.other.username)

        def checker(endpoint: str) -> Any:
            fields = ENDPOINTS[endpoint][1]
            rooms = st.sampled_from(world.rooms) if "{room}" in ENDPOINTS[endpoint][0] \
                else st.just("")

            @fuzz_settings()
            @given(room=rooms, token=st.sampled_from(["valid", "valid", "valid", "forged",
                                                      "none", "other"]),
                   content_type=st.sampled_from(["application/json"] * 4 + [
                       None, "text/plain", "application/x-www-form-urlencoded",
                       "application/json; charset=latin-1"]),
                   body=bodies(fields, world))
            def check(room: str, token: str, content_type: str | None,
                      body: tuple[str, bytes]) -> None:
                on_loop(loop, one(endpoint, room, token, content_type, *body))
                bystanders.check_running()
                assert node.running, node.log_tail()

            return check

        started = time.monotonic()
        # First the inputs that once gave 500s (RecursionError, lone surrogates reaching
        # argon2 and redis-py), on every endpoint.
        for endpoint, (_, fields, _) in ENDPOINTS.items():
            for kind, body in known_hostile(fields):
                for token in ("valid", "none"):
                    await one(endpoint, world.own, token, "application/json", kind, body)
        for endpoint in ENDPOINTS:
            await run_given(checker(endpoint))
        elapsed = time.monotonic() - started
        assert not failures, "\n".join(failures[:20])
        chat = await bystanders.stop()
        # The bystanders' room is as they left it: their two memberships, their messages.
        reader = bystanders.users[0]
        status, room = await api.call("GET", f"/api/v1/rooms/{bystanders.room}", user=reader)
        assert status == 200
        assert sorted(m["user_id"] for m in room["members"]) == sorted(
            u.user_id for u in bystanders.users)
        status, page = await api.call("GET", f"/api/v1/rooms/{bystanders.room}/messages"
                                      "?limit=200", user=reader)
        assert {m["sender_id"] for m in page["messages"]} <= {u.user_id for u in
                                                               bystanders.users}
    assert node.running
    assert_log_clean(node)
    summary("fuzz http POST bodies", examples=sum(stats.values()), seconds=round(elapsed, 1),
            statuses=dict(sorted(stats.items())), bystanders=chat)
