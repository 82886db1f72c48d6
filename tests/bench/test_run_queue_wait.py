"""bench.cluster.run_queue_wait_s: time runnable processes spent queued for a core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.cluster import run_queue_wait_s

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"),
                                reason="reads /proc/PID/task/TID/schedstat (Linux)")

# Spin for 0.4 s of CPU, say so, then stay alive (blocked on stdin) to be read.
SPIN = ("import sys, time\nend = time.process_time() + 0.4\n"
        "while time.process_time() < end: pass\nprint('spun', flush=True)\nsys.stdin.read()")


def test_more_spinners_than_cores_queue_for_them() -> None:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
                for _ in range(2 * (os.cpu_count() or 1) + 1)]
    try:
        for p in spinners:
            assert p.stdout is not None and p.stdout.readline() == "spun\n"
        waits = [run_queue_wait_s(p.pid) for p in spinners]
        # More CPU-bound processes than cores: together they must have queued.
        assert sum(waits) > 0.05, waits
    finally:
        for p in spinners:
            p.kill()
            p.communicate()  # reaps it and closes its pipes


def test_a_process_that_is_gone_reads_as_zero() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert run_queue_wait_s(p.pid) == 0.0
