"""A node at its connection cap refuses the next WebSocket with 503 before the upgrade,
and keeps the files it needs for everything else: /healthz, /metrics and the WebSockets
it holds go on. A real chatd process whose open-files limit is lowered to 400."""

from __future__ import annotations

import asyncio
import shutil
import sys

import aiohttp
import pytest

from tests.client import FAST_ENV, Chat, connect
from tests.conftest import ChatdNodes
from tests.harness import ValkeyProcess

FILES = 400
CAP = FILES - FILES // 4  # chatd.capacity: at least 256 kept back, at most a quarter


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) not found")
async def test_a_node_at_its_cap_refuses_the_next_websocket_and_still_serves_the_rest(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(
        1, redis_url=valkey, env={**FAST_ENV, "CHATD_LIMITS__MAX_CONNECTIONS_PER_USER": "1000"},
        command=["prlimit", f"--nofile={FILES}:{FILES}", sys.executable, "-m", "chatd"])
    # No cap on the client's side: its default pool holds 100 connections.
    async with Chat(node) as chat, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as http:
        user = await chat.api.register()
        held = [await connect(http, node.ws_url, user) for _ in range(CAP)]
        # Past the cap, at once: each is answered 503 before it is a WebSocket.
        refusals = await asyncio.gather(*(http.get(node.ws_url.replace("ws", "http", 1),
                                                        headers={"Upgrade": "websocket",
                                                                 "Connection": "Upgrade",
                                                                 "Sec-WebSocket-Version": "13",
                                                                 "Sec-WebSocket-Key":
                                                                     "dGhlIHNhbXBsZSBub25jZQ=="})
                                          for _ in range(50)))
        for response in refusals:
            assert response.status == 503
            body = await response.json()
            assert body["error"]["code"] == "unavailable"
            response.release()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(node.ws_url)
        assert refused.value.status == 503
        async with chat.http.get(node.url + "/healthz") as r:
            assert r.status == 200
        async with chat.http.get(node.url + "/metrics") as r:
            text = await r.text()
        assert f"chatd_connections_max {CAP}.0" in text
        assert f"chatd_connections {CAP}.0" in text
        # The connections it holds still work, and a closed one frees its place.
        await held[0].send({"type": "ping", "id": "p"})
        await held[0].wait_type("pong")
        await held.pop().close()
        held.append(await connect(http, node.ws_url, user))
        for ws in held:
            await ws.close()
