"""The rooms scenario's targets block (bench/report.py `targets`): each target judged from
the run's own steps, never from a step that would flatter it."""

from __future__ import annotations

from typing import Any

from bench.report import ScenarioResult, StepResult, ratios, render, targets


def step(system: str, offered: float, *, p99: float = 1.0, saturated: str = "",
         cpu: float = 1.0, scripts: float = 1.0, machine_cpu: float = 0.0,
         cores: int = 0) -> StepResult:
    fields: dict[str, Any] = dict(
        system=system, step=0, offered=offered, per_sender=offered / 1000,
        expected_delivered=offered * 10, sent_rate=offered, delivered_rate=offered * 10,
        acks_rate=offered, span_s=10.0, span_sends=int(offered * 10),
        span_deliveries=int(offered * 100), server_cpu=cpu, redis_cpu=0.1, client_cpu=0.1,
        other_cpu=0.0, scripts_per_send=scripts, cmds_per_send=14.0, drained=not saturated,
        saturated=saturated, p99_ms=p99, machine_cpu=machine_cpu, cores=cores)
    return StepResult(**fields)


def rooms(*steps: StepResult) -> ScenarioResult:
    result = ScenarioResult("rooms", "python -m bench run --scenario rooms")
    for s in steps:
        result.steps.setdefault(s.system, []).append(s)
    return result


def test_p99_is_judged_at_the_first_step_from_half_of_saturation() -> None:
    result = rooms(step("chatd", 4000, p99=3.0), step("chatd", 5000, p99=6.5),
                   step("chatd", 6000, p99=9.0), step("chatd", 10000, saturated="behind"))
    (p99, scripts) = targets(result)
    assert p99 == ("p99 at half of saturation (< 5 ms): saturated at 10,000 sends/s; "
                   "at 5,000 sends/s p99 6.5 ms: NOT met")
    assert scripts == "script calls per send (1): at most 1.00: met"
    assert "targets (issue 8; figures from this run):\n  " + p99 in render(result)


def test_a_step_below_half_is_never_used() -> None:
    result = rooms(step("chatd", 1000, p99=2.0), step("chatd", 16000, saturated="behind"))
    assert targets(result)[0] == (
        "p99 at half of saturation (< 5 ms): not measured, no step that kept up at "
        "8,000 sends/s or more; add one to --rates")


def test_met_and_not_saturated() -> None:
    met = rooms(step("chatd", 2000, p99=4.9), step("chatd", 4000, saturated="behind"))
    assert targets(met)[0].endswith("at 2,000 sends/s p99 4.9 ms: met")
    unsaturated = rooms(step("chatd", 2000), step("chatd", 3000))
    assert targets(unsaturated)[0] == (
        "p99 at half of saturation (< 5 ms): not measured, chatd kept up to 3,000 sends/s; "
        "offer more with --rates")


def test_more_than_one_script_per_send_is_not_met() -> None:
    assert targets(rooms(step("chatd", 1000, scripts=1.5)))[1] == (
        "script calls per send (1): at most 1.50: NOT met")


def test_the_peer_ratio_counts_only_steps_where_the_peer_kept_up() -> None:
    result = rooms(step("chatd", 500, cpu=1.0), step("chatd", 1000, cpu=1.0),
                   step("chatd", 2000, cpu=2.0),
                   step("sio", 500, cpu=2.5), step("sio", 1000, cpu=1.9),
                   step("sio", 2000, cpu=20.0, saturated="behind"))
    assert targets(result)[-1] == (
        "chatd / python-socketio deliveries per server CPU-s (>= 2x) where python-socketio "
        "keeps up: median 2.20x over 2 steps: met")


def test_each_peer_s_p99_at_half_of_its_own_saturation_is_given_for_comparison() -> None:
    """Judged like chatd's, but not a target: a peer that saturates at 10,000 sends/s
    is read at its first step from 5,000 on; one that kept up says so."""
    result = rooms(step("chatd", 4000, p99=3.0), step("chatd", 14000, saturated="behind"),
                   step("chatd", 7000, p99=8.0, machine_cpu=19.0, cores=2),
                   step("node", 4000, p99=30.0), step("node", 6000, p99=35.3,
                                                      machine_cpu=18.6, cores=2),
                   step("node", 10000, p99=1100.0, saturated="p99 > 1000 ms"),
                   step("sio", 500, p99=3.0), step("sio", 1000, p99=4.4))
    lines = targets(result)
    assert lines[:3] == [
        "p99 at half of saturation (< 5 ms): saturated at 14,000 sends/s; at 7,000 sends/s "
        "p99 8.0 ms, machine 95% busy: NOT met",
        "  python-socketio at half of its own saturation, for comparison: not measured, "
        "python-socketio kept up to 1,000 sends/s; offer more with --rates",
        "  Node socket.io at half of its own saturation, for comparison: saturated at 10,000 "
        "sends/s; at 6,000 sends/s p99 35.3 ms, machine 93% busy"]
    assert "\n    Node socket.io at half" in render(result)


def test_other_scenarios_have_no_targets_block() -> None:
    result = rooms(step("chatd", 1000))
    result.scenario = "fanout"
    assert targets(result) == []
    assert "targets (" not in render(result)


def test_a_rate_given_more_than_once_is_judged_by_its_median_step() -> None:
    result = rooms(step("chatd", 5000, p99=16.0), step("chatd", 5000, p99=4.0),
                   step("chatd", 5000, p99=4.5), step("chatd", 6000, p99=3.0),
                   step("chatd", 10000, saturated="behind"))
    assert targets(result)[0] == (
        "p99 at half of saturation (< 5 ms): saturated at 10,000 sends/s; at 5,000 sends/s "
        "median p99 of 3 steps (16.0, 4.0, 4.5) 4.5 ms: met")



