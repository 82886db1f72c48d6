"""CPU per Redis call: redis-py's asyncio client against chatd's pipelined client.

    python -m bench.redis_client [--calls 5000]

Starts a private Valkey, then times one EVALSHA (a one-line INCR script) per
call, one caller at a time and 10 concurrent callers, through:

- redis-py `Redis` on a `BlockingConnectionPool` (what chatd uses for
  everything but the hot path, and used for the hot path before),
- redis-py `Redis` on the default `ConnectionPool`,
- `chatd.multiplex.Multiplexed` (the hot path on a standalone server).

Prints CPU microseconds of this process per call (getrusage, so time spent
waiting for Valkey is not counted) and the ratio to the pipelined client.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from bench.cluster import Stack
from bench.loadgen import run
from chatd.multiplex import Multiplexed

_SCRIPT = "return redis.call('INCR', KEYS[1])"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _cpu_us_per_call(call: Callable[[], Awaitable[object]], calls: int,
                           callers: int) -> float:
    async def caller(n: int) -> None:
        for _ in range(n):
            await call()

    await caller(200)  # warm up: connections, caches
    start = _cpu_s()
    await asyncio.gather(*(caller(calls // callers) for _ in range(callers)))
    return 1e6 * (_cpu_s() - start) / calls


async def _measure(url: str, calls: int) -> list[tuple[str, int, float]]:
    blocking = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(url))
    default = aioredis.Redis.from_url(url)
    mux = Multiplexed(url, decode=True, connect_timeout_s=2.0, timeout_s=2.0)
    sha = await default.script_load(_SCRIPT)
    clients: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("redis-py, BlockingConnectionPool", lambda: blocking.evalsha(sha, 1, "k")),
        ("redis-py, ConnectionPool", lambda: default.evalsha(sha, 1, "k")),
        ("chatd.multiplex (pipelined)", lambda: mux.execute("EVALSHA", sha, 1, "k")),
    ]
    rows = []
    try:
        for callers in (1, 10):
            for name, call in clients:
                rows.append((name, callers, await _cpu_us_per_call(call, calls, callers)))
    finally:
        await blocking.aclose()
        await default.aclose()
        await mux.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000, help="calls per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatd-bench-redis-") as tmp, Stack(Path(tmp)) as stack:
        stack.start_valkey()
        rows = run(_measure(stack.redis_url, args.calls))
    print(f"CPU of this process per EVALSHA call ({args.calls} calls each)")
    print(f"{'client':<34} {'callers':>7} {'cpu us/call':>12} {'vs pipelined':>13}")
    for name, callers, us in rows:
        base = next(u for n, c, u in rows if c == callers and n.startswith("chatd"))
        print(f"{name:<34} {callers:>7} {us:>12.1f} {us / base:>12.2f}x")


if __name__ == "__main__":
    main()
