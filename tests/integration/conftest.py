"""Fixtures of the tests that run chatd as an operator does (cli_process.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.client import FAST_ENV
from tests.harness import free_port, release_port
from tests.integration.cli_process import SHUTDOWN_S, Chatd


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


@pytest.fixture
def chatd(tmp_path: Path) -> Iterator[Chatd]:
    """The embedded default in tmp_path; killed with whatever it started at the end."""
    port = free_port()
    server = Chatd(tmp_path, tmp_path / "data", port,
                   {**FAST_ENV, "CHATD_SERVER__SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S)})
    try:
        yield server
    finally:
        server.cleanup()
        release_port(port)
