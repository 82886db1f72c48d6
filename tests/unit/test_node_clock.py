"""A node's reading of Redis' clock (`Node.redis_time_ms`, `Node.monotonic_at`): session
expiry and delivery lag are on Redis' clock, and the node's own may be off from it."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from chatd import config
from chatd.metrics import Metrics
from chatd.node import Node


def node(offset_ms: float) -> Node:
    n = Node(settings=config.load(None, {}, {}), node_id="n-test",
             redis=cast(Any, None), scripts=cast(Any, None), metrics=Metrics())
    n.clock_offset_ms = offset_ms
    return n


@pytest.mark.parametrize("offset_ms", [0.0, 60_000.0, -60_000.0])
def test_redis_time_is_ours_plus_the_offset(offset_ms: float) -> None:
    before = time.time() * 1000
    now = node(offset_ms).redis_time_ms()
    assert before + offset_ms <= now <= time.time() * 1000 + offset_ms


@pytest.mark.parametrize("offset_ms", [0.0, 60_000.0, -60_000.0])
def test_a_redis_moment_one_second_ahead_is_one_second_of_monotonic_time_away(
        offset_ms: float) -> None:
    n = node(offset_ms)
    # A session that Redis says ends in 1 s ends in 1 s here, whatever our wall clock says.
    start = time.monotonic()
    due = n.monotonic_at(n.redis_time_ms() + 1000)
    end = time.monotonic()
    assert start + 1 - 0.001 <= due <= end + 1 + 0.001  # 1 ms for float rounding
