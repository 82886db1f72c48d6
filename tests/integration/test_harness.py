"""Self-tests of the test harness (tests/harness.py + tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import fakeredis
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.conftest import ValkeyClusterFactory
from tests.harness import (
    CLUSTER_BUS_OFFSET,
    ChatdNodes,
    ValkeyBinaries,
    ValkeyCluster,
    ValkeyProcess,
    assert_clean_logs,
    find_log_problems,
    free_cluster_port,
    free_port,
    release_cluster_port,
    release_port,
    require_chatd,
)

# ------------------------------------------------------------------------- helpers


def test_valkey_binaries(valkey_binaries: ValkeyBinaries) -> None:
    if "CHATD_TEST_SERVER" not in os.environ:
        assert valkey_binaries.server.name == "valkey-server"
        assert valkey_binaries.cli.name == "valkey-cli"
    assert os.access(valkey_binaries.server, os.X_OK)
    assert os.access(valkey_binaries.cli, os.X_OK)


def test_free_ports_are_unique_and_bindable() -> None:
    ports = [free_port() for _ in range(20)]
    cluster_ports = [free_cluster_port() for _ in range(6)]
    try:
        everything = ports + cluster_ports + [p + CLUSTER_BUS_OFFSET for p in cluster_ports]
        assert len(set(everything)) == len(everything)
        for p in cluster_ports:
            assert p + CLUSTER_BUS_OFFSET <= 65535
        for p in everything:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
    finally:
        release_port(*ports)
        for p in cluster_ports:
            release_cluster_port(p)


def test_find_log_problems() -> None:
    text = textwrap.dedent(
        """\
        {"level": "info", "msg": "started"}
        {"level": "error", "msg": "unhandled exception in handler"}
        {"level": "error", "msg": "redis down, retrying"}
        Traceback (most recent call last):
          File "x.py", line 1, in <module>
            boom()
        ValueError: boom
        {"level": "info", "msg": "after"}
        """
    )
    problems = find_log_problems(text)
    assert len(problems) == 2
    assert "unhandled exception" in problems[0]
    assert problems[1].startswith("Traceback")
    assert problems[1].endswith("ValueError: boom")
    assert find_log_problems('{"level": "info", "msg": "unhandled but info"}\nplain') == []


# -------------------------------------------------------------------------- valkey


async def test_valkey_ping_stop_start_keeps_data(valkey: ValkeyProcess) -> None:
    assert valkey.url == f"redis://127.0.0.1:{valkey.port}/0"
    assert valkey.pid is not None
    assert valkey.dir.is_dir()
    r = valkey.client()
    try:
        assert await r.ping()
        await r.set("k", "v")
    finally:
        await r.aclose()

    first_pid = valkey.pid
    assert await valkey.stop() == 0
    assert not valkey.running
    r = valkey.client(socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await r.ping()
    finally:
        await r.aclose()

    await valkey.start()
    assert valkey.pid != first_pid
    r = aioredis.Redis.from_url(valkey.url)
    try:
        assert await r.get("k") == b"v"  # appendonly yes: survives the restart
    finally:
        await r.aclose()


async def test_valkey_kill(valkey: ValkeyProcess) -> None:
    proc = valkey.proc
    valkey.kill()
    assert proc is not None
    assert proc.returncode == -9
    await valkey.start()
    r = valkey.client()
    try:
        assert await r.ping()
    finally:
        await r.aclose()


# ------------------------------------------------------------------------- cluster


async def test_valkey_cluster(valkey_cluster: ValkeyCluster) -> None:
    cluster = valkey_cluster
    print(f"cluster startup took {cluster.startup_seconds:.2f}s")
    assert len(cluster.nodes) == 3
    assert cluster.startup_nodes == ",".join(f"127.0.0.1:{p}" for _, p in cluster.nodes)
    for _, port in cluster.nodes:
        info = await cluster.cluster_info(port)
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == "16384"
        assert info["cluster_size"] == "3"

    # Ground truth for slot ownership, straight from CLUSTER SHARDS on one node.
    ranges: list[tuple[int, int, int]] = []  # (first slot, last slot, master port)
    async with cluster.node_client(cluster.nodes[0][1], decode_responses=True) as node:
        shards = await node.execute_command("CLUSTER", "SHARDS")  # type: ignore[no-untyped-call]
        keyslots = {
            tag: int(await node.execute_command("CLUSTER", "KEYSLOT", tag))  # type: ignore[no-untyped-call]
            for tag in ("{a}", "{b}", "{c}")
        }
    for shard in shards:  # redis-py parses each shard into {"slots": [...], "nodes": [...]}
        slots = shard["slots"]
        (master,) = [n for n in shard["nodes"] if n["role"] == "master"]
        for lo, hi in zip(slots[::2], slots[1::2], strict=True):
            ranges.append((int(lo), int(hi), int(master["port"])))
    assert sorted((lo, hi) for lo, hi, _ in ranges) == [(0, 5460), (5461, 10922), (10923, 16383)]

    def owner(slot: int) -> int:
        (port,) = [p for lo, hi, p in ranges if lo <= slot <= hi]
        return port

    owners = {tag: owner(slot) for tag, slot in keyslots.items()}
    assert len(set(owners.values())) == 3, (keyslots, ranges)
    for tag, slot in keyslots.items():
        assert await cluster.slot_owner(slot) == owners[tag]  # harness agrees

    rc = await cluster.client()
    try:
        for tag in keyslots:
            await rc.set(f"{tag}:key", tag)
        for tag in keyslots:
            assert await rc.get(f"{tag}:key") == tag.encode()
    finally:
        await rc.aclose()

    # Each key really lives on the master the slot maps to.
    for tag, port in owners.items():
        async with cluster.node_client(port) as direct:
            assert await direct.get(f"{tag}:key") == tag.encode()

    per_master = await cluster.hash_tags_per_master()
    assert sorted(per_master) == sorted(await cluster.masters())


async def test_valkey_cluster_failover(make_valkey_cluster: ValkeyClusterFactory) -> None:
    t0 = time.monotonic()
    cluster = await make_valkey_cluster(masters=3, replicas_per_master=1)
    print(f"3+3 cluster startup took {time.monotonic() - t0:.2f}s")
    assert len(cluster.nodes) == 6
    masters = await cluster.masters()
    assert len(masters) == 3
    for port in cluster.ports:
        assert (await cluster.cluster_info(port))["cluster_state"] == "ok"

    victim = masters[0]
    (replica,) = await cluster.replicas_of(victim)
    tag = (await cluster.hash_tags_per_master())[victim]
    rc = await cluster.client()
    try:
        await rc.set(f"{tag}:before", "1")
        await rc.wait(1, 2000)  # make sure the replica has it
    finally:
        await rc.aclose()

    cluster.kill(victim)
    waited = await cluster.wait_ok(timeout=20)
    print(f"failover took {waited:.2f}s")
    assert await cluster.role(replica) == "master"
    assert replica in await cluster.masters()
    assert victim not in await cluster.masters()
    for port in cluster.running_ports():
        assert (await cluster.cluster_info(port))["cluster_state"] == "ok"

    rc = await cluster.client()
    try:
        assert await rc.get(f"{tag}:before") == b"1"
        await rc.set(f"{tag}:after", "2")
        assert await rc.get(f"{tag}:after") == b"2"
    finally:
        await rc.aclose()

    # The old master comes back as a replica of the promoted one.
    await cluster.start_node(victim)
    await cluster.wait_ok(timeout=20)
    assert await cluster.role(victim) == "slave"


# ---------------------------------------------------------------------- fakeredis


async def test_fake_redis_lua(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCRBY', KEYS[2], ARGV[2])"
    assert await fake_redis.eval(script, 2, "k", "n", "v", 5) == 5
    assert await fake_redis.eval(script, 2, "k", "n", "w", 5) == 10
    assert await fake_redis.get("k") == b"w"


async def test_fake_redis_is_fresh_per_test(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    assert await fake_redis.get("k") is None
    assert await fake_redis.dbsize() == 0


# -------------------------------------------------------------------------- chatd

# A stand-in chatd: accepts the same CLI flags, serves /healthz + /readyz, exits 0 on
# SIGTERM. Lets the chatd_nodes machinery be tested before the real server exists.
FAKE_CHATD = """
import argparse, json, os, sys
from aiohttp import web

