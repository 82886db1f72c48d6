"""Connections waiting for `hello` are capped per client address on a node
(`limits.hello_waits_per_ip`): one more upgrade gets 429 `rate_limited` with Retry-After,
a connection leaves the count when its hello arrives or it closes, and other addresses
are not affected. One real node; the second address is 127.0.0.2."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.client import Ws, connect
from tests.conftest import OneNode

CAP = 3
AUTH_TIMEOUT_S = 30  # no connection leaves the count by timing out during the test


async def refused(http: aiohttp.ClientSession, ws_url: str) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
        await http.ws_connect(ws_url)
    assert refusal.value.status == 429


async def accepted_soon(http: aiohttp.ClientSession, ws_url: str) -> Ws:
    """A connection opened once the node has counted a departure (a client's close
    returns on the server's close frame, a moment before the handler moves on)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return Ws(await http.ws_connect(ws_url))
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 429 and time.monotonic() < deadline, e
            await asyncio.sleep(0.05)


async def test_connections_waiting_for_hello_are_capped_per_address(
        one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__HELLO_WAITS_PER_IP": str(CAP),
                              "CHATD_LIMITS__AUTH_TIMEOUT_S": str(AUTH_TIMEOUT_S)}) as chat:
        alice = await chat.api.register()
        ws_url = chat.node.ws_url
        async with aiohttp.ClientSession() as http, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as elsewhere:
            waiting = [Ws(await http.ws_connect(ws_url)) for _ in range(CAP)]
            await refused(http, ws_url)
            # The refusal is the documented error, before any upgrade.
            async with http.get(ws_url.replace("ws://", "http://", 1)) as r:
                body = await r.json()
                assert (r.status, body["error"]["code"]) == (429, "rate_limited"), body
                assert body["error"]["retry_after_ms"] == AUTH_TIMEOUT_S * 1000
                assert int(r.headers["Retry-After"]) == AUTH_TIMEOUT_S

            # Another address has its own count.
            other = await connect(elsewhere, ws_url, alice)
            await other.ping()

            # Saying hello leaves the count: one more may wait.
            waiting[0].start()
            await waiting[0].send({"type": "hello", "token": alice.token})
            await waiting[0].wait_type("welcome")
            waiting.append(Ws(await http.ws_connect(ws_url)))
            await refused(http, ws_url)

            # So does closing before hello.
            await waiting[1].ws.close()
            waiting.append(await accepted_soon(http, ws_url))
            await refused(http, ws_url)

            # The one that said hello is served as usual.
            await waiting[0].ping()
            for ws in (*waiting, other):
                await ws.ws.close()
