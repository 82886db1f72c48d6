"""The command line as an operator meets it: real `python -m chatd` / `chatd` processes.

- invalid configuration and an unreachable Redis: exit 2, one line naming the problem;
- the embedded default (no Redis configured): ready, SIGTERM drains to exit 0 and stops
  the embedded valkey-server; data survives a restart and a SIGKILL;
- logs on a non-tty stderr are JSON lines; `--help` works for both entry points.

Every process runs in a temporary working directory, so neither the repository's
config.toml nor a ./data directory is picked up by accident.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.client import Api, connect
from tests.harness import free_port, release_port
from tests.integration.cli_process import (
    PYTHON_M,
    SHUTDOWN_S,
    Chatd,
    alive,
    assert_one_problem_line,
    json_record,
    run_cli,
    valkey_pids_for,
)

CONSOLE = [str(Path(sys.executable).parent / "chatd")]
LOW_SOFT_LIMIT = 256  # open files, as a stingy system might start chatd
FILES = 128  # the open files limit (soft and hard) the exhaustion test gives chatd


# --- invalid configuration ------------------------------------------------------------------


@pytest.mark.parametrize(("args", "names"), [
    (["--port", "70000"], ["server.port", "70000"]),
    (["--port", "0"], ["server.port"]),
    (["--redis-url", "http://localhost:6379"], ["redis.url"]),
    (["--redis-cluster", "nohost"], ["redis.cluster_nodes", "nohost"]),
    (["--config", "missing.toml"], ["missing.toml"]),
])
def test_bad_flag_exits_2_with_one_line(tmp_path: Path, args: list[str],
                                        names: list[str]) -> None:
    assert_one_problem_line(run_cli(args, tmp_path), *names)


def test_non_numeric_port_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    assert_one_problem_line(run_cli(["--port", "eighty"], tmp_path), "--port", "eighty")


@pytest.mark.parametrize("command", [PYTHON_M, CONSOLE], ids=["python-m", "console-script"])
def test_unknown_key_in_config_file(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "chatd.toml").write_text('[server]\nport = 9000\nlisten = "0.0.0.0"\n')
    res = run_cli(["--config", "chatd.toml"], tmp_path, command=command)
    assert_one_problem_line(res, "server.listen")


def test_unknown_key_in_implicit_config_toml(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[redis]\npartitons = 4\n")
    assert_one_problem_line(run_cli([], tmp_path), "redis.partitons")


def test_unknown_section_and_bad_toml(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[serve]\nport = 9000\n")
    assert_one_problem_line(run_cli(["--config", "a.toml"], tmp_path), "[serve]")
    (tmp_path / "b.toml").write_text("[server]\nport = \n")
    assert_one_problem_line(run_cli(["--config", "b.toml"], tmp_path), "b.toml")


@pytest.mark.parametrize(("var", "value", "names"), [
    ("CHATD_SERVER__PORT", "eighty", ["server.port", "CHATD_SERVER__PORT", "eighty"]),
    ("CHATD_LIMITS__SEND_BURST", "1.5", ["limits.send_burst", "CHATD_LIMITS__SEND_BURST"]),
    ("CHATD_SERVER__LOG_LEVEL", "loud", ["server.log_level", "loud"]),
    ("CHATD_SERVER__PROT", "1", ["server.prot"]),
    ("CHATD_SERVER__WORKERS", "-1", ["server.workers", "-1"]),
])
def test_bad_env_exits_2_with_one_line(tmp_path: Path, var: str, value: str,
                                       names: list[str]) -> None:
    assert_one_problem_line(run_cli([], tmp_path, {var: value}), *names)


def test_unreachable_redis_exits_2(tmp_path: Path) -> None:
    port = free_port()  # reserved, and nothing listens on it
    try:
        url = f"redis://:hunter2pw@127.0.0.1:{port}/0"
        t0 = time.monotonic()
        res = run_cli(["--redis-url", url, "--port", str(free_port())], tmp_path,
                      {"CHATD_REDIS__STARTUP_TIMEOUT_S": "1"})
        elapsed = time.monotonic() - t0
    finally:
        release_port(port)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "hunter2pw" not in res.stderr  # the password never reaches a log
    assert elapsed < 15  # gave up after about startup_timeout_s
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    # One line names the problem; the others are the retry log (one record per attempt).
    problems = [line for line in lines if json_record(line) is None]
    assert len(problems) == 1, res.stderr
    assert "Redis" in problems[0] and f"127.0.0.1:{port}" in problems[0]
    retries = [json_record(line) for line in lines if json_record(line) is not None]
    assert all(r is not None and r["level"] == "warning" for r in retries), retries


def test_unreachable_redis_one_line_at_log_level_error(tmp_path: Path) -> None:
    port = free_port()
    try:
        res = run_cli(["--redis-url", f"redis://127.0.0.1:{port}/0"], tmp_path,
                      {"CHATD_REDIS__STARTUP_TIMEOUT_S": "0.5",
                       "CHATD_SERVER__LOG_LEVEL": "error"})
    finally:
        release_port(port)
    assert_one_problem_line(res, "Redis", f"127.0.0.1:{port}")


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_exits_2_and_stops_the_embedded_server(tmp_path: Path, workers: int) -> None:
    """With workers too: the first starts alone, so one line names the problem, not one
    line per worker."""
    data_dir = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        res = run_cli(["--port", str(port), "--data-dir", str(data_dir)], tmp_path,
                      {"CHATD_SERVER__SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
                       "CHATD_SERVER__WORKERS": str(workers)},
                      timeout=SHUTDOWN_S + 15)
        elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    problems = [line for line in res.stderr.splitlines()
                if line.strip() and json_record(line) is None]
    assert len(problems) == 1, res.stderr
    assert f"127.0.0.1:{port}" in problems[0]
    assert elapsed < SHUTDOWN_S + 10
    assert valkey_pids_for(data_dir) == set()  # the embedded server it started is gone


# --- --help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [PYTHON_M, CONSOLE], ids=["python-m", "console-script"])
def test_help(tmp_path: Path, command: list[str]) -> None:
    res = run_cli(["--help"], tmp_path, command=command)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: chatd")
    for flag in ("--config", "--host", "--port", "--node-id", "--redis-url", "--redis-cluster",
                 "--data-dir", "--workers", "--ops-port"):
        assert flag in res.stdout
    assert res.stderr == ""


def test_console_script_is_installed() -> None:
    assert Path(CONSOLE[0]).is_file() and os.access(CONSOLE[0], os.X_OK)
    assert shutil.which("chatd", path=str(Path(sys.executable).parent)) == CONSOLE[0]


# --- the embedded default -------------------------------------------------------------------


async def stop_gracefully(chatd: Chatd) -> None:
    """SIGTERM: exit 0 within shutdown_timeout_s, and the embedded valkey-server is gone."""
    valkey_pid = chatd.valkey_pid()
    t0 = time.monotonic()
    chatd.signal(signal.SIGTERM)
    assert await chatd.wait_exit(SHUTDOWN_S + 5) == 0, chatd.stderr()
    assert time.monotonic() - t0 < SHUTDOWN_S
    assert not alive(valkey_pid)
    assert valkey_pids_for(chatd.data_dir) == set()
    assert "Traceback" not in chatd.stderr()


async def test_embedded_default_drains_and_keeps_data(chatd: Chatd,
                                                      session: aiohttp.ClientSession) -> None:
    await chatd.start(session)
    valkey_pid = chatd.valkey_pid()
    assert valkey_pids_for(chatd.data_dir) == {valkey_pid}  # serving this data dir
    assert (chatd.data_dir / "valkey").is_dir()
    api = Api(session, chatd.url)
    user = await api.register()
    async with session.get(chatd.url + "/readyz") as resp:
        node_id = (await resp.json())["node_id"]

    await stop_gracefully(chatd)

    await chatd.start(session)
    assert chatd.valkey_pid() != valkey_pid  # a fresh server, on the same files
    again = await api.login(user.username)
    assert again.user_id == user.user_id
    async with session.get(chatd.url + "/readyz") as resp:
        assert (await resp.json())["node_id"] == node_id  # stable per data dir
    await stop_gracefully(chatd)


async def test_embedded_default_survives_sigkill(chatd: Chatd,
                                                 session: aiohttp.ClientSession) -> None:
    await chatd.start(session)
    api = Api(session, chatd.url)
    user = await api.register()

    orphan = chatd.valkey_pid()

    chatd.signal(signal.SIGKILL)
    assert await chatd.wait_exit(5) == -signal.SIGKILL

    # At once: the old server may still be shutting down (it gets SIGTERM from the kernel).
    assert await chatd.start(session, within_s=20) < 20
    assert not alive(orphan)
    assert valkey_pids_for(chatd.data_dir) == {chatd.valkey_pid()}
    again = await api.login(user.username)
    assert again.user_id == user.user_id
    other = await api.register()  # and it takes writes
    await stop_gracefully(chatd)

    await chatd.start(session)
    assert (await api.login(other.username)).user_id == other.user_id
    await stop_gracefully(chatd)


async def test_ready_log_line_names_the_url(chatd: Chatd,
                                            session: aiohttp.ClientSession) -> None:
    await chatd.start(session)
    await stop_gracefully(chatd)
    records = chatd.records()
    assert all(isinstance(r.get("level"), str) and isinstance(r.get("msg"), str)
               for r in records)
    [ready] = [r for r in records if r["msg"] == "chatd ready"]
    assert ready["level"] == "info"
    assert ready["url"] == f"{chatd.url}/"
    assert [r["msg"] for r in records][-1] == "stopped"


async def test_the_open_files_limit_is_raised_to_the_hard_one(
        chatd: Chatd, session: aiohttp.ClientSession) -> None:
    """Each connection is a file: a soft limit of 1024 under a higher hard one would cap a
    node near a thousand connections, so chatd lifts it and names it when ready."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= LOW_SOFT_LIMIT:
        pytest.skip(f"the hard limit on open files here is {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, hard))
    try:
        await chatd.start(session)  # inherits the low soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert chatd.proc is not None
    assert psutil.Process(chatd.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    [ready] = [r for r in chatd.records() if r["msg"] == "chatd ready"]
    assert ready["max_open_files"] == hard
    await stop_gracefully(chatd)


async def test_past_the_open_files_limit_new_connections_are_dropped_and_open_ones_go_on(
        chatd: Chatd, session: aiohttp.ClientSession) -> None:
    """With every file in use, the kernel's accept fails: chatd drops the connection it
    cannot take, neither spins nor crashes, keeps delivering on the open ones, and takes
    new ones again once files are free."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    chatd.wrapper = [prlimit, f"--nofile={FILES}:{FILES}"]
    # No cap: it would refuse them before the files run out (test_capacity.py), and the
    # files can run out without WebSockets, e.g. through HTTP requests.
    chatd.env["CHATD_LIMITS__MAX_CONNECTIONS_PER_NODE"] = "100000000"
    await chatd.start(session)
    api = Api(session, chatd.url)
    alice, bob = await api.register(), await api.register()
    room = await api.direct(alice, bob)
    ws_url = chatd.url.replace("http://", "ws://", 1) + "/ws"
    sender, receiver = await connect(session, ws_url, alice), await connect(session, ws_url, bob)
    assert chatd.proc is not None
    node = psutil.Process(chatd.proc.pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as crowd:
        held, dropped = [], 0
        for _ in range(FILES + 50):
            try:
                held.append(await asyncio.wait_for(crowd.ws_connect(ws_url), 5))
            except (aiohttp.ClientError, TimeoutError):
                dropped += 1
        assert dropped and node.num_fds() <= FILES, (dropped, node.num_fds())
        busy = sum(node.cpu_times()[:2])
        await asyncio.sleep(2)
        assert sum(node.cpu_times()[:2]) - busy < 1.0  # not retrying accept in a loop
        ack = await sender.send_message(room, "still here")
        assert ack["type"] == "ack", ack
        assert [m["body"] for m in await receiver.wait_messages(room, 1)] == ["still here"]
        for ws in held:
            await ws.close()
    deadline = time.monotonic() + 10
    while True:  # the node frees the files as it sees the closes
        try:
            late = await connect(session, ws_url, alice)
            break
        except aiohttp.ClientError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    await late.ping()
    for ws in (sender, receiver, late):
        await ws.close()
    await stop_gracefully(chatd)


async def test_non_tty_stderr_is_json_lines(chatd: Chatd,
                                            session: aiohttp.ClientSession) -> None:
    await chatd.start(session)
    await stop_gracefully(chatd)
    lines = [line for line in chatd.stderr().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json_record(line)
        assert record is not None, f"not a JSON line: {line!r}"
        assert {"level", "msg"} <= set(record)
