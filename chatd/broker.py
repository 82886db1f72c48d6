"""Inbox consumption and node liveness.

Every node reads its room inboxes (one per partition on a cluster, one in all
on a standalone server: keys.inbox_partition) plus its control inbox, in a
consumer group of its own, and XACKs (then XDELs) entries only after handing
them to local sockets, in batches (ACK_EVERY_S, ACK_MAX_IDS). After a Redis
connection drop the consumer re-reads its pending entries first (from id
"0"), so a burst or a drop loses nothing; what it hands over twice, sockets
drop by seq.

On a standalone server one blocking XREADGROUP covers every stream, and
while live the consumer keeps several of them queued ahead (`_read_ahead`);
on a cluster the streams live in different slots, so each gets its own
reader, one read at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from chatd import keys
from chatd.fanout import Fanout
from chatd.loops import Loop
from chatd.multiplex import entries
from chatd.node import Node

log = logging.getLogger("chatd.broker")

GROUP = "chatd"

# Handed-over entries are acked at the first read once this old or this many.
# Acking after every read cost a round trip per read, which at light load (a
# message per read) was most of what a read cost. Delay and count bound what a
# dropped connection re-reads.
ACK_EVERY_S = 0.05
ACK_MAX_IDS = 512
# Inbox reads kept queued on a standalone server (`_read_ahead`).
READ_AHEAD = 8


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
        cursors = dict.fromkeys(streams, "0")
        handled: dict[str, list[bytes]] = {}  # handed to sockets, not acked yet
        due = 0.0  # when they must be acked (monotonic)
        ahead: deque[asyncio.Future[Any]] = deque()  # reads in flight (standalone, live)

        async def step() -> None:
            nonlocal due
            try:
                if handled and (time.monotonic() >= due or
                                sum(map(len, handled.values())) >= ACK_MAX_IDS):
                    await self._ack(handled)
                    handled.clear()
                if ahead or (not self.node.redis.is_cluster and
                             all(c == ">" for c in cursors.values())):
                    batch = await self._read_ahead(cursors, ahead)
                else:
                    batch = await self.read_batch(cursors)
            except ResponseError:
                # NOGROUP: the janitor removed our inboxes; the heartbeat handles the rest.
                await self._drop_ahead(ahead)
                await self.create_groups()
                cursors.update(dict.fromkeys(cursors, "0"))
                raise
            except BaseException:
                await self._drop_ahead(ahead)
                cursors.update(dict.fromkeys(cursors, "0"))  # re-read what is pending
                raise
            for stream, ids in self.handle_batch(batch, cursors):
                if not handled:
                    due = time.monotonic() + ACK_EVERY_S
                handled.setdefault(stream, []).extend(ids)

        return step

    async def _ack(self, handled: dict[str, list[bytes]]) -> None:
        """XACK + XDEL what was handed to sockets. Until that lands the entries stay
        pending: a consumer that fails meanwhile re-reads (and sockets drop) them."""
        if not self.node.redis.is_cluster:
            commands: list[tuple[str | bytes | int, ...]] = []
            for stream, ids in handled.items():
                commands += [("XACK", stream, GROUP, *ids), ("XDEL", stream, *ids)]
            await self.node.redis.raw.pipeline(commands)
            return
        async with self.node.redis.raw.pipeline(transaction=False) as pipe:
            for stream, ids in handled.items():
                pipe.xack(stream, GROUP, *ids)
                pipe.xdel(stream, *ids)
            await pipe.execute()

    def _xreadgroup(self, cursors: dict[str, str]) -> tuple[str | int, ...]:
        fanout = self.node.settings.fanout
        return ("XREADGROUP", "GROUP", GROUP, self.node.node_id, "COUNT", fanout.read_count,
                "BLOCK", fanout.block_ms, "STREAMS", *cursors, *cursors.values())

    async def _read_ahead(self, cursors: dict[str, str], ahead: deque[asyncio.Future[Any]],
                          ) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
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
                [self._xreadgroup(cursors)] * new, extra_s=(len(ahead) + 1) * block_s,
                step_s=block_s))
        reply = await ahead[0]
        ahead.popleft()
        return _batch(reply)

    async def _drop_ahead(self, ahead: deque[asyncio.Future[Any]]) -> None:
        """After a failure: reads still queued would hand out entries nobody handles
        ahead of the re-read of pending ones, so their connection goes with them."""
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

    async def read_batch(self, cursors: dict[str, str],
                         ) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
        """One read: of pending entries after a cursor (recovery), or on a cluster."""
        reader = self.node.redis.reader
        if not self.node.redis.is_cluster:
            block_s = self.node.settings.fanout.block_ms / 1000
            return _batch(await reader.execute(*self._xreadgroup(cursors), extra_s=block_s))
        # One stream per reader here. Name the node that serves it: XREADGROUP has
        # "movable" keys, so redis-py would ask one fixed node (COMMAND GETKEYS) where
        # to send it, twice per read, and if that node dies it fails before its own
        # failover handling, for ever: inbox reads would stop until the node is back.
        ((stream, _),) = cursors.items()
        reply = await reader.execute_command(*self._xreadgroup(cursors),
                                             target_nodes=reader.get_node_from_key(stream))
        if isinstance(reply, dict):  # RESP3 shape
            return [(k.decode(), v[0] if v and isinstance(v[0], list) else v)
                    for k, v in reply.items()]
        return [(stream.decode(), items) for stream, items in reply or ()]

    def handle_batch(self, batch: list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]],
                     cursors: dict[str, str]) -> list[tuple[str, list[bytes]]]:
        """Hand entries to local sockets; returns the ids to ack, per stream."""
        handled: list[tuple[str, list[bytes]]] = []
        for stream, items in batch:
            if cursors.get(stream, ">") != ">":
                # Re-reading pending entries: go on after the last one (the same read
                # again would hand out the same entries until their ack lands), and
                # go live once none are left.
                cursors[stream] = items[-1][0].decode() if items else ">"
            if not items:
                continue
            control = stream == self._control
            for _entry_id, fields in items:
                if fields:  # a pending entry trimmed away arrives without fields
                    try:
                        self.fanout.handle(fields, control=control)
                    except (KeyError, ValueError) as e:
                        log.warning("malformed inbox entry", extra={"error": repr(e)})
            handled.append((stream, [entry_id for entry_id, _ in items]))
            self.node.metrics.inbox_entries.inc(len(items))
        return handled

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
        ok, _ = await self.node.scripts.run("node_heartbeat", [keys.NODES],
                                            [self.node.node_id, mode])
        return bool(ok)


def _batch(reply: list[Any] | None) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """An XREADGROUP reply from the multiplexed client, shaped like redis-py's."""
    return [(stream.decode(), entries(items)) for stream, items in reply or ()]
