"""Inbox consumption and node liveness.

Every node reads its room inboxes (one per partition on a cluster, one in all
on a standalone server: keys.inbox_partition) plus its control inbox, with
XREADGROUP ... NOACK in a consumer group of its own, and trims the entries it
handed to local sockets, in batches (TRIM_EVERY_S, TRIM_MAX). The node keeps
its own cursor, the last entry id it handed over per stream: after a Redis
connection drop it first catches up with plain XREADs after that cursor, so
the entries of a reply lost with its connection are read again; what it hands
over twice (the catch-up overlaps later group reads), it skips by id.

Why NOACK and a cursor of our own rather than the group's pending list: Redis
writes every pending entry to the AOF twice more (an XCLAIM when read, an XACK
when acked), about a fifth of the AOF bytes of a send, and a busy AOF is what
stalls this whole machine for tens of milliseconds (docs/performance.md).
The group stays because its server-side ">" lets reads be queued ahead.

On a standalone server one blocking XREADGROUP covers every stream, and
while live the consumer keeps several of them queued ahead (`_read_ahead`);
on a cluster the streams live in different slots, so each gets its own
reader, one read at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from chatd import keys
from chatd.fanout import Fanout
from chatd.logs import error_text
from chatd.loops import Loop
from chatd.multiplex import entries
from chatd.node import Node

log = logging.getLogger("chatd.broker")

GROUP = "chatd"

# Handed-over entries are trimmed at the first read once this old or this many:
# one XTRIM per stream and batch rather than a command per read.
TRIM_EVERY_S = 0.05
TRIM_MAX = 512
# Inbox reads kept queued on a standalone server (`_read_ahead`).
READ_AHEAD = 8
# The consumer waits fanout.coalesce_ms after a batch whose messages went to this many
# local connections each, on average, while handling batches has taken this share of
# the node's time over about the last BUSY_WINDOW_S (a moving average; `Pacer`).
BIG_ROOM_FRAMES = 64
BUSY_SHARE = 0.7
BUSY_WINDOW_S = 0.05

Batch = list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]


def entry_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq)


class Pacer:
    """Waits between inbox batches while messages to big rooms keep the node writing.

    Each such message costs a write per local member. When they come about as fast as
    the node can write them one at a time, a short wait lets the next ones arrive, and
    each connection then gets them in one write (WriteBatch) instead of one each: in a
    room of 1,000 at 160 messages/s that is the difference between keeping up and not
    (docs/performance.md, fanout). Small rooms, or a node with time to spare, never
    wait: there latency comes first. The share is averaged because one batch's is
    noise: at half that load a fifth of the batches took 3/4 of the time since the
    one before."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._previous = -math.inf  # when the previous batch began, its wait left out
        self._busy = 0.0  # moving average of the share of time spent handling batches

    def wait_after(self, started: float, took: float, entries: int, frames: int) -> float:
        """Seconds to wait after a batch of `entries` messages that handed `frames` frames
        to local connections, began at `started` and took `took` (time.monotonic())."""
        if not entries:
            return 0.0  # a read that found nothing: the node had time to spare
        # At least a microsecond: a timer may end the wait a little early.
        since = max(started - self._previous, 1e-6)
        self._previous = started
        # Each batch weighs by the time it covers: after a lull the past counts no more.
        self._busy += min(1.0, since / BUSY_WINDOW_S) * (min(1.0, took / since) - self._busy)
        if not self.wait_s or frames < BIG_ROOM_FRAMES * entries or self._busy < BUSY_SHARE:
            return 0.0
        # The node's own wait is not load: the next batch is judged without it.
        self._previous += self.wait_s
        return self.wait_s


