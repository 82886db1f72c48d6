"""chatd.scripts.Scripts.run turns redis-py's connection races into `unavailable`, and
nothing else: the same exception types raised outside redis-py still surface."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from chatd.errors import ChatError
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
