"""Prometheus metrics of one node, in a registry of its own (no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("chatd_connections", "Open WebSocket connections", registry=r)
        self.frames_in = Counter("chatd_frames_in", "WebSocket frames received", registry=r)
        self.frames_out = Counter("chatd_frames_out", "WebSocket frames sent to clients",
                                  registry=r)
        self.sends = Counter("chatd_sends", "Messages accepted (acked)", ["duplicate"],
                             registry=r)
        self.errors = Counter("chatd_errors", "Errors returned to clients", ["code"], registry=r)
        self.closes = Counter("chatd_ws_closes", "WebSocket closes by code", ["code"], registry=r)
        self.heartbeat_drops = Counter("chatd_heartbeat_drops",
                                       "WebSockets dropped for not answering pings", registry=r)
        self.redis_latency = Histogram("chatd_redis_call_seconds", "Redis script call latency",
                                       ["script"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inbox_entries = Counter("chatd_inbox_entries", "Fanout entries read from inboxes",
                                     registry=r)
        self.loop_errors = Counter("chatd_background_errors",
                                   "Errors in background loops (retried)", ["loop"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
