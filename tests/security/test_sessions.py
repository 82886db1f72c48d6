"""Sessions and tokens across real nodes (issue 7, part 3; PROTOCOL.md s2 "missing,
malformed, expired or revoked token -> 401", s3 "-> 4001", POST /logout "closed with 4001
within 2 s").

What tests/integration/test_ws_protocol.py (expired, tampered, revoked, garbage tokens at
`hello`), tests/integration/test_accounts.py (the same over HTTP, in-process) and
tests/multinode/test_sessions.py (logout closes every node's connections within 2 s)
already cover is not repeated. Here:

* nodes configured with `CHATD_AUTH__SECRET` next to a node that generated its secret,
  on the same Redis: each refuses the other's tokens (the session record exists in the
  shared Redis, so only the signature can be what is refused), at `hello`, in the upgrade
  header, and over HTTP; an expired or payload-swapped token signed with the configured
  secret too;
* a session whose Redis record expired: refused at once everywhere;
* a session that expires while connected: the connection is closed with 4001 by the next
  heartbeat sweep, another session of the same user stays open;
* logout on one configured node closes, within 2 s, that session's connections on the
  other configured node, also one authenticated by the upgrade's `Authorization` header,
  and leaves another session of the same user (on the generated-secret node) alone.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from chatd import keys
from chatd.auth import TOKEN_SALT
from tests.client import Api, User, Ws, connect, connect_all
from tests.harness import ChatdNode, ChatdNodes, ValkeyProcess
from tests.security.support import (
    BASE_ENV,
    CLOSE_UNAUTHORIZED,
    assert_log_clean,
    summary,
)

SECRET = "a configured secret for the security suite, 40+ characters"


class OldSigner(TimestampSigner):
    """Signs as if eight days ago: past the default 7-day session TTL."""

    def get_timestamp(self) -> int:
        return int(time.time()) - 8 * 24 * 3600


async def refused_at_hello(http: aiohttp.ClientSession, node: ChatdNode, token: str) -> None:
    """The token in `hello`, then in the upgrade header: `unauthorized`, then 4001."""
    ws = Ws(await http.ws_connect(node.ws_url))
    ws.start()
    await ws.send({"type": "hello", "id": "h", "token": token})
    assert await ws.wait_closed() == CLOSE_UNAUTHORIZED, ws.frames
    assert [(f["type"], f["code"], f.get("id")) for f in ws.frames] == [
        ("error", "unauthorized", "h")], ws.frames
    ws = Ws(await http.ws_connect(node.ws_url, headers={"Authorization": f"Bearer {token}"}))
    ws.start()
    await ws.send({"type": "hello"})
    assert await ws.wait_closed() == CLOSE_UNAUTHORIZED, ws.frames
    assert not ws.of_type("welcome")


async def refused_over_http(api: Api, token: str) -> None:
    for method, path in (("GET", "/api/v1/me"), ("GET", "/api/v1/rooms"),
                         ("POST", "/api/v1/logout")):
        status, body = await api.call(method, path,
                                      headers={"Authorization": f"Bearer {token}"})
        assert (status, body["error"]["code"]) == (401, "unauthorized"), (method, path, body)


async def accepted(http: aiohttp.ClientSession, node: ChatdNode, user: User) -> None:
    status, me = await Api(http, node.url).call("GET", "/api/v1/me", user=user)
    assert status == 200 and me["user_id"] == user.user_id
    ws = await connect(http, node.ws_url, user)
    await ws.close()


async def test_tokens_of_another_secret_expired_or_swapped_are_refused(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (generated,) = await chatd_nodes.start(1, redis_url=valkey, env=BASE_ENV)
    (configured,) = await chatd_nodes.start(1, redis_url=valkey,
                                            env={**BASE_ENV, "CHATD_AUTH__SECRET": SECRET})
    async with aiohttp.ClientSession() as http:
        api_g, api_c = Api(http, generated.url), Api(http, configured.url)
        alice = await api_g.register()
        bob = await api_g.register()
        alice_g = await api_g.login(alice.username)  # signed with the generated secret
        alice_c = await api_c.login(alice.username)  # signed with SECRET
        bob_c = await api_c.login(bob.username)
        for user, node in ((alice_g, generated), (alice_c, configured)):
            await accepted(http, node, user)
        async with valkey.client(decode_responses=True) as r:
            stored = await r.hget(keys.META, "secret")
            # Both sessions exist in the shared Redis: only the signature can be refused.
            for user in (alice_g, alice_c):
                assert await r.exists(keys.session(user.user_id, user.session_id))
        assert stored and stored != SECRET

        configured_signer = URLSafeTimedSerializer(SECRET, salt=TOKEN_SALT)
        expired = URLSafeTimedSerializer(SECRET, salt=TOKEN_SALT, signer=OldSigner).dumps(
            [alice_c.user_id, alice_c.session_id])
        rest = alice_c.token.partition(".")[2]  # timestamp and signature
        cases: dict[str, tuple[ChatdNode, Api, str]] = {
            "generated-secret token at the configured node": (configured, api_c, alice_g.token),
            "configured-secret token at the generated node": (generated, api_g, alice_c.token),
            "expired, signed with the configured secret": (configured, api_c, expired),
            "bob's payload with alice's signature": (configured, api_c,
                                                     bob_c.token.partition(".")[0] + "." + rest),
            "signed with the configured secret for a session that does not exist": (
                configured, api_c, configured_signer.dumps([alice_c.user_id, "x" * 22])),
            "alice's session id under bob's user id": (configured, api_c, configured_signer.dumps(
                [bob_c.user_id, alice_c.session_id])),
        }
        assert configured_signer.loads(alice_c.token) == [alice_c.user_id, alice_c.session_id]
        for label, (node, api, token) in cases.items():
            try:
                await refused_at_hello(http, node, token)
                await refused_over_http(api, token)
            except AssertionError as e:
                raise AssertionError(label) from e
        # None of that was a logout: both genuine sessions still work on their own node.
        for user, node in ((alice_g, generated), (alice_c, configured)):
            await accepted(http, node, user)
    for node in (generated, configured):
        assert_log_clean(node)
        assert SECRET not in node.log_text()
    summary("sessions: foreign secret, expired, swapped", refused_cases=len(cases),
            ways_each="hello token, upgrade header, 3 HTTP calls")


async def test_expired_session_record_is_refused_everywhere(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    a, b = await chatd_nodes.start(2, redis_url=valkey, env=BASE_ENV)
    async with aiohttp.ClientSession() as http:
        user = await Api(http, a.url).register()
        await accepted(http, b, user)
        async with valkey.client() as r:  # what the session's TTL does after 7 days
            assert await r.pexpire(keys.session(user.user_id, user.session_id), 1)
        await asyncio.sleep(0.05)
        for node in (a, b):
            await refused_at_hello(http, node, user.token)
            await refused_over_http(Api(http, node.url), user.token)
    for node in (a, b):
        assert_log_clean(node)
    summary("sessions: expired session record", nodes=2, refused_ways=5)


async def test_an_open_connection_is_closed_when_its_session_expires(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    """The heartbeat sweep (4 per `heartbeat_s`, 0.5 s apart here) closes a connection with
    4001 once its session's `expires_at` has passed; another session of the user stays."""
    heartbeat_s = 2.0
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env={
        **BASE_ENV, "CHATD_LIMITS__HEARTBEAT_S": str(heartbeat_s)})
    async with aiohttp.ClientSession() as http:
        api = Api(http, node.url)
        (alice, _bob), room = await api.group_of(2)
        other_session = await api.login(alice.username)
        async with valkey.client() as r:  # the session as it is 1.5 s before its 7 days end
            ends_ms = int(time.time() * 1000) + 1500
            key = keys.session(alice.user_id, alice.session_id)
            await r.hset(key, "expires_at", ends_ms)
            assert await r.pexpireat(key, ends_ms)
        expiring, staying = await connect_all(http, (node, alice), (node, other_session))
        assert (await expiring.send_message(room, "before the end"))["type"] == "ack"

        code = await expiring.wait_closed(timeout=5.0)
        late_s = time.time() - ends_ms / 1000
        assert code == CLOSE_UNAUTHORIZED, expiring.frames
        # The first sweep after the end closes it: one sweep interval, plus the handshake.
        assert 0 <= late_s < heartbeat_s / 4 + 0.5, f"closed {late_s:.2f}s after the end"
        await refused_at_hello(http, node, alice.token)
        ack = await staying.send_message(room, "the other session")
        assert ack["type"] == "ack" and staying.closed_code is None
        await staying.close()
    assert_log_clean(node)
    summary("sessions: expiry closes open connections", seconds_after_expiry=round(late_s, 3),
            sweep_interval_s=heartbeat_s / 4)


