"""The scenarios: rooms, direct, fanout (stepped load, chatd and the peers), idle, resume.

Each scenario starts its own private Valkey and nodes (:class:`bench.cluster.Stack`)
and load-generator processes (:class:`bench.loadgen.WorkerPool`), and stops all of
them before it returns, also on errors. Setup (users, rooms, logins, connecting)
is never inside a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import plan
from bench.accounts import setup_chatd
from bench.cluster import (
    CHATD_BENCH_ENV,
    SCRIPT_COMMANDS,
    BenchError,
    Stack,
    ValkeyCounters,
    cpu_seconds,
    environment,
    run_queue_wait_s,
    valkey_counters,
)
from bench.loadgen import WorkerPool, files_for_connections
from bench.peers import node_setup
from bench.plan import MEMBER, ConnSpec, Topology
from bench.report import ScenarioResult, StepResult
from bench.stallprobe import StallProbe
from bench.tracking import count_loss, merge_samples, percentile
from chatd import config

SCENARIOS = ("rooms", "direct", "fanout", "idle", "resume")
PEER_SCENARIOS = ("rooms", "fanout")
PEERS = ("sio", "node")  # python-socketio, Node socket.io (bench/peers/)
QUIET_S = 1.5  # drain: no progress for this long with nothing unacknowledged = done
BACKGROUND_S = 6.0  # idle window before the steps for the background script rate


@dataclass
class Options:
    scenario: str
    command: str
    quick: bool = False
    nodes: int = 2
    workers: int = 1
    rates: list[float] = field(default_factory=list)  # offered sends/s, one per step
    duration: float = 8.0
    warmup: float = 1.0
    drain_s: float = 10.0
    body_chars: int = 64
    receipts_ms: int = 0
    slo_ms: float = 1000.0
    all_steps: bool = False
    half_steps: int = 3  # rooms: steps at half of chatd's saturation, after it
    peers: tuple[str, ...] = PEERS  # those that run in PEER_SCENARIOS
    chatd: bool = True
    chatd_env: dict[str, str] = field(default_factory=dict)  # extra CHATD_* (--chatd-env)
    rooms: int = 100
    members: int = 10
    pairs: int = 500
    conns: int = 2000
    missed: int = 100
    heartbeat_s: float = 5.0
    idle_window_s: float = 10.0
    log: bool = True
    keep_logs: bool = False

    def __post_init__(self) -> None:
        """Refuse what cannot make a run, naming the flag, before anything starts:
        a zero, negative or endless size crashed a run half-way or measured nothing."""
        at_least = {"--nodes": (self.nodes, 1), "--workers": (self.workers, 1),
                    "--rooms": (self.rooms, 1), "--members": (self.members, 2),
                    "--pairs": (self.pairs, 1), "--conns": (self.conns, 1),
                    "--missed": (self.missed, 1), "--body-chars": (self.body_chars, 1),
                    "--receipts-ms": (self.receipts_ms, 0), "--warmup": (self.warmup, 0),
                    "--drain": (self.drain_s, 0),
                    "--half-steps": (self.half_steps, 0)}
        for flag, (value, lo) in at_least.items():
            if not (math.isfinite(value) and value >= lo):
                raise ValueError(f"{flag} must be a number of at least {lo}, not {value:g}")
        above_zero = {"--duration": self.duration, "--slo-ms": self.slo_ms,
                      "--heartbeat-s": self.heartbeat_s, "--idle-window": self.idle_window_s}
        for flag, value in above_zero.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be a finite number above 0, not {value:g}")
        if self.warmup >= self.duration:
            raise ValueError(f"--warmup ({self.warmup:g} s) must be shorter than --duration "
                             f"({self.duration:g} s)")
        # One connection is one file, and a load-generator process may open only so
        # many: past that its connects fail, which would read as the servers' limit.
        conns = _topology(self).n_users
        each = -(-conns // self.workers)
        files = files_for_connections()
        if each > files:
            raise ValueError(f"{conns:,} connections over {self.workers} load-generator "
                             f"process(es) is {each:,} each, and one may hold {files:,} "
                             f"here: use --workers {-(-conns // files)} or more")
        if self.chatd:
            # The nodes' own settings (--chatd-env over the bench's), read as they will:
            # a bad key or a body chatd refuses fails here, not in every send.
            try:
                limits = config.load(env={**os.environ, **chatd_env(self)}).limits
            except config.ConfigError as e:
                raise ValueError(f"--chatd-env: {e}") from None
            if self.body_chars > limits.max_body_chars:
                raise ValueError(f"--body-chars {self.body_chars} is over chatd's "
                                 f"limits.max_body_chars ({limits.max_body_chars}); raise it "
                                 "with --chatd-env CHATD_LIMITS__MAX_BODY_CHARS=N")

    def say(self, text: str) -> None:
        if self.log:
            print(f"[bench] {text}", flush=True)


def chatd_env(opts: Options) -> dict[str, str]:
    env = {**CHATD_BENCH_ENV, **opts.chatd_env}
    if opts.scenario == "idle":
        env["CHATD_LIMITS__HEARTBEAT_S"] = str(opts.heartbeat_s)
    return env


# ------------------------------------------------------------------ sampling


@dataclass
class Sample:
    t: float
    server: float
    redis: float
    clients: float
    machine: float  # CPU-s of every process on the machine (kernel threads included)
    wait: float  # run-queue wait of the run's servers, Redis and clients (runnable, no core)
    bench: float  # this orchestrating process
    valkey: ValkeyCounters
    status: dict[str, int]

    def forks_since(self, before: Sample) -> int:
        """Valkey's forks (AOF rewrite, RDB save) that ran since `before`: those started
        since, and one that was running then."""
        return self.valkey.forks - before.valkey.forks + before.valkey.forking

    def commands_since(self, before: Sample) -> int:
        """Commands Valkey ran since `before`, those inside scripts included."""
        return sum(self.valkey.calls.values()) - sum(before.valkey.calls.values())

    def others(self, before: Sample) -> float:
        """CPU-s used meanwhile by processes that are not part of the run (noise)."""
        ours = (self.server + self.redis + self.clients + self.bench
                - before.server - before.redis - before.clients - before.bench)
        return max(0.0, self.machine - before.machine - ours)


_ME = psutil.Process()


def _machine_busy() -> float:
    """Summed per process, reaped children included, not read from /proc/stat: its
    busy time is sampled at each tick, and the run's processes wake for bursts
    shorter than a tick, so on the 2-vCPU VM of docs/performance.md it read 21-34
    ticks busy per 2 s while those processes were charged 88-93 (and over a whole
    step it could read more than they used, which showed as seconds of 'other')."""
    total = 0.0
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(proc)
    return total


def _sample(stack: Stack, pool: WorkerPool, with_status: bool = True) -> Sample:
    assert stack.valkey is not None
    status = pool.sum_status() if with_status else {}
    pids = ([p.pid for n in stack.nodes for p in n.proc.tree()] + [stack.valkey.pid]
            + [p.pid for p in pool.ps])
    return Sample(time.time(), sum(n.proc.cpu() for n in stack.nodes), stack.valkey.cpu(),
                  pool.cpu(), _machine_busy(), sum(map(run_queue_wait_s, pids)),
                  cpu_seconds(_ME),
                  valkey_counters(stack.valkey_port), status)


def _sleep_until(t: float, stack: Stack) -> None:
    while True:
        left = t - time.time()
        if left <= 0:
            return
        stack.check_alive()
        time.sleep(min(left, 0.25))


def _drain(pool: WorkerPool, limit_s: float) -> tuple[bool, float]:
    """Wait until every acked message reached every recipient (True), or give up."""
    started = time.monotonic()
    last: tuple[int, ...] = ()
    changed = started
    while True:
        st = pool.sum_status()
        now = time.monotonic()
        if st["pending"] <= 0 and st["deliveries"] >= st["expected"]:
            return True, now - started
        key = (st["deliveries"], st["acked"], st["failed"])
        if key != last:
            last, changed = key, now
        elif st["pending"] <= 0 and now - changed > QUIET_S:
            return False, now - started  # nothing more is coming: lost
        if now - started > limit_s:
            return False, now - started
        time.sleep(0.05)


# ------------------------------------------------------------- stepped load


def _senders(specs: list[ConnSpec]) -> list[ConnSpec]:
    return [s for s in specs if s.send_room is not None and s.role == MEMBER]


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000


def _scripts(s: Sample) -> int:
    return sum(s.valkey.calls.get(c, 0) for c in SCRIPT_COMMANDS)


def _background_scripts_per_s(stack: Stack, pool: WorkerPool, seconds: float) -> float:
    """Script calls per second with nothing offered: the nodes' heartbeats and the
    janitor's lock. Taken off each step's count, which is meant to be the sends' own
    (at 500 sends/s they were 0.4% of it)."""
    a = _sample(stack, pool, with_status=False)
    _sleep_until(a.t + seconds, stack)
    b = _sample(stack, pool, with_status=False)
    return (_scripts(b) - _scripts(a)) / (b.t - a.t)


def _run_steps(opts: Options, stack: Stack, pool: WorkerPool, specs: list[ConnSpec],
               system: str) -> list[StepResult]:
    senders = _senders(specs)
    per_send = statistics.mean(s.recipients for s in senders)
    window = opts.duration - opts.warmup
    background = _background_scripts_per_s(stack, pool, min(BACKGROUND_S, opts.duration))
    steps: list[StepResult] = []
    with StallProbe() as probe:

        def run_step(offered: float, why: str = "") -> StepResult:
            i = len(steps)
            rate = offered / len(senders)
            t0 = time.time() + 0.3
            pool.call("step", i, rate, t0, opts.duration, opts.warmup)
            _sleep_until(t0, stack)
            s0 = _sample(stack, pool)
            _sleep_until(t0 + opts.duration, stack)
            windows = pool.call("step_wait", timeout=opts.duration + 60)
            drained, drain_s = _drain(pool, opts.drain_s)
            s1 = _sample(stack, pool)
            a = Counter[str]()
            b = Counter[str]()
            for w in windows:
                a.update(w["start"])
                b.update(w["end"])
            sends = s1.status["sent"] - s0.status["sent"]
            scripts = max(0.0, _scripts(s1) - _scripts(s0) - background * (s1.t - s0.t))
            lat = sorted(x for part in pool.call("latency", i) for x in part)
            stalls, stall_ms = probe.between(t0, t0 + opts.duration)
            step = StepResult(
                system=system, step=i, offered=offered, per_sender=rate,
                expected_delivered=offered * per_send,
                sent_rate=(b["sent"] - a["sent"]) / window,
                delivered_rate=(b["deliveries"] - a["deliveries"]) / window,
                acks_rate=(b["acked"] - a["acked"]) / window,
                span_s=s1.t - s0.t, span_sends=sends,
                span_deliveries=s1.status["deliveries"] - s0.status["deliveries"],
                server_cpu=s1.server - s0.server, redis_cpu=s1.redis - s0.redis,
                client_cpu=s1.clients - s0.clients, other_cpu=s1.others(s0),
                wait_s=s1.wait - s0.wait, machine_cpu=s1.machine - s0.machine,
                cores=os.cpu_count() or 1, stalls=stalls, stall_ms=stall_ms,
                forks=s1.forks_since(s0),
                scripts_per_send=scripts / sends if sends else 0.0,
                cmds_per_send=s1.commands_since(s0) / sends if sends else 0.0,
                drained=drained, p99_ms=_ms(percentile(lat, 0.99)),
                failed=s1.status["failed"] - s0.status["failed"],
                errors=_delta(s0.status, s1.status, "error:"),
                closes=_delta(s0.status, s1.status, "close:"))
            step.saturated = _saturation(opts, step, drain_s)
            opts.say(f"{system} step {i}{why}: offered {offered:.0f}/s ({rate:.2f}/s per "
                     f"sender), delivered {step.delivered_rate:.0f}/s of "
                     f"{step.expected_delivered:.0f}/s, p99 {step.p99_ms or 0:.1f} ms, "
                     f"server cpu {step.server_cpu:.2f}s"
                     + (f", failed sends {step.errors}" if step.failed else "")
                     + (f", connections closed {step.closes}" if step.closes else "")
                     + (f" -> saturated: {step.saturated}" if step.saturated else ""))
            steps.append(step)
            return step

        for offered in opts.rates:
            if run_step(offered).saturated and not opts.all_steps:
                break
        saturated = next((s for s in steps if s.saturated), None)
        if saturated is not None and system == "chatd" and opts.scenario == "rooms" \
                and opts.half_steps:
            # The p99 target is read at half of saturation, and one step's p99 moves by
            # 2x and more from run to run on a busy machine: judge the median of several.
            # They start once the saturated step's backlog is gone, or they would measure it.
            drained, waited = _drain(pool, opts.drain_s)
            if not drained:
                opts.say(f"{system}: backlog still there after {waited:.1f}s; no steps at "
                         "half of saturation")
                return steps
            for k in range(opts.half_steps):
                run_step(saturated.offered / 2,
                         f" (half of saturation, {k + 1} of {opts.half_steps})")
    return steps


def _delta(a: dict[str, int], b: dict[str, int], prefix: str) -> dict[str, int]:
    return {k.removeprefix(prefix): b[k] - a.get(k, 0) for k in b
            if k.startswith(prefix) and b[k] - a.get(k, 0)}


def _saturation(opts: Options, s: StepResult, drain_s: float) -> str:
    reasons = []
    if s.sent_rate < 0.95 * s.offered:
        reasons.append(f"sent only {s.sent_rate:.0f}/s")
    if s.delivered_rate < 0.9 * s.expected_delivered:
        reasons.append("delivered < 90% of offered")
    if s.failed > 0.01 * max(1, s.span_sends):
        reasons.append(f"{s.failed} sends failed")
    if not s.drained:
        reasons.append(f"backlog not delivered within {drain_s:.1f}s drain")
    if s.p99_ms is not None and s.p99_ms > opts.slo_ms:
        reasons.append(f"p99 > {opts.slo_ms:.0f} ms")
    return ", ".join(reasons)


def _finish_steps(steps: list[StepResult], pool: WorkerPool, specs: list[ConnSpec]) -> None:
    """Final numbers once everything drained: latency by step, loss, order, duplicates."""
    parts = pool.call("results", timeout=120)
    latency = merge_samples([p["latency_us"] for p in parts])
    acks = merge_samples([p["ack_us"] for p in parts])
    lags = merge_samples([p["lag_us"] for p in parts])
    acked: dict[str, list[tuple[int, int]]] = {}
    tracks: dict[tuple[int, str], tuple[int, list[int]]] = {}
    late: Counter[int] = Counter()
    dups: Counter[int] = Counter()
    for p in parts:
        for stream, items in p["acked_by_stream"].items():
            acked.setdefault(stream, []).extend(items)
        tracks.update(p["tracks"])
        late.update(p["late"])
        dups.update(p["dups"])
    lost = count_loss(acked, tracks, _receivers_of(specs, acked))
    for s in steps:
        lat = latency.get(s.step, [])
        s.p50_ms = _ms(percentile(lat, 0.50))
        s.p99_ms = _ms(percentile(lat, 0.99))
        s.p999_ms = _ms(percentile(lat, 0.999))
        s.max_ms = _ms(float(lat[-1])) if lat else None
        s.ack_p99_ms = _ms(percentile(acks.get(s.step, []), 0.99))
        s.lag_p99_ms = _ms(percentile(lags.get(s.step, []), 0.99))
        s.deliveries = len(lat)
        s.lost, s.late, s.dups = lost[s.step], late[s.step], dups[s.step]


def _receivers_of(specs: list[ConnSpec], acked: dict[str, Any]) -> dict[str, list[int]]:
    """Stream -> connections that must receive it (chatd: room; peer: 'room|sender')."""
    by_room = plan.receivers_by_room(specs)
    return {stream: by_room.get(stream.split("|", 1)[0], []) for stream in acked}


def _loss_summary(pool: WorkerPool, specs: list[ConnSpec]) -> dict[str, int]:
    parts = pool.call("results", timeout=120)
    acked: dict[str, list[tuple[int, int]]] = {}
    tracks: dict[tuple[int, str], tuple[int, list[int]]] = {}
    for p in parts:
        for stream, items in p["acked_by_stream"].items():
            acked.setdefault(stream, []).extend(items)
        tracks.update(p["tracks"])
    lost = count_loss(acked, tracks, _receivers_of(specs, acked))
    return {"lost": sum(lost.values()), "late": sum(sum(p["late"].values()) for p in parts),
            "dups": sum(sum(p["dups"].values()) for p in parts)}


# ---------------------------------------------------------------- systems


def _chatd_specs(opts: Options, stack: Stack, topo: Topology,
                 result: ScenarioResult) -> list[ConnSpec]:
    nodes = stack.start_chatd(opts.nodes, chatd_env(opts))
    started = time.monotonic()
    tokens, room_ids = asyncio.run(setup_chatd([n.http_url for n in nodes], topo))
    result.setup.update(users=topo.n_users, rooms=len(topo.rooms),
                        chatd_setup_s=round(time.monotonic() - started, 1))
    opts.say(f"chatd: {opts.nodes} nodes, {topo.n_users} users and {len(topo.rooms)} rooms "
             f"set up in {time.monotonic() - started:.1f}s")
    return plan.conn_specs(topo, [n.ws_url for n in nodes], tokens, room_ids)


def _peer_specs(opts: Options, stack: Stack, topo: Topology, peer: str) -> list[ConnSpec]:
    nodes = stack.start_sio(opts.nodes) if peer == "sio" else stack.start_node_peer(opts.nodes)
    return plan.conn_specs(topo, [n.ws_url for n in nodes],
                           [f"user{u}" for u in range(topo.n_users)],
                           [f"room{j}" for j in range(len(topo.rooms))])


@dataclass(frozen=True)
class Connects:
    seconds: float
    connected: int
    failed: int
    first_error: str  # "" when none failed


def _connect(opts: Options, pool: WorkerPool, system: str, roles: list[str] | None = None,
             resume: bool = False, *, all_needed: bool = True) -> Connects:
    """Connect, and with `all_needed` fail the run unless every connection came up."""
    started = time.monotonic()
    replies = pool.call("connect", roles, resume, timeout=300)
    failed = sum(r["failed"] for r in replies)
    connected = sum(r["connected"] for r in replies)
    first = next((r["first_error"] for r in replies if r["first_error"]), "")
    if failed and (all_needed or not connected):
        raise BenchError(f"{system}: {failed} connections failed (first: {first})")
    seconds = time.monotonic() - started
    opts.say(f"{system}: {connected} connections open in {seconds:.1f}s"
             + (f", {failed} failed (first: {first})" if failed else ""))
    return Connects(seconds, connected, failed, first)


def _topology(opts: Options) -> Topology:
    if opts.scenario == "rooms":
        return plan.groups(opts.rooms, opts.members)
    if opts.scenario == "direct":
        return plan.direct_pairs(opts.pairs)
    if opts.scenario == "fanout":
        return plan.one_room(opts.members)
    if opts.scenario == "idle":
        return plan.idle_groups(opts.conns, opts.members)
    return plan.resume_groups(opts.conns, opts.members)


def _with_stack(opts: Options, body: Any) -> ScenarioResult:
    run_dir = Path(tempfile.mkdtemp(prefix=f"chatd-bench-{opts.scenario}-"))
    result = ScenarioResult(opts.scenario, opts.command)
    result.setup.update(environment())
    if float(result.setup["loadavg_1m_at_start"]) > 0.5:
        opts.say(f"warning: machine load average {result.setup['loadavg_1m_at_start']} at "
                 "start: other processes share these cores (see 'other cpu-s')")
    ok = False
    try:
        with Stack(run_dir) as stack:
            stack.start_valkey()
            body(stack, result)
        ok = True
    finally:
        if ok and not opts.keep_logs:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"[bench] logs kept in {run_dir}", flush=True)
    return result


# --------------------------------------------------------------- scenarios


def run_stepped(opts: Options) -> ScenarioResult:
    topo = _topology(opts)
    systems = (["chatd"] if opts.chatd else []) + (
        list(opts.peers) if opts.scenario in PEER_SCENARIOS else [])

    def body(stack: Stack, result: ScenarioResult) -> None:
        for system in systems:
            specs = (_chatd_specs(opts, stack, topo, result) if system == "chatd"
                     else _peer_specs(opts, stack, topo, system))
            pool = WorkerPool(system, specs, opts.workers, opts.body_chars, opts.receipts_ms)
            try:
                _connect(opts, pool, system)
                steps = _run_steps(opts, stack, pool, specs, system)
                _finish_steps(steps, pool, specs)
                result.steps[system] = steps
            finally:
                pool.close()
                stack.stop_nodes()
        result.notes.append(
            "per message, chatd: one Lua script (the sender's rate-limit token, membership, "
            "idempotency key, seq, XADD to the room log with AOF everysec, XADD to each "
            "interested node's inbox), ack after the script, inbox XREADGROUP NOACK + batched "
            "XTRIM, ordered per-connection queues with gap filling; receipts only with "
            "--receipts-ms")
        if "sio" in systems:
            result.notes.append(
                "per message, sio peer: socket.io event with ack, local emit to the room and "
                "one Redis PUBLISH (pickled) read by every other node; no storage, no seq, no "
                "receipts, no resume")
        if "node" in systems:
            result.setup["node_peer"] = node_setup.versions()
            result.notes.append(
                "per message, node peer: socket.io event with ack (sent without waiting for "
                "Redis), one XADD (JSON, MAXLEN ~10000) to the one stream every node "
                "reads with XREAD BLOCK, local emit once the XADD is answered; no storage "
                "beyond the capped stream, no seq, no receipts, no resume")
        if opts.receipts_ms:
            result.notes.append(f"chatd clients sent cumulative `delivered` every "
                                f"{opts.receipts_ms} ms per advanced room")

    return _with_stack(opts, body)


def run_idle(opts: Options) -> ScenarioResult:
    topo = _topology(opts)

    def body(stack: Stack, result: ScenarioResult) -> None:
        specs = _chatd_specs(opts, stack, topo, result)
        pool = WorkerPool("chatd", specs, opts.workers, opts.body_chars, 0)
        try:
            time.sleep(1.0)
            rss0 = sum(n.proc.rss() for n in stack.nodes)
            a = _sample(stack, pool, with_status=False)
            _sleep_until(time.time() + opts.idle_window_s, stack)
            b = _sample(stack, pool, with_status=False)
            # How many a node can hold is what this scenario finds out: connections
            # that fail are counted and reported, not an error of the run.
            connects = _connect(opts, pool, "chatd", all_needed=False)
            # Measure once every connection is past its first ping (steady state), over
            # at least one heartbeat: a shorter window may hold no ping at all.
            _sleep_until(time.time() + max(1.0, opts.heartbeat_s), stack)
            rss1 = sum(n.proc.rss() for n in stack.nodes)
            files = [n.proc.files() for n in stack.nodes]
            c = _sample(stack, pool)
            _sleep_until(time.time() + max(opts.idle_window_s, opts.heartbeat_s), stack)
            d = _sample(stack, pool)
            status = d.status
            collections = [c for node in stack.nodes for c in node.full_collections()]
            workers = stack.nodes[0].workers
        finally:
            pool.close()
            stack.stop_nodes()
        n = connects.connected
        full_gcs = sum(count for count, _, _ in collections)
        base_cpu = (b.server - a.server) / (b.t - a.t)
        idle_cpu = (d.server - c.server) / (d.t - c.t)
        # As counted by the clients: the server decides when to ping (chatd/heartbeat.py).
        pings = max(1, d.status["pings"] - c.status["pings"])
        result.summary["chatd"] = {
            "connections_asked": len(specs), "connections": n, "nodes": opts.nodes,
            "workers_per_node": workers,
            "up_at_end": status["up"], "not_connected": connects.failed,
            "not_connected_because": connects.first_error,
            "connect_s": round(connects.seconds, 2),
            "connects_per_s": round(n / connects.seconds, 1),
            "server_rss_before_mib": round(rss0 / 2**20, 1),
            "server_rss_after_mib": round(rss1 / 2**20, 1),
            "rss_per_conn_kib": round((rss1 - rss0) / n / 1024, 2),
            "heartbeat_s": opts.heartbeat_s, "window_s": round(d.t - c.t, 2),
            "pings_in_window": pings,
            "server_cpu_pct_no_conns": round(100 * base_cpu, 2),
            "server_cpu_pct_idle_conns": round(100 * idle_cpu, 2),
            "server_cpu_us_per_conn_per_s": round(1e6 * (idle_cpu - base_cpu) / n, 2),
            "server_cpu_us_per_heartbeat": round(1e6 * (d.server - c.server
                                                        - base_cpu * (d.t - c.t)) / pings, 1),
            "redis_cpu_pct_idle_conns": round(100 * (d.redis - c.redis) / (d.t - c.t), 2),
            "client_cpu_pct_idle_conns": round(100 * (d.clients - c.clients) / (d.t - c.t), 2),
            "other_cpu_pct_idle_conns": round(100 * d.others(c) / (d.t - c.t), 2),
            "reconnects": status["reconnects"],
            # What bounds the connections of a node here: a connection is one file.
            "node_open_files": max(open_ for open_, _ in files),
            "node_open_files_limit": min(limit for _, limit in files),
            "loadgen_files": files_for_connections(),  # connections one client process holds
            # Full collections scan every tracked object: their pause grows with
            # the connections (chatd_gc_full_pause_seconds), here over the whole run.
            "full_gcs": full_gcs,
            "full_gc_sources": len(collections),  # /metrics read: one per node, or per worker
            "full_gc_mean_ms": round(1000 * sum(total for _, total, _ in collections)
                                     / max(1, full_gcs), 1),
            "full_gc_longest_under_s": max(longest for _, _, longest in collections),
        }
        if workers > 1:
            result.notes.append("with workers, RSS, CPU and full collections are summed over "
                                "the server's processes (each worker's /metrics read on its "
                                "ops port), and open files are of the busiest one")
        result.notes.append("heartbeat cost = server CPU with idle connections minus the "
                            "same window without connections, per WebSocket ping "
                            "(as many as the clients received in the window)")

    return _with_stack(opts, body)


def _merged_counts(parts: Iterable[dict[str, int]]) -> str:
    """Counts by key over the load generators, most first: "reason x N; ..." ("" if none)."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return "; ".join(f"{key} x {n}" for key, n in total.most_common())


