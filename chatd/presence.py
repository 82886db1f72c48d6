"""Cluster-wide presence: online while any node holds a connection of the user.

Each node counts its own connections per user in the user's node hash (Lua,
under the user's tag). A node that dies without saying goodbye is removed
from those hashes by the janitor (`drop_node_users`), which also announces
the users that went offline with it: presence never sticks to a dead node.
"""

from __future__ import annotations

from collections import defaultdict

from chatd import keys, protocol, rooms
from chatd.node import Node


async def opened(node: Node, user_id: str, first_on_node: bool) -> None:
    """Count a new connection; raises TooManyConnections past the per-user limit."""
    if first_on_node:
        # Recorded before the count, so the janitor can always find what to undo.
        await node.redis.execute("SADD", keys.node_users(node.node_id), user_id)
    edge, ts = await _count(node, user_id, node.node_id, "open")
    if edge == 1:
        await publish(node, user_id, online=True, ts=ts)


async def closed(node: Node, user_id: str, last_on_node: bool) -> None:
    edge, ts = await _count(node, user_id, node.node_id, "close")
    if last_on_node:
        await node.redis.execute("SREM", keys.node_users(node.node_id), user_id)
    if edge == -1:
        await publish(node, user_id, online=False, ts=ts)


async def refused(node: Node, user_id: str, last_on_node: bool) -> None:
    """Undo `opened`'s bookkeeping for a connection the limit turned away."""
    if last_on_node:
        await node.redis.execute("SREM", keys.node_users(node.node_id), user_id)


async def drop_node_users(node: Node, dead_node_id: str) -> int:
    """Forget every connection a dead node held; returns how many users went offline."""
    offline = 0
    users_key = keys.node_users(dead_node_id)
    for user_id in await node.redis.cmd.smembers(users_key):
        edge, ts = await _count(node, user_id, dead_node_id, "drop")
        if edge == -1:
            offline += 1
            await publish(node, user_id, online=False, ts=ts)
    await node.redis.cmd.delete(users_key)
    return offline


async def snapshot(node: Node, user_ids: list[str]) -> list[dict[str, object]]:
    """Current presence of these users, for a `welcome`."""
    replies = await node.redis.execute_many(
        [cmd for user_id in user_ids for cmd in (("HLEN", keys.user_nodes(user_id)),
                                                 ("HGET", keys.user_presence(user_id),
                                                  "last_seen"))])
    return [{"user_id": user_id, "online": bool(replies[2 * i]),
             "last_seen": int(seen) if (seen := replies[2 * i + 1]) else None}
            for i, user_id in enumerate(user_ids)]


async def _count(node: Node, user_id: str, node_id: str, op: str) -> tuple[int, int]:
    edge, ts = await node.scripts.run(
        "presence_conn", [keys.user_nodes(user_id), keys.user_presence(user_id)],
        [node_id, op, node.settings.limits.max_connections_per_user])
    return int(edge), int(ts)


async def publish(node: Node, user_id: str, *, online: bool, ts: int) -> None:
    frame = protocol.encode({"type": "presence", "user_id": user_id, "online": online,
                             "last_seen": ts})
    by_partition: dict[int, list[str]] = defaultdict(list)
    for room_id in await rooms.user_room_ids(node, user_id):
        by_partition[keys.partition_of(room_id, node.partitions)].append(room_id)
    for p, room_ids in by_partition.items():
        await node.scripts.run(
            "publish_presence",
            [node.inbox_prefix(p), *(keys.room_nodes(p, r) for r in room_ids)],
            [user_id, frame, ",".join(room_ids), node.settings.fanout.inbox_max_len])
