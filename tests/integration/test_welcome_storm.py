"""A reconnect storm: hundreds of hellos at once on one node are welcomed in turns
(`limits.welcomes_at_once`) instead of all waiting for Redis connections together and
failing on the pool's timeout (close 1011); and no client can hold a turn. In-process
app, real Valkey."""

from __future__ import annotations

import asyncio
import json

from aiohttp import WSMsgType

from tests.integration.test_accounts import (  # noqa: F401 (the fixtures are used by name)
    Client,
    MakeClient,
    make_client_fixture,
    new_user,
)

HELLOS = 400


async def hello(client: Client, token: str) -> str:
    """The type of the first frame the node answers a hello with, or the close code."""
    ws = await client.ws_connect("/ws")
    try:
        await ws.send_str(json.dumps({"type": "hello", "token": token}))
        msg = await asyncio.wait_for(ws.receive(), 30)
        if msg.type == WSMsgType.TEXT:
            return str(json.loads(msg.data)["type"])
        return f"closed {ws.close_code}"
    finally:
        await ws.close()


async def test_hellos_at_once_on_a_small_redis_pool_are_all_welcomed(
        make_client: MakeClient) -> None:
    # Two pooled Redis connections, waited for at most 0.25 s: a few hundred hellos
    # taken all at once would queue for them far longer than that.
    client = await make_client(**{"limits.welcomes_at_once": 2,
                                  "limits.max_connections_per_user": HELLOS,
                                  "redis.max_connections": 2,
                                  "redis.socket_timeout_s": 0.25})
    user = await new_user(client, "storm")
    answers = await asyncio.gather(*(hello(client, user.token) for _ in range(HELLOS)))
    assert answers == ["welcome"] * HELLOS


async def test_a_refused_client_that_never_answers_the_close_holds_up_no_welcome(
        make_client: MakeClient) -> None:
    client = await make_client(**{"limits.welcomes_at_once": 1})
    user = await new_user(client, "patient")
    # A bad token, and no reply to the node's close: the node waits up to 10 s for one.
    rude = await client.ws_connect("/ws", autoclose=False)
    try:
        await rude.send_str(json.dumps({"type": "hello", "token": "not-a-token"}))
        refused = await asyncio.wait_for(rude.receive(), 10)
        assert json.loads(refused.data)["code"] == "unauthorized"
        # The node is now waiting for the rude client's close reply; the next hello
        # must not wait behind it for a turn.
        assert await asyncio.wait_for(hello(client, user.token), 5) == "welcome"
        closing = await asyncio.wait_for(rude.receive(), 10)
        assert closing.type == WSMsgType.CLOSE
        assert closing.data == 4001
    finally:
        await rude.close()
