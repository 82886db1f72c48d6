"""Logout revokes a session on every node (PROTOCOL.md s2 POST /logout, s3 close 4001)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from chatd import keys
from tests.client import FAST_ENV, Api, connect
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes, ValkeyProcess


async def test_logout_on_one_node_closes_the_session_everywhere(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    a, b, c = await chatd_nodes.start(3, **redis_backend.chatd_args, env=FAST_ENV)
    async with aiohttp.ClientSession() as http:
        api_a = Api(http, a.url)
        (bob, alice), room = await api_a.group_of(2)
        alice2 = await Api(http, b.url).login(alice.username)  # a second session (device)

        revoked_b = await connect(http, b.ws_url, alice)
        revoked_c = await connect(http, c.ws_url, alice)
        revoked_c2 = await connect(http, c.ws_url, alice)
        other_session_c = await connect(http, c.ws_url, alice2)
        other_session_b = await connect(http, b.ws_url, alice2)
        bob_a = await connect(http, a.ws_url, bob)
        assert {w.of_type("welcome")[0]["session_id"] for w in (revoked_b, revoked_c)} == {
            alice.session_id}

        codes, elapsed = await api_a.logout(alice, revoked_b, revoked_c, revoked_c2)
        assert codes == [4001, 4001, 4001], codes
        assert elapsed < 2.0, f"closed after {elapsed:.2f}s"

        # The other session is untouched: it still receives and sends, on both nodes.
        ack = await bob_a.send_message(room, "still there?")
        assert ack["type"] == "ack"
        for ws in (other_session_b, other_session_c):
            assert (await ws.wait_messages(room, 1))[0]["body"] == "still there?"
        reply = await other_session_b.send_message(room, "yes")
        assert reply["type"] == "ack" and reply["seq"] == 2, reply
        for ws in (other_session_b, other_session_c, bob_a):
            assert [m["body"] for m in await ws.wait_messages(room, 2)] == ["still there?", "yes"]

        # The revoked token is refused everywhere: HTTP 401 and WebSocket 4001.
        for node in (a, b, c):
            api = Api(http, node.url)
            status, body = await api.call("GET", "/api/v1/me", user=alice)
            assert status == 401 and body["error"]["code"] == "unauthorized", (node, body)
            status, _ = await api.call("GET", "/api/v1/rooms", user=alice)
            assert status == 401
            ws = await connect(http, node.ws_url, alice, hello=False)
            await ws.send({"type": "hello", "token": alice.token})
            assert await ws.wait_closed() == 4001
            assert all(f.get("type") == "error" and f["code"] == "unauthorized"
                       for f in ws.frames), ws.frames
            # ... also when the token comes in the upgrade request's header.
            raw = await http.ws_connect(node.ws_url, headers=alice.headers)
            await raw.send_json({"type": "hello"})
            async for _ in raw:
                pass
            assert raw.close_code == 4001
            # The other session is still accepted by every node.
            status, me = await api.call("GET", "/api/v1/me", user=alice2)
            assert status == 200 and me["user_id"] == alice.user_id

        await asyncio.sleep(0.5)
        for ws in (other_session_b, other_session_c, bob_a):
            assert ws.closed_code is None
            await ws.close()


async def test_logout_racing_a_hello_still_closes_the_new_connection(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    """DESIGN.md: "a node registers in the user's node set before it reads that truth at
    hello, so a connection either sees the new truth or is on a node that gets the notice".

    `CLIENT PAUSE WRITE` holds the hello at its first write while a logout (its two steps,
    as auth.logout does them: delete the session, then notify every node in the user's
    node set) is queued behind it; both then run in arrival order."""
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=FAST_ENV)
    admin, logout = valkey.client(decode_responses=True), valkey.client(decode_responses=True)
    try:
        async with aiohttp.ClientSession() as http:
            alice = await Api(http, node.url).register()
            await admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
            try:
                ws = await connect(http, node.ws_url, alice, hello=False)
                await ws.send({"type": "hello", "token": alice.token})
                await asyncio.sleep(0.3)  # the hello now waits at its first write

                async def revoke() -> list[str]:
                    async with logout.pipeline(transaction=True) as pipe:
                        pipe.delete(keys.session(alice.user_id, alice.session_id))
                        pipe.hkeys(keys.user_nodes(alice.user_id))
                        _, targets = await pipe.execute()
                    return list(targets)

                revoking = asyncio.create_task(revoke())
                await asyncio.sleep(0.2)
            finally:
                await admin.execute_command("CLIENT", "UNPAUSE")
            for target in await revoking:
                await logout.xadd(keys.control(target),
                                  {"k": "x", "u": alice.user_id, "sid": alice.session_id})
            assert not await logout.exists(keys.session(alice.user_id, alice.session_id))
            # Either the hello saw the revoked session, or its node got the notice.
            with contextlib.suppress(TimeoutError):
                await ws.wait_closed(timeout=3)
            assert ws.closed_code == 4001, f"revoked session still connected: {ws.frames}"
    finally:
        await admin.aclose()
        await logout.aclose()