class Broker:
    def __init__(self, node: Node, fanout: Fanout,
                 on_fenced: Callable[[], Awaitable[None]]) -> None:
        self.node = node
        self.fanout = fanout
        self._on_fenced = on_fenced
        self._control = keys.control(node.node_id)
        self._streams = [*node.inboxes(), self._control]
        # Since when (monotonic) every heartbeat succeeded; None right after a failed one.
        # The janitor judges other nodes only after a full node_ttl_s of this (janitor.py).
        self.beating_since: float | None = None

    async def create_groups(self) -> None:
        for stream in self._streams:
            try:
                await self.node.redis.cmd.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def join(self) -> None:
        await self.create_groups()
        await self._beat("join")

    def loops(self) -> list[Loop]:
        metrics = self.node.metrics
        groups = [[s] for s in self._streams] if self.node.redis.is_cluster else [self._streams]
        out = [Loop(f"consumer-{i}", self._consumer(g), metrics) for i, g in enumerate(groups)]
        # Back off no longer than one interval: after a Redis outage every node must
        # beat again within an interval, before the janitors judge (janitor.py).
        interval = self.node.settings.fanout.heartbeat_interval_s
        out.append(Loop("heartbeat", self._heartbeat, metrics, interval_s=interval,
                        max_backoff_s=interval))
        return out

    # --- consuming ------------------------------------------------------------

    def _consumer(self, streams: list[str]) -> Callable[[], Awaitable[None]]:
        # The last id handed to sockets, per stream: entries at or before it are done.
        # From "0-0" at start, so what a previous run of this node left is handed out.
        last = dict.fromkeys(streams, (0, 0))
        catching_up = True  # plain XREADs after `last` until none is left, then ">"
        untrimmed: dict[str, int] = {}  # handed over since the last trim, per stream
        due = 0.0  # when they must be trimmed (monotonic)
        ahead: deque[asyncio.Future[Any]] = deque()  # reads in flight (standalone, live)
        pacer = Pacer(self.node.settings.fanout.coalesce_ms / 1000)
        frames_out = self.node.metrics.frames_out

        async def step() -> None:
            nonlocal catching_up, due
            try:
                if untrimmed and (time.monotonic() >= due or
                                  sum(untrimmed.values()) >= TRIM_MAX):
                    await self._trim({s: last[s] for s in untrimmed})
                    untrimmed.clear()
                if catching_up:
                    batch = await self._read_after(last)
                    catching_up = any(items for _, items in batch)
                elif ahead or not self.node.redis.is_cluster:
                    batch = await self._read_ahead(streams, ahead)
                else:
                    batch = await self._read_new(streams)
            except ResponseError:
                # NOGROUP: the janitor removed our inboxes; the heartbeat handles the rest.
                await self._drop_ahead(ahead)
                await self.create_groups()
                catching_up = True
                raise
            except BaseException:
                await self._drop_ahead(ahead)
                catching_up = True  # a reply may have been lost with its connection
                raise
            started, frames = time.monotonic(), frames_out.value
            handled = self.handle_batch(batch, last)
            for stream, n in handled:
                if not untrimmed:
                    due = time.monotonic() + TRIM_EVERY_S
                untrimmed[stream] = untrimmed.get(stream, 0) + n
            wait_s = pacer.wait_after(started, time.monotonic() - started,
                                      sum(n for _, n in handled), frames_out.value - frames)
            if wait_s:
                self.node.metrics.inbox_waits.value += 1
                await asyncio.sleep(wait_s)

        return step

    async def _trim(self, upto: dict[str, tuple[int, int]]) -> None:
        """Drop each stream's entries up to its last handed-over one: MINID keeps
        what was written since, read or not."""
        commands = [("XTRIM", stream, "MINID", f"{ms}-{seq + 1}")
                    for stream, (ms, seq) in upto.items()]
        if not self.node.redis.is_cluster:
            await self.node.redis.raw.pipeline(commands)
            return
        async with self.node.redis.raw.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

    def _xreadgroup(self, streams: list[str]) -> tuple[str | int, ...]:
        """New entries (">"), blocking; NOACK: they never enter the pending list."""
        fanout = self.node.settings.fanout
        return ("XREADGROUP", "GROUP", GROUP, self.node.node_id, "COUNT", fanout.read_count,
                "BLOCK", fanout.block_ms, "NOACK", "STREAMS", *streams, *[">"] * len(streams))

    def _xread_after(self, last: dict[str, tuple[int, int]]) -> tuple[str | int, ...]:
        """Entries after the node's own cursors, without blocking (catching up)."""
        return ("XREAD", "COUNT", self.node.settings.fanout.read_count, "STREAMS", *last,
                *[f"{ms}-{seq}" for ms, seq in last.values()])

    async def _read_ahead(self, streams: list[str], ahead: deque[asyncio.Future[Any]],
                          ) -> Batch:
        """The next batch of new entries from reads queued ahead on the reader's own
        connection. Redis answers a queued XREADGROUP as soon as entries arrive,
        without waiting for a request, so a node writes one command per READ_AHEAD / 2
        batches instead of one per batch: at light load, a batch is one message."""
        if len(ahead) <= READ_AHEAD // 2:
            block_s = self.node.settings.fanout.block_ms / 1000
            new = READ_AHEAD - len(ahead)
            # Each read blocks only once those before it answered: the k-th may take
            # k block times.
            ahead.extend(await self.node.redis.reader.submit(
                [self._xreadgroup(streams)] * new, extra_s=(len(ahead) + 1) * block_s,
                step_s=block_s))
        batch = _batch(await ahead[0])
        ahead.popleft()
        # Replies that arrived together are handed over together: one write per
        # connection for all of them, where a busy node would make one per reply.
        # A failed read stays queued and raises at the next step.
        while ahead and ahead[0].done() and not ahead[0].cancelled() and (
                ahead[0].exception() is None):
            batch.extend(_batch(ahead.popleft().result()))
        return batch

    async def _drop_ahead(self, ahead: deque[asyncio.Future[Any]]) -> None:
        """After a failure: reads still queued would hand out entries ahead of the
        catch-up after them, so their connection goes with them."""
        if not ahead:
            return
        in_flight = False
        for future in ahead:
            if future.done():
                if not future.cancelled():
                    future.exception()  # retrieved: the failure was already raised
            else:
                in_flight = True
                future.cancel()
        ahead.clear()
        if in_flight:
            await self.node.redis.reader.close()

    async def _read_new(self, streams: list[str]) -> Batch:
        return await self._read(self._xreadgroup(streams), streams)

    async def _read_after(self, last: dict[str, tuple[int, int]]) -> Batch:
        return await self._read(self._xread_after(last), list(last))

    async def _read(self, command: tuple[str | int, ...], streams: list[str]) -> Batch:
        """One read on the reader: on a standalone server any, on a cluster one stream's."""
        reader = self.node.redis.reader
        if not self.node.redis.is_cluster:
            block_s = self.node.settings.fanout.block_ms / 1000
            return _batch(await reader.execute(*command, extra_s=block_s))
        # Name the node that serves the stream: XREAD(GROUP) has "movable" keys, so
        # redis-py would ask one fixed node (COMMAND GETKEYS) where to send it, twice
        # per read, and if that node dies it fails before its own failover handling,
        # for ever: inbox reads would stop until the node is back.
        (stream,) = streams
        reply = await reader.execute_command(*command,
                                             target_nodes=reader.get_node_from_key(stream))
        if isinstance(reply, dict):  # RESP3 shape
            return [(k.decode(), v[0] if v and isinstance(v[0], list) else v)
                    for k, v in reply.items()]
        return [(s.decode(), items) for s, items in reply or ()]

    def handle_batch(self, batch: Batch, last: dict[str, tuple[int, int]],
                     ) -> list[tuple[str, int]]:
        """Hand entries after `last` to local sockets and move `last` past them;
        returns how many were handed over, per stream."""
        handled: list[tuple[str, int]] = []
        # One entry means at most one frame per connection: nothing to coalesce.
        many = len(batch) > 1 or any(len(items) > 1 for _, items in batch)
        with self.fanout.batch if many else contextlib.nullcontext():
            for stream, items in batch:
                done = last[stream]
                control = stream == self._control
                n = 0
                for raw_id, fields in items:
                    eid = entry_id(raw_id)
                    if eid <= done:
                        continue  # handed over already: a catch-up read got it first
                    if not n and not control:
                        self._observe_lag(eid[0])
                    done = eid
                    n += 1
                    try:
                        self.fanout.handle(fields, control=control)
                    except (KeyError, ValueError) as e:
                        log.warning("malformed inbox entry", extra={"error": error_text(e)})
                if n:
                    last[stream] = done
                    handled.append((stream, n))
                    self.node.metrics.inbox_entries.value += n
        return handled

    def _observe_lag(self, stored_ms: int) -> None:
        age_ms = self.node.redis_time_ms() - stored_ms
        self.node.metrics.delivery_lag.observe(max(0.0, age_ms / 1000))

    # --- liveness -------------------------------------------------------------

    async def _heartbeat(self) -> None:
        try:
            alive = await self._beat("beat")
        except BaseException:
            self.beating_since = None
            raise
        if self.beating_since is None:
            self.beating_since = time.monotonic()
        if alive:
            return
        log.warning("this node was presumed dead; rejoining", extra={
            "node_id": self.node.node_id})
        await self._on_fenced()
        await self.create_groups()
        await self._beat("join")

    async def _beat(self, mode: str) -> bool:
        ok, now_ms = await self.node.scripts.run("node_heartbeat", [keys.NODES],
                                                 [self.node.node_id, mode])
        self.node.clock_offset_ms = int(now_ms) - time.time() * 1000
        return bool(ok)


def _batch(reply: list[Any] | None) -> Batch:
    """An XREAD(GROUP) reply from the multiplexed client, shaped like redis-py's."""
    return [(stream.decode(), entries(items)) for stream, items in reply or ()]
