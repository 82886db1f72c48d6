"""redis-py's write race (#4287: AttributeError or TypeError raised inside redis-py when
a cluster failover closes a connection under a command) is a lost connection: scripts
and HTTP requests answer `unavailable`. The same exception types raised outside
redis-py are bugs and still surface (or answer `internal`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chatd.appkeys import NODE
from chatd.errors import ChatError
from chatd.http import errors_middleware
from chatd.metrics import Metrics
from chatd.scripts import Scripts

# What redis-py 8.1 does when a cluster failover clears a connection's writer under a
# command (seen in tests/cluster/test_cluster_failover.py): the AttributeError is raised
# in a frame of redis.asyncio.connection.
_IN_REDIS_PY: dict[str, Any] = {"__name__": "redis.asyncio.connection"}
exec("def send_packed_command(writer):\n    writer.writelines([b'EVALSHA'])\n", _IN_REDIS_PY)


def _own_bug(writer: Any) -> None:
    writer.writelines([b"EVALSHA"])


class FailingClient:
    """Stands in for redis-py's client: every script call fails with `fail(None)`."""

    def __init__(self, fail: Callable[[Any], None]) -> None:
        self.fail = fail

    def register_script(self, source: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def call(keys: Sequence[str], args: Sequence[Any]) -> Any:
            self.fail(None)

        return call


async def test_a_write_racing_a_closed_connection_in_redis_py_is_unavailable() -> None:
    scripts = Scripts(FailingClient(_IN_REDIS_PY["send_packed_command"]), Metrics())
    with pytest.raises(ChatError) as info:
        await scripts.run("take_token", ["bucket"], [1, 1])
    assert info.value.code == "unavailable"
    assert isinstance(info.value.__cause__, AttributeError)


async def test_the_same_error_from_chatd_itself_is_not_hidden() -> None:
    scripts = Scripts(FailingClient(_own_bug), Metrics())
    with pytest.raises(AttributeError):
        await scripts.run("take_token", ["bucket"], [1, 1])


async def _status_of(fail: Callable[[Any], None]) -> tuple[int, str]:
    async def handler(request: web.Request) -> web.Response:
        fail(None)
        return web.Response()

    app = web.Application(middlewares=[errors_middleware])
    node: Any = SimpleNamespace(metrics=Metrics())
    app[NODE] = node
    app.router.add_get("/x", handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/x")
        return resp.status, (await resp.json())["error"]["code"]


async def test_an_http_request_hit_by_the_race_is_unavailable() -> None:
    assert await _status_of(_IN_REDIS_PY["send_packed_command"]) == (503, "unavailable")


async def test_an_http_request_hit_by_a_bug_is_internal() -> None:
    assert await _status_of(_own_bug) == (500, "internal")
