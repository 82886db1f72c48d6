"""Inbox consumption and node liveness.

Every node reads one inbox stream per partition plus its control inbox, in a
consumer group of its own, and XACKs (then XDELs) entries only after handing
them to local sockets: in the same round trip as a later read, at most
ACK_EVERY_S after the first of them was handed over. After a Redis connection
drop the consumer re-reads its pending entries first (id "0"), so a burst or a
drop loses nothing; what it hands over twice, sockets drop by seq.

On a standalone server one blocking XREADGROUP covers every stream; on a
cluster the streams live in different slots, so each gets its own reader.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from chatd import keys
from chatd.fanout import Fanout
from chatd.loops import Loop
from chatd.multiplex import entries
from chatd.node import Node

log = logging.getLogger("chatd.broker")

GROUP = "chatd"

# Acks ride with a read once this old or this many. Acking every read made
# Redis answer the acks at once while the read blocked: one more wakeup, socket
# read and task step per inbox read, which at a message per read (light load)
# was most of what a read cost. Delay and count bound what a dropped
# connection re-reads.
ACK_EVERY_S = 0.05
ACK_MAX_IDS = 512


class Broker:
    def __init__(self, node: Node, fanout: Fanout,
                 on_fenced: Callable[[], Awaitable[None]]) -> None:
        self.node = node
        self.fanout = fanout
        self._on_fenced = on_fenced
        self._control = keys.control(node.node_id)
        self._streams = [keys.inbox(p, node.node_id) for p in range(node.partitions)]
        self._streams.append(self._control)
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

        async def step() -> None:
            nonlocal due
            now = time.monotonic()
            ack = bool(handled) and (now >= due or
                                     sum(map(len, handled.values())) >= ACK_MAX_IDS)
            try:
                batch = await self.read_batch(cursors, list(handled.items()) if ack else [])
            except ResponseError:
                # NOGROUP: the janitor removed our inboxes; the heartbeat handles the rest.
                await self.create_groups()
                cursors.update(dict.fromkeys(cursors, "0"))
                raise
            except BaseException:
                cursors.update(dict.fromkeys(cursors, "0"))  # re-read what is pending
                raise
            if ack:
                handled.clear()
            for stream, ids in self.handle_batch(batch, cursors):
                if not handled:
                    due = time.monotonic() + ACK_EVERY_S
                handled.setdefault(stream, []).extend(ids)

        return step

    async def read_batch(self, cursors: dict[str, str], acks: list[tuple[str, list[bytes]]],
                         ) -> list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]:
        """Ack (XACK + XDEL) what the last batch handed to sockets, then read the next.
        Until the ack lands those entries stay pending: a lost reply re-reads them."""
        fanout = self.node.settings.fanout
        reader = self.node.redis.reader
        if not self.node.redis.is_cluster:
            # One round trip: the acks, then the blocking read, on the reader's own
            # connection (nothing else waits behind its block there).
            commands: list[tuple[str | bytes | int, ...]] = []
            for stream, ids in acks:
                commands += [("XACK", stream, GROUP, *ids), ("XDEL", stream, *ids)]
            commands.append(("XREADGROUP", "GROUP", GROUP, self.node.node_id, "COUNT",
                             fanout.read_count, "BLOCK", fanout.block_ms, "STREAMS",
                             *cursors, *cursors.values()))
            replies = await reader.pipeline(commands, extra_s=fanout.block_ms / 1000)
            return [(stream.decode(), entries(items)) for stream, items in replies[-1] or ()]
        if acks:
            async with self.node.redis.raw.pipeline(transaction=False) as pipe:
                for stream, ids in acks:
                    pipe.xack(stream, GROUP, *ids)
                    pipe.xdel(stream, *ids)
                await pipe.execute()
        # One stream per reader here. Name the node that serves it: XREADGROUP has
        # "movable" keys, so redis-py would ask one fixed node (COMMAND GETKEYS) where
        # to send it, twice per read, and if that node dies it fails before its own
        # failover handling, for ever: inbox reads would stop until the node is back.
        ((stream, cursor),) = cursors.items()
        reply = await reader.execute_command(
            "XREADGROUP", "GROUP", GROUP, self.node.node_id, "COUNT", fanout.read_count,
            "BLOCK", fanout.block_ms, "STREAMS", stream, cursor,
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
            if not items:
                if cursors.get(stream) == "0":
                    cursors[stream] = ">"  # pending ones done: go live
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
