"""The inbox reads a standalone node keeps queued (chatd/broker.py, `_read_ahead`),
on a stand-in reader: replies that arrived together come out as one batch, in
order, and a failed read is raised by the step after the replies before it. And
the consumer's pacing (`Pacer`): it waits between batches only while messages to
big rooms keep the node writing."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any, cast

import pytest

from chatd import broker as broker_module
from chatd.broker import BIG_ROOM_FRAMES, READ_AHEAD, Batch, Broker, Pacer
from chatd.metrics import Tally
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


def make_broker(reader: FakeReader, fanout: Any = None) -> Broker:
    settings = SimpleNamespace(fanout=SimpleNamespace(read_count=100, block_ms=1000,
                                                      coalesce_ms=5.0))
    metrics = SimpleNamespace(frames_out=Tally(), inbox_entries=Tally(), inbox_waits=Tally(),
                              delivery_lag=SimpleNamespace(observe=lambda _: None))
    node = SimpleNamespace(node_id="n1", partitions=1, settings=settings, metrics=metrics,
                           redis=SimpleNamespace(is_cluster=False, reader=reader),
                           redis_time_ms=lambda: 0)
    node.inboxes = lambda: ["inbox"]
    return Broker(cast(Node, node), fanout=fanout, on_fenced=cast(Any, None))


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


MS = 0.001


def back_to_back(pacer: Pacer, start: float, n: int, took: float, entries: int,
                 frames: int) -> list[float]:
    """n batches each begun as the one before ended (after its wait): a node behind."""
    waits, t = [], start
    for _ in range(n):
        waits.append(pacer.wait_after(t, took, entries, frames))
        t += took + waits[-1]
    return waits


def test_a_node_with_time_to_spare_never_waits() -> None:
    pacer = Pacer(5 * MS)
    # A room of 1,000 every 12.5 ms (80/s), 6 ms to write: half of the time, and now and
    # then a batch that took 11 ms.
    took = [6 * MS, 6 * MS, 11 * MS, 6 * MS] * 10
    assert [pacer.wait_after(i * 12.5 * MS, t, 1, 500) for i, t in enumerate(took)] == [
        0.0] * 40


def test_small_rooms_never_wait_however_busy() -> None:
    frames = BIG_ROOM_FRAMES * 10 - 1  # ten messages, just under the big-room average
    assert back_to_back(Pacer(5 * MS), 0.0, 20, 7 * MS, 10, frames) == [0.0] * 20


def test_big_rooms_that_keep_the_node_writing_wait_and_their_wait_is_not_load() -> None:
    pacer = Pacer(5 * MS)
    waits = back_to_back(pacer, 0.0, 12, 7 * MS, 1, 500)
    # The first has nothing before it; the average then climbs past the share within
    # some 50 ms, and stays there although every batch after is followed by a wait.
    assert waits[:2] == [0.0, 0.0]
    first = waits.index(5 * MS)
    assert first <= 9 and waits[first:] == [5 * MS] * (12 - first)
    # After a lull, in which reads found nothing, the node has time again: no wait
    # until it is behind again.
    assert pacer.wait_after(1.0, 0.0, 0, 0) == 0.0
    after = back_to_back(pacer, 2.0, 12, 7 * MS, 1, 500)
    assert after[0] == 0.0 and after[-1] == 5 * MS


def test_batches_no_time_apart_are_no_error() -> None:
    # A timer may end a wait a little early, and a clock may read the same twice.
    pacer = Pacer(5 * MS)
    assert pacer.wait_after(1.0, 0.0, 1, 500) == 0.0
    assert pacer.wait_after(1.0, 0.0, 1, 500) == 0.0
    assert pacer.wait_after(0.999, 1 * MS, 1, 500) == 0.0


def test_no_wait_when_it_is_switched_off() -> None:
    pacer = Pacer(0.0)
    assert [pacer.wait_after(i * 7 * MS, 7 * MS, 1, 500) for i in range(3)] == [0.0] * 3


async def test_the_consumer_waits_after_big_busy_batches(monkeypatch: pytest.MonkeyPatch,
                                                       ) -> None:
    """The wiring: `fanout.coalesce_ms` reaches the consumer, which measures each batch
    (its frames, on a clock the stand-in fanout moves) and sleeps when it should."""
    clock = [100.0]
    monkeypatch.setattr(broker_module.time, "monotonic", lambda: clock[0])
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(broker_module.asyncio, "sleep", sleep)
    reader = FakeReader()
    fanout = SimpleNamespace(batch=None)
    broker = make_broker(reader, fanout)

    def handle(fields: object, *, control: bool = False) -> None:
        broker.node.metrics.frames_out.value += 500  # a room of 1,000 over two nodes
        clock[0] += 7 * MS

    fanout.handle = handle

    async def caught_up(*_: object, **__: object) -> None:
        return None  # the catch-up read finds nothing left

    reader.execute = caught_up  # type: ignore[attr-defined]
    trims: list[Any] = []

    async def pipeline(commands: list[Any]) -> None:
        trims.extend(commands)

    broker.node.redis.raw = SimpleNamespace(pipeline=pipeline)
    step = broker._consumer(["inbox"])
    await step()  # catching up: nothing
    for n in range(12):
        pending = asyncio.ensure_future(step())
        await real_sleep(0)
        reader.submitted[n].set_result(reply(f"{n + 1}-0"))
        await pending
    assert broker.node.metrics.inbox_entries.value == 12
    # Back to back from the second batch on: once the node has been writing long enough
    # it waits, after every batch.
    assert 0 < len(slept) < 12 and set(slept) == {0.005}
    assert broker.node.metrics.inbox_waits.value == len(slept)  # chatd_inbox_paced_waits
    assert trims  # what was handed over is trimmed, waits or not
