"""``python -m bench run --scenario rooms`` (see bench/README.md for every flag)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.cluster import BenchError
from bench.peers import node_setup
from bench.report import load_json, render, write_chart, write_json
from bench.scenarios import PEER_SCENARIOS, PEERS, SCENARIOS, Options, run
from chatd.listen import raise_open_files_limit

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Sizes per scenario: (full run, --quick). Flags override either.
DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "rooms": ({"rooms": 100, "members": 10,
               "rates": [500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 10000, 12000, 14000]},
              {"rooms": 10, "members": 5, "rates": [100]}),
    "direct": ({"pairs": 500, "rates": [500, 1000, 2000, 3000, 4000, 6000]},
               {"pairs": 20, "rates": [80]}),
    "fanout": ({"members": 1000, "rates": [5, 10, 20, 40, 80, 160]},
               {"members": 50, "rates": [20]}),
    "idle": ({"conns": 2000, "members": 10, "heartbeat_s": 5.0, "idle_window_s": 10.0},
             {"conns": 200, "members": 10, "heartbeat_s": 1.0, "idle_window_s": 1.5}),
    "resume": ({"conns": 1000, "members": 10, "missed": 100},
               {"conns": 100, "members": 10, "missed": 20}),
}
TIMING = ({"duration": 6.0, "warmup": 1.0, "drain_s": 10.0},
          {"duration": 1.5, "warmup": 0.5, "drain_s": 5.0})


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("rates: comma-separated numbers") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates: at least one positive number")
    return rates


def _peers(text: str) -> tuple[str, ...]:
    peers = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in peers if p not in PEERS]
    if not peers or unknown:
        raise argparse.ArgumentTypeError(f"peers: comma-separated, from {','.join(PEERS)}")
    return peers


def _env_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("CHATD_"):
        raise argparse.ArgumentTypeError("expected CHATD_SECTION__KEY=VALUE")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the scenarios and their default sizes")
    c = sub.add_parser("chart", help="redraw the chart(s) of a results JSON")
    c.add_argument("results", type=Path)
    c.add_argument("--out-dir", type=Path, help="default: next to the JSON")
    r = sub.add_parser("run", help="run one scenario (or all) and print the results")
    r.add_argument("--scenario", required=True, choices=[*SCENARIOS, "all"])
    r.add_argument("--quick", action="store_true", help="small sizes, a few seconds each")
    r.add_argument("--nodes", type=int, default=2, help="server nodes (default 2)")
    r.add_argument("--workers", type=int, default=1, help="load-generator processes (1)")
    r.add_argument("--rates", type=_rates, help="offered sends/s per step, e.g. 500,1000,2000")
    r.add_argument("--duration", type=float, help="seconds of sending per step")
    r.add_argument("--warmup", type=float, help="first seconds of a step not in the rates")
    r.add_argument("--drain", dest="drain_s", type=float, help="max seconds to wait for a "
                   "step's backlog after sending stops")
    r.add_argument("--all-steps", action="store_true", help="do not stop at saturation")
    r.add_argument("--slo-ms", type=float, default=1000.0, help="p99 above this = saturated")
    r.add_argument("--half-steps", type=int, default=3, help="rooms: once chatd saturates, "
                   "this many steps at half its rate, for the p99 target (3; 0 = none)")
    r.add_argument("--body-chars", type=int, default=64, help="message body length (64)")
    r.add_argument("--receipts-ms", type=int, default=0, help="chatd clients send a "
                   "cumulative `delivered` this often (0 = never)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--peers", type=_peers, default=PEERS, metavar="sio,node",
                       help="rooms, fanout: the peers to run besides chatd (default: both; "
                       "one that cannot run here is skipped with the reason)")
    which.add_argument("--no-peer", dest="peers", action="store_const", const=(),
                       help="rooms, fanout: no peer at all")
    r.add_argument("--peer-only", dest="chatd", action="store_false",
                   help="rooms, fanout: run only the peers")
    r.add_argument("--chatd-env", action="append", default=[], metavar="CHATD_KEY=VALUE",
                   type=_env_item, help="extra chatd setting for this run (documented "
                   "config keys only; repeatable)")
    r.add_argument("--rooms", type=int, help="rooms: number of group rooms")
    r.add_argument("--members", type=int, help="members per room (rooms, fanout, idle, resume)")
    r.add_argument("--pairs", type=int, help="direct: number of 1:1 rooms")
    r.add_argument("--conns", type=int, help="idle: connections; resume: resuming clients")
    r.add_argument("--missed", type=int, help="resume: messages each client missed")
    r.add_argument("--heartbeat-s", type=float, help="idle: server heartbeat (ping) interval")
    r.add_argument("--idle-window", dest="idle_window_s", type=float,
                   help="idle: seconds of each CPU measurement window")
    r.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="where the JSON and the chart go (default bench/results/)")
    r.add_argument("--json", type=Path, help="also write the results as JSON here")
    r.add_argument("--no-chart", dest="chart", action="store_false")
    r.add_argument("--keep-logs", action="store_true",
                   help="keep the servers' logs and data (a temp dir) after a good run")
    r.add_argument("--check", action="store_true",
                   help="exit 1 if chatd lost, reordered or duplicated anything")
    return p


def options_for(scenario: str, args: argparse.Namespace, command: str) -> Options:
    sizes = dict(DEFAULTS[scenario][1 if args.quick else 0])
    sizes.update(TIMING[1 if args.quick else 0])
    for key in ("rates", "duration", "warmup", "drain_s", "rooms", "members", "pairs", "conns",
                "missed", "heartbeat_s", "idle_window_s"):
        value = getattr(args, key)
        if value is not None:
            sizes[key] = value
    return Options(scenario=scenario, command=command, quick=args.quick, nodes=args.nodes,
                   workers=args.workers, body_chars=args.body_chars,
                   receipts_ms=args.receipts_ms, slo_ms=args.slo_ms,
                   all_steps=args.all_steps, half_steps=args.half_steps,
                   peers=args.peers, chatd=args.chatd,
                   chatd_env=dict(args.chatd_env), keep_logs=args.keep_logs, **sizes)


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _unavailable_peers(peers: tuple[str, ...]) -> dict[str, str]:
    """Peer -> why it cannot run on this machine (it is skipped, the run goes on)."""
    out = {}
    if "sio" in peers and importlib.util.find_spec("socketio") is None:
        out["sio"] = "python-socketio is not installed (pip install -e '.[bench]')"
    if "node" in peers:
        why = node_setup.prepare(_say)
        if why:
            out["node"] = why
    return out


def cmd_run(args: argparse.Namespace, plans: list[Options]) -> int:
    raise_open_files_limit()  # thousands of sockets per process
    scenarios = [opts.scenario for opts in plans]
    wants_peers = bool(args.peers) and any(s in PEER_SCENARIOS for s in scenarios)
    skipped = _unavailable_peers(args.peers) if wants_peers else {}
    for peer, why in skipped.items():
        _say(f"{peer} peer skipped: {why}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    failed = False
    for opts in plans:
        scenario = opts.scenario
        opts.peers = tuple(p for p in opts.peers if p not in skipped)
        result = run(opts)
        if scenario in PEER_SCENARIOS:
            result.notes += [f"{peer} peer skipped: {why}" for peer, why in skipped.items()]
        if args.chart:
            result.notes.append(write_chart(result, args.results_dir /
                                            f"{scenario}-{stamp}.png"))
        print()
        print(render(result), flush=True)
        print()
        results.append(result)
        # --check is about chatd; the peers' loss is reported, not a failure.
        failed |= any(p.startswith("chatd") for p in result.correctness_problems())
    path = args.results_dir / f"{args.scenario}-{stamp}.json"
    write_json(results, path)
    print(f"results: {path}")
    if args.json:
        write_json(results, args.json)
    return 1 if args.check and failed else 0


def cmd_list() -> int:
    for scenario in SCENARIOS:
        full, quick = DEFAULTS[scenario]
        peer = f" (+ peers {','.join(PEERS)})" if scenario in PEER_SCENARIOS else ""
        print(f"{scenario}{peer}: {full}; --quick: {quick}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "run" and not args.chatd and not args.peers:
        p.error("--peer-only with --no-peer leaves nothing to run")
    if args.command == "list":
        return cmd_list()
    if args.command == "chart":
        try:
            results = load_json(args.results)
        except (OSError, ValueError) as e:
            p.error(str(e))
        for result in results:
            out_dir = args.out_dir or args.results.parent
            print(write_chart(result, out_dir / f"{args.results.stem}-{result.scenario}.png"))
        return 0
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    try:
        plans = [options_for(scenario, args, command) for scenario in scenarios]
    except ValueError as e:
        p.error(str(e))
    # Checked now: found only when writing, a run's results would be lost after it ran.
    for flag, folder in (("--results-dir", args.results_dir),
                         ("--json", args.json.parent if args.json else None)):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"{flag}: cannot create {folder} ({e.strerror})")
        if not os.access(folder, os.W_OK):
            p.error(f"{flag}: {folder} is not writable")
    try:
        return cmd_run(args, plans)
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
