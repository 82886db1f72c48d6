"""A real `python -m chatd` process, as an operator runs it, and what it leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.harness import REPO_ROOT

PYTHON_M = [sys.executable, "-m", "chatd"]
SHUTDOWN_S = 5.0


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra or {})
    return env


def json_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def valkey_pids_for(data_dir: Path) -> set[int]:
    """Pids of live valkey/redis-server processes serving `data_dir` (cmdline or cwd)."""
    marker = os.fsencode(data_dir.resolve())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_bytes()
        except OSError:
            continue
        if b"valkey-server" not in cmdline and b"redis-server" not in cmdline:
            continue
        if state[state.rfind(b")") + 2:][:1] in (b"Z", b"X"):
            continue  # exited, waiting to be reaped
        cwd = b""
        with contextlib.suppress(OSError):
            cwd = os.fsencode(os.readlink(entry / "cwd"))
        if marker in cmdline or cwd.startswith(marker):
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rfind(b")") + 2:][:1] not in (b"Z", b"X")


class Chatd:
    """One chatd process with no Redis configured: the embedded default."""

    def __init__(self, workdir: Path, data_dir: Path, port: int, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.data_dir = data_dir
        self.port = port
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.wrapper: list[str] = []  # a command that execs chatd's, e.g. prlimit
        self.runs = 0
        self.stderr_path = workdir / "stderr-0.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.runs += 1
        self.stderr_path = self.workdir / f"stderr-{self.runs}.log"
        argv = [*self.wrapper, *PYTHON_M, "--port", str(self.port),
                "--data-dir", str(self.data_dir)]
        setpriv = shutil.which("setpriv")
        if setpriv:  # dies with pytest, even if pytest is SIGKILLed
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=self.workdir, env=child_env(self.env),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        return [r for r in map(json_record, self.stderr().splitlines()) if r is not None]

    def valkey_pid(self) -> int:
        [pid] = [r["pid"] for r in self.records() if r.get("msg") == "embedded valkey started"]
        return int(pid)

    async def start(self, session: aiohttp.ClientSession, within_s: float = 20) -> float:
        """Spawn and wait for /readyz 200; the seconds it took."""
        self.spawn()
        return await self.ready(session, within_s)

    async def ready(self, session: aiohttp.ClientSession, within_s: float = 20) -> float:
        """Wait for /readyz 200 of the running process; the seconds it took."""
        t0 = time.monotonic()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"chatd exited with {self.proc.returncode}:\n"
                                     f"{self.stderr()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(self.url + "/readyz") as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            if time.monotonic() - t0 > within_s:
                raise AssertionError(f"chatd not ready within {within_s}s:\n{self.stderr()}")
            await asyncio.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    async def wait_exit(self, within_s: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + within_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"chatd still running after {within_s}s:\n{self.stderr()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):  # its workers (server.workers)
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    child.kill()
            self.proc.kill()
            self.proc.wait(10)
        for pid in valkey_pids_for(self.data_dir):  # started by our chatd, left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run_cli(args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None,
            command: Sequence[str] = PYTHON_M,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], cwd=cwd, env=child_env(env), capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def assert_one_problem_line(res: subprocess.CompletedProcess[str], *names: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    [line] = lines
    for name in names:
        assert name in line, (name, line)
    return line
