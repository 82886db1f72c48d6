"""Resharding under traffic (docs/scaling.md): the slot of a busy room's partition moves
to another master while two nodes send into the room and members on both nodes read.

The move is done by hand, the way `valkey-cli --cluster reshard` does it, but slowed
down so that sends really meet the migration: CLUSTER SETSLOT IMPORTING on the target,
MIGRATING on the source, MIGRATE of the slot's keys in small batches, SETSLOT NODE
everywhere. Meanwhile the send script gets TRYAGAIN (some of its keys moved, or not
created yet) and ASK; chatd retries those for up to redis.socket_timeout_s, then
answers `unavailable`, and the client retries with the same client_msg_id.

Checked: every acked message is in the room's log at its acked seq, the log has no gap
and no duplicate client_msg_id, every member connection saw every seq once and in
order (resuming after a 4009 if the server chose to close instead of skip), both nodes
are ready again without a restart, and the keys really live on the new master.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from chatd import keys
from tests.client import FAST_ENV, Api
from tests.cluster.support import (
    LOAD_ENV,
    PARTITIONS,
    Member,
    history,
    keep_resuming,
    room_master,
    room_slot,
    send_until_acked,
)
from tests.conftest import ValkeyClusterFactory
from tests.harness import LOOPBACK, ChatdNodes, ValkeyCluster

pytestmark = pytest.mark.cluster

PER_SENDER = 120
BATCH = 5  # keys per MIGRATE: small, so the slot stays in migration for a while


async def node_ids(cluster: ValkeyCluster) -> dict[int, str]:
    return {n.port: n.node_id for n in await cluster.cluster_nodes()}


async def migrate_slot(cluster: ValkeyCluster, slot: int, source: int, target: int,
                       pause_s: float = 0.03) -> tuple[int, float]:
    """Move `slot` from `source` to `target` (ports); returns (keys moved, seconds)."""
    ids = await node_ids(cluster)
    started = time.monotonic()
    moved = 0
    async with cluster.node_client(source, decode_responses=True) as src, \
            cluster.node_client(target, decode_responses=True) as dst:
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        while batch := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, BATCH):
            await src.execute_command("MIGRATE", LOOPBACK, target, "", 0, 5000, "KEYS", *batch)
            moved += len(batch)
            await asyncio.sleep(pause_s)
        # Target first, then source, then everyone (what valkey-cli does).
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        await src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    for port in await cluster.masters():
        if port not in (source, target):
            async with cluster.node_client(port) as other:
                await other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    return moved, time.monotonic() - started


async def test_moving_a_busy_partition_loses_and_reorders_nothing(
        make_valkey_cluster: ValkeyClusterFactory, chatd_nodes: ChatdNodes) -> None:
    cluster = await make_valkey_cluster()
    a, b = await chatd_nodes.start(2, redis_cluster=cluster, env=FAST_ENV | LOAD_ENV)
    async with aiohttp.ClientSession() as http:
        (s1, s2, *readers), room = await Api(http, a.url).group_of(5, name="moving")
        slot = await room_slot(cluster, room)
        source = await room_master(cluster, room)
        target = next(p for p in await cluster.masters() if p != source)

        senders = [Member(http, a.ws_url, s1, [room]), Member(http, b.ws_url, s2, [room])]
        members = [Member(http, (a, b)[i % 2].ws_url, u, [room]) for i, u in enumerate(readers)]
        for m in (*senders, *members):
            await m.open()
        # History before the move, so the slot has plenty of keys (one idempotency key
        # per message, the log, the room, both nodes' inboxes, ...).
        for k in range(40):
            await send_until_acked(senders[k % 2], room, f"pre-{k:03d}")

        acks: dict[str, int] = {}
        stats: dict[str, int] = {}

        async def stream(i: int) -> None:
            for k in range(PER_SENDER):
                cmid = f"s{i}-{k:03d}"
                ack = await send_until_acked(senders[i], room, cmid, stats=stats)
                assert ack is not None
                acks[cmid] = ack["seq"]
                await asyncio.sleep(0.005)

        async def move() -> tuple[int, float]:
            await asyncio.sleep(0.3)
            return await migrate_slot(cluster, slot, source, target)

        watcher = asyncio.create_task(keep_resuming(members))
        try:
            _, _, (moved, took) = await asyncio.gather(stream(0), stream(1), move())
            assert await room_master(cluster, room) == target
            assert moved > 40, moved
            # A few more after the move: chatd follows the new owner.
            for k in range(5):
                cmid = f"after-{k}"
                ack = await send_until_acked(senders[k % 2], room, cmid)
                assert ack is not None
                acks[cmid] = ack["seq"]
            total = 40 + 2 * PER_SENDER + 5
            deadline = time.monotonic() + 20
            while not all(len(set(m.seqs(room))) >= total for m in members):
                assert not watcher.done(), watcher.result()
                assert time.monotonic() < deadline, [len(m.seqs(room)) for m in members]
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert not watcher.done(), watcher.result()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

        log = await history(http, b.url, readers[0], room)
        assert [m["seq"] for m in log] == list(range(1, total + 1))
        by_cmid: dict[str, Any] = {m["client_msg_id"]: m for m in log}
        assert len(by_cmid) == total  # no client_msg_id stored twice
        for cmid, seq in acks.items():
            assert by_cmid[cmid]["seq"] == seq, (cmid, seq)
        for i in range(2):  # each sender's messages in the order it sent them
            mine = [m["client_msg_id"] for m in log if m["client_msg_id"].startswith(f"s{i}-")]
            assert mine == [f"s{i}-{k:03d}" for k in range(PER_SENDER)]
        for m in (*members, *senders):
            assert m.seqs(room) == list(range(1, total + 1)), (m.user.username, m.resumes)

        # The partition's keys now live on the target master; both nodes are ready.
        p = keys.partition_of(room, PARTITIONS)
        async with cluster.node_client(target) as new_owner:
            assert await new_owner.exists(keys.room_log(p, room), keys.inbox(p, a.node_id),
                                          keys.inbox(p, b.node_id)) == 3
        for node in (a, b):
            await node.wait_ready(timeout=10)
        # The sends really met the migration: the masters answered TRYAGAIN or ASK.
        redirects = {}
        for port in (source, target):
            stats_ = await cluster.info(port, "errorstats")
            for code in ("TRYAGAIN", "ASK"):
                redirects[code] = redirects.get(code, 0) + int(
                    stats_.get(f"errorstat_{code}", {}).get("count", 0))
        assert redirects["TRYAGAIN"] + redirects["ASK"] > 0, redirects
        print(f"\nresharding: moved {moved} keys of slot {slot} in {took:.2f}s while "
              f"{2 * PER_SENDER} messages were sent; redirects {redirects}, "
              f"unavailable answers {stats}, "
              f"4009 resumes {[m.resumes for m in (*senders, *members)]}")
        for m in (*senders, *members):
            await m.close()
