"""Several processes on one address and port (`server.workers`).

One process uses one core and holds at most its open-files limit of connections.
With more than one worker the `chatd` process supervises instead of serving: it
holds the data dir, runs the embedded Valkey when no Redis is configured, and runs
each worker as `python -m chatd <the same flags> --worker N`. A worker is a whole
node (node id `<node_id>-N`, or one generated and kept in `<data_dir>/worker-N`;
its own inboxes and connection cap) whose listening socket joins the others' on
the port with SO_REUSEPORT, so the kernel spreads new connections over them.

A worker that fails to start stops the server with its exit code (2 for a bad
setting); the first starts alone, so a setting that every worker would reject is
reported once. Once all are up, a worker that dies is started again after a pause,
whatever its exit code; meanwhile its clients reconnect to the others and resume.
A worker whose event loop stops turning (a deadlock, a stopped process) is killed once
it has been silent for `server.worker_timeout_s`, and so started again: each writes a
line to the supervisor's pipe every fifth of that from its loop (`report_alive`). One
that is not up `redis.startup_timeout_s` later than that after its start is killed too.
SIGTERM and SIGINT drain every worker at once, then stop Valkey. A killed supervisor's
workers drain by themselves (PR_SET_PDEATHSIG), and the next supervisor waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from chatd import listen
from chatd.config import EXIT_CONFIG, ConfigError, Settings
from chatd.embedded import EmbeddedError, EmbeddedValkey, embedded_for, pdeathsig_preexec
from chatd.node import claim_data_dir

log = logging.getLogger("chatd.workers")

RESTART_PAUSE_S = 1.0
STOP_GRACE_S = 5.0  # past shutdown_timeout_s, before a draining worker is killed
_POLL_S = 0.5
_READY_LINE = b"chatd ready"  # what a worker prints once it listens (cli.serve)
_ALIVE_LINE = b"chatd alive\n"


def worker_count(configured: int) -> int:
    """`server.workers`, 0 meaning one per CPU this process may run on."""
    if configured:
        return configured
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_data_path(settings: Settings, index: int) -> Path:
    return settings.data_path / f"worker-{index}"


def worker_flags(settings: Settings, index: int) -> list[str]:
    """What makes worker `index` a node of its own: after the server's own flags, these win."""
    flags = ["--worker", str(index), "--data-dir", str(worker_data_path(settings, index))]
    if settings.server.node_id:
        flags += ["--node-id", f"{settings.server.node_id}-{index}"]
    return flags


