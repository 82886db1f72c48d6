"""Accounts, sessions and tokens over HTTP, in-process apps on a real Valkey.

The helpers and the `make_client` fixture here are shared with test_rooms.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from chatd import config, keys
from chatd.app import create_app
from chatd.auth import TOKEN_SALT
from tests.client import PASSWORD, User
from tests.harness import ValkeyProcess

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

CHEAP_AUTH = {"auth.argon2_memory_kib": 1024, "auth.argon2_time_cost": 1,
              "auth.argon2_parallelism": 1, "auth.login_burst": 100_000,
              "auth.login_rate_per_s": 100_000.0}


@pytest.fixture(name="make_client")
def make_client_fixture(valkey: ValkeyProcess, tmp_path: Path,
                        aiohttp_client: Any) -> MakeClient:
    """`await make_client(**{"section.key": value})`: an app on the test's Valkey.

    `valkey` comes first so that it is torn down after the apps that use it.
    """
    made = 0

    async def make(**overrides: Any) -> Client:
        nonlocal made
        made += 1
        flags = {"redis.url": valkey.url, "server.data_dir": str(tmp_path / f"node{made}"),
                 **CHEAP_AUTH, **overrides}
        client: Client = await aiohttp_client(create_app(config.load(None, {}, flags)))
        return client

    return make


@pytest.fixture(name="client")
async def client_fixture(make_client: MakeClient) -> Client:
    return await make_client()


async def call(client: Client, method: str, path: str, body: Any = None,
               token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
    """(status, decoded JSON body or None) of one API call."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = kwargs.pop("data", None)
    if body is not None:
        data = json.dumps(body)
    async with client.request(method, "/api/v1" + path, data=data, headers=headers,
                              **kwargs) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def new_user(client: Client, name: str, password: str = PASSWORD) -> User:
    status, body = await call(client, "POST", "/register",
                              {"username": name, "password": password})
    assert status == 201, body
    return await login(client, name, password)


async def login(client: Client, name: str, password: str = PASSWORD) -> User:
    status, body = await call(client, "POST", "/login", {"username": name, "password": password})
    assert status == 200, body
    return User(body["username"], body["user_id"], body["token"], body["session_id"])


def error_code(body: Any) -> str:
    return str(body["error"]["code"])


# --- register, login, me, users -------------------------------------------------------

async def test_register_login_me_and_lookup(client: Client) -> None:
    status, body = await call(client, "POST", "/register",
                              {"username": "Alice_1", "password": PASSWORD, "extra": True})
    assert status == 201
    assert body["username"] == "alice_1" and len(body["user_id"]) >= 22
    before = int(time.time() * 1000)
    status, session = await call(client, "POST", "/login",
                                 {"username": "ALICE_1", "password": PASSWORD})
    assert status == 200
    assert set(session) == {"token", "user_id", "username", "session_id", "expires_at"}
    assert (session["user_id"], session["username"]) == (body["user_id"], "alice_1")
    ttl_ms = 7 * 24 * 3600 * 1000
    assert before + ttl_ms - 5000 <= session["expires_at"] <= before + ttl_ms + 5000
    token = session["token"]
    assert await call(client, "GET", "/me", token=token) == (
        200, {"user_id": body["user_id"], "username": "alice_1"})
    assert await call(client, "GET", "/users?username=Alice_1", token=token) == (
        200, {"user_id": body["user_id"], "username": "alice_1"})
    status, missing = await call(client, "GET", "/users?username=nobody", token=token)
    assert (status, error_code(missing)) == (404, "not_found")
    status, no_param = await call(client, "GET", "/users", token=token)
    assert (status, error_code(no_param)) == (400, "bad_request")
    status, anonymous = await call(client, "GET", "/users?username=alice_1")
    assert (status, error_code(anonymous)) == (401, "unauthorized")


async def test_username_is_unique_case_insensitively(client: Client) -> None:
    assert (await call(client, "POST", "/register",
                       {"username": "Bob.X", "password": PASSWORD}))[0] == 201
    status, body = await call(client, "POST", "/register",
                              {"username": "bob.x", "password": "another password"})
    assert (status, error_code(body)) == (409, "conflict")


