"""User-addressed events: appended to the control inbox of every node serving the user.

Callers write the truth first (membership, session) and notify after. A node
registers in the user's node set before it reads that truth at `hello`, so a
connection either sees the new truth or is on a node that gets the notice.
"""

from __future__ import annotations

from collections.abc import Mapping

from chatd import keys
from chatd.node import Node


async def notify_user(node: Node, user_id: str, fields: Mapping[str, str]) -> int:
    """Returns the number of nodes notified."""
    cmd = node.redis.cmd
    targets = await cmd.hkeys(keys.user_nodes(user_id))
    for node_id in targets:
        await cmd.xadd(keys.control(node_id), dict(fields),
                       maxlen=node.settings.fanout.inbox_max_len, approximate=True)
    return len(targets)