def run_resume(opts: Options) -> ScenarioResult:
    topo = _topology(opts)

    def body(stack: Stack, result: ScenarioResult) -> None:
        specs = _chatd_specs(opts, stack, topo, result)
        clients = [s for s in specs if s.role == MEMBER]
        pool = WorkerPool("chatd", specs, opts.workers, opts.body_chars, 0)
        try:
            _connect(opts, pool, "chatd")
            pool.call("close", [MEMBER])
            fed = pool.call("feed", opts.missed, 32, 300.0, timeout=320)
            feed_s = max(f["seconds"] for f in fed)
            if any(f["pending"] for f in fed):
                raise BenchError("resume: the feeders' messages were not all acked")
            targets: dict[str, int] = {}
            for part in pool.call("acked_max"):
                for room, seq in part.items():
                    targets[room] = max(seq, targets.get(room, 0))
            opts.say(f"chatd: {len(clients)} clients offline, {opts.missed} messages written "
                     f"to each of {len(targets)} rooms in {feed_s:.1f}s; reconnecting all")
            s0 = _sample(stack, pool)
            caught = pool.call("catchup", targets, [MEMBER], 120.0, timeout=180)
            s1 = _sample(stack, pool)
            drained, _ = _drain(pool, opts.drain_s)
            loss = _loss_summary(pool, specs)
        finally:
            pool.close()
            stack.stop_nodes()
        times = sorted(t for c in caught for t in c["times"])
        replayed = len(clients) * opts.missed
        all_s = times[-1] if times else float("nan")
        result.setup["feed_s"] = round(feed_s, 1)
        result.summary["chatd"] = {
            "clients": len(clients), "missed_each": opts.missed, "replayed": replayed,
            "all_caught_up_s": round(all_s, 3),
            "p50_client_s": percentile(times, 0.5), "p99_client_s": percentile(times, 0.99),
            "replayed_per_s": round(replayed / all_s, 1) if times else 0.0,
            "server_cpu_s": round(s1.server - s0.server, 3),
            "redis_cpu_s": round(s1.redis - s0.redis, 3),
            "client_cpu_s": round(s1.clients - s0.clients, 3),
            "other_cpu_s": round(s1.others(s0), 3),
            "server_cpu_s_per_1k_replayed": round(1000 * (s1.server - s0.server) / replayed, 4),
            "redis_cmds": s1.commands_since(s0),
            "connect_failed": sum(c["connect_failed"] for c in caught),
            "connect_retries": sum(c["connect_retries"] for c in caught),
            "connect_errors": _merged_counts(c["connect_errors"] for c in caught),
            "not_caught_up": sum(c["not_caught_up"] for c in caught),
            "drained": drained, **loss,
        }

    return _with_stack(opts, body)


def run(opts: Options) -> ScenarioResult:
    if opts.scenario == "idle":
        return run_idle(opts)
    if opts.scenario == "resume":
        return run_resume(opts)
    return run_stepped(opts)