@pytest.mark.parametrize(("body", "data"), [
    ({"username": "ab", "password": PASSWORD}, None),
    ({"username": "a" * 33, "password": PASSWORD}, None),
    ({"username": "bad name", "password": PASSWORD}, None),
    ({"username": "ünïcode", "password": PASSWORD}, None),
    ({"username": 123, "password": PASSWORD}, None),
    ({"username": ["x"], "password": PASSWORD}, None),
    ({"password": PASSWORD}, None),
    ({"username": "carol", "password": "short"}, None),
    ({"username": "carol", "password": "x" * 1025}, None),
    ({"username": "carol", "password": 12345678}, None),
    ({"username": "carol"}, None),
    (None, "not json"),
    (None, "[1, 2]"),
    (None, ""),
    (None, b"\xff\xfe"),
])
async def test_register_rejects_bad_input(client: Client, body: Any, data: Any) -> None:
    status, reply = await call(client, "POST", "/register", body, data=data)
    assert status == 400, reply
    assert error_code(reply) == "bad_request" and reply["error"]["message"]


async def test_oversized_and_malformed_login_bodies(client: Client) -> None:
    big = json.dumps({"username": "carol", "password": "x" * 70_000})
    status, reply = await call(client, "POST", "/login", data=big)
    assert (status, error_code(reply)) == (413, "too_large")
    status, reply = await call(client, "POST", "/login", data="{")
    assert (status, error_code(reply)) == (400, "bad_request")
    status, reply = await call(client, "POST", "/login", {"username": "carol", "password": None})
    assert (status, error_code(reply)) == (400, "bad_request")


