"""Load-generator processes: many connections per process, driven over a pipe.

The parent (:class:`WorkerPool`) starts ``workers`` processes (multiprocessing,
spawn) and gives each a share of the connections. A process runs one event
loop (uvloop when installed, like the servers) and answers commands, one at a
time: ``connect``, ``step`` (start an open-loop send schedule in the
background) and ``step_wait``, ``status``, ``feed``, ``close``, ``catchup``,
``results``, ``stop``. A process whose pipe closes (the parent died) stops.

Sending is open-loop: send ``k`` of a step is due at ``t0 + (k + phase) / R``
whatever the server answered, round-robin over the process's senders, so
each sender sends at the step's per-sender rate, evenly spaced. The body
carries the intended time (see tracking.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import multiprocessing
import resource
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import psutil

from bench.chatd_client import ChatdClient
from bench.client_base import BaseClient
from bench.cluster import BenchError, cpu_seconds
from bench.peers.sio_client import SioClient
from bench.plan import FEEDER, MEMBER, ConnSpec
from bench.tracking import FEED_STEP, Recorder, results_payload
from bench.waketimer import WakeTimer
from chatd.listen import raise_open_files_limit

# Setup only (not measured): a moderate burst of hellos per process. The resume
# scenario reconnects everyone at once on purpose.
CONNECT_CONCURRENCY = 16
# Connection idx uses source address 127.0.0.(1 + idx // CONNS_PER_SOURCE): one source
# address has about 28,000 ephemeral ports towards one server port
# (net.ipv4.ip_local_port_range), so an idle run past that needs several.
CONNS_PER_SOURCE = 20_000
CATCHUP_RETRIES = 5


@dataclass(frozen=True)
class WorkerConfig:
    system: str  # "chatd", or a peer ("sio", "node": both speak socket.io, SioClient)
    index: int
    workers: int
    specs: list[ConnSpec]
    body_chars: int
    receipts_ms: int


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, as the servers do."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


# Files a load-generator process needs besides its connections (its pipe, the event
# loop, the timer, libraries').
SPARE_FILES = 64


def files_for_connections() -> int:
    """How many connections one load-generator process can hold here: its open-files
    limit once lifted (as worker_main does) less what the process needs besides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if hard == resource.RLIM_INFINITY else hard
    return max(0, limit - SPARE_FILES)


def source_address(idx: int) -> str:
    return f"127.0.0.{1 + idx // CONNS_PER_SOURCE}"


def worker_main(cfg: WorkerConfig, pipe: Connection) -> None:
    raise_open_files_limit()  # thousands of sockets per process
    run(Worker(cfg, pipe).main())


