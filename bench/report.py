"""Results: per-step records, the printed tables, the chatd/peer ratios, JSON and the chart."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SYSTEM_LABELS = {"chatd": "chatd", "sio": "python-socketio (peer)",
                 "node": "Node socket.io 4.8 + redis-streams-adapter (peer)"}


@dataclass
class StepResult:
    system: str
    step: int
    offered: float  # sends/s asked of the load generators
    per_sender: float  # sends/s of each sender
    expected_delivered: float  # offered x recipients per send
    sent_rate: float  # sends/s actually made (measurement window)
    delivered_rate: float  # first deliveries/s received (measurement window)
    acks_rate: float
    span_s: float  # step start to end of drain: what CPU and counts below cover
    span_sends: int
    span_deliveries: int
    server_cpu: float
    redis_cpu: float
    client_cpu: float
    other_cpu: float  # CPU-s of processes outside the run during the span (machine noise)
    scripts_per_send: float
    cmds_per_send: float
    drained: bool
    saturated: str = ""  # why this step counts as saturated ("" = it kept up)
    wait_s: float = 0.0  # seconds the run's processes waited for a core (run queue), summed
    machine_cpu: float = 0.0  # CPU-s of every process on the machine during the span
    cores: int = 0  # the machine's, which share that CPU
    stalls: int = 0  # whole-machine stalls of 10 ms or more while the step sent (stallprobe.py)
    stall_ms: float = 0.0  # their total length
    forks: int = 0  # Valkey AOF rewrites and RDB saves that ran during the span (each a process)
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    ack_p99_ms: float | None = None
    lag_p99_ms: float | None = None
    deliveries: int = 0  # deliveries of this step's messages (whenever they arrived)
    lost: int = 0
    late: int = 0
    dups: int = 0
    failed: int = 0  # sends answered with an error, or cut off by a closed connection
    errors: dict[str, int] = field(default_factory=dict)  # error code -> count (span)
    closes: dict[str, int] = field(default_factory=dict)  # unexpected close code -> count

    @property
    def deliv_per_server_cpu_s(self) -> float:
        return self.span_deliveries / self.server_cpu if self.server_cpu > 0 else math.nan

    @property
    def machine_busy(self) -> float:
        """The share of the machine's cores busy over the span, whoever used them: how
        long a woken process may have to wait for one."""
        if not self.cores or self.span_s <= 0:
            return math.nan
        return self.machine_cpu / (self.cores * self.span_s)

    @property
    def server_cpu_per_1k(self) -> float:
        return 1000 * self.server_cpu / self.span_deliveries if self.span_deliveries else math.nan

    @property
    def redis_cpu_per_1k(self) -> float:
        return 1000 * self.redis_cpu / self.span_deliveries if self.span_deliveries else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(deliv_per_server_cpu_s=self.deliv_per_server_cpu_s,
                 machine_busy=self.machine_busy,
                 server_cpu_per_1k=self.server_cpu_per_1k,
                 redis_cpu_per_1k=self.redis_cpu_per_1k)
        return d


@dataclass
class ScenarioResult:
    scenario: str
    command: str
    setup: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, list[StepResult]] = field(default_factory=dict)
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # idle, resume
    notes: list[str] = field(default_factory=list)

    def correctness_problems(self) -> list[str]:
        """Loss, order violations or duplicates anywhere (chatd: any; peer: reported)."""
        out = []
        for system, steps in self.steps.items():
            for s in steps:
                if s.lost or s.late or s.dups:
                    out.append(f"{system} step {s.step}: lost {s.lost}, late {s.late}, "
                               f"dups {s.dups}")
        for system, summary in self.summary.items():
            for key in ("lost", "late", "dups", "not_caught_up", "connect_failed"):
                if summary.get(key):
                    out.append(f"{system}: {key} {summary[key]}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "command": self.command, "setup": self.setup,
                "steps": {k: [s.to_dict() for s in v] for k, v in self.steps.items()},
                "summary": self.summary, "notes": self.notes,
                "problems": self.correctness_problems()}


# ---------------------------------------------------------------- formatting


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 10000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _table(header: list[tuple[str, int]], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i > 0 else c.ljust(w)
                         for i, (c, (_, w)) in enumerate(zip(cells, header, strict=True)))

    return "\n".join([line([name for name, _ in header]), *(line(r) for r in rows)])


_RATES = [("system", 6), ("step", 4), ("offered/s", 9), ("sent/s", 9), ("deliv/s", 9),
          ("acks/s", 8), ("p50 ms", 7), ("p99 ms", 8), ("p999 ms", 8),
          ("stalls", 9), ("forks", 5), ("lost", 6),
          ("late", 5), ("dup", 4), ("failed", 6), ("saturated", 9)]
_COSTS = [("system", 6), ("step", 4), ("deliv/srv-cpu-s", 15), ("srv cpu-s", 9),
          ("redis cpu-s", 11), ("cli cpu-s", 9), ("other cpu-s", 11), ("core wait s", 11),
          ("busy %", 6),
          ("srv cpu-s/1k", 12),
          ("redis cpu-s/1k", 14), ("scripts/send", 12), ("cmds/send", 9)]


def steps_table(result: ScenarioResult) -> str:
    """Two tables: rates, latency and correctness; then CPU costs."""
    rates, costs = [], []
    for system, steps in result.steps.items():
        for s in steps:
            rates.append([system, str(s.step), _f(s.offered), _f(s.sent_rate),
                          _f(s.delivered_rate), _f(s.acks_rate), _f(s.p50_ms), _f(s.p99_ms),
                          _f(s.p999_ms), f"{s.stalls}/{s.stall_ms:.0f}ms", str(s.forks),
                          str(s.lost), str(s.late), str(s.dups), str(s.failed),
                          "yes" if s.saturated else "no"])
            costs.append([system, str(s.step), _f(s.deliv_per_server_cpu_s, 0),
                          _f(s.server_cpu, 2), _f(s.redis_cpu, 2), _f(s.client_cpu, 2),
                          _f(s.other_cpu, 2), _f(s.wait_s, 2), _f(100 * s.machine_busy, 0),
                          _f(s.server_cpu_per_1k, 3),
                          _f(s.redis_cpu_per_1k, 3), _f(s.scripts_per_send, 2),
                          _f(s.cmds_per_send, 1)])
    return (_table(_RATES, rates) + "\n(stalls = times an idle probe thread woke 10 ms or "
            "more late while the step sent: how many / their total; bench/stallprobe.py; "
            "forks = Valkey AOF rewrites or RDB saves running during the step, each a "
            "process that takes a core meanwhile)"
            "\n\nCPU (step start to end of its drain; other = "
            "processes outside this run; core wait = time the run's processes were "
            "runnable but queued for a core; busy = CPU-s of every process over the cores' "
            "seconds)\n" + _table(_COSTS, costs))


def first_at_each_rate(steps: list[StepResult]) -> dict[float, StepResult]:
    """The stepped series: a rate run again later (half of saturation, or given twice
    in --rates) keeps its first step here."""
    first: dict[float, StepResult] = {}
    for s in steps:
        first.setdefault(s.offered, s)
    return first


def ratios(result: ScenarioResult) -> list[dict[str, Any]]:
    """chatd / each peer at equal offered load (steps both systems ran)."""
    chatd = first_at_each_rate(result.steps.get("chatd", []))
    out = []
    for system, steps in result.steps.items():
        if system == "chatd":
            continue
        for peer in steps:
            mine = chatd.get(peer.offered)
            if mine is None:
                continue
            eff = mine.deliv_per_server_cpu_s / peer.deliv_per_server_cpu_s \
                if peer.deliv_per_server_cpu_s else math.nan
            p99 = mine.p99_ms / peer.p99_ms if mine.p99_ms and peer.p99_ms else math.nan
            out.append({"peer": system, "offered": peer.offered, "deliv_per_cpu_ratio": eff,
                        "p99_ratio": p99, "chatd_deliv_per_cpu": mine.deliv_per_server_cpu_s,
                        "peer_deliv_per_cpu": peer.deliv_per_server_cpu_s,
                        "chatd_p99_ms": mine.p99_ms, "peer_p99_ms": peer.p99_ms})
    return out


def ratios_table(result: ScenarioResult) -> str:
    rows = ratios(result)
    if not rows:
        return ""
    lines = ["peer  offered/s  chatd deliv/srv-cpu-s  peer deliv/srv-cpu-s  ratio   "
             "chatd p99 ms  peer p99 ms  p99 ratio"]
    for r in rows:
        lines.append(f"{r['peer']:<4}  {_f(r['offered']):>9}  "
                     f"{_f(r['chatd_deliv_per_cpu'], 0):>20}  "
                     f"{_f(r['peer_deliv_per_cpu'], 0):>20}  {_f(r['deliv_per_cpu_ratio'], 2):>5}"
                     f"   {_f(r['chatd_p99_ms']):>11}  {_f(r['peer_p99_ms']):>11}  "
                     f"{_f(r['p99_ratio'], 2):>9}")
    return "\n".join(lines)


P99_TARGET_MS = 5.0  # p99 send->deliver at half of chatd's saturation (issue 8)
SIO_RATIO_TARGET = 2.0  # chatd / python-socketio deliveries per server CPU-second
IDLE_CONNS_TARGET = 50_000  # idle connections on one node ...
IDLE_KIB_TARGET = 20.0  # ... at this RSS each at most


PEER_NAMES = {"sio": "python-socketio", "node": "Node socket.io"}


def _p99_at_half(steps: list[StepResult], who: str) -> tuple[str, float | None]:
    """p99 at half of this system's saturation, as a sentence and a figure (None: not
    measured, the sentence says why)."""
    saturated = [s for s in steps if s.saturated]
    if not saturated:
        return (f"not measured, {who} kept up to {_f(max(s.offered for s in steps), 0)} "
                "sends/s; offer more with --rates"), None
    # Saturation lies between the last step that kept up and the first that did
    # not; judged at the first step from half the latter on, so never below half.
    half = saturated[0].offered / 2
    above = [s for s in steps if s.offered >= half and not s.saturated]
    if not above:
        return (f"not measured, no step that kept up at {_f(half, 0)} sends/s or more; "
                "add one to --rates"), None
    rate = min(s.offered for s in above)
    # A rate run more than once (in --rates, or the steps at half of saturation) is
    # judged by the median of its steps: one step's p99 moves by 2x and more from run
    # to run on a busy VM.
    p99s = [s.p99_ms for s in above if s.offered == rate and s.p99_ms is not None]
    p99 = statistics.median(p99s) if p99s else None
    # How full the machine already is there: on a small one, the tail is mostly
    # processes waiting for a core (docs/performance.md).
    busy = [s.machine_busy for s in above if s.offered == rate
            and not math.isnan(s.machine_busy)]
    busy_text = f", machine {statistics.median(busy):.0%} busy" if busy else ""
    which = (f"median p99 of {len(p99s)} steps ({', '.join(_f(v) for v in p99s)})"
             if len(p99s) > 1 else "p99")
    return (f"saturated at {_f(saturated[0].offered, 0)} sends/s; at {_f(rate, 0)} sends/s "
            f"{which} {_f(p99)} ms{busy_text}"), p99


def targets(result: ScenarioResult) -> list[str]:
    """The targets of the rooms and idle scenarios, each with the figure from this run
    and met or not."""
    if result.scenario == "idle":
        return _idle_targets(result.summary.get("chatd", {}))
    steps = result.steps.get("chatd", [])
    if result.scenario != "rooms" or not steps:
        return []
    text, p99 = _p99_at_half(steps, "chatd")
    verdict = "" if p99 is None else f": {'met' if p99 < P99_TARGET_MS else 'NOT met'}"
    out = [f"p99 at half of saturation (< {P99_TARGET_MS:g} ms): {text}{verdict}"]
    # The same measure for each peer, at half of its own saturation: how much of the
    # tail the machine gives any chat server at that point of its curve.
    for system, name in PEER_NAMES.items():
        if result.steps.get(system):
            out.append(f"  {name} at half of its own saturation, for comparison: "
                       f"{_p99_at_half(result.steps[system], name)[0]}")
    scripts = max(s.scripts_per_send for s in steps)
    out.append(f"script calls per send (1): at most {_f(scripts, 2)}: "
               f"{'met' if scripts <= 1.0 else 'NOT met'}")
    sio = [r["deliv_per_cpu_ratio"] for r in ratios(result)
           if r["peer"] == "sio" and not math.isnan(r["deliv_per_cpu_ratio"])
           and not any(s.saturated for s in result.steps["sio"] if s.offered == r["offered"])]
    if sio:
        median = statistics.median(sio)
        out.append(f"chatd / python-socketio deliveries per server CPU-s (>= "
                   f"{SIO_RATIO_TARGET:g}x) where python-socketio keeps up: median "
                   f"{_f(median, 2)}x over {len(sio)} steps: "
                   f"{'met' if median >= SIO_RATIO_TARGET else 'NOT met'}")
    return out


def _idle_targets(s: dict[str, Any]) -> list[str]:
    if not s:
        return []
    nodes = s["nodes"]
    asked = s.get("connections_asked", s["connections"]) // nodes
    held = s["connections"] // nodes
    kib_met = s["rss_per_conn_kib"] <= IDLE_KIB_TARGET
    out = [f"RSS per idle connection (<= {IDLE_KIB_TARGET:g} KiB): "
           f"{_f(s['rss_per_conn_kib'], 2)} KiB: {'met' if kib_met else 'NOT met'}"]
    head = f"idle connections on one node ({IDLE_CONNS_TARGET:,}): "
    limit = s["node_open_files_limit"]
    files = (f"a node here may open {limit:,} files, one per connection, and the busiest "
             f"had {s['node_open_files']:,} open")
    failed = s.get("not_connected", 0)
    if failed:
        files = f"{failed:,} failed to connect (first: {s['not_connected_because']}); {files}"
    if asked < IDLE_CONNS_TARGET:
        fit = (f": fewer than {IDLE_CONNS_TARGET:,} connections fit"
               if limit < IDLE_CONNS_TARGET else "")
        loadgens = -(-IDLE_CONNS_TARGET // s["loadgen_files"]) if s.get("loadgen_files") else 1
        ask = f"--nodes 1 --conns {IDLE_CONNS_TARGET}" + (
            f" --workers {loadgens}" if loadgens > 1 else "")
        out.append(f"{head}not measured, this run held {held:,} per node (ask with {ask}); "
                   f"{files}{fit}")
    else:
        met = not failed and s["up_at_end"] == s["connections"]
        total = s.get("connections_asked", s["connections"])
        up = f"{s['up_at_end']:,} of {total:,} up at the end"
        per_node = s.get("workers_per_node", 1)
        if per_node > 1:
            # Each worker is a node of its own: the port holds the connections, no one
            # process does, and the target names one.
            out.append(f"{head}{held:,} on one port of a chatd with {per_node} workers (nodes); "
                       f"{files}; {up}: "
                       f"{'met by the port, NOT by one node process' if met else 'NOT met'}")
        else:
            out.append(f"{head}{held:,} per node, {up}{'; ' + files if failed else ''}: "
                       f"{'met' if met else 'NOT met'}")
    return out


def summary_table(result: ScenarioResult) -> str:
    lines = []
    for system, summary in result.summary.items():
        lines.append(f"[{system}]")
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            shown = _f(value, 3) if isinstance(value, float) else str(value)
            lines.append(f"  {key.ljust(width)}  {shown}")
    return "\n".join(lines)


def render(result: ScenarioResult) -> str:
    out = [f"== scenario {result.scenario} ==", f"command: {result.command}"]
    if result.setup:
        out.append("setup (not measured): " + ", ".join(f"{k}={v}"
                                                        for k, v in result.setup.items()))
    if result.steps:
        out += ["", steps_table(result)]
        sat = [f"{sys} step {s.step}: {s.saturated}" for sys, steps in result.steps.items()
               for s in steps if s.saturated]
        if sat:
            out += ["saturation: " + "; ".join(sat)]
        failed = [f"{sys} step {s.step}: {s.errors}" for sys, steps in result.steps.items()
                  for s in steps if s.errors]
        if failed:
            out += ["failed sends by error code: " + "; ".join(failed)]
        closed = [f"{sys} step {s.step}: {s.closes}" for sys, steps in result.steps.items()
                  for s in steps if s.closes]
        if closed:
            out += ["connections closed by the server (code: count; clients reconnect, chatd "
                    "with resume): " + "; ".join(closed)]
    ratio = ratios_table(result)
    if ratio:
        out += ["", "chatd / each peer at equal offered load (ratio > 1: chatd delivers more "
                "per server CPU-second; p99 ratio < 1: chatd is faster)", ratio]
    goals = targets(result)
    if goals:
        out += ["", "targets (issue 8; figures from this run):", *("  " + g for g in goals)]
    if result.summary:
        out += ["", summary_table(result)]
    for note in result.notes:
        out.append(f"note: {note}")
    problems = result.correctness_problems()
    out.append("correctness: " + ("OK (no loss, no reorder, no duplicates)" if not problems
                                  else "PROBLEMS: " + "; ".join(problems)))
    return "\n".join(out)


def load_json(path: Path) -> list[ScenarioResult]:
    """Results written by :func:`write_json` (to redraw a chart); ValueError naming the
    file when it is not one, OSError when it cannot be read."""
    names = {f.name for f in fields(StepResult)}
    out = []
    try:
        for raw in json.loads(path.read_text()):
            result = ScenarioResult(raw["scenario"], raw["command"], raw["setup"],
                                    summary=raw["summary"], notes=raw["notes"])
            result.steps = {system: [StepResult(**{k: v for k, v in s.items() if k in names})
                                     for s in steps] for system, steps in raw["steps"].items()}
            out.append(result)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a results file of python -m bench run "
                         f"({type(e).__name__}: {e})") from None
    return out


def write_json(results: list[ScenarioResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in results], indent=2, default=str))


def write_chart(result: ScenarioResult, path: Path) -> str:
    """Delivered rate and p99 against offered load, one line per system.

    Returns a note: where the chart went, or why there is none.
    """
    if not result.steps:
        return "no chart: this scenario has no load steps"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, steps in result.steps.items():
        label = SYSTEM_LABELS.get(system, system)
        # A line through the stepped series; repeats of a rate are points off it.
        first = first_at_each_rate(steps)
        line = sorted(first.values(), key=lambda s: s.offered)
        xs = [s.offered for s in line]
        (drawn,) = ax1.plot(xs, [s.delivered_rate for s in line], marker="o", label=label)
        ax2.plot(xs, [s.p99_ms or math.nan for s in line], marker="o", label=label,
                 color=drawn.get_color())
        repeats = [s for s in steps if first[s.offered] is not s]
        if repeats:
            ax1.plot([s.offered for s in repeats], [s.delivered_rate for s in repeats],
                     linestyle="", marker=".", color=drawn.get_color())
            ax2.plot([s.offered for s in repeats], [s.p99_ms or math.nan for s in repeats],
                     linestyle="", marker=".", color=drawn.get_color())
        for s in steps:
            if s.saturated:
                ax1.plot([s.offered], [s.delivered_rate], marker="x", color="red", markersize=9)
                ax2.plot([s.offered], [s.p99_ms or math.nan], marker="x", color="red",
                         markersize=9)
            if s.lost or s.failed or s.late or s.dups:
                ax1.annotate(f"{system}: lost {s.lost}, late {s.late}, failed {s.failed}",
                             (s.offered, s.delivered_rate), xytext=(-6, 6),
                             textcoords="offset points", ha="right", fontsize=7)
    all_steps = [s for steps in result.steps.values() for s in steps]
    if all_steps:
        xs = sorted({s.offered for s in all_steps})
        ideal = {s.offered: s.expected_delivered for s in all_steps}
        ax1.plot(xs, [ideal[x] for x in xs], linestyle=":", color="grey",
                 label="offered x recipients")
    ax1.set(xlabel="offered messages/s (sends)", ylabel="delivered messages/s",
            title=f"{result.scenario}: delivered rate (x = saturated step)")
    ax2.set(xlabel="offered messages/s (sends)", ylabel="p99 send->deliver latency (ms)",
            title=f"{result.scenario}: p99 latency", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"
