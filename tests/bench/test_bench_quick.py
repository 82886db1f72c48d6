"""The benchmark harness must keep working: every scenario in --quick mode, once.

Correctness only (no loss, no reorder, no duplicates, the tables print); no
timing assertions: the machine is shared and small. One `python -m bench run
--scenario all --quick` runs for the whole module (about a minute on an idle
2-core machine, plus an `npm ci` the first time); each scenario is then
checked from its JSON results. The Node peer runs only where node and npm
are; elsewhere its checks are skipped with the reason the run printed.
"""

from __future__ import annotations

import json
import os
import re
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
NODES = 2
# The npm ci of a first run (bounded at 300 s by the harness) comes on top of the run.
RUN_TIMEOUT_S = 540


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--scenario", "all", "--quick", "--check",
         "--nodes", str(NODES), "--no-chart", "--results-dir", str(out), "--json", str(json_path)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench exited with {proc.returncode}:\n{output[-6000:]}"
    results = {r["scenario"]: r for r in json.loads(json_path.read_text())}
    return output, results


def _check_steps(system: str, steps: list[dict[str, Any]]) -> None:
    assert steps, f"{system}: no step ran"
    for step in steps:
        assert step["lost"] == 0 and step["late"] == 0 and step["dups"] == 0, step
        assert step["failed"] == 0, step["errors"]
        assert step["deliveries"] > 0, step
        # Every acked message reached every member connection (drain complete).
        assert step["drained"], step


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_scenario(quick_run: tuple[str, dict[str, Any]], scenario: str) -> None:
    output, results = quick_run
    assert f"== scenario {scenario} ==" in output
    result = results[scenario]
    assert result["problems"] == [], result["problems"]
    for system in STEPPED.get(scenario, []):
        _check_steps(system, result["steps"][system])
    if scenario in STEPPED:
        assert "deliv/srv-cpu-s" in output
    if scenario == "idle":
        summary = result["summary"]["chatd"]
        assert summary["up_at_end"] == summary["connections"]
        # Each node holds at least its share of the connections, one file each.
        assert (summary["connections"] // NODES <= summary["node_open_files"]
                <= summary["node_open_files_limit"]), summary
        assert "idle connections on one node (50,000): not measured" in output
        # Read from the nodes' /metrics: none or some full collections, each timed.
        assert summary["full_gcs"] >= 0
        assert (summary["full_gc_longest_under_s"] > 0) == (summary["full_gcs"] > 0), summary
    if scenario == "resume":
        summary = result["summary"]["chatd"]
        assert summary["not_caught_up"] == 0 and summary["connect_failed"] == 0
        assert summary["lost"] == 0 and summary["late"] == 0 and summary["dups"] == 0


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("scenario", ["rooms", "fanout"])
def test_quick_node_peer(quick_run: tuple[str, dict[str, Any]], scenario: str) -> None:
    output, results = quick_run
    steps = results[scenario]["steps"].get("node")
    if steps is None:
        # Not a failure (no node here, or npm ci failed), but the run must say why.
        skipped = re.search(r"node peer skipped: (.+)", output)
        assert skipped, "the node peer neither ran nor said why it was skipped"
        pytest.skip(f"node peer: {skipped.group(1)}")
    _check_steps("node", steps)
    section = output.split(f"== scenario {scenario} ==", 1)[1].split("== scenario ", 1)[0]
    rows = re.findall(r"^node +[0-9]", section, re.MULTILINE)
    # Its row in the rates table, in the CPU table and in the chatd/peer ratios.
    assert len(rows) == 3 * len(steps), section


def test_charts_are_redrawn_from_the_results(quick_run: tuple[str, dict[str, Any]],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main  # after the importorskips above

    _, results = quick_run
    path = tmp_path / "results.json"
    path.write_text(json.dumps(list(results.values())))
    assert main(["chart", str(path), "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for scenario in STEPPED:
        chart = tmp_path / f"results-{scenario}.png"
        assert (chart.stat().st_size > 0 if chart.exists()
                else "matplotlib is not installed" in printed), printed


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_rooms_repeats_half_of_saturation(tmp_path: Path) -> None:
    """Once chatd saturates, `rooms` runs --half-steps more steps at half that rate: here
    every step counts as saturated (a p99 objective of 1 us), so the first one is."""
    json_path = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--scenario", "rooms", "--quick", "--no-peer",
         "--rates", "60", "--slo-ms", "0.001", "--half-steps", "2", "--no-chart",
         "--results-dir", str(tmp_path), "--json", str(json_path)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench exited with {proc.returncode}:\n{output[-6000:]}"
    (result,) = json.loads(json_path.read_text())
    steps = result["steps"]["chatd"]
    assert [s["offered"] for s in steps] == [60, 30, 30], output[-3000:]
    assert "chatd step 1 (half of saturation, 1 of 2): offered 30/s" in output
    assert "chatd step 2 (half of saturation, 2 of 2): offered 30/s" in output
    for s in steps:
        assert s["lost"] == 0 and s["late"] == 0 and s["dups"] == 0, s


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_quick_idle_over_workers_reads_every_worker(tmp_path: Path) -> None:
    """One chatd of two workers: every connection up, and the full collections read
    from each worker's own /metrics (behind the shared port, any one would answer)."""
    json_path = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--scenario", "idle", "--quick", "--nodes", "1",
         "--chatd-env", "CHATD_SERVER__WORKERS=2", "--results-dir", str(tmp_path),
         "--json", str(json_path)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    [result] = json.loads(json_path.read_text())
    summary = result["summary"]["chatd"]
    assert summary["workers_per_node"] == 2
    assert summary["up_at_end"] == summary["connections"] == summary["connections_asked"]
    assert summary["full_gc_sources"] == 2
