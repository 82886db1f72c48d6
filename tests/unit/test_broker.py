"""The inbox reads a standalone node keeps queued (chatd/broker.py, `_read_ahead`),
on a stand-in reader: replies that arrived together come out as one batch, in
order, and a failed read is raised by the step after the replies before it."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any, cast

import pytest

from chatd.broker import READ_AHEAD, Batch, Broker
from chatd.node import Node

STREAM = b"inbox"


class FakeReader:
    """Answers each submitted batch of commands with futures the test resolves."""

    def __init__(self) -> None:
        self.submitted: list[asyncio.Future[Any]] = []

    async def submit(self, commands: list[Any], **_: float) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self.submitted.extend(futures)
        return futures


def make_broker(reader: FakeReader) -> Broker:
    settings = SimpleNamespace(fanout=SimpleNamespace(read_count=100, block_ms=1000))
    node = SimpleNamespace(node_id="n1", partitions=1, settings=settings,
                           redis=SimpleNamespace(is_cluster=False, reader=reader))
    node.inboxes = lambda: ["inbox"]
    return Broker(cast(Node, node), fanout=cast(Any, None), on_fenced=cast(Any, None))


def reply(*ids: str) -> list[Any]:
    return [[STREAM, [[i.encode(), [b"k", b"m"]] for i in ids]]]


def ids(batch: Batch) -> list[str]:
    return [f"{stream}:{entry_id.decode()}" for stream, items in batch for entry_id, _ in items]


async def start_read() -> tuple[Broker, FakeReader, deque[asyncio.Future[Any]],
                              asyncio.Future[Batch]]:
    """A broker's first `_read_ahead`, started: its reads are submitted, none answered."""
    reader = FakeReader()
    broker = make_broker(reader)
    ahead: deque[asyncio.Future[Any]] = deque()
    step = asyncio.ensure_future(broker._read_ahead(["inbox"], ahead))
    await asyncio.sleep(0)
    return broker, reader, ahead, step


async def test_replies_that_arrived_together_are_one_batch_in_order() -> None:
    _, reader, ahead, first = await start_read()
    assert len(reader.submitted) == READ_AHEAD
    for future, entry_ids in zip(reader.submitted, [("1-0",), ("2-0", "3-0"), ("4-0",)],
                                 strict=False):
        future.set_result(reply(*entry_ids))
    assert ids(await first) == ["inbox:1-0", "inbox:2-0", "inbox:3-0", "inbox:4-0"]
    assert len(ahead) == READ_AHEAD - 3  # the unanswered reads stay queued


async def test_a_failed_read_is_raised_after_the_replies_before_it() -> None:
    broker, reader, ahead, step = await start_read()
    reader.submitted[0].set_result(reply("1-0"))
    reader.submitted[1].set_exception(ConnectionError("lost"))
    reader.submitted[2].set_result(reply("2-0"))
    assert ids(await step) == ["inbox:1-0"]
    with pytest.raises(ConnectionError):
        await broker._read_ahead(["inbox"], ahead)
