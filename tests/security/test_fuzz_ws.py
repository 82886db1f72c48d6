"""Hypothesis-generated WebSocket frames against a real node (issue 7, part 1).

Frames of every shape a hostile or broken client can produce: malformed and truncated
JSON, deep nesting, wrong types in every field, huge strings and numbers, NaN and
Infinity, lone surrogates (escaped, and raw as invalid UTF-8), other Unicode edge cases,
unknown types, binary frames, frames over the size limit. After `hello`, and as the first
frame of a connection. What may come back: the documented `error` frames (never
`internal` or `unavailable`), acks/history/pong for what happened to be valid, and the
documented close codes (1009 for over-size, 4008 after repeated invalid frames; 4001
before hello). Meanwhile a bystander pair keeps chatting on the same node and receives
every message in order, nothing reaches their room, and the node logs no traceback.

One node and one connection serve all examples; a closed connection is reopened.
`CHATD_FUZZ_EXAMPLES=N` runs N examples per test instead of 150.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
import time
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from itsdangerous import BadData, URLSafeTimedSerializer

from chatd import keys
from chatd.auth import TOKEN_SALT
from tests.client import Api, User, Ws, connect
from tests.harness import ChatdNodes, ValkeyProcess
from tests.security.strategies import (
    deep,
    deep_values,
    hostile,
    json_values,
    mutated,
    nesting,
    serialize,
    weighted,
)
from tests.security.support import (
    BASE_ENV,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    ERROR_KEYS,
    MAX_FRAME_BYTES,
    Bystanders,
    assert_log_clean,
    fuzz_examples,
    fuzz_settings,
    on_loop,
    run_given,
    summary,
)

ENV = {**BASE_ENV, "CHATD_LIMITS__FRAME_RATE_PER_S": "100000",
       "CHATD_LIMITS__FRAME_BURST": "100000", "CHATD_LIMITS__MAX_CONNECTIONS_PER_USER": "1000"}

TYPES = ["hello", "send", "delivered", "read", "typing", "history", "ping"]
ODD_TYPES = ["", "PING", "Ping", "ping ", " ping", "ping\x00", "shout", "message", "ack",
             "welcome", "error", "__proto__", "constructor", "hello\u200b", "\ud800"]
FIELDS = ["id", "room_id", "client_msg_id", "body", "seq", "active", "after_seq",
          "before_seq", "limit", "token", "resume"]
CLOSE_ABNORMAL = 1006  # what a client reports for a connection that ended without a close
KNOWN_CODES = {"bad_request", "not_found", "too_large", "rate_limited"}

# A failing example may be a 600 kB frame: hypothesis warns before printing it.
pytestmark = [pytest.mark.filterwarnings("ignore:Generating overly large repr"),
              pytest.mark.timeout(120 + fuzz_examples() // 5)]


# --- strategies -------------------------------------------------------------------------

def plausible(field: str, rooms: list[str]) -> st.SearchStrategy[Any]:
    """Values that pass validation, so that examples also reach dispatch and storage."""
    room = st.sampled_from(rooms)
    return {
        "id": st.text(max_size=64),
        "room_id": room,
        "client_msg_id": st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
        "body": st.text(min_size=1, max_size=30),
        "seq": st.integers(0, 6),
        "active": st.booleans(),
        "after_seq": st.integers(0, 6),
        "before_seq": st.integers(0, 6),
        "limit": st.integers(1, 200),
        "token": st.text(max_size=10),
        "resume": st.dictionaries(room, st.integers(0, 6), max_size=3),
    }[field]


# The fields of each frame type: required, then optional (PROTOCOL.md section 3).
SHAPES: dict[str, tuple[list[str], list[str]]] = {
    "hello": (["token"], ["id", "resume"]),
    "send": (["room_id", "client_msg_id", "body"], ["id"]),
    "delivered": (["room_id", "seq"], ["id"]),
    "read": (["room_id", "seq"], ["id"]),
    "typing": (["room_id", "active"], ["id"]),
    "history": (["room_id"], ["id", "after_seq", "before_seq", "limit"]),
    "ping": ([], ["id"]),
}


def shaped(rooms: list[str], types: list[str],
           overrides: dict[str, st.SearchStrategy[Any]] | None = None,
           ) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of the given types with plausible fields, then (often) one mutation."""
    chosen = overrides or {}

    def value(field: str) -> st.SearchStrategy[Any]:
        return chosen.get(field, plausible(field, rooms))

    def of_type(kind: str) -> st.SearchStrategy[dict[str, Any]]:
        required, optional = SHAPES[kind]
        return st.fixed_dictionaries(
            {"type": st.just(kind), **{f: value(f) for f in required}},
            optional={f: value(f) for f in optional})

    return st.sampled_from(types).flatmap(of_type).flatmap(mutated)


