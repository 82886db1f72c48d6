"""bench/gc_pause.py runs and shows what gc.freeze() takes out of a full collection."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prints_the_scanned_objects_before_and_after_freeze() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.gc_pause"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    before = re.search(r"([\d,]+)\s+[\d.]+\s+before gc.freeze\(\)", out)
    after = re.search(r"([\d,]+)\s+[\d.]+\s+after gc.freeze\(\) \(([\d,]+) frozen\)", out)
    assert before and after, out
    scanned_before = int(before.group(1).replace(",", ""))
    assert scanned_before > 10_000  # chatd's modules and app: what a node would rescan
    assert int(after.group(1).replace(",", "")) < 0.01 * scanned_before
    assert int(after.group(2).replace(",", "")) >= 0.9 * scanned_before
