"""Every Lua script touches one hash slot, as chatd actually calls it (DESIGN.md:
"every script touches one slot and runs unchanged on Redis Cluster").

An in-process chatd app runs on a 3-master Valkey Cluster with `Scripts.run`
wrapped to record each call's script name and KEYS. The test drives every code path
that runs a script (accounts, rooms, membership, sends, receipts, typing, presence,
interest, heartbeat, the janitor's lock and dead-node clean-up), then checks that

- every script in lua/ was called at least once (a new script without a path here
  fails the test, so the check stays systematic), and
- every recorded call's KEYS hash to a single slot.

Running on a real cluster is a second check: redis-py's cluster client refuses a
cross-slot script before sending it, which the last test shows.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from chatd import config, keys
from chatd.app import create_app
from chatd.appkeys import NODE
from chatd.metrics import Metrics
from chatd.scripts import Scripts, sources
from tests.client import Ws
from tests.harness import ValkeyCluster
from tests.integration.test_accounts import CHEAP_AUTH, Client, call, new_user

pytestmark = pytest.mark.cluster

_names = itertools.count()


async def ws_of(client: Client, token: str) -> Ws:
    ws = Ws(await client.ws_connect("/ws"))
    ws.start()
    await ws.send({"type": "hello", "token": token})
    await ws.wait_type("welcome")
    return ws


async def test_every_script_call_stays_in_one_slot(
        valkey_cluster: ValkeyCluster, tmp_path: Path, aiohttp_client: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []
    original = Scripts.run

    async def recording(self: Scripts, name: str, keys_: Sequence[str], args: Sequence[Any],
                        **kwargs: Any) -> Any:
        calls.append((name, list(keys_)))
        return await original(self, name, keys_, args, **kwargs)

    monkeypatch.setattr(Scripts, "run", recording)
    flags = {"redis.cluster_nodes": valkey_cluster.startup_nodes.split(","),
             "server.data_dir": str(tmp_path / "node"),
             "fanout.janitor_interval_s": 0.2, "fanout.node_ttl_s": 1.0,
             "fanout.heartbeat_interval_s": 0.2, **CHEAP_AUTH}
    client: Client = await aiohttp_client(create_app(config.load(None, {}, flags)))
    node = client.app[NODE]
    partitions = node.partitions

    alice, bob, carol = [await new_user(client, f"slots{next(_names)}") for _ in range(3)]
    # More group rooms than partitions: at least two share one, so presence is published
    # with several rooms' interest sets in one call.
    groups = []
    for i in range(partitions + 1):
        status, room = await call(client, "POST", "/rooms", {
            "kind": "group", "name": f"g{i}", "members": [bob.user_id]}, token=alice.token)
        assert status == 201, room
        groups.append(room["room_id"])
    status, direct = await call(client, "POST", "/rooms", {
        "kind": "direct", "members": [bob.user_id]}, token=alice.token)
    assert status == 201, direct
    room = groups[0]

    alice_ws = await ws_of(client, alice.token)  # presence open + online, interest add
    bob_ws = await ws_of(client, bob.token)
    ack = await alice_ws.send_message(room, "hello")  # take_token, send_message
    assert ack["type"] == "ack", ack
    await bob_ws.wait_messages(room, 1)
    await bob_ws.send({"type": "delivered", "room_id": room, "seq": 1})  # mark_seen
    await bob_ws.send({"type": "read", "room_id": room, "seq": 1})
    await bob_ws.send({"type": "typing", "room_id": room, "active": True})  # publish_typing
    await alice_ws.wait_type("receipt", room_id=room, read_seq=1)
    await alice_ws.wait_type("typing", room_id=room)
    status, body = await call(client, "POST", f"/rooms/{room}/messages",
                              {"client_msg_id": "http-1", "body": "over http"},
                              token=bob.token)
    assert status == 201, body
    assert (await call(client, "GET", "/rooms", token=alice.token))[0] == 200  # room_view
    assert (await call(client, "POST", f"/rooms/{room}/members", {"user_id": carol.user_id},
                       token=alice.token))[0] == 204  # add_member
    assert (await call(client, "DELETE", f"/rooms/{room}/members/{carol.user_id}",
                       token=alice.token))[0] == 204  # remove_member
    await bob_ws.close()  # presence close + offline, interest remove
    assert (await call(client, "POST", "/logout", token=bob.token))[0] == 204

    # A dead node with interest and a connected user: the janitor (lock, extend_lock,
    # release_lock) cleans it up with interest and presence_conn "drop".
    ghost = f"ghost-{secrets.token_hex(3)}"
    redis = await valkey_cluster.client(decode_responses=True)
    try:
        p = keys.partition_of(direct["room_id"], partitions)
        await redis.sadd(keys.node_rooms(p, ghost), direct["room_id"])
        await redis.sadd(keys.room_nodes(p, direct["room_id"]), ghost)
        await redis.sadd(keys.node_users(ghost), carol.user_id)
        await redis.hset(keys.user_nodes(carol.user_id), ghost, 1)
        await redis.zadd(keys.NODES, {ghost: 1})
        deadline = time.monotonic() + 10
        while await redis.zscore(keys.NODES, ghost) is not None:
            assert time.monotonic() < deadline, "the janitor never cleaned up the dead node"
            await asyncio.sleep(0.1)
        assert not await redis.sismember(keys.room_nodes(p, direct["room_id"]), ghost)
    finally:
        await redis.aclose()
    await alice_ws.close()

    called = {name for name, _ in calls}
    assert called == set(sources()), f"never called: {set(sources()) - called}"
    cross = [(name, k) for name, k in calls if len({key_slot(x.encode()) for x in k}) != 1]
    assert cross == [], cross[:5]
    print(f"\n{len(calls)} script calls of {len(called)} scripts, each in one slot")


async def test_cluster_client_refuses_a_cross_slot_script(
        valkey_cluster: ValkeyCluster) -> None:
    """redis-py refuses before sending; a node refuses too (CROSSSLOT) if asked directly."""
    tags = list((await valkey_cluster.hash_tags_per_master()).items())
    (port_a, tag_a), (_, tag_b) = tags[0], tags[1]
    src = sources()["interest"]
    two_slots = [f"chatd:{tag_a}:room:r:nodes", f"chatd:{tag_b}:node:n:rooms"]
    rc = await valkey_cluster.client(decode_responses=True)
    try:
        with pytest.raises(RedisClusterException, match="same key slot"):
            await rc.eval(src, 2, *two_slots, "n", "r", "add")
        scripts = Scripts(rc, Metrics())
        with pytest.raises(RedisClusterException, match="same key slot"):
            await scripts.run("interest", two_slots, ["n", "r", "add"])
        # The same keys in one slot are fine.
        one_slot = [f"chatd:{tag_a}:room:r:nodes", f"chatd:{tag_a}:node:n:rooms"]
        assert await scripts.run("interest", one_slot, ["n", "r", "add"]) == 1
    finally:
        await rc.aclose()
    # Two slots of the same master: the node itself answers CROSSSLOT.
    slot_a = await valkey_cluster.keyslot(tag_a)
    for i in range(10_000):
        other = f"{{x{i}}}"
        slot = await valkey_cluster.keyslot(other)
        if slot != slot_a and await valkey_cluster.slot_owner(slot) == port_a:
            break
    async with valkey_cluster.node_client(port_a) as direct:
        with pytest.raises(ClusterCrossSlotError, match="same slot"):
            await direct.eval(src, 2, f"chatd:{tag_a}:a", f"chatd:{other}:b", "n", "r", "add")