p = argparse.ArgumentParser()
for flag in ("--host", "--port", "--node-id", "--data-dir", "--redis-url",
             "--redis-cluster", "--config"):
    p.add_argument(flag)
a = p.parse_args()
mode = os.environ.get("FAKE_MODE", "")
print(json.dumps({"level": "info", "msg": "starting", "node": a.node_id,
                  "redis": a.redis_url or a.redis_cluster, "config": a.config}),
      file=sys.stderr)
if mode == "crash":
    raise RuntimeError("boom at startup")
if mode == "unhandled":
    print(json.dumps({"level": "error", "msg": "unhandled exception in ws handler"}),
          file=sys.stderr)
app = web.Application()
ok = lambda request: web.json_response({"node": a.node_id})
app.router.add_get("/healthz", ok)
if mode != "never-ready":
    app.router.add_get("/readyz", ok)
web.run_app(app, host=a.host, port=int(a.port), print=None)
"""


@pytest.fixture
def fake_chatd(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_chatd.py"
    script.write_text(FAKE_CHATD)
    return [sys.executable, str(script)]


async def test_chatd_nodes_with_stand_in(
    chatd_nodes: ChatdNodes, fake_chatd: list[str], valkey: ValkeyProcess
) -> None:
    nodes = await chatd_nodes.start(
        2, redis_url=valkey, config_text="[server]\n", command=fake_chatd
    )
    assert len(nodes) == 2
    assert nodes[0].port != nodes[1].port
    assert nodes[0].node_id.startswith("n0-")
    assert nodes[1].node_id.startswith("n1-")
    assert nodes[0].ws_url == f"ws://127.0.0.1:{nodes[0].port}/ws"
    async with aiohttp.ClientSession() as session:
        for node in nodes:
            async with session.get(node.url + "/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["node"] == node.node_id
    assert valkey.url in nodes[0].log_text()
    assert "config.toml" in nodes[0].log_text()

    old = (nodes[0].pid, nodes[0].port, nodes[0].node_id, nodes[0].data_dir)
    await nodes[0].restart()
    assert nodes[0].pid != old[0]
    assert (nodes[0].port, nodes[0].node_id, nodes[0].data_dir) == old[1:]
    assert nodes[0].log_text().count("=== harness: start #") == 2

    nodes[1].terminate()
    assert await nodes[1].wait_exit(10) == 0
    nodes[0].kill()
    assert await nodes[0].wait_exit(1) == -9
    assert_clean_logs(*nodes)


async def test_chatd_nodes_default_valkey_and_cluster_flag(
    chatd_nodes: ChatdNodes, fake_chatd: list[str]
) -> None:
    (node,) = await chatd_nodes.start(1, command=fake_chatd)
    assert chatd_nodes.valkey is not None
    assert chatd_nodes.valkey.url in node.log_text()
    startup = "127.0.0.1:7000,127.0.0.1:7001"
    (node,) = await chatd_nodes.start(1, redis_cluster=startup, command=fake_chatd)
    assert f"--redis-cluster', '{startup}'" in node.log_text()
    assert "--redis-url" not in node.log_text()


async def test_chatd_nodes_failures(chatd_nodes: ChatdNodes, fake_chatd: list[str]) -> None:
    with pytest.raises(pytest.fail.Exception, match="boom at startup"):
        await chatd_nodes.start(
            1, redis_url="redis://127.0.0.1:1/0", command=fake_chatd, env={"FAKE_MODE": "crash"}
        )
    with pytest.raises(pytest.fail.Exception, match="not ready"):
        await chatd_nodes.start(
            1,
            redis_url="redis://127.0.0.1:1/0",
            command=fake_chatd,
            env={"FAKE_MODE": "never-ready"},
            ready_timeout=1.5,
        )
    (node,) = await chatd_nodes.start(
        1, redis_url="redis://127.0.0.1:1/0", command=fake_chatd, env={"FAKE_MODE": "unhandled"}
    )
    with pytest.raises(AssertionError, match="unhandled exception in ws handler"):
        assert_clean_logs(node)
    crashed = chatd_nodes[0]
    with pytest.raises(AssertionError, match="RuntimeError: boom at startup"):
        assert_clean_logs(crashed)
    chatd_nodes.report_log_problems = False  # provoked on purpose; keep the summary clean


async def test_chatd_nodes_real_server(chatd_nodes: ChatdNodes, valkey: ValkeyProcess) -> None:
    require_chatd()
    (node,) = await chatd_nodes.start(1, redis_url=valkey.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(node.url + "/readyz") as resp:
            assert resp.status == 200
    node.terminate()
    assert await node.wait_exit(10) == 0
    assert_clean_logs(node)
