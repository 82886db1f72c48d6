"""bench.cluster.valkey_counters and the `forks` of a step: Valkey's own background
processes (AOF rewrites, RDB saves) each take a core for a while, and a step's tail is
read differently when one ran in it."""

from __future__ import annotations

import asyncio

from bench.cluster import ValkeyCounters, valkey_counters
from bench.scenarios import Sample
from tests.harness import ValkeyProcess


async def test_a_rewrite_counts_as_a_fork_and_commands_are_counted(
        valkey: ValkeyProcess) -> None:
    before = await asyncio.to_thread(valkey_counters, valkey.port)
    client = valkey.client()
    try:
        for i in range(3):
            await client.set(f"k{i}", "v")
        await client.bgrewriteaof()
        for _ in range(500):  # the rewrite of a few keys takes milliseconds
            if not (await client.info("persistence"))["aof_rewrite_in_progress"]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the AOF rewrite did not end within 5 s")
    finally:
        await client.aclose()
    after = await asyncio.to_thread(valkey_counters, valkey.port)
    assert after.forks == before.forks + 1
    assert not after.forking
    assert after.calls["set"] - before.calls.get("set", 0) == 3


def sample(forks: int, forking: bool) -> Sample:
    return Sample(t=0.0, server=0.0, redis=0.0, clients=0.0, machine=0.0, wait=0.0, bench=0.0,
                  valkey=ValkeyCounters({}, forks, forking), status={})


def test_a_step_counts_the_forks_started_in_it_and_one_running_at_its_start() -> None:
    assert sample(5, False).forks_since(sample(5, False)) == 0
    assert sample(7, True).forks_since(sample(5, False)) == 2
    assert sample(5, False).forks_since(sample(5, True)) == 1  # ended during the step
