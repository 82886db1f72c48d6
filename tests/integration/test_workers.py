"""`server.workers`: several chatd processes on one port, supervised by the `chatd` process.

Real processes throughout: the supervisor with its embedded Valkey, its workers, and
WebSocket clients that the kernel spreads over the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from chatd.workers import RESTART_PAUSE_S
from tests.client import Api, User, Ws, connect, metric
from tests.harness import free_port_run, release_port
from tests.integration.cli_process import (
    SHUTDOWN_S,
    Chatd,
    alive,
    run_cli,
    valkey_pids_for,
)

WORKERS = 2
FILES = 128  # open files per process in the test that needs more connections than that
SILENT_S = 2.0  # server.worker_timeout_s in the tests of hung workers
STARTUP_S = 3.0  # redis.startup_timeout_s there: what a start may take besides


@pytest.fixture
def server(chatd: Chatd) -> Chatd:
    chatd.env["CHATD_SERVER__WORKERS"] = str(WORKERS)
    return chatd


def worker_pids(chatd: Chatd) -> dict[int, int]:
    """Worker index -> pid, of the live workers of the server."""
    if chatd.proc is None or chatd.proc.poll() is not None:
        return {}
    found = {}
    for child in psutil.Process(chatd.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            argv = child.cmdline()
            if "--worker" in argv and child.status() != psutil.STATUS_ZOMBIE:
                found[int(argv[argv.index("--worker") + 1])] = child.pid
    return found


async def node_ids(chatd: Chatd, session: aiohttp.ClientSession, count: int) -> set[str]:
    """The node ids /readyz answers with, once `count` differ (each request is a new
    connection, which the kernel gives to any worker)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=session.timeout) as fresh:
        while len(seen) < count:
            assert time.monotonic() < deadline, f"only {seen} answer:\n{chatd.stderr()}"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with fresh.get(chatd.url + "/readyz") as resp:
                    if resp.status == 200:
                        seen.add((await resp.json())["node_id"])
            await asyncio.sleep(0.02)
    return seen


async def ready_node_id(session: aiohttp.ClientSession, url: str) -> str:
    """/readyz of one node, once it answers 200 (it listens on its ops port just after
    the shared one)."""
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/readyz") as resp:
                if resp.status == 200:
                    return str((await resp.json())["node_id"])
        assert time.monotonic() < deadline, f"{url} not ready"
        await asyncio.sleep(0.05)


async def connect_on_another_node(session: aiohttp.ClientSession, ws_url: str, user: User,
                                  not_on: str) -> Ws:
    for _ in range(100):
        ws = await connect(session, ws_url, user)
        if ws.of_type("welcome")[0]["node_id"] != not_on:
            return ws
        await ws.close()
    raise AssertionError(f"every connection landed on {not_on}")


