"""Prometheus metrics of one node, in a registry of its own (no process globals)."""

from __future__ import annotations

import bisect
import contextlib
import gc
import itertools
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_GC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Tally:
    """A counter bumped once per frame: a plain int that `/metrics` reads when scraped.
    prometheus_client's Counter takes a lock on every `inc` (0.27 us here, and a
    message into a room of ten is eleven frames); a node's event loop is the only
    writer, so the lock buys nothing."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Spread:
    """A histogram observed once per inbox read: plain counts, for the reason of `Tally`."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # Prometheus' "le"
        self.total += value


class FullCollections:
    """How long the collector's full collections stop the process. They scan every
    tracked object, and each connection holds about 65 (docs/performance.md), so
    they grow with the connections a node holds; young collections stay short.
    `gc.callbacks` is the process's: `watch` while the node runs, `unwatch` after."""

    def __init__(self) -> None:
        self.pauses = Spread(_GC_BUCKETS)
        self._started = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.observe(time.perf_counter() - self._started)

    def watch(self) -> None:
        gc.callbacks.append(self._on_gc)

    def unwatch(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)


class _Tallies(Collector):
    def __init__(self, tallies: dict[str, tuple[str, Tally]],
                 spreads: dict[str, tuple[str, Spread]]) -> None:
        self._tallies = tallies
        self._spreads = spreads

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, tally) in self._tallies.items():
            yield CounterMetricFamily(name, documentation, value=tally.value)
        for name, (documentation, spread) in self._spreads.items():
            cumulative = list(itertools.accumulate(spread.counts))
            buckets = [(str(bound), float(count))
                       for bound, count in zip(spread.bounds, cumulative, strict=False)]
            yield HistogramMetricFamily(name, documentation,
                                        buckets=[*buckets, ("+Inf", float(cumulative[-1]))],
                                        sum_value=spread.total)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("chatd_connections", "Open WebSocket connections, counted "
                                 "from their upgrade request", registry=r)
        self.connections_max = Gauge(
            "chatd_connections_max", "WebSockets this node takes at once (limits."
            "max_connections_per_node, or its open-files limit less what it keeps back); "
            "one more is refused with 503", registry=r)
        Gauge("chatd_gc_frozen_objects",
              "Objects out of the garbage collector's reach (gc.freeze), which full "
              "collections skip", registry=r).set_function(gc.get_freeze_count)
        self.frames_in = Tally()
        self.frames_out = Tally()
        self.inbox_entries = Tally()
        self.inbox_waits = Tally()
        self.delivery_lag = Spread(_LAG_BUCKETS)
        self.full_collections = FullCollections()
        r.register(_Tallies({
            "chatd_frames_in": ("WebSocket frames received", self.frames_in),
            "chatd_frames_out": ("WebSocket frames sent to clients", self.frames_out),
            "chatd_inbox_entries": ("Fanout entries read from inboxes", self.inbox_entries),
            "chatd_inbox_paced_waits": (
                "Waits of fanout.coalesce_ms between inbox reads, while messages to big rooms "
                "kept this node busy", self.inbox_waits),
        }, {
            "chatd_delivery_lag_seconds": (
                "Age of room inbox entries (since Redis stored them, on Redis' clock) when "
                "this node hands them to its sockets: the oldest new entry of each read",
                self.delivery_lag),
            "chatd_gc_full_pause_seconds": (
                "Pauses of the process for the garbage collector's full collections, "
                "which grow with the objects (connections) the node holds",
                self.full_collections.pauses),
        }))
        sends = Counter("chatd_sends", "Messages accepted (acked)", ["duplicate"], registry=r)
        # The two children made once: `labels()` on every send costs a lock and a lookup.
        self.sends_new = sends.labels("false")
        self.sends_duplicate = sends.labels("true")
        self.errors = Counter("chatd_errors", "Errors returned to clients", ["code"], registry=r)
        self.closes = Counter("chatd_ws_closes", "WebSocket closes by code", ["code"], registry=r)
        self.heartbeat_drops = Counter("chatd_heartbeat_drops",
                                       "WebSockets dropped for not answering pings", registry=r)
        self.redis_latency = Histogram("chatd_redis_call_seconds", "Redis script call latency",
                                       ["script"], buckets=_LATENCY_BUCKETS, registry=r)
        self.loop_errors = Counter("chatd_background_errors",
                                   "Errors in background loops (retried)", ["loop"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
