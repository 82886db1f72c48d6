"""The pipelined hot-path client (chatd/multiplex.py) against a real Valkey."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatd.multiplex import Multiplexed, entries
from tests.harness import ValkeyProcess


def _client(valkey: ValkeyProcess, *, decode: bool = True, timeout_s: float = 2.0,
            retries: int = 0) -> Multiplexed:
    return Multiplexed(valkey.url, decode=decode, connect_timeout_s=2.0, timeout_s=timeout_s,
                       retries=retries)


async def test_concurrent_callers_get_their_own_replies_in_order(
        valkey: ValkeyProcess) -> None:
    mux = _client(valkey)
    try:
        replies = await asyncio.gather(*(mux.execute("INCRBY", f"k{i % 7}", i)
                                         for i in range(500)))
        totals: dict[int, int] = {}
        for i, reply in enumerate(replies):
            totals[i % 7] = totals.get(i % 7, 0) + i
            assert reply == totals[i % 7]  # each caller saw its own INCRBY's result
        assert await mux.pipeline([("SET", "a", "1"), ("GET", "a"), ("GET", "missing")]) == \
            ["OK", "1", None]
    finally:
        await mux.close()


async def test_error_replies_raise_and_leave_the_connection_usable(
        valkey: ValkeyProcess) -> None:
    mux = _client(valkey)
    try:
        await mux.execute("SET", "s", "text")
        with pytest.raises(ResponseError, match="not an integer"):
            await mux.pipeline([("INCR", "s"), ("SET", "t", "1")])
        assert await mux.execute("GET", "t") == "1"  # the rest of the pipeline ran
        with pytest.raises(ResponseError, match="NOSCRIPT"):
            await mux.execute("EVALSHA", "0" * 40, 0)
    finally:
        await mux.close()


async def test_raw_stream_entries_keep_bytes(valkey: ValkeyProcess) -> None:
    mux = _client(valkey, decode=False)
    try:
        await mux.execute("XADD", "log", "1-0", "m", b"\xff{}", "u", "x")
        got = entries(await mux.execute("XRANGE", "log", "-", "+"))
        assert got == [(b"1-0", {b"m": b"\xff{}", b"u": b"x"})]
    finally:
        await mux.close()


async def test_a_killed_connection_fails_what_is_in_flight_then_reconnects(
        valkey: ValkeyProcess) -> None:
    mux = _client(valkey)
    admin = _client(valkey)
    try:
        await mux.execute("CLIENT", "SETNAME", "victim")
        blocked = asyncio.ensure_future(mux.execute("BLPOP", "never", 5, extra_s=5))
        await asyncio.sleep(0.2)
        await admin.execute("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")
        with pytest.raises(RedisConnectionError):
            await blocked
        assert await mux.execute("PING") == "PONG"  # connected again on demand
    finally:
        await mux.close()
        await admin.close()


async def test_a_silent_server_times_out_every_command_in_flight(
        valkey: ValkeyProcess) -> None:
    mux = _client(valkey, timeout_s=0.3, retries=1)
    try:
        await mux.execute("PING")
        assert valkey.pid is not None
        os.kill(valkey.pid, signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            results = await asyncio.gather(*(mux.execute("PING") for _ in range(20)),
                                           return_exceptions=True)
            elapsed = asyncio.get_running_loop().time() - started
        finally:
            os.kill(valkey.pid, signal.SIGCONT)
        assert all(isinstance(r, RedisTimeoutError | RedisConnectionError) for r in results)
        assert elapsed < 5.0  # bounded by the timeout and one retry, not hanging
        assert await mux.execute("PING") == "PONG"
    finally:
        await mux.close()


async def test_queued_blocking_commands_each_get_their_own_block_time(
        valkey: ValkeyProcess) -> None:
    """`submit` with `step_s`: Redis runs queued blocking commands one after another,
    so the k-th may answer k block times late (the inbox read-ahead relies on it).
    Four BLPOPs of 0.3 s answer at about 0.3, 0.6, 0.9 and 1.2 s; the client's own
    timeout is 0.5 s, so every margin below is 0.3 s or more."""
    mux = _client(valkey, timeout_s=0.5)
    admin = _client(valkey)
    block = [("BLPOP", "queue", 0.3)] * 4
    try:
        futures = await mux.submit(block, extra_s=0.3, step_s=0.3)  # due 0.8 ... 1.7 s
        assert await asyncio.gather(*futures) == [None] * 4  # each timed out in Redis

        futures = await mux.submit(block, extra_s=0.3, step_s=0.3)
        await admin.execute("RPUSH", "queue", "a", "b")
        assert await asyncio.gather(*futures) == [["queue", "a"], ["queue", "b"], None, None]

        # Without the step all four are due at 0.8 s: the last, answered at about
        # 1.2 s, is late, and the client drops the connection with what is in flight.
        futures = await mux.submit(block, extra_s=0.3)
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[0] is None and isinstance(results[-1], RedisTimeoutError), results
        assert await mux.execute("PING") == "PONG"
    finally:
        await mux.close()
        await admin.close()
