"""The message pipeline on a 3-master Valkey Cluster, chatd nodes spread over it."""

from __future__ import annotations

import aiohttp
import pytest

from chatd import keys
from tests.client import FAST_ENV, Api, connect
from tests.conftest import ValkeyClusterFactory
from tests.harness import ChatdNodes

pytestmark = pytest.mark.cluster


async def test_partitions_spread_over_every_master(
        make_valkey_cluster: ValkeyClusterFactory) -> None:
    cluster = await make_valkey_cluster()
    owners = {await cluster.slot_owner(await cluster.keyslot(keys.room(p, "r")))
              for p in range(16)}
    assert len(owners) == 3


async def test_messages_receipts_and_resume_on_a_cluster(
        make_valkey_cluster: ValkeyClusterFactory, chatd_nodes: ChatdNodes) -> None:
    cluster = await make_valkey_cluster()
    a, b = await chatd_nodes.start(2, redis_cluster=cluster, env=FAST_ENV)
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        alice, bob, carol = [await api.register() for _ in range(3)]
        # Enough rooms that they land in partitions owned by every master.
        rooms = [await api.group(alice, [bob, carol], name=f"r{i}") for i in range(12)]
        owners = {await cluster.slot_owner(await cluster.keyslot(
            keys.room(keys.partition_of(r, 16), r))) for r in rooms}
        sender = await connect(http, a.ws_url, alice)
        reader = await connect(http, b.ws_url, bob)
        for room in rooms:
            for i in range(3):
                ack = await sender.send_message(room, f"{room}:{i}")
                assert ack["type"] == "ack", ack
        for room in rooms:
            got = await reader.wait_messages(room, 3)
            assert [(m["seq"], m["body"]) for m in got] == [(i + 1, f"{room}:{i}")
                                                           for i in range(3)]
        await reader.send({"type": "read", "room_id": rooms[0], "seq": 3})
        receipt = await sender.wait_type("receipt", room_id=rooms[0], user_id=bob.user_id)
        assert receipt["read_seq"] == 3

        # Carol was offline: she resumes every room from 1 on the other node.
        late = await connect(http, a.ws_url, carol, resume={r: 1 for r in rooms})
        for room in rooms:
            got = await late.wait_messages(room, 2)
            assert [m["seq"] for m in got] == [2, 3]
        for ws in (sender, reader, late):
            await ws.close()
    assert len(owners) >= 2  # the rooms really crossed masters