async def test_workers_are_nodes_of_their_own_on_one_port_and_drain_together(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    await server.start(session)
    ids = await node_ids(server, session, WORKERS)
    for i in range(WORKERS):  # generated once, kept per worker
        assert (server.data_dir / f"worker-{i}" / "node_id").read_text().strip() in ids
    api = Api(session, server.url)
    alice, bob = await api.register(), await api.register()
    room = await api.direct(alice, bob)
    ws_url = server.url.replace("http://", "ws://", 1) + "/ws"
    sender = await connect(session, ws_url, alice)
    sender_node = sender.of_type("welcome")[0]["node_id"]
    receiver = await connect_on_another_node(session, ws_url, bob, not_on=sender_node)
    ack = await sender.send_message(room, "across workers")
    assert ack["type"] == "ack", ack
    [got] = await receiver.wait_messages(room, 1)
    assert (got["body"], got["seq"]) == ("across workers", ack["seq"])

    workers, valkey_pid = worker_pids(server), server.valkey_pid()
    assert sorted(workers) == list(range(WORKERS))
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    assert await receiver.wait_closed() == 1001  # drained: going away
    assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()
    assert time.monotonic() - t0 < SHUTDOWN_S
    assert not any(alive(pid) for pid in [*workers.values(), valkey_pid])
    assert valkey_pids_for(server.data_dir) == set()
    assert "Traceback" not in server.stderr()
    await sender.close()


async def test_a_worker_that_dies_is_started_again_under_its_node_id(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    await server.start(session)
    ids = await node_ids(server, session, WORKERS)
    victim = worker_pids(server)[0]
    # Its data dir held by someone else for a while: restarts fail with exit code 2,
    # a bad setting to a worker, and are tried again; the server does not stop.
    with (server.data_dir / "worker-0" / "chatd.lock").open("a+") as lock:
        os.kill(victim, signal.SIGKILL)
        psutil.Process(victim).wait(5)  # its lock goes with it; the restart comes a pause later
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        await asyncio.sleep(3 * RESTART_PAUSE_S)
        assert server.proc is not None and server.proc.poll() is None, server.stderr()
    assert "data dir" in server.stderr() and "in use by another chatd" in server.stderr()
    deadline = time.monotonic() + 20
    while worker_pids(server).get(0) in (None, victim):
        assert time.monotonic() < deadline, server.stderr()
        await asyncio.sleep(0.1)
    assert await node_ids(server, session, WORKERS) == ids
    api = Api(session, server.url)
    alice, bob = await api.register(), await api.register()
    room = await api.direct(alice, bob)
    ws_url = server.url.replace("http://", "ws://", 1) + "/ws"
    sender, receiver = await connect(session, ws_url, alice), await connect(session, ws_url, bob)
    ack = await sender.send_message(room, "after the restart")
    assert [m["seq"] for m in await receiver.wait_messages(room, 1)] == [ack["seq"]]
    for ws in (sender, receiver):
        await ws.close()
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()


async def test_a_worker_that_stops_answering_is_killed_and_started_again(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    """A hung worker holds its clients and its share of new connections: a process that
    is alive is no proof that it serves. SIGSTOP stands in for a stuck event loop."""
    server.env["CHATD_SERVER__WORKER_TIMEOUT_S"] = str(SILENT_S)
    await server.start(session)
    ids = await node_ids(server, session, WORKERS)
    before = worker_pids(server)
    os.kill(before[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    deadline = stopped_at + SILENT_S + 20
    while worker_pids(server).get(1) in (None, before[1]):
        assert time.monotonic() < deadline, server.stderr()
        await asyncio.sleep(0.05)
    # Its last line may have come a beat (a fifth of the timeout) before the stop.
    assert time.monotonic() - stopped_at >= SILENT_S * 4 / 5
    assert not alive(before[1])
    assert worker_pids(server)[0] == before[0]
    assert "worker stopped answering" in server.stderr()
    assert await node_ids(server, session, WORKERS) == ids
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()


async def stop_on_arrival(server: Chatd, index: int, not_pid: int | None = None) -> int:
    """SIGSTOP worker `index` as soon as it runs (a new one, when `not_pid` is given):
    long before it can be up, as a worker that hangs while it starts."""
    deadline = time.monotonic() + 20
    while (pid := worker_pids(server).get(index)) in (None, not_pid):
        assert time.monotonic() < deadline, server.stderr()
        await asyncio.sleep(0.005)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    return pid


async def test_a_worker_that_hangs_while_it_starts_again_is_killed_and_started_again(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    server.env["CHATD_SERVER__WORKER_TIMEOUT_S"] = str(SILENT_S)
    server.env["CHATD_REDIS__STARTUP_TIMEOUT_S"] = str(STARTUP_S)
    await server.start(session)
    ids = await node_ids(server, session, WORKERS)
    first = worker_pids(server)[1]
    os.kill(first, signal.SIGKILL)
    hung = await stop_on_arrival(server, 1, not_pid=first)
    deadline = time.monotonic() + SILENT_S + STARTUP_S + 20
    while worker_pids(server).get(1) in (None, hung):
        assert time.monotonic() < deadline, server.stderr()
        await asyncio.sleep(0.05)
    assert not alive(hung)
    assert "worker did not start; killed" in server.stderr()
    assert await node_ids(server, session, WORKERS) == ids
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()


async def test_a_server_whose_first_worker_hangs_while_it_starts_exits(server: Chatd) -> None:
    """At startup there is no server yet to keep serving: it stops, and says why."""
    server.env["CHATD_SERVER__WORKER_TIMEOUT_S"] = str(SILENT_S)
    server.env["CHATD_REDIS__STARTUP_TIMEOUT_S"] = str(STARTUP_S)
    server.spawn()
    hung = await stop_on_arrival(server, 0)
    assert await server.wait_exit(SILENT_S + STARTUP_S + 20) == 1, server.stderr()
    assert not alive(hung)
    assert "worker did not start; killed" in server.stderr()
    assert valkey_pids_for(server.data_dir) == set()


async def test_workers_outlive_a_supervisor_that_stood_still(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    """While the supervisor is stopped nobody reads the workers' lines: once it runs
    again their silence is its own, not theirs."""
    server.env["CHATD_SERVER__WORKER_TIMEOUT_S"] = str(SILENT_S)
    await server.start(session)
    await node_ids(server, session, WORKERS)
    before = worker_pids(server)
    server.signal(signal.SIGSTOP)
    await asyncio.sleep(SILENT_S * 2)
    server.signal(signal.SIGCONT)
    await asyncio.sleep(SILENT_S + 1)  # long enough to judge them
    assert worker_pids(server) == before, server.stderr()
    assert "worker stopped answering" not in server.stderr()
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()


async def test_a_server_started_while_the_killed_ones_workers_drain_waits_for_them(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    """A service manager restarts a killed chatd at once, while its workers, told by
    the kernel that their parent died, still drain and hold their data dirs."""
    await server.start(session)
    ids = await node_ids(server, session, WORKERS)
    lingering = worker_pids(server)[0]
    os.kill(lingering, signal.SIGSTOP)  # it drains only once continued
    try:
        server.signal(signal.SIGKILL)
        assert await server.wait_exit(5) == -signal.SIGKILL
        server.spawn()
        await asyncio.sleep(3)  # its first worker would have failed on the data dir by now
        assert server.proc is not None and server.proc.poll() is None, server.stderr()
        os.kill(lingering, signal.SIGCONT)
        psutil.Process(lingering).wait(SHUTDOWN_S + 5)
        await server.ready(session)
        assert await node_ids(server, session, WORKERS) == ids
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(lingering, signal.SIGKILL)
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()


async def test_workers_hold_more_connections_than_one_process_may_open(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    """What workers are for beyond cores: each process caps itself under its own
    open-files limit (capacity.py), and the port holds the sum."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    server.wrapper = [prlimit, f"--nofile={FILES}:{FILES}"]
    server.env["CHATD_SERVER__WORKERS"] = "3"
    server.env["CHATD_LIMITS__MAX_CONNECTIONS_PER_USER"] = "1000"
    await server.start(session)
    await node_ids(server, session, 3)
    api = Api(session, server.url)
    alice, bob = await api.register(), await api.register()
    room = await api.direct(alice, bob)
    ws_url = server.url.replace("http://", "ws://", 1) + "/ws"
    sender = await connect(session, ws_url, alice)
    wanted = FILES + FILES // 2
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as crowd:
        held = [await connect(crowd, ws_url, bob) for _ in range(wanted)]
        nodes = {ws.of_type("welcome")[0]["node_id"] for ws in held}
        assert len(nodes) == 3, nodes
        for pid in worker_pids(server).values():
            assert psutil.Process(pid).num_fds() <= FILES
        ack = await sender.send_message(room, "to every one of them")
        for ws in held:
            assert [m["seq"] for m in await ws.wait_messages(room, 1)] == [ack["seq"]]
        for ws in held:
            await ws.close()
    await sender.close()
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()


async def test_each_worker_answers_on_an_ops_port_of_its_own(
        server: Chatd, session: aiohttp.ClientSession) -> None:
    """Behind the shared port a request reaches any worker; a monitor needs each."""
    base = free_port_run(WORKERS)
    try:
        server.env["CHATD_SERVER__OPS_PORT"] = str(base)
        await server.start(session)
        await node_ids(server, session, WORKERS)  # both listen on the shared port
        ops = [f"http://127.0.0.1:{base + i}" for i in range(WORKERS)]
        for i, url in enumerate(ops):
            node_id = await ready_node_id(session, url)
            assert node_id == (server.data_dir / f"worker-{i}" / "node_id").read_text().strip()
            async with session.get(url + "/api/me") as resp:
                assert resp.status == 404  # nothing but the ops endpoints there
        user = await Api(session, server.url).register()
        ws = await connect(session, server.url.replace("http://", "ws://", 1) + "/ws", user)
        on = next(i for i in range(WORKERS) if
                  (server.data_dir / f"worker-{i}" / "node_id").read_text().strip()
                  == ws.of_type("welcome")[0]["node_id"])
        counts = [await metric(session, url, "chatd_connections") for url in ops]
        assert counts == [1.0 if i == on else 0.0 for i in range(WORKERS)]
        await ws.close()
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(SHUTDOWN_S + 5) == 0, server.stderr()
    finally:
        release_port(*range(base, base + WORKERS))


def test_ops_ports_past_65535_are_refused_with_one_line(tmp_path: Path) -> None:
    res = run_cli([], tmp_path, {"CHATD_SERVER__WORKERS": "2", "CHATD_SERVER__OPS_PORT": "65535"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == ("chatd: server.ops_port: 2 workers take ports 65535 to "
                                  "65536, past 65535")
