"""The stall probe sees a process that could not run (bench/stallprobe.py)."""

from __future__ import annotations

import sys
import time

from bench.stallprobe import StallProbe


def test_a_stretch_the_probe_could_not_run_is_one_stall_of_about_its_length() -> None:
    interval = sys.getswitchinterval()
    with StallProbe() as probe:
        time.sleep(0.05)
        start = time.time()
        # Hold the GIL for 60 ms: the probe's thread cannot run, as when the machine stops.
        sys.setswitchinterval(1.0)
        try:
            end = time.perf_counter() + 0.06
            while time.perf_counter() < end:
                pass
        finally:
            sys.setswitchinterval(interval)
        time.sleep(0.05)
        now = time.time()
        count, total_ms = probe.between(start, now)
        assert probe.between(now + 1, now + 2) == (0, 0)  # counted in the window it ended in
    assert count >= 1 and total_ms >= 45, (count, total_ms)
