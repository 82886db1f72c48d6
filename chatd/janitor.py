"""Clean up after dead nodes, under a Redis lock so one node does it at a time.

A node is dead when its heartbeat is older than `fanout.node_ttl_s`. Its
interest in rooms, its inboxes, its control inbox and its share of every
user's presence are removed, and users left with no connection anywhere are
announced offline. A node also runs `cleanup_node` on itself at start, for
what a previous life under the same node id left behind.

A stale heartbeat proves a node dead only if that node could have written
one: after Redis itself was away (an outage, a failover) longer than
`node_ttl_s`, *every* heartbeat is stale, and sweeping then would make the
nodes fence each other and close every connection with 4009. So the janitor
judges only once its own heartbeats have succeeded for `node_ttl_s` plus one
heartbeat interval (`alive_since`): by then every live node has beaten again.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable

from chatd import keys, presence, rooms
from chatd.node import Node

log = logging.getLogger("chatd.janitor")

_REPAIR_AFTER_MS = 5000


async def cleanup_node(node: Node, node_id: str) -> None:
    cmd = node.redis.cmd
    for p in range(node.partitions):
        node_rooms = keys.node_rooms(p, node_id)
        for room_id in await cmd.smembers(node_rooms):
            await node.scripts.run("interest", [keys.room_nodes(p, room_id), node_rooms],
                                   [node_id, room_id, "remove"])
        await cmd.delete(node_rooms)
    # Only now that no room lists the node: on one server the rooms of every partition
    # share one inbox (keys.inbox_partition), which a send to a room still listing the
    # node would create again.
    for p in range(node.partitions):
        await cmd.delete(keys.inbox(p, node_id))
    # Users first: a notice sent while they still list the node would recreate its inbox.
    await presence.drop_node_users(node, node_id)
    await cmd.delete(keys.control(node_id))


class Janitor:
    def __init__(self, node: Node,
                 alive_since: Callable[[], float | None] = lambda: -math.inf) -> None:
        """`alive_since()`: since when (monotonic) this node's heartbeats have all
        succeeded, None right after a failure (the broker's `beating_since`); the
        default judges at once."""
        self.node = node
        self._token = secrets.token_hex(8)
        self._alive_since = alive_since

    async def step(self) -> None:
        node = self.node
        since = self._alive_since()
        fanout = node.settings.fanout
        # A live node beats again within one interval of Redis coming back (its
        # heartbeat backs off no longer than that): wait for it, plus a full TTL.
        grace = fanout.node_ttl_s + fanout.heartbeat_interval_s
        if since is None or time.monotonic() - since < grace:
            return  # others may not have had the chance to beat yet: judge nobody
        ttl_ms = int(node.settings.fanout.janitor_interval_s * 3000)
        if not await node.redis.cmd.set(keys.JANITOR_LOCK, self._token, nx=True, px=ttl_ms):
            return
        try:
            await self._sweep()
        finally:
            await node.scripts.run("release_lock", [keys.JANITOR_LOCK], [self._token])

    async def _sweep(self) -> None:
        node = self.node
        sec, usec = await node.redis.cmd.time()
        now_ms = sec * 1000 + usec // 1000
        cutoff = now_ms - int(node.settings.fanout.node_ttl_s * 1000)
        for dead in await node.redis.cmd.zrangebyscore(keys.NODES, "-inf", cutoff):
            if dead == node.node_id:
                continue  # our own heartbeat lags: the heartbeat loop fences us instead
            if not await self._still_ours():
                return
            log.info("cleaning up dead node", extra={"dead_node_id": dead})
            await cleanup_node(node, dead)
            await node.redis.cmd.zrem(keys.NODES, dead)
        await rooms.repair_index(node, older_than_ms=_REPAIR_AFTER_MS)

    async def _still_ours(self) -> bool:
        """Fencing: stop as soon as the lock expired and may belong to another node."""
        ttl_ms = int(self.node.settings.fanout.janitor_interval_s * 3000)
        return bool(await self.node.scripts.run("extend_lock", [keys.JANITOR_LOCK],
                                                [self._token, ttl_ms]))