class Worker:
    def __init__(self, cfg: WorkerConfig, pipe: Connection) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.rec = Recorder()
        self.clients: list[BaseClient] = []
        self._step: asyncio.Task[dict[str, Any]] | None = None
        self._timer: WakeTimer | None = None  # made in main(): it needs the running loop

    async def main(self) -> None:
        timer = self._timer = WakeTimer()
        cls = ChatdClient if self.cfg.system == "chatd" else SioClient
        self.clients = [cls(spec, source_address(spec.idx), self.rec, self.cfg.body_chars)
                        for spec in self.cfg.specs]
        receipts = None
        if self.cfg.receipts_ms > 0 and self.cfg.system == "chatd":
            receipts = asyncio.create_task(self._receipts())
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    cmd, args = await loop.run_in_executor(None, self.pipe.recv)
                except (EOFError, OSError):
                    break
                handler: Callable[..., Coroutine[Any, Any, Any]] = getattr(self, f"cmd_{cmd}")
                try:
                    reply = ("ok", await handler(*args))
                except Exception:
                    reply = ("error", traceback.format_exc())
                self.pipe.send(reply)
                if cmd == "stop":
                    break
        finally:
            if receipts is not None:
                receipts.cancel()
            await self.cmd_stop()
            timer.close()

    def _pick(self, roles: list[str] | None) -> list[BaseClient]:
        return [c for c in self.clients if roles is None or c.spec.role in roles]

    async def cmd_connect(self, roles: list[str] | None, resume: bool) -> dict[str, Any]:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        failures: list[str] = []
        started = time.monotonic()

        async def one(c: BaseClient) -> None:
            async with sem:
                try:
                    await c.connect(resume=resume)
                except (OSError, TimeoutError) as e:
                    failures.append(repr(e))

        picked = self._pick(roles)
        await asyncio.gather(*(one(c) for c in picked))
        # The connections' state lives as long as the process; out of the collector's
        # sight, a full collection stops scanning it. Unfrozen, one took 14-16 ms in
        # both processes at once (same allocations, same moment) in the middle of a
        # step, and read as send->deliver latency of the servers.
        gc.freeze()
        return {"connected": len(picked) - len(failures), "failed": len(failures),
                "first_error": failures[0] if failures else None,
                "seconds": time.monotonic() - started}

    async def cmd_close(self, roles: list[str] | None) -> int:
        picked = self._pick(roles)
        await asyncio.gather(*(c.close() for c in picked))
        return len(picked)

    async def cmd_status(self) -> dict[str, int]:
        errors = {f"error:{code}": n for code, n in self.rec.errors.items()}
        closes = {f"close:{code}": n for code, n in self.rec.closes.items()}
        pings = sum(c.ws.pings for c in self.clients if c.ws is not None)
        return {**self.rec.counters(), "up": sum(c.up for c in self.clients), "pings": pings,
                **errors, **closes}

    async def cmd_step(self, step: int, rate: float, t0: float, duration: float,
                       warmup: float) -> None:
        self._step = asyncio.create_task(self._run_step(step, rate, t0, duration, warmup))

    async def cmd_step_wait(self) -> dict[str, Any]:
        assert self._step is not None
        return await self._step

    async def _run_step(self, step: int, rate: float, t0: float, duration: float,
                        warmup: float) -> dict[str, Any]:
        senders = [c for c in self.clients if c.spec.send_room and c.spec.role == MEMBER]
        timer = self._timer
        assert timer is not None
        total = len(senders) * rate
        phase = self.cfg.index / self.cfg.workers
        window_start: dict[str, int] | None = None
        await asyncio.sleep(max(0.0, t0 - time.time()))
        k = 0
        while True:
            now = time.time()
            if window_start is None and now >= t0 + warmup:
                window_start = self.rec.counters()
            if total <= 0:
                if now >= t0 + duration:
                    break
                await asyncio.sleep(min(0.05, t0 + duration - now))
                continue
            due = int((now - t0) * total - phase) + 1
            end = int((duration * total) - phase) + 1
            if k >= end:
                break
            while k < min(due, end):
                intended = t0 + (k + phase) / total
                client = senders[k % len(senders)]
                k += 1
                try:
                    await client.send(step, int(intended * 1e9))
                except ConnectionError:
                    self.rec.fail("send_error")
            next_at = t0 + (k + phase) / total
            await timer.sleep_until(min(next_at, time.time() + 0.01))
        await asyncio.sleep(max(0.0, t0 + duration - time.time()))
        window_end = self.rec.counters()
        return {"start": window_start or window_end, "end": window_end}

    async def cmd_feed(self, count: int, window: int, limit_s: float) -> dict[str, Any]:
        """Each feeder sends `count` messages, at most `window` unacknowledged at a time."""
        feeders = [c for c in self.clients if c.spec.role == FEEDER and c.up]
        rec = self.rec
        deadline = time.monotonic() + limit_s

        async def feed(c: BaseClient) -> None:
            for _ in range(count):
                # Polls counters the reader task updates (an Event per ack costs more).
                while c.in_flight() >= window:
                    if time.monotonic() > deadline:
                        return
                    await asyncio.sleep(0.002)
                await c.send(FEED_STEP, time.time_ns())

        started = time.monotonic()
        await asyncio.gather(*(feed(c) for c in feeders))
        while rec.counters()["pending"] > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return {"feeders": len(feeders), "seconds": time.monotonic() - started,
                "pending": rec.counters()["pending"]}

    async def cmd_catchup(self, targets: dict[str, int], roles: list[str],
                          limit_s: float) -> dict[str, Any]:
        """Reconnect the clients of `roles` at once (with resume); time each one until it
        has every room up to its target seq."""
        picked = self._pick(roles)
        started = time.monotonic()
        done: dict[int, float] = {}
        connect_failed = 0
        retries = 0
        reasons: collections.Counter[str] = collections.Counter()

        def caught_up(c: BaseClient) -> bool:
            return all(c.tracks.get(room) is not None and c.tracks[room].last >= target
                       for room, target in targets.items() if room in c.spec.rooms)

        async def one(c: BaseClient) -> None:
            nonlocal connect_failed, retries
            for attempt in range(CATCHUP_RETRIES + 1):
                try:
                    await c.connect(resume=True, limit_s=limit_s)
                    break
                except (OSError, TimeoutError) as e:
                    reasons[retry_reason(e)] += 1
                    if attempt == CATCHUP_RETRIES:
                        connect_failed += 1
                        return
                    retries += 1
                    await asyncio.sleep(0.2 * (attempt + 1))
            while not caught_up(c):
                if time.monotonic() - started > limit_s:
                    return
                await asyncio.sleep(0.005)
            done[c.spec.idx] = time.monotonic() - started

        await asyncio.gather(*(one(c) for c in picked))
        return {"clients": len(picked), "times": sorted(done.values()),
                "connect_failed": connect_failed, "connect_retries": retries,
                "connect_errors": dict(reasons),
                "not_caught_up": len(picked) - len(done)}

    async def _receipts(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.receipts_ms / 1000)
            for c in self.clients:
                if isinstance(c, ChatdClient):
                    with contextlib.suppress(ConnectionError):
                        await c.report_delivered()

    async def cmd_latency(self, step: int) -> list[int]:
        return list(self.rec.latency_us.get(step, ()))

    async def cmd_acked_max(self) -> dict[str, int]:
        return {stream: max(n for n, _ in acked)
                for stream, acked in self.rec.acked_by_stream.items() if acked}

    async def cmd_results(self) -> dict[str, Any]:
        return results_payload(self.rec, {c.spec.idx: c.tracks for c in self.clients})

    async def cmd_stop(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))


