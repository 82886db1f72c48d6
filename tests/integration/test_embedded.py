"""The embedded Valkey server, with real valkey-server processes (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import shutil
import signal
import stat
import sys
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from chatd.embedded import PID_FILE, EmbeddedError, EmbeddedValkey

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Stands in for a chatd process: starts the server, writes a key, then waits to be killed.
CHILD = """
import asyncio, pathlib, sys
import redis.asyncio as aioredis
from chatd.embedded import EmbeddedValkey

async def main() -> None:
    ev = EmbeddedValkey(pathlib.Path(sys.argv[1]))
    url = await ev.start()
    async with aioredis.Redis.from_url(url) as client:
        await client.set("survivor", "yes")
    print(ev.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture
async def servers() -> AsyncIterator[list[EmbeddedValkey]]:
    """Every EmbeddedValkey a test appends here is stopped, even when the test fails."""
    started: list[EmbeddedValkey] = []
    yield started
    for server in reversed(started):
        await server.stop()


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path.resolve()


def gone(pid: int) -> bool:
    """True when pid has exited; an unreaped zombie counts as exited."""
    try:
        stat_line = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat_line[stat_line.rfind(b")") + 2:][:1] in (b"Z", b"X")


async def wait_gone(pid: int, timeout_s: float) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if gone(pid):
            return True
        await asyncio.sleep(0.05)
    return gone(pid)


def kill_if_alive(pid: int | None) -> None:
    if pid is not None and not gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def get(url: str, key: str) -> bytes | None:
    async with aioredis.Redis.from_url(url) as client:
        value = await client.get(key)
        assert value is None or isinstance(value, bytes)
        return value


async def set_key(url: str, key: str, value: str) -> None:
    async with aioredis.Redis.from_url(url) as client:
        assert await client.ping()
        await client.set(key, value)


async def spawn_chatd_child(data_dir: pathlib.Path) -> tuple[asyncio.subprocess.Process, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(data_dir), stdout=asyncio.subprocess.PIPE, env=env)
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        return child, int(line)
    except BaseException:
        await reap_child(child)
        raise


async def reap_child(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    await child.wait()


async def test_start_stop_and_data_survives_restart(
        data_dir: pathlib.Path, servers: list[EmbeddedValkey],
        caplog: pytest.LogCaptureFixture) -> None:
    ev = EmbeddedValkey(data_dir)
    servers.append(ev)
    caplog.set_level(logging.INFO, logger="chatd.embedded")
    url = await ev.start()
    valkey_dir = data_dir / "valkey"
    assert url == f"unix://{valkey_dir}/valkey.sock"
    pid = ev.pid
    assert pid is not None
    assert (valkey_dir / PID_FILE).read_text().strip() == str(pid)
    assert stat.S_IMODE(valkey_dir.stat().st_mode) == 0o700
    assert await ev.start() == url and ev.pid == pid  # already running: no second server
    started = [r for r in caplog.records if r.getMessage() == "embedded valkey started"]
    assert [r.__dict__["pid"] for r in started] == [pid]
    assert started[0].__dict__["socket"] == f"{valkey_dir}/valkey.sock"

    async with aioredis.Redis.from_url(url) as client:
        assert await client.ping()
        await client.set("greeting", "hello")
        config = await client.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["auto-aof-rewrite-min-size"] == str(512 * 1024 * 1024)
    assert config["port"] == "0"
    assert config["unixsocketperm"] == "700"
    assert config["dir"] == str(valkey_dir)

    await ev.stop()
    assert ev.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (valkey_dir / PID_FILE).exists()
    await ev.stop()  # idempotent

    assert await ev.start() == url
    assert ev.pid != pid
    assert await get(url, "greeting") == b"hello"
    await ev.stop()


async def test_leftover_server_from_dead_chatd_is_replaced(
        tmp_path: pathlib.Path, servers: list[EmbeddedValkey]) -> None:
    old = EmbeddedValkey(tmp_path)
    servers.append(old)
    url = await old.start()
    old_pid = old.pid
    assert old_pid is not None
    await set_key(url, "before", "crash")

    # `old` is never stopped, as if its chatd was SIGKILLed and PDEATHSIG did not fire.
    new = EmbeddedValkey(tmp_path)
    servers.append(new)
    assert await new.start() == url
    assert new.pid is not None and new.pid != old_pid
    assert gone(old_pid)
    assert await get(url, "before") == b"crash"

    # Stopping the stale handle reaps its child but must not touch the new server.
    await old.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    pid_file = tmp_path / "valkey" / PID_FILE
    assert pid_file.read_text().strip() == str(new.pid)
    assert await get(url, "before") == b"crash"


async def test_sigkilled_chatd_process_then_fresh_start(
        tmp_path: pathlib.Path, servers: list[EmbeddedValkey]) -> None:
    server_pid: int | None = None
    try:
        child, server_pid = await spawn_chatd_child(tmp_path)
        await reap_child(child)  # SIGKILL: no chance to stop the server

        ev = EmbeddedValkey(tmp_path)
        servers.append(ev)
        url = await ev.start()
        assert ev.pid != server_pid
        assert gone(server_pid)
        assert await get(url, "survivor") == b"yes"
    finally:
        kill_if_alive(server_pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
async def test_pdeathsig_takes_server_down_with_chatd(tmp_path: pathlib.Path) -> None:
    server_pid: int | None = None
    try:
        child, server_pid = await spawn_chatd_child(tmp_path)
        assert not gone(server_pid)
        await reap_child(child)
        assert await wait_gone(server_pid, 10)
    finally:
        kill_if_alive(server_pid)


async def test_long_data_dir_puts_socket_in_tmp(
        tmp_path: pathlib.Path, servers: list[EmbeddedValkey]) -> None:
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(os.fsencode(data_dir / "valkey" / "valkey.sock")) > 100
    ev = EmbeddedValkey(data_dir, appendfsync="always", aof_rewrite_min_mb=100)
    servers.append(ev)
    url = await ev.start()
    socket = pathlib.Path(url.removeprefix("unix://"))
    try:
        assert socket.parent.parent == pathlib.Path("/tmp")
        assert socket.parent.name.startswith("chatd-")
        assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
        assert len(os.fsencode(socket)) <= 100
        async with aioredis.Redis.from_url(url) as client:
            await client.set("deep", "path")
            assert (await client.config_get("appendfsync"))["appendfsync"] == "always"
            assert (await client.config_get("auto-aof-rewrite-min-size"))[
                "auto-aof-rewrite-min-size"] == str(100 * 1024 * 1024)
        await ev.stop()
        assert await ev.start() == url  # same data dir, same socket
        assert await get(url, "deep") == b"path"
        assert (data_dir / "valkey" / "appendonlydir").is_dir()
        await ev.stop()
    finally:
        await ev.stop()
        shutil.rmtree(socket.parent, ignore_errors=True)


def test_invalid_appendfsync(tmp_path: pathlib.Path) -> None:
    with pytest.raises(EmbeddedError, match=r"appendfsync 'sometimes'.*always, everysec, no"):
        EmbeddedValkey(tmp_path, appendfsync="sometimes")


def test_missing_explicit_binary(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-valkey-server"
    with pytest.raises(EmbeddedError, match="no-such-valkey-server"):
        EmbeddedValkey(tmp_path, binary=str(missing))
    not_executable = tmp_path / "valkey-server"
    not_executable.write_text("")
    with pytest.raises(EmbeddedError, match="not executable"):
        EmbeddedValkey(tmp_path, binary=str(not_executable))


async def test_server_exiting_at_startup_reports_log(tmp_path: pathlib.Path) -> None:
    false = shutil.which("false")
    assert false is not None
    ev = EmbeddedValkey(tmp_path, binary=false)
    with pytest.raises(EmbeddedError, match="exited with code 1 during startup"):
        await ev.start(timeout_s=5)
    assert ev.pid is None
    assert not (tmp_path / "valkey" / PID_FILE).exists()


# A valkey-server stand-in that answers PING with LOADING for a while, then PONG:
# a server reading an AOF that takes longer than the start timeout.
SLOW_LOADER = r"""
import socket, sys, time
path = sys.argv[sys.argv.index("--unixsocket") + 1]
until = time.monotonic() + float(sys.argv[1])
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
while True:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(4096):
            if b"HELLO" in data.upper():  # redis-py 8.2+ asks for RESP3 first
                conn.sendall(b"%1\r\n$5\r\nproto\r\n:3\r\n")
            elif b"PING" not in data.upper():  # the client's handshake: allowed while loading
                conn.sendall(b"+OK\r\n" * data.count(b"*"))
            elif time.monotonic() < until:
                conn.sendall(b"-LOADING Valkey is loading the dataset in memory\r\n")
            else:
                conn.sendall(b"+PONG\r\n")
"""


async def test_start_waits_for_a_server_loading_its_data_past_the_timeout(
        tmp_path: pathlib.Path, servers: list[EmbeddedValkey]) -> None:
    script = tmp_path / "loader.py"
    script.write_text(SLOW_LOADER)
    fake = tmp_path / "fake-valkey-server"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {script} 1.5 \"$@\"\n")
    fake.chmod(0o755)
    ev = EmbeddedValkey(tmp_path / "data", binary=str(fake))
    servers.append(ev)
    started = asyncio.get_running_loop().time()
    await ev.start(timeout_s=0.5)
    assert asyncio.get_running_loop().time() - started >= 1.5
    assert ev.pid is not None


async def test_server_not_answering_times_out_and_is_killed(tmp_path: pathlib.Path) -> None:
    pid_out = tmp_path / "fake.pid"
    fake = tmp_path / "fake-valkey-server"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_out}\nexec sleep 60\n")
    fake.chmod(0o755)
    ev = EmbeddedValkey(tmp_path / "data", binary=str(fake))
    fake_pid: int | None = None
    try:
        with pytest.raises(EmbeddedError, match=r"did not answer PING within 0\.5s"):
            await ev.start(timeout_s=0.5)
        fake_pid = int(pid_out.read_text())
        assert await wait_gone(fake_pid, 5)
        assert not (tmp_path / "data" / "valkey" / PID_FILE).exists()
    finally:
        kill_if_alive(fake_pid)
