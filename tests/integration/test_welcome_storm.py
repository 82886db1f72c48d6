"""A reconnect storm: hundreds of hellos at once on one node are welcomed in turns
(`limits.welcomes_at_once`) instead of all asking for Redis connections together and
failing (close 1011) where a connect's commands use redis-py's pools (a cluster); and no
client can hold a turn. A real chatd process on a real Valkey or Valkey Cluster."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.client import FAST_ENV, Chat
from tests.conftest import ChatdNodes, OneNode
from tests.harness import ValkeyCluster

HELLOS = 400


async def hello(http: aiohttp.ClientSession, ws_url: str, token: str) -> str:
    """The type of the first frame the node answers a hello with, or the close code."""
    ws = await http.ws_connect(ws_url)
    try:
        await ws.send_str(json.dumps({"type": "hello", "token": token}))
        msg = await asyncio.wait_for(ws.receive(), 30)
        if msg.type == WSMsgType.TEXT:
            return str(json.loads(msg.data)["type"])
        return f"closed {ws.close_code}"
    finally:
        await ws.close()


@pytest.mark.cluster
async def test_hellos_at_once_on_a_cluster_are_all_welcomed(
        valkey_cluster: ValkeyCluster, chatd_nodes: ChatdNodes) -> None:
    # On a cluster a connect's commands use redis-py's pools, here 16 connections per
    # master, and a command finding them all in use fails at once: a few hundred hellos
    # taken all together would be closed with 1011.
    (node,) = await chatd_nodes.start(1, redis_cluster=valkey_cluster, env={
        **FAST_ENV, "CHATD_LIMITS__WELCOMES_AT_ONCE": "2",
        "CHATD_LIMITS__MAX_CONNECTIONS_PER_USER": str(HELLOS),
        "CHATD_REDIS__MAX_CONNECTIONS": "16"})
    async with Chat(node) as chat:
        user = await chat.api.register()
        # No cap on the client's side: every hello is in flight at once.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            answers = await asyncio.gather(*(hello(http, node.ws_url, user.token)
                                             for _ in range(HELLOS)))
    assert answers == ["welcome"] * HELLOS


async def test_a_refused_client_that_never_answers_the_close_holds_up_no_welcome(
        one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__WELCOMES_AT_ONCE": "1"}) as chat:
        user = await chat.api.register()
        # A bad token, and no reply to the node's close: the node waits up to 10 s for one.
        rude = await chat.http.ws_connect(chat.node.ws_url, autoclose=False)
        try:
            await rude.send_str(json.dumps({"type": "hello", "token": "not-a-token"}))
            refused = await asyncio.wait_for(rude.receive(), 10)
            assert json.loads(refused.data)["code"] == "unauthorized"
            # The node is now waiting for the rude client's close reply; the next hello
            # must not wait behind it for a turn.
            welcome = await asyncio.wait_for(hello(chat.http, chat.node.ws_url, user.token), 5)
            assert welcome == "welcome"
            closing = await asyncio.wait_for(rude.receive(), 10)
            assert closing.type == WSMsgType.CLOSE
            assert closing.data == 4001
        finally:
            await rude.close()