def retry_reason(e: BaseException) -> str:
    """A failed connect, as the resume scenario counts it: the kind and what it said."""
    return f"{type(e).__name__}: {e}"[:80]


class WorkerPool:
    """The parent's handle on the load-generator processes."""

    def __init__(self, system: str, specs: list[ConnSpec], workers: int, body_chars: int,
                 receipts_ms: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        workers = max(1, min(workers, len(specs)))
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self.ps: list[psutil.Process] = []
        self._last_cpu: dict[int, float] = {}
        try:
            for i in range(workers):
                cfg = WorkerConfig(system, i, workers, specs[i::workers], body_chars,
                                   receipts_ms)
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker_main, args=(cfg, child), daemon=True,
                                   name=f"bench-{system}-{i}")
                proc.start()
                child.close()
                self.procs.append(proc)
                self.pipes.append(parent)
                assert proc.pid is not None
                self.ps.append(psutil.Process(proc.pid))
        except BaseException:
            self.close()
            raise

    def call(self, cmd: str, *args: Any, timeout: float = 120.0) -> list[Any]:
        """Send a command to every process; their replies, in process order."""
        for pipe in self.pipes:
            pipe.send((cmd, args))
        deadline = time.monotonic() + timeout
        replies = []
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"load generator {i} did not answer {cmd!r} in {timeout}s")
            try:
                status, value = pipe.recv()
            except EOFError:
                raise BenchError(f"load generator {i} died during {cmd!r}") from None
            if status != "ok":
                raise BenchError(f"load generator {i} failed {cmd!r}:\n{value}")
            replies.append(value)
        return replies

    def sum_status(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for status in self.call("status", timeout=30):
            for k, v in status.items():
                total[k] = total.get(k, 0) + v
        return total

    def cpu(self) -> float:
        for p in self.ps:
            with contextlib.suppress(psutil.Error):
                self._last_cpu[p.pid] = cpu_seconds(p)
        return sum(self._last_cpu.values())

    def close(self) -> None:
        self.cpu()
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("stop", ()))
        deadline = time.monotonic() + 15
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()