def test_the_p99_target_says_how_busy_the_machine_was_at_that_rate() -> None:
    """Over a span of 10 s on 2 cores: 18.8, 19.2 and 19.6 CPU-s, their median 96%."""
    result = rooms(step("chatd", 4000, p99=3.0, machine_cpu=12.0, cores=2),
                   step("chatd", 7000, p99=20.0, machine_cpu=19.2, cores=2),
                   step("chatd", 14000, saturated="behind", machine_cpu=20.0, cores=2),
                   step("chatd", 7000, p99=9.0, machine_cpu=18.8, cores=2),
                   step("chatd", 7000, p99=12.0, machine_cpu=19.6, cores=2))
    assert targets(result)[0] == (
        "p99 at half of saturation (< 5 ms): saturated at 14,000 sends/s; at 7,000 sends/s "
        "median p99 of 3 steps (20.0, 9.0, 12.0) 12.0 ms, machine 96% busy: NOT met")
    assert [f"{s.machine_busy:.2f}" for s in result.steps["chatd"]] == [
        "0.60", "0.96", "1.00", "0.94", "0.98"]
    costs = render(result).split("busy = ")[1]
    assert " 60 " in costs and " 94 " in costs  # the "busy %" column


def test_steps_at_half_of_saturation_after_the_series_are_judged_with_it() -> None:
    # What `--half-steps 3` appends once 10,000 saturated: three steps at 5,000.
    result = rooms(step("chatd", 4000, p99=3.0), step("chatd", 6000, p99=9.0),
                   step("chatd", 10000, saturated="behind"), step("chatd", 5000, p99=7.0),
                   step("chatd", 5000, p99=4.0), step("chatd", 5000, p99=4.8))
    assert targets(result)[0] == (
        "p99 at half of saturation (< 5 ms): saturated at 10,000 sends/s; at 5,000 sends/s "
        "median p99 of 3 steps (7.0, 4.0, 4.8) 4.8 ms: met")


def test_a_peer_is_compared_with_chatd_s_stepped_series_not_a_repeat() -> None:
    result = rooms(step("chatd", 1000, cpu=1.0), step("chatd", 2000, saturated="behind"),
                   step("chatd", 1000, cpu=4.0), step("sio", 1000, cpu=2.0))
    (ratio,) = ratios(result)
    assert ratio["offered"] == 1000 and ratio["deliv_per_cpu_ratio"] == 2.0

def idle(**figures: Any) -> ScenarioResult:
    result = ScenarioResult("idle", "python -m bench run --scenario idle")
    result.summary["chatd"] = {"connections": 19000, "nodes": 1, "up_at_end": 19000,
                               "rss_per_conn_kib": 16.22, "node_open_files": 19051,
                               "node_open_files_limit": 20000, **figures}
    return result


def test_idle_says_how_many_connections_one_node_held_and_what_stopped_it() -> None:
    assert targets(idle()) == [
        "RSS per idle connection (<= 20 KiB): 16.22 KiB: met",
        "idle connections on one node (50,000): not measured, this run held 19,000 per node "
        "(ask with --nodes 1 --conns 50000); a node here may open 20,000 files, one per "
        "connection, and the busiest had 19,051 open: fewer than 50,000 connections fit"]
    assert "(ask with --nodes 1 --conns 50000 --workers 3)" in targets(
        idle(loadgen_files=19_936))[1]
    roomy = idle(node_open_files_limit=1_048_576)
    assert targets(roomy)[1].endswith("the busiest had 19,051 open")
    assert "targets (issue 8; figures from this run):" in render(idle())


def test_idle_connections_are_counted_per_node_and_must_all_stay_up() -> None:
    spread = idle(connections=100_000, nodes=2, up_at_end=100_000, rss_per_conn_kib=21.0)
    assert targets(spread) == [
        "RSS per idle connection (<= 20 KiB): 21.00 KiB: NOT met",
        "idle connections on one node (50,000): 50,000 per node, 100,000 of 100,000 up at "
        "the end: met"]
    capped = idle(connections_asked=50_000, connections=19_000, up_at_end=19_000,
                  not_connected=31_000, not_connected_because="HandshakeError('no upgrade: 503')",
                  node_open_files=19_260, loadgen_files=19_936)
    assert targets(capped)[1] == (
        "idle connections on one node (50,000): 19,000 per node, 19,000 of 50,000 up at the "
        "end; 31,000 failed to connect (first: HandshakeError('no upgrade: 503')); a node here "
        "may open 20,000 files, one per connection, and the busiest had 19,260 open: NOT met")
    dropped = idle(connections=50_000, up_at_end=49_999, node_open_files_limit=1_048_576)
    assert targets(dropped)[1].startswith(
        "idle connections on one node (50,000): 50,000 per node, 49,999 of 50,000 up at the "
        "end: NOT met")


def test_idle_over_workers_is_met_by_the_port_not_by_one_node() -> None:
    """Each worker is a node: 50,000 over three of them is not 50,000 on one node."""
    workers = idle(connections=50_000, up_at_end=50_000, workers_per_node=3,
                   node_open_files=16_921)
    assert targets(workers)[1] == (
        "idle connections on one node (50,000): 50,000 on one port of a chatd with 3 workers "
        "(nodes); a node here may open 20,000 files, one per connection, and the busiest had "
        "16,921 open; 50,000 of 50,000 up at the end: met by the port, NOT by one node process")
    one_down = idle(connections=50_000, up_at_end=49_999, workers_per_node=3)
    assert targets(one_down)[1].endswith(": NOT met")
