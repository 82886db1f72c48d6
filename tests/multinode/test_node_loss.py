"""Losing a node (SIGKILL) while its clients are connected (PROTOCOL.md s3 presence,
Guarantee 3; DESIGN.md: dead nodes are detected by heartbeat and cleaned up by the
janitor).

Its users go offline for the others within a bounded time, its interest in rooms and
its inboxes disappear from Valkey, and a client that resumes on another node gets
every acked message exactly once and in order, its own included.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp

from chatd import keys
from tests.client import FAST_ENV, Api, Ws, connect, connect_all
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes

PARTITIONS = 16  # config.toml default, recorded in chatd:meta (checked below)
ENV = FAST_ENV | {
    "CHATD_FANOUT__NODE_TTL_S": "2",
    "CHATD_FANOUT__JANITOR_INTERVAL_S": "0.5",
    "CHATD_FANOUT__HEARTBEAT_INTERVAL_S": "0.5",
    "CHATD_LIMITS__SEND_RATE_PER_S": "100000",
    "CHATD_LIMITS__SEND_BURST": "100000",
    "CHATD_LIMITS__FRAME_RATE_PER_S": "100000",
    "CHATD_LIMITS__FRAME_BURST": "100000",
}


def acked(ws: Ws, prefix: str) -> dict[str, int]:
    """client_msg_id -> seq of every ack this connection got for ids starting with prefix."""
    return {f["client_msg_id"]: f["seq"] for f in ws.of_type("ack")
            if f["client_msg_id"].startswith(prefix)}


async def pump(ws: Ws, room: str, prefix: str, count: int, pause_s: float) -> None:
    for k in range(count):
        cmid = f"{prefix}{k:04d}"
        try:
            await ws.send({"type": "send", "id": cmid, "room_id": room, "client_msg_id": cmid,
                           "body": cmid})
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return  # the node died under us
        if ws.closed_code is not None:
            return
        await asyncio.sleep(pause_s)


async def test_killed_node_is_cleaned_up_and_its_clients_resume_elsewhere(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    a, b, victim = await chatd_nodes.start(3, **redis_backend.chatd_args, env=ENV)
    redis = await redis_backend.client(decode_responses=True)
    try:
        assert int(await redis.hget(keys.META, "partitions")) == PARTITIONS
        async with aiohttp.ClientSession() as http:
            await _scenario(http, redis, a, b, victim)
    finally:
        await redis.aclose()


async def _scenario(http: aiohttp.ClientSession, redis: Any, a: Any, b: Any,
                    victim: Any) -> None:
    api = Api(http, a.url)
    (alice, bob, carol, dave, erin), room = await api.group_of(5, name="survivors")
    p = keys.partition_of(room, PARTITIONS)

    alice_a = await connect(http, a.ws_url, alice)
    bob_b = await connect(http, b.ws_url, bob)
    carol_v = await connect(http, victim.ws_url, carol)   # only on the victim
    dave_v = await connect(http, victim.ws_url, dave)     # only on the victim
    erin_v = await connect(http, victim.ws_url, erin)     # on the victim ...
    erin_b = await connect(http, b.ws_url, erin)          # ... and on a survivor
    for user in (carol, dave, erin):
        await alice_a.wait_type("presence", user_id=user.user_id, online=True)

    # The victim's footprint exists before the kill, so its absence later means something.
    assert victim.node_id in await redis.smembers(keys.room_nodes(p, room))
    assert await redis.exists(keys.inbox(keys.inbox_partition(p, cluster=False),
                                        victim.node_id))
    assert await redis.zscore(keys.NODES, victim.node_id) is not None
    assert victim.node_id in await redis.hkeys(keys.user_nodes(carol.user_id))

    # Traffic from both sides, then SIGKILL the victim in the middle of it.
    senders = [
        asyncio.create_task(pump(alice_a, room, "a-", 150, 0.01)),
        asyncio.create_task(pump(carol_v, room, "c-", 150, 0.01)),
    ]
    await asyncio.sleep(0.6)
    victim.kill()
    killed_at = time.monotonic()
    await asyncio.gather(*senders)
    await carol_v.wait_closed()
    assert carol_v.closed_code is not None
    # What carol got before her node died (all of it read: the socket is closed now).
    carol_seen = [m["seq"] for m in carol_v.messages(room)]
    await alice_a.wait_for(lambda f: len(acked(alice_a, "a-")) == 150)

    # Presence: the users that were only on the victim go offline for everyone else.
    offline_after = {}
    for user in (carol, dave):
        for ws in (alice_a, bob_b, erin_b):
            frame = await ws.wait_type("presence", user_id=user.user_id, online=False,
                                       timeout=10 - (time.monotonic() - killed_at))
            assert frame["last_seen"] > 0
        offline_after[user.username] = time.monotonic() - killed_at
    assert max(offline_after.values()) < 10
    # erin still has a connection on a survivor: she never went offline.
    assert not [f for f in alice_a.of_type("presence")
                if f["user_id"] == erin.user_id and f["online"] is False]

    # Valkey: the victim's interest, inboxes, control inbox and registrations are gone.
    deadline = time.monotonic() + 5
    while await redis.zscore(keys.NODES, victim.node_id) is not None:
        assert time.monotonic() < deadline, "the dead node is still registered"
        await asyncio.sleep(0.1)
    assert victim.node_id not in await redis.smembers(keys.room_nodes(p, room))
    assert {a.node_id, b.node_id} <= set(await redis.smembers(keys.room_nodes(p, room)))
    for q in range(PARTITIONS):
        assert not await redis.exists(keys.inbox(q, victim.node_id), keys.node_rooms(
            q, victim.node_id)), f"partition {q}"
    assert not await redis.exists(keys.control(victim.node_id), keys.node_users(victim.node_id))
    for user in (alice, bob, carol, dave, erin):
        assert victim.node_id not in await redis.hkeys(keys.user_nodes(user.user_id))
    leftovers = [k async for k in redis.scan_iter(match=f"*{victim.node_id}*")]
    assert leftovers == [], leftovers
    print(f"\nnode loss: offline presence after {offline_after}, "
          f"cleanup done {time.monotonic() - killed_at:.2f}s after the kill")

    # carol resumes on a survivor: every message once, in order, her own acked ones too.
    carol_acked = acked(carol_v, "c-")
    alice_acked = acked(alice_a, "a-")
    assert alice_acked and carol_acked
    last = carol_seen[-1] if carol_seen else 0
    assert carol_seen == list(range(1, last + 1))
    carol_b = await connect(http, b.ws_url, carol, resume={room: last})
    # Unacked sends are retried with the same client_msg_id: stored at most once.
    retried = 0
    for k in range(150):
        cmid = f"c-{k:04d}"
        if cmid not in carol_acked:
            reply = await carol_b.send_message(room, cmid, client_msg_id=cmid)
            assert reply["type"] == "ack", reply
            carol_acked[cmid] = reply["seq"]
            retried += 1
    status, body = await api.call("GET", "/api/v1/rooms", user=alice)
    assert status == 200
    last_seq = next(r["last_seq"] for r in body["rooms"] if r["room_id"] == room)
    all_acked = set(carol_acked.values()) | set(alice_acked.values())
    assert last_seq == len(all_acked) == 300, (last_seq, len(all_acked))
    got = await carol_b.wait_messages(room, last_seq - last)
    await asyncio.sleep(0.3)
    got = carol_b.messages(room)
    assert [m["seq"] for m in got] == list(range(last + 1, last_seq + 1))
    # Each client_msg_id of both senders appears exactly once, in the order it was sent.
    everything = carol_v.messages(room) + got
    for prefix in ("a-", "c-"):
        ids = [m["client_msg_id"] for m in everything if m["client_msg_id"].startswith(prefix)]
        assert ids == [f"{prefix}{k:04d}" for k in range(150)], prefix
    # The survivors' connections saw the same single order throughout.
    for ws in (alice_a, bob_b, erin_b):
        seen = await ws.wait_messages(room, last_seq)
        assert [m["seq"] for m in seen] == list(range(1, last_seq + 1))
    print(f"node loss: carol had {last} messages at the kill, {len(carol_acked) - retried} "
          f"of her sends acked before it, {retried} retried after resume")
    for ws in (alice_a, bob_b, erin_b, carol_b):
        await ws.close()
    for ws in (dave_v, erin_v):
        assert ws.closed_code is not None


async def test_node_presumed_dead_comes_back_and_loses_nothing(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    """SIGSTOP a node past node_ttl_s: the janitor cleans it up as dead. After SIGCONT it
    must notice (heartbeat fencing), tell its clients to resume (4009) or keep them whole,
    and serve again; nothing acked is lost on the way."""
    a, frozen = await chatd_nodes.start(2, **redis_backend.chatd_args, env=ENV)
    redis = await redis_backend.client(decode_responses=True)
    try:
        async with aiohttp.ClientSession() as http:
            (bob, alice), room = await Api(http, a.url).group_of(2)
            bob_a, alice_f = await connect_all(http, (a, bob), (frozen, alice))
            await bob_a.wait_type("presence", user_id=alice.user_id, online=True)
            assert (await bob_a.send_message(room, "before"))["seq"] == 1
            await alice_f.wait_messages(room, 1)

            assert frozen.pid is not None
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                for k in range(20):
                    assert (await bob_a.send_message(room, f"frozen {k}"))["type"] == "ack"
                # The janitor on `a` declares it dead: alice goes offline for bob.
                await bob_a.wait_type("presence", user_id=alice.user_id, online=False,
                                      timeout=10)
                # Presence is announced during the clean-up, the registration goes last.
                deadline = time.monotonic() + 5
                while await redis.zscore(keys.NODES, frozen.node_id) is not None:
                    assert time.monotonic() < deadline, "the dead node is still registered"
                    await asyncio.sleep(0.05)
                for k in range(20):
                    assert (await bob_a.send_message(room, f"dead {k}"))["type"] == "ack"
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
            thawed_at = time.monotonic()

            # It registers again and is ready.
            while await redis.zscore(keys.NODES, frozen.node_id) is None:
                assert time.monotonic() - thawed_at < 10, "the node never re-registered"
                await asyncio.sleep(0.1)
            await frozen.wait_ready()
            for k in range(10):
                assert (await bob_a.send_message(room, f"after {k}"))["type"] == "ack"
            total = 1 + 20 + 20 + 10

            # alice: whatever her connection got, then (after a 4009) a resume on the same
            # node, is every seq once and in order.
            deadline = time.monotonic() + 10
            while alice_f.closed_code is None and len(alice_f.messages(room)) < total:
                assert time.monotonic() < deadline, [m["seq"] for m in alice_f.messages(room)]
                await asyncio.sleep(0.05)
            seqs = [m["seq"] for m in alice_f.messages(room)]
            assert seqs == list(range(1, len(seqs) + 1)), seqs
            resumed = None
            if alice_f.closed_code is not None:
                assert alice_f.closed_code == 4009, alice_f.closed_code
                resumed = await connect(http, frozen.ws_url, alice,
                                        resume={room: seqs[-1]})
                await resumed.wait_messages(room, total - seqs[-1])
                seqs += [m["seq"] for m in resumed.messages(room)]
            assert seqs == list(range(1, total + 1)), seqs
            await bob_a.wait_type("presence", user_id=alice.user_id, online=True, timeout=5)

            # The thawed node delivers live traffic again, both ways.
            live = resumed or alice_f
            ack = await live.send_message(room, "from the thawed node")
            assert ack["type"] == "ack" and ack["seq"] == total + 1
            assert (await bob_a.send_message(room, "to the thawed node"))["seq"] == total + 2
            await live.wait_type("message", room_id=room, seq=total + 2)
            tail = [m["seq"] for m in live.messages(room)][-3:]
            assert tail == [total, total + 1, total + 2], tail
            await bob_a.wait_messages(room, total + 2)
            print(f"\nthawed node: alice's connection "
                  f"{'closed with 4009 and resumed' if resumed else 'stayed whole'}")
            for ws in (bob_a, live):
                await ws.close()
    finally:
        await redis.aclose()