class Worker:
    """One worker process, started again as often as it dies."""

    def __init__(self, index: int, argv: list[str], silent_s: float, startup_s: float) -> None:
        self.index = index
        self.argv = argv
        self.silent_s = silent_s  # server.worker_timeout_s; 0 = never judged
        self.startup_s = startup_s  # what a start may take besides: the wait for Redis
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.died_at: float | None = None
        self.heard_at = 0.0  # when its last line came (monotonic)
        self._stdout: asyncio.Task[None] | None = None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def start(self) -> None:
        self.ready = asyncio.Event()
        self.died_at = None
        self.heard_at = time.monotonic()
        # stderr (the logs) is shared; stdout carries the ready line, then the alive ones.
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            preexec_fn=pdeathsig_preexec())
        self._stdout = asyncio.create_task(self._read_stdout(self.proc.stdout))
        log.info("worker started", extra={"worker": self.index, "pid": self.proc.pid})

    async def _read_stdout(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        async for line in stream:
            # When read, on this process's clock: after the supervisor itself stood
            # still (stopped, starved), what the workers wrote meanwhile counts as new.
            self.heard_at = time.monotonic()
            if line.startswith(_READY_LINE):
                self.ready.set()

    async def until_ready(self, stop: asyncio.Event) -> bool:
        """Wait until the worker listens (True), exits, hangs or the server stops (False)."""
        assert self.proc is not None
        waits = [asyncio.ensure_future(w) for w in (self.ready.wait(), self.proc.wait(),
                                                    stop.wait())]
        try:
            while not (await asyncio.wait(waits, timeout=_POLL_S,
                                          return_when=asyncio.FIRST_COMPLETED))[0]:
                self.kill_if_silent(time.monotonic())
        finally:
            for w in waits:
                w.cancel()
        return self.ready.is_set() and self.exit_code is None

    def kill_if_silent(self, now: float) -> None:
        """SIGKILL a live worker that said nothing for `silent_s` once up, or is not up
        `startup_s + silent_s` after its start: a hung one cannot drain. Whoever
        waits for it then sees it die."""
        if not self.silent_s or self.proc is None or self.exit_code is not None:
            return
        up = self.ready.is_set()
        if now - self.heard_at <= self.silent_s + (0 if up else self.startup_s):
            return
        log.warning("worker stopped answering; killed" if up else "worker did not start; killed",
                    extra={"worker": self.index, "silent_s": round(now - self.heard_at, 1)})
        self.proc.kill()

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM (the worker drains), SIGKILL after `timeout_s`."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("worker did not drain in time; killed", extra={"worker": self.index})
                proc.kill()
                await proc.wait()
        if self._stdout is not None:
            await self._stdout


async def supervise(settings: Settings, count: int, argv: Sequence[str]) -> int:
    """Run `count` workers until SIGTERM or SIGINT; the exit code."""
    if not sys.platform.startswith("linux"):
        raise ConfigError("server.workers: more than 1 needs Linux (SO_REUSEPORT spreading "
                          "connections); run one chatd per port instead")
    ops_port = settings.server.ops_port
    if ops_port and ops_port + count - 1 > 65535:
        raise ConfigError(f"server.ops_port: {count} workers take ports {ops_port} to "
                          f"{ops_port + count - 1}, past 65535")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(claim_data_dir(settings.data_path).close)
        common = [sys.executable, "-m", "chatd", *argv]
        embedded = embedded_for(settings)
        if embedded is not None:
            url = await embedded.start(timeout_s=settings.redis.startup_timeout_s)
            stack.push_async_callback(embedded.stop)
            common += ["--redis-url", url]
        workers = [Worker(i, [*common, *worker_flags(settings, i)],
                          settings.server.worker_timeout_s, settings.redis.startup_timeout_s)
                   for i in range(count)]
        for i in range(count):
            await _wait_for_predecessor(worker_data_path(settings, i),
                                        settings.server.shutdown_timeout_s + STOP_GRACE_S)
        stack.push_async_callback(_stop_all, workers,
                                  settings.server.shutdown_timeout_s + STOP_GRACE_S)
        for group in (workers[:1], workers[1:]):
            for worker in group:
                await worker.start()
            started = await asyncio.gather(*(w.until_ready(stop) for w in group))
            if stop.is_set():
                return 0
            if not all(started):
                codes = [w.exit_code for w in group]
                return EXIT_CONFIG if EXIT_CONFIG in codes else 1
        url = listen.http_url(settings.server.host, settings.server.port)
        log.info("chatd ready", extra={"url": url, "workers": count})
        print(f"chatd ready: web client on {url} ({count} workers)", flush=True)
        await _watch(workers, embedded, stop, settings)
        log.info("draining")
        return 0


async def _wait_for_predecessor(data_path: Path, timeout_s: float) -> None:
    """Wait until no process holds a worker's data dir. When a supervisor is killed its
    workers get SIGTERM (PR_SET_PDEATHSIG) and drain for up to shutdown_timeout_s,
    each holding its dir: a supervisor started meanwhile (a service manager restarting
    it at once) would see its first worker fail on "in use" and give up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waited = False
    while True:
        try:
            claim_data_dir(data_path).close()
            return
        except ConfigError:
            if loop.time() > deadline:
                raise
            if not waited:
                log.info("waiting for the previous worker of this data dir to exit",
                         extra={"data_dir": str(data_path)})
                waited = True
            await asyncio.sleep(_POLL_S / 5)


async def _watch(workers: list[Worker], embedded: EmbeddedValkey | None, stop: asyncio.Event,
                 settings: Settings) -> None:
    """Start again whatever dies, until `stop`. Once the server is up a worker's exit
    code is no reason to stop the others: even a restart that fails on a setting
    (Redis unreachable, exit 2) is retried, while they serve."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _POLL_S)
        if stop.is_set():
            break
        if embedded is not None:
            try:
                await embedded.revive(settings.redis.startup_timeout_s)
            except (EmbeddedError, OSError) as e:
                log.warning("embedded valkey did not start again", extra={"error": str(e)})
        now = time.monotonic()
        for worker in workers:
            code = worker.exit_code
            if code is None:
                worker.kill_if_silent(now)
                continue
            if worker.died_at is None:
                worker.died_at = now
                log.warning("worker exited; starting it again",
                            extra={"worker": worker.index, "code": code})
            elif now - worker.died_at >= RESTART_PAUSE_S:
                await worker.start()


async def report_alive(timeout_s: float) -> None:
    """A worker's side: a line to the supervisor every fifth of `timeout_s`, written
    from the event loop, so that they stop when it stops turning. Never blocking: a
    supervisor that does not read (stopped) must not stop its workers with it."""
    fd = sys.stdout.fileno()
    # Never to a terminal: made non-blocking, it stays so for the shell and all else
    # that shares it (`--worker` run by hand). The supervisor's is a pipe or socket.
    if os.isatty(fd):
        return
    os.set_blocking(fd, False)
    while True:
        # A line cut short by a full socket ends with the next one: any line counts.
        # A line that cannot go (full, or the supervisor gone) is the supervisor's
        # to miss: it judges by what it reads.
        with contextlib.suppress(OSError):
            os.write(fd, _ALIVE_LINE)
        await asyncio.sleep(timeout_s / 5)


async def _stop_all(workers: list[Worker], timeout_s: float) -> None:
    await asyncio.gather(*(w.stop(timeout_s) for w in workers))