def chaotic(rooms: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Any type (odd ones too) with any subset of the known fields, each plausible or not."""
    def value(field: str) -> st.SearchStrategy[Any]:
        return st.one_of(plausible(field, rooms), hostile())

    return st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(TYPES), st.sampled_from(ODD_TYPES), json_values())},
        optional={f: value(f) for f in FIELDS})


def objects(rooms: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    after_hello = [t for t in TYPES if t != "hello"]
    return weighted((3, shaped(rooms, after_hello)), (1, chaotic(rooms)))


def payloads(rooms: list[str]) -> st.SearchStrategy[tuple[str, bytes, bool]]:
    """(kind, payload, binary?)"""
    framed = st.builds(lambda obj, ascii_only, binary: ("object", serialize(obj, ascii_only),
                                                        binary),
                       objects(rooms), st.booleans(), st.sampled_from([False] * 7 + [True]))
    truncated = st.builds(lambda obj, cut: ("truncated", serialize(obj, True)[:cut], False),
                          objects(rooms), st.integers(0, 60))
    raw_text = st.builds(lambda t: ("text", t.encode("utf-8", "surrogatepass"), False),
                         st.one_of(st.text(max_size=80), st.sampled_from(
                             ["", "null", "[]", "{}", "1", '"ping"', "true", '{"type":null}',
                              '{"type":"ping"', "{'type':'ping'}", '{"type":"ping",}',
                              '{"type":"ping"}{"type":"ping"}', "\ufeff{\"type\":\"ping\"}",
                              '{"type":"ping","id":"a","id":"b"}', "NaN", "-Infinity",
                              "1" * 5000, "[" + "1," * 20000 + "1]"])))
    nested = st.builds(lambda t: ("nested", t.encode(), False),
                       st.one_of(deep_values(), deep("{\"type\":\"ping\",\"x\":[", "]}")))
    binary = st.builds(lambda b: ("binary", b, True),
                       st.one_of(st.binary(max_size=100), st.just(b'{"type":"ping"}')))
    return weighted((12, framed), (1, truncated), (1, raw_text), (1, nested), (1, binary))


def readable_id(payload: bytes) -> str | None:
    """The request id a strict JSON reader finds in the frame, if any (the server must
    echo it in an error). Near the decoder's nesting limit (Python's recursion limit,
    less the depth of the server's own call stack) whether it can be read depends on the
    caller's stack, so such frames are not judged."""
    if nesting(payload) > 500:
        return None
    try:
        obj = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 64 else None


# --- the runner ----------------------------------------------------------------------------

class Fuzzer:
    """Sends one payload per example on a long-lived connection, fences it with a ping,
    and checks what came back in between."""

    def __init__(self, http: aiohttp.ClientSession, ws_url: str, user: User, own: str) -> None:
        self.http, self.ws_url, self.user, self.own = http, ws_url, user, own
        self.ws: Ws | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.fence = 0

    async def ensure(self) -> Ws:
        if self.ws is None or self.ws.closed_code is not None:
            if self.ws is not None:
                self.stats["reconnects"] += 1
            self.ws = await connect(self.http, self.ws_url, self.user)
        return self.ws

    async def close(self) -> None:
        if self.ws is not None and self.ws.closed_code is None:
            await self.ws.close()

    def fail(self, what: str, payload: bytes, detail: Any) -> None:
        exc = self.ws.ws.exception() if self.ws is not None else None
        self.failures.append(f"{what}: {detail!r} for {len(payload)} bytes {payload[:120]!r}"
                             f" (client: {exc!r})")

    async def one(self, kind: str, payload: bytes, binary: bool) -> None:
        ws = await self.ensure()
        self.stats[f"kind:{kind}"] += 1
        start = len(ws.frames)
        self.fence += 1
        fence = f"fence-{self.fence}"
        over = len(payload) > MAX_FRAME_BYTES
        try:
            await ws.ws.send_frame(payload, aiohttp.WSMsgType.BINARY if binary
                                   else aiohttp.WSMsgType.TEXT)
            if over:
                # No fence: the server closes at once, and a client still writing may
                # be reset by TCP before it reads the close frame.
                await ws.wait_closed(timeout=15)
            else:
                await ws.send({"type": "ping", "id": fence})
                await ws.wait_for(lambda f: f.get("id") == fence, timeout=15)
        except (AssertionError, ConnectionError):  # closed meanwhile
            await ws.wait_closed(timeout=15)
        replies = ws.frames[start:]
        code = ws.closed_code
        reset = isinstance(ws.ws.exception(), ConnectionResetError)
        if over and code == CLOSE_ABNORMAL and reset:
            # The server closed (1009) while we were still writing the frame: its TCP
            # stack resets the connection, which may discard the close frame in flight.
            self.stats["close:1009 (reset while sending)"] += 1
        elif code is not None:
            self.stats[f"close:{code}"] += 1
            if code != (CLOSE_TOO_BIG if over else CLOSE_POLICY):
                self.fail(f"closed with {code}", payload, replies)
        elif over:
            self.fail("an over-size frame did not close 1009", payload, replies)
        rid = None if binary else readable_id(payload)  # a binary frame is not read at all
        answers = [f for f in replies if f.get("type") in ("error", "ack", "pong", "history")
                   and f.get("id") != fence]
        if len(answers) > 1:
            self.fail("more than one answer", payload, answers)
        for frame in replies:
            self.check_frame(frame, rid, payload)
        for frame in answers:
            self.stats[f"reply:{frame['type']}:{frame.get('code', '')}"] += 1

    def check_frame(self, frame: dict[str, Any], rid: str | None, payload: bytes) -> None:
        kind = frame.get("type")
        if kind == "error":
            if frame.get("code") not in KNOWN_CODES:
                self.fail("undocumented or server-side error code", payload, frame)
            if not set(frame) <= ERROR_KEYS or not isinstance(frame.get("message"), str):
                self.fail("error frame shape", payload, frame)
            if rid is not None and frame.get("id") != rid:
                self.fail("error does not echo the request id", payload, frame)
        elif kind in ("ack", "history", "message", "receipt"):
            if frame.get("room_id") != self.own:  # the fuzzer is a member of its room only
                self.fail(f"{kind} of a room that is not the fuzzer's", payload, frame)
        elif kind != "pong":
            self.fail("unexpected frame", payload, frame)


async def test_fuzzed_frames_after_hello(valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=ENV)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        api = Api(http, node.url)
        fuzzer_user = await api.register()
        own = await api.group(fuzzer_user, [], name="fuzz")
        bystanders = await stack.enter_async_context(Bystanders(http, node))
        rooms = [own, own, own, bystanders.room, secrets.token_urlsafe(20), "x", "{0}",
                 f"{bystanders.room}:members", bystanders.room.swapcase()]
        fuzzer = Fuzzer(http, node.ws_url, fuzzer_user, own)
        started = time.monotonic()

        @fuzz_settings()
        @given(example=payloads(rooms))
        def check(example: tuple[str, bytes, bool]) -> None:
            on_loop(loop, fuzzer.one(*example))
            bystanders.check_running()
            assert node.running, node.log_tail()

        try:
            await run_given(check)
        finally:
            await fuzzer.close()
        elapsed = time.monotonic() - started
        assert not fuzzer.failures, "\n".join(fuzzer.failures[:20])
        chat = await bystanders.stop()
        # Nothing of the fuzzer reached the bystanders' room: messages, receipts.
        status, page = await api.call("GET", f"/api/v1/rooms/{bystanders.room}/messages"
                                      "?limit=200", user=bystanders.users[0])
        assert status == 200
        assert {m["sender_id"] for m in page["messages"]} <= {u.user_id for u in
                                                               bystanders.users}
        status, receipts = await api.call("GET", f"/api/v1/rooms/{bystanders.room}/receipts",
                                          user=bystanders.users[0])
        assert {r["user_id"] for r in receipts["receipts"]} == {u.user_id for u in
                                                                bystanders.users}
        for ws in bystanders.conns:
            assert not [f for f in ws.frames if fuzzer_user.user_id in json.dumps(f)]
    assert node.running
    assert_log_clean(node)
    stats = fuzzer.stats
    summary("fuzz ws after hello", examples=sum(v for k, v in stats.items()
                                                if k.startswith("kind:")),
            seconds=round(elapsed, 1), reconnects=stats["reconnects"],
            closes={k[6:]: v for k, v in stats.items() if k.startswith("close:")},
            replies={k[6:]: v for k, v in sorted(stats.items()) if k.startswith("reply:")},
            bystanders=chat)


def hellos(token: str, rooms: list[str]) -> st.SearchStrategy[tuple[str, bytes, bool]]:
    """First frames: hellos with the user's token, a damaged one or none, and a resume map
    naming the user's room, a foreign one or garbage; and anything else."""
    tokens = weighted(
        (6, st.just(token)),
        (1, st.builds(lambda i, c: token[:i] + c + token[i + 1:],
                      st.integers(0, len(token) - 1), st.sampled_from("A_-.0\x00\u00e9"))),
        (1, st.builds(lambda n: token[:n], st.integers(0, len(token)))),
        (1, st.builds(lambda x: token + x, st.text(min_size=1, max_size=5))))
    resume = st.one_of(
        plausible("resume", rooms),
        st.builds(lambda n: {f"r{i}": i for i in range(n)}, st.sampled_from([100, 3000])))
    hello = shaped(rooms, ["hello"], {"token": tokens, "resume": resume})
    as_hello = st.builds(lambda obj, ascii_only: ("hello", serialize(obj, ascii_only), False),
                         hello, st.booleans())
    return weighted((3, as_hello), (1, payloads(rooms)))


async def test_fuzzed_first_frames(valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=ENV)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        api = Api(http, node.url)
        user = await api.register()
        own = await api.group(user, [], name="resumable")
        writer = await connect(http, node.ws_url, user)
        for k in range(3):
            assert (await writer.send_message(own, f"own {k}"))["seq"] == k + 1
        await writer.close()
        bystanders = await stack.enter_async_context(Bystanders(http, node))
        rooms = [own, own, bystanders.room, secrets.token_urlsafe(20), "{0}"]
        async with valkey.client(decode_responses=True) as r:
            signer = URLSafeTimedSerializer(await r.hget(keys.META, "secret"), salt=TOKEN_SALT)

        def genuine(token: Any) -> bool:
            """Signed by the node for this session (base64 ignores the unused low bits of a
            last character, so a token may differ from `user.token` and still be this one)."""
            try:
                return bool(signer.loads(token) == [user.user_id, user.session_id])
            except (BadData, TypeError, ValueError, AttributeError):
                return False

        stats: collections.Counter[str] = collections.Counter()
        failures: list[str] = []

        async def one(kind: str, payload: bytes, binary: bool) -> None:
            ws = Ws(await http.ws_connect(node.ws_url))
            ws.start()
            await ws.ws.send_frame(payload, aiohttp.WSMsgType.BINARY if binary
                                   else aiohttp.WSMsgType.TEXT)
            try:
                welcome = await ws.wait_type("welcome", timeout=15)
            except AssertionError:  # closed
                code = ws.closed_code
                over = len(payload) > MAX_FRAME_BYTES
                if over and code == CLOSE_ABNORMAL and isinstance(ws.ws.exception(),
                                                                  ConnectionResetError):
                    stats["close:1009 (reset while sending)"] += 1  # see Fuzzer.one
                    return
                stats[f"close:{code}"] += 1
                if code != (CLOSE_TOO_BIG if over else CLOSE_UNAUTHORIZED):
                    failures.append(f"closed {code} for {payload[:200]!r}: {ws.frames}")
                if any(f.get("type") != "error" or f.get("code") != "unauthorized"
                       for f in ws.frames):
                    failures.append(f"before the close: {ws.frames} for {payload[:200]!r}")
                return
            stats["welcome"] += 1
            # Lenient on purpose: the server skips unknown fields without checking them,
            # so invalid UTF-8 inside one does not make a hello invalid.
            obj = json.loads(payload.decode("utf-8", "surrogatepass"))
            if obj.get("type") != "hello" or not genuine(obj.get("token")):
                failures.append(f"welcomed with {payload[:200]!r}")
            if [r["room_id"] for r in welcome["rooms"]] != [own]:
                failures.append(f"welcome rooms {welcome['rooms']}")
            resume = obj.get("resume") or {}
            if own in resume:
                stats["resumed"] += 1
                want = list(range(resume[own] + 1, 4))
                if want:
                    await ws.wait_messages(own, len(want), timeout=10)
                if [m["seq"] for m in ws.messages(own)] != want:
                    failures.append(f"resume {resume}: {ws.messages(own)}")
            await ws.send({"type": "ping", "id": "after"})
            await ws.wait_for(lambda f: f.get("id") == "after")
            if [f for f in ws.frames if f.get("room_id") not in (None, own)]:
                failures.append(f"frames of another room: {ws.frames}")
            await ws.close()

        started = time.monotonic()

        @fuzz_settings()
        @given(example=hellos(user.token, rooms))
        def check(example: tuple[str, bytes, bool]) -> None:
            on_loop(loop, one(*example))
            bystanders.check_running()
            assert node.running, node.log_tail()

        await run_given(check)
        elapsed = time.monotonic() - started
        assert not failures, "\n".join(failures[:20])
        assert stats["welcome"] > 10 and stats[f"close:{CLOSE_UNAUTHORIZED}"] > 10, stats
        chat = await bystanders.stop()
    assert_log_clean(node)
    summary("fuzz ws first frame", examples=sum(stats.values()) - stats["resumed"],
            seconds=round(elapsed, 1), outcomes=dict(stats), bystanders=chat)
