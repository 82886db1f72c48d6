"""A node's WebSockets drive its freezing of the collector's survivors (chatd/gcfreeze.py):
every connection that opens and closes is counted, and closing more than a quarter of the
frozen ones thaws them, so their memory can come back. In-process app, real Valkey."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from aiohttp import ClientWebSocketResponse

from chatd.appkeys import NODE
from chatd.gcfreeze import FreezeSurvivors
from tests.integration.test_accounts import (  # noqa: F401 (the fixtures are used by name)
    MakeClient,
    make_client_fixture,
)


@pytest.fixture
def no_automatic_collections() -> Iterator[None]:
    """Only the test's collections: the collector would otherwise run at any allocation."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def open_count(survivors: FreezeSurvivors, n: int) -> None:
    """Wait until the node counts n open connections (its handlers run after our calls)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        if survivors.open == n:
            return
        assert asyncio.get_running_loop().time() < deadline, (
            f"{survivors.open} connections open, not {n}, after 5 s")
        await asyncio.sleep(0.01)


async def test_closing_a_quarter_of_the_frozen_connections_thaws_them(
        make_client: MakeClient, no_automatic_collections: None) -> None:
    client = await make_client()
    survivors = client.app[NODE].survivors
    wss: list[ClientWebSocketResponse] = [await client.ws_connect("/ws") for _ in range(20)]
    await open_count(survivors, 20)

    gc.collect()
    assert survivors.frozen == 20
    assert gc.get_freeze_count() > 0

    for ws in wss[:5]:
        await ws.close()
    await open_count(survivors, 15)
    assert survivors.closed_frozen == 5
    assert gc.get_freeze_count() > 0  # a quarter: not more than a quarter yet

    await wss[5].close()
    await open_count(survivors, 14)
    assert gc.get_freeze_count() == 0
    assert survivors.frozen == 0

    for ws in wss[6:]:
        await ws.close()
    await open_count(survivors, 0)
