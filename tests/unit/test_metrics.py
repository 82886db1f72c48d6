"""`chatd.metrics.Spread`, the lock-free histogram, as Prometheus reads it, and the
collector's full-collection pauses that feed one."""

from __future__ import annotations

import gc

from prometheus_client.parser import text_string_to_metric_families

from chatd.metrics import Metrics


def test_delivery_lag_buckets_are_cumulative_and_inclusive() -> None:
    metrics = Metrics()
    for age in (0.0, 0.0005, 0.001, 0.003, 0.3, 20.0):
        metrics.delivery_lag.observe(age)
    (family,) = [f for f in text_string_to_metric_families(metrics.render().decode())
                 if f.name == "chatd_delivery_lag_seconds"]
    assert family.type == "histogram"
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("chatd_delivery_lag_seconds_bucket", "0.001")] == 3.0  # le: 0.001 counts
    assert got[("chatd_delivery_lag_seconds_bucket", "0.005")] == 4.0
    assert got[("chatd_delivery_lag_seconds_bucket", "0.25")] == 4.0
    assert got[("chatd_delivery_lag_seconds_bucket", "0.5")] == 5.0
    assert got[("chatd_delivery_lag_seconds_bucket", "10.0")] == 5.0
    assert got[("chatd_delivery_lag_seconds_bucket", "+Inf")] == 6.0
    assert got[("chatd_delivery_lag_seconds_count", None)] == 6.0
    assert abs(got[("chatd_delivery_lag_seconds_sum", None)] - 20.3045) < 1e-9


def full_pauses(metrics: Metrics) -> dict[str, float]:
    (family,) = [f for f in text_string_to_metric_families(metrics.render().decode())
                 if f.name == "chatd_gc_full_pause_seconds"]
    return {s.name.removeprefix("chatd_gc_full_pause_seconds_"): s.value
            for s in family.samples if s.labels.get("le") in (None, "+Inf")}


def test_full_collections_are_timed_while_watched_and_young_ones_are_not() -> None:
    metrics = Metrics()
    assert full_pauses(metrics) == {"bucket": 0.0, "count": 0.0, "sum": 0.0}
    metrics.full_collections.watch()
    try:
        gc.collect(0)
        gc.collect(1)
        gc.collect()
        gc.collect()
    finally:
        metrics.full_collections.unwatch()
    gc.collect()  # not watched any more
    got = full_pauses(metrics)
    assert got["count"] == 2.0 and got["bucket"] == 2.0
    assert 0.0 < got["sum"] < 5.0
    metrics.full_collections.unwatch()  # twice is harmless