async def test_unknown_user_and_wrong_password_look_alike(client: Client,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    await new_user(client, "dave")
    checks: list[str] = []
    real_verify = argon2.PasswordHasher.verify

    def counting_verify(self: argon2.PasswordHasher, hash: str | bytes,
                        password: str | bytes) -> bool:
        checks.append(str(password))
        return real_verify(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting_verify)
    wrong = await call(client, "POST", "/login", {"username": "dave", "password": "wrong pass"})
    unknown = await call(client, "POST", "/login", {"username": "nobody", "password": "wrong"})
    invalid = await call(client, "POST", "/login", {"username": "x!", "password": "wrong"})
    assert wrong == unknown == invalid
    assert wrong[0] == 401 and error_code(wrong[1]) == "unauthorized"
    assert checks == ["wrong pass", "wrong", "wrong"]  # one argon2 check on every path


# --- tokens -------------------------------------------------------------------------

class OldSigner(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 8 * 24 * 3600


async def test_tampered_unsigned_and_expired_tokens(client: Client,
                                                    valkey: ValkeyProcess) -> None:
    user = await new_user(client, "erin")
    other = await new_user(client, "frank")
    async with valkey.client(decode_responses=True) as r:
        secret = await r.hget(keys.META, "secret")
    assert secret
    good = URLSafeTimedSerializer(secret, salt=TOKEN_SALT)
    assert good.loads(user.token) == [user.user_id, user.session_id]
    payload, _, signature = user.token.rpartition(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    bad_tokens = {
        "flipped signature": f"{payload}.{flipped}",
        "other payload": other.token.split(".")[0] + user.token[len(user.token.split(".")[0]):],
        "unsigned": payload,
        "wrong secret": URLSafeTimedSerializer("not-the-secret", salt=TOKEN_SALT).dumps(
            [user.user_id, user.session_id]),
        "wrong salt": URLSafeTimedSerializer(secret, salt="other").dumps(
            [user.user_id, user.session_id]),
        "expired": URLSafeTimedSerializer(secret, salt=TOKEN_SALT, signer=OldSigner).dumps(
            [user.user_id, user.session_id]),
        "no session": good.dumps([user.user_id, "no-such-session"]),
        "bad payload": good.dumps({"user": user.user_id}),
        "braces": good.dumps([user.user_id + "}", user.session_id]),
        "garbage": "!!!",
    }
    for name, token in bad_tokens.items():
        status, body = await call(client, "GET", "/me", token=token)
        assert (status, error_code(body)) == (401, "unauthorized"), name
    for header in ["", "Bearer", "Bearer ", f"Token {user.token}", user.token]:
        async with client.get("/api/v1/me", headers={"Authorization": header}) as resp:
            assert resp.status == 401, header
    async with client.get("/api/v1/me", headers={"authorization": f"bearer {user.token}"}) as resp:
        assert resp.status == 200


async def test_logout_revokes_only_that_session(client: Client, valkey: ValkeyProcess) -> None:
    first = await new_user(client, "gina")
    second = await login(client, "gina")
    async with valkey.client(decode_responses=True) as r:
        ttl_ms = await r.pttl(keys.session(first.user_id, first.session_id))
        assert 7 * 24 * 3600 * 1000 - 60_000 < ttl_ms <= 7 * 24 * 3600 * 1000  # expires by itself
        await r.hset(keys.user_nodes(first.user_id), "n-elsewhere", "1")
        assert await call(client, "POST", "/logout", token=first.token) == (204, None)
        notices = [f for _, f in await r.xrange(keys.control("n-elsewhere"))]
    assert notices == [{"k": "x", "u": first.user_id, "sid": first.session_id}]
    status, body = await call(client, "GET", "/me", token=first.token)
    assert (status, error_code(body)) == (401, "unauthorized")
    assert (await call(client, "POST", "/logout", token=first.token))[0] == 401
    assert (await call(client, "GET", "/me", token=second.token))[0] == 200


async def test_configured_secret_wins_over_the_stored_one(make_client: MakeClient) -> None:
    generated = await make_client()
    configured = await make_client(**{"auth.secret": "a configured secret, 32+ chars long!"})
    user = await new_user(generated, "hank")
    assert (await call(generated, "GET", "/me", token=user.token))[0] == 200
    assert (await call(configured, "GET", "/me", token=user.token))[0] == 401
    mine = await login(configured, "hank")
    assert URLSafeTimedSerializer("a configured secret, 32+ chars long!",
                                  salt=TOKEN_SALT).loads(mine.token)[0] == user.user_id
    assert (await call(configured, "GET", "/me", token=mine.token))[0] == 200
    assert (await call(generated, "GET", "/me", token=mine.token))[0] == 401


async def test_password_is_rehashed_when_parameters_change(make_client: MakeClient,
                                                           valkey: ValkeyProcess) -> None:
    old = await make_client()
    user = await new_user(old, "ivan")
    new = await make_client(**{"auth.argon2_time_cost": 2})
    async with valkey.client(decode_responses=True) as r:
        assert "$m=1024,t=1,p=1$" in await r.hget(keys.user(user.user_id), "pw")
        await login(new, "ivan")
        assert "$m=1024,t=2,p=1$" in await r.hget(keys.user(user.user_id), "pw")
    await login(old, "ivan")  # the new hash still verifies with any parameters


# --- throttling -----------------------------------------------------------------------

@pytest.fixture
async def session_from() -> AsyncIterator[Callable[[str], aiohttp.ClientSession]]:
    """Client sessions whose connections come from a given loopback address."""
    sessions: list[aiohttp.ClientSession] = []

    def make(ip: str) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)))
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()


async def test_login_and_register_are_throttled_per_ip_and_per_username(
        make_client: MakeClient,
        session_from: Callable[[str], aiohttp.ClientSession]) -> None:
    client = await make_client(**{"auth.login_burst": 4, "auth.login_rate_per_s": 0.01})

    async def attempt(ip: str, path: str, username: str,
                      password: str = "wrong password") -> tuple[int, Any, str | None]:
        async with session_from(ip).post(client.make_url("/api/v1" + path), json={
                "username": username, "password": password}) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")

    assert (await attempt("127.0.0.3", "/register", "judy", PASSWORD))[0] == 201  # judy: 3 left
    for _ in range(3):
        assert (await attempt("127.0.0.1", "/login", "judy"))[0] == 401  # .1: 1 left; judy: 0
    status, body, retry_after = await attempt("127.0.0.1", "/login", "judy")
    assert (status, error_code(body)) == (429, "rate_limited")
    assert retry_after is not None and int(retry_after) >= 1
    assert body["error"]["retry_after_ms"] > 0
    assert (await attempt("127.0.0.2", "/login", "judy"))[0] == 429  # the name's bucket
    assert (await attempt("127.0.0.1", "/login", "kate"))[0] == 429  # the address's bucket
    assert (await attempt("127.0.0.1", "/register", "kate"))[0] == 429
    assert (await attempt("127.0.0.2", "/login", "kate"))[0] == 401  # neither exhausted