async def test_logout_closes_the_session_on_another_configured_node_within_2s(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    env = {**BASE_ENV, "CHATD_AUTH__SECRET": SECRET}
    one, two = await chatd_nodes.start(2, redis_url=valkey, env=env)
    (generated,) = await chatd_nodes.start(1, redis_url=valkey, env=BASE_ENV)
    async with aiohttp.ClientSession() as http:
        api_one = Api(http, one.url)
        alice, bob = await api_one.register(), await api_one.register()
        room = await api_one.direct(alice, bob)
        other_session = await Api(http, generated.url).login(alice.username)

        by_hello = await connect(http, two.ws_url, alice)
        by_header = Ws(await http.ws_connect(two.ws_url, headers=alice.headers))
        by_header.start()
        await by_header.send({"type": "hello"})
        await by_header.wait_type("welcome")
        same_node = await connect(http, one.ws_url, alice)
        untouched = await connect(http, generated.ws_url, other_session)
        bob_ws = await connect(http, two.ws_url, bob)

        codes, elapsed = await api_one.logout(alice, by_hello, by_header, same_node)
        assert codes == [CLOSE_UNAUTHORIZED] * 3, codes
        assert elapsed < 2.0, f"closed after {elapsed:.2f}s"
        for node in (one, two, generated):
            await refused_over_http(Api(http, node.url), alice.token)
        await refused_at_hello(http, two, alice.token)

        # The other session (another secret, another node) and bob are unaffected.
        ack = await bob_ws.send_message(room, "still here?")
        assert ack["type"] == "ack"
        got: list[dict[str, Any]] = await untouched.wait_messages(room, 1)
        assert got[0]["body"] == "still here?"
        assert untouched.closed_code is None
        for ws in (untouched, bob_ws):
            await ws.close()
    for node in (one, two, generated):
        assert_log_clean(node)
    summary("sessions: logout on another configured node", closed=3,
            seconds_to_close=round(elapsed, 3), limit_s=2.0)
