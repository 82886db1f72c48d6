"""How many workers `server.workers` means, and what makes each a node of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import pytest

from chatd import cli
from chatd.workers import report_alive, worker_count, worker_flags


def test_zero_workers_is_one_per_cpu_this_process_may_run_on() -> None:
    assert worker_count(0) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def test_each_worker_has_its_own_data_dir_and_node_id() -> None:
    settings = cli.settings_from(cli.parse_args(["--data-dir", "/srv/chat", "--node-id", "eu1"]))
    flags = [worker_flags(settings, i) for i in range(2)]
    assert flags == [
        ["--worker", "0", "--data-dir", "/srv/chat/worker-0", "--node-id", "eu1-0"],
        ["--worker", "1", "--data-dir", "/srv/chat/worker-1", "--node-id", "eu1-1"],
    ]
    # Flags given last win: the worker's own, after the server's.
    args = cli.parse_args(["--data-dir", "/srv/chat", "--node-id", "eu1", *flags[1]])
    assert (args.worker, args.data_dir, args.node_id) == (1, "/srv/chat/worker-1", "eu1-1")


def test_a_generated_node_id_is_left_to_each_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATD_SERVER__NODE_ID", raising=False)
    settings = cli.settings_from(cli.parse_args(["--data-dir", "d"]))
    assert worker_flags(settings, 0) == ["--worker", "0", "--data-dir", str(Path("d/worker-0"))]


async def beat_for(seconds: float) -> None:
    beating = asyncio.create_task(report_alive(0.05))  # a line at once, then every 10 ms
    await asyncio.sleep(seconds)
    beating.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beating


def test_a_worker_reports_alive_to_a_pipe_without_ever_blocking_on_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    with open(write_end, "w") as out, open(read_end, "rb", buffering=0) as pipe:
        monkeypatch.setattr(sys, "stdout", out)
        asyncio.run(beat_for(0.12))
        assert not os.get_blocking(write_end)  # a full pipe must not stop the loop
        lines = pipe.read(4096).splitlines()
    assert len(lines) >= 5 and set(lines) == {b"chatd alive"}


def test_a_worker_leaves_a_terminal_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    controller, terminal = os.openpty()
    try:
        with open(terminal, "w", closefd=False) as out:
            monkeypatch.setattr(sys, "stdout", out)
            asyncio.run(asyncio.wait_for(report_alive(0.05), 1))  # returns at once
        assert os.get_blocking(terminal)
        os.set_blocking(controller, False)
        with pytest.raises(BlockingIOError):
            os.read(controller, 4096)  # nothing was written
    finally:
        os.close(controller)
        os.close(terminal)
