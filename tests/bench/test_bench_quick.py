"""The benchmark harness must keep working: every scenario in --quick mode, once.

Correctness only (no loss, no reorder, no duplicates, the tables print); no
timing assertions: the machine is shared and small. One `python -m bench run
--scenario all --quick` runs for the whole module (about 40 s on an idle
2-core machine); each scenario is then checked from its JSON results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psutil", reason="bench deps missing: pip install -e '.[bench]' (psutil)")
pytest.importorskip("socketio",
                    reason="bench deps missing: pip install -e '.[bench]' (python-socketio)")

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["rooms", "direct", "fanout", "idle", "resume"]
STEPPED = {"rooms": ["chatd", "sio"], "direct": ["chatd"], "fanout": ["chatd", "sio"]}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--scenario", "all", "--quick", "--check",
         "--no-chart", "--results-dir", str(out), "--json", str(json_path)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench exited with {proc.returncode}:\n{output[-6000:]}"
    results = {r["scenario"]: r for r in json.loads(json_path.read_text())}
    return output, results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_scenario(quick_run: tuple[str, dict[str, Any]], scenario: str) -> None:
    output, results = quick_run
    assert f"== scenario {scenario} ==" in output
    result = results[scenario]
    assert result["problems"] == [], result["problems"]
    for system in STEPPED.get(scenario, []):
        steps = result["steps"][system]
        assert steps, f"{system}: no step ran"
        for step in steps:
            assert step["lost"] == 0 and step["late"] == 0 and step["dups"] == 0, step
            assert step["failed"] == 0, step["errors"]
            assert step["deliveries"] > 0, step
            # Every acked message reached every member connection (drain complete).
            assert step["drained"], step
    if scenario in STEPPED:
        assert "deliv/srv-cpu-s" in output
    if scenario == "idle":
        summary = result["summary"]["chatd"]
        assert summary["up_at_end"] == summary["connections"]
    if scenario == "resume":
        summary = result["summary"]["chatd"]
        assert summary["not_caught_up"] == 0 and summary["connect_failed"] == 0
        assert summary["lost"] == 0 and summary["late"] == 0 and summary["dups"] == 0
