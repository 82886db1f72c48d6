"""WebSocket liveness: one sweep over a node's connections instead of timers per connection.

aiohttp's own heartbeat (`WebSocketResponse(heartbeat=...)`) keeps two timers
per connection, re-arms one for every frame received and sends each ping from
a task of its own: 85-113 us of server CPU per ping (docs/performance.md).
Here a loop runs SWEEPS_PER_HEARTBEAT times per `limits.heartbeat_s`. It
pings a connection at the first sweep that finds it silent for at least
`heartbeat_s` less one sweep interval, so an idle connection sees traffic at
least every `heartbeat_s` (what keeps it open through a proxy's read
timeout), and drops one that has not answered within half a heartbeat, as
aiohttp did: a client that stopped answering is gone 1.25-1.75 heartbeats
after its last frame.

The same sweep closes a connection whose session has expired (4001, as a
logout does): expiry is otherwise only checked at `hello` and on HTTP calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from chatd.conn import Conn
from chatd.fanout import Fanout
from chatd.loops import Loop
from chatd.node import Node
from chatd.protocol import CLOSE_UNAUTHORIZED, PING_FRAME

SWEEPS_PER_HEARTBEAT = 4


def sweep(conns: Iterable[Conn], now: float, heartbeat_s: float) -> int:
    """Ping the silent connections, drop the unanswering ones, close those whose session
    expired; returns how many were dropped."""
    ping_after_s = heartbeat_s - heartbeat_s / SWEEPS_PER_HEARTBEAT
    dropped = 0
    for conn in conns:
        if now >= conn.session_ends:
            conn.close(CLOSE_UNAUTHORIZED)
        elif conn.ping_sent > conn.last_heard:  # a ping is out, nothing heard since
            if now - conn.ping_sent >= heartbeat_s / 2:
                conn.drop()
                dropped += 1
        elif now - conn.last_heard >= ping_after_s and not conn.closing:
            conn.ping_sent = now
            conn.control(PING_FRAME)
    return dropped


def heartbeat_loop(node: Node, fanout: Fanout) -> Loop:
    heartbeat_s = node.settings.limits.heartbeat_s
    dropped = node.metrics.heartbeat_drops

    async def step() -> None:
        dropped.inc(sweep(fanout.all_conns(), time.monotonic(), heartbeat_s))

    return Loop("ws-heartbeat", step, node.metrics, interval_s=heartbeat_s / SWEEPS_PER_HEARTBEAT)
