"""The open-loop sender's clock (bench/waketimer.py): on time, never early, no spin."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from bench.waketimer import WakeTimer


@pytest.mark.parametrize("platform", [sys.platform, "other"])
async def test_wakes_at_the_due_time_never_before(platform: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", platform)  # "other": the asyncio.sleep fallback
    timer = WakeTimer()
    try:
        for delay in (0.0003, 0.002, 0.015):
            due = time.time() + delay
            await timer.sleep_until(due)
            late = time.time() - due
            assert 0 <= late < 0.5, (delay, late)  # generous: the machine is shared
        started = time.time()
        await timer.sleep_until(started - 1)  # already past: at once
        assert time.time() - started < 0.5
    finally:
        timer.close()


async def test_waiting_does_not_spin() -> None:
    timer = WakeTimer()
    try:
        cpu, started = time.process_time(), time.time()
        for _ in range(100):  # sub-millisecond waits: uvloop would round them to 0
            await timer.sleep_until(time.time() + 0.0005)
        wall = time.time() - started
        assert time.process_time() - cpu < 0.5 * wall, "the process spun while waiting"
    finally:
        timer.close()


async def test_a_cancelled_wait_leaves_the_timer_usable() -> None:
    timer = WakeTimer()
    try:
        waiting = asyncio.create_task(timer.sleep_until(time.time() + 10))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        due = time.time() + 0.005
        await asyncio.wait_for(timer.sleep_until(due), 2)
        assert time.time() >= due
    finally:
        timer.close()
