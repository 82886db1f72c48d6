"""`durability.replicas` on a Redis Cluster (docs/durability.md): an ack waits for
`WAIT 1` on the master of the room's slot, run on the connection that ran the send
script. With that master's replica up a send is acked; with it paused (SIGSTOP) the
send is stored but answered `unavailable`, and so is every retry of it, also one
refused by the rate limit; once the replica is back, the retry is acked with the
original seq. Masters whose replicas are fine keep acking meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.client import FAST_ENV, Api, connect
from tests.cluster.support import history, room_master, send
from tests.conftest import ValkeyClusterFactory
from tests.harness import ChatdNodes

pytestmark = pytest.mark.cluster

ENV = FAST_ENV | {"CHATD_DURABILITY__REPLICAS": "1", "CHATD_DURABILITY__WAIT_TIMEOUT_MS": "200"}
# Node b: a bucket of one send, refilled every 100 s, so a retry there is rate limited.
TIGHT = {"CHATD_LIMITS__SEND_RATE_PER_S": "0.01", "CHATD_LIMITS__SEND_BURST": "1"}


async def test_wait_for_a_replica_on_a_cluster(make_valkey_cluster: ValkeyClusterFactory,
                                                chatd_nodes: ChatdNodes) -> None:
    cluster = await make_valkey_cluster(masters=3, replicas_per_master=1)
    (a,) = await chatd_nodes.start(1, redis_cluster=cluster, env=ENV)
    (b,) = await chatd_nodes.start(1, redis_cluster=cluster, env=ENV | TIGHT)
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        alice, dora = await api.register(), await api.register()
        # Room ids are random: create rooms until every master serves one (12 rooms
        # miss a master about 2% of the time; 60 almost never).
        master_of: dict[str, int] = {}
        while len(set(master_of.values())) < 3:
            assert len(master_of) < 60, f"60 rooms never reached every master: {master_of}"
            room = await api.group(alice, [dora], name=f"w{len(master_of)}")
            master_of[room] = await room_master(cluster, room)
        rooms = list(master_of)
        alice_a = await connect(http, a.ws_url, alice)
        dora_b = await connect(http, b.ws_url, dora)

        # Every replica up: acked everywhere.
        for room in rooms:
            ack = await send(alice_a, room, f"up-{room[:6]}")
            assert ack["type"] == "ack" and ack["seq"] == 1, ack

        room = rooms[0]
        victim = master_of[room]
        (replica,) = await cluster.replicas_of(victim)
        elsewhere = next(r for r in rooms if master_of[r] != victim)
        pid = cluster.node(replica).pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            reply = await send(alice_a, room, "needs-replica")
            took = time.monotonic() - started
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            assert took < 2.0, f"unavailable after {took:.2f}s"
            for _ in range(2):  # retries, same client_msg_id: stored once, never acked
                reply = await send(alice_a, room, "needs-replica")
                assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            # Other masters' replicas are fine: their rooms still ack.
            ack = await send(alice_a, elsewhere, "other-master")
            assert ack["type"] == "ack", ack

            # dora on b spends her only token on a message that cannot be confirmed,
            # then retries it: refused by the bucket, it is a duplicate of a stored
            # message, and still must not be acked while no replica has it.
            reply = await send(dora_b, room, "dora-1")
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            reply = await send(dora_b, room, "dora-1")
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            reply = await send(dora_b, room, "dora-fresh")  # a new message: rate limited
            assert reply["type"] == "error" and reply["code"] == "rate_limited", reply
        finally:
            os.kill(pid, signal.SIGCONT)

        # Replica back: the retries are acked, with the seq stored the first time.
        deadline = time.monotonic() + 15
        while (reply := await send(alice_a, room, "needs-replica"))["type"] != "ack":
            assert reply["code"] == "unavailable", reply
            assert time.monotonic() < deadline, "never acked after the replica came back"
            await asyncio.sleep(0.1)
        assert reply["seq"] == 2 and reply["duplicate"] is True, reply
        reply = await send(dora_b, room, "dora-1")  # rate limited, answered after WAIT
        assert reply["type"] == "ack" and reply["seq"] == 3 and reply["duplicate"], reply

        log = await history(http, a.url, alice, room)
        assert [(m["seq"], m["client_msg_id"]) for m in log] == [
            (1, f"up-{room[:6]}"), (2, "needs-replica"), (3, "dora-1")]
        for ws in (alice_a, dora_b):
            await ws.close()
