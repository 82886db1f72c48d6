"""Token buckets in Redis (lua/take_token.lua), shared by every node.

A bucket lives in Redis rather than in the process so that a client spreading
its requests over several nodes gets the same budget as on one node.
"""

from __future__ import annotations

from chatd import keys
from chatd.errors import ChatError
from chatd.node import Node


async def take(node: Node, bucket_key: str, rate_per_s: float, burst: int) -> None:
    """Take one token from the bucket, or raise `rate_limited` with the wait until one refills."""
    taken, retry_after_ms = await node.scripts.run("take_token", [bucket_key],
                                                   [rate_per_s, burst, 1])
    if not int(taken):
        raise ChatError("rate_limited", "too many requests, retry later",
                        retry_after_ms=int(retry_after_ms))


async def take_room_op(node: Node, user_id: str) -> None:
    """Every room and member is kept in Redis for good: a script creating them as fast
    as it can must be slowed."""
    limits = node.settings.limits
    await take(node, keys.room_ops_bucket(user_id), limits.room_ops_rate_per_s,
               limits.room_ops_burst)


async def take_read(node: Node, user_id: str) -> None:
    """Reads are cheap one by one, but a page can be 200 messages and a user look-up
    tells whether a name exists: a script looping over them must be slowed."""
    limits = node.settings.limits
    await take(node, keys.read_bucket(user_id), limits.read_rate_per_s, limits.read_burst)
