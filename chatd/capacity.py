"""How many WebSockets a node holds at once.

Each WebSocket is a file, and a process at its open-files limit can open no file
at all: not a health check or a /metrics scrape, not a new connection to Redis
after one dropped, which would cut the node off from every room. So a node keeps
files back and answers the WebSocket over its cap with 503 `unavailable` before
the upgrade; the client tries another node, or again later.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

from chatd.errors import ChatError

# Kept back from the open-files limit: a twentieth of it, at least this many (Redis
# pools, HTTP requests, listening sockets, logs), but never more than a quarter.
RESERVE_MIN = 256
RESERVE_SHARE = 20
RESERVE_MAX_SHARE = 4
NO_LIMIT_CAP = 100_000_000  # no file limit to stay under (an unlimited RLIMIT_NOFILE)


def cap_for(configured: int, open_files: int | None = None) -> int:
    """`limits.max_connections_per_node`, or when 0 the open-files limit (the process's
    own by default) less what is kept back."""
    if configured:
        return configured
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY:
        return NO_LIMIT_CAP
    reserve = max(min(RESERVE_MIN, open_files // RESERVE_MAX_SHARE), open_files // RESERVE_SHARE)
    return max(1, open_files - reserve)


class Sockets:
    """WebSockets open on this node, counted from their upgrade request, at most `cap`."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.open >= self.cap:
            raise ChatError("unavailable", "this node holds all the connections it can; "
                                           "connect to another node or retry later")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
