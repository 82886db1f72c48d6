"""Redis connections dropping under traffic (PROTOCOL.md Guarantees 1-3; DESIGN.md: "a Redis
connection drop or a burst loses nothing: the node resumes from its pending entries").

`CLIENT KILL TYPE normal` cuts every chatd connection to Valkey (command pools and the
blocking inbox readers) while a sender streams messages. Every acked message must
reach every connected member exactly once and in order; sends refused as
`unavailable` are retried with the same client_msg_id until acked.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp
import pytest

from chatd import keys, scripts
from tests.client import FAST_ENV, Api, User, Ws, connect_all, metric
from tests.cluster.support import Member, keep_resuming
from tests.harness import ChatdNodes, ValkeyProcess

PARTITIONS = 16
COUNT = 300
KILLS = 5
ENV = FAST_ENV | {"CHATD_LIMITS__SEND_RATE_PER_S": "100000", "CHATD_LIMITS__SEND_BURST": "100000",
                  "CHATD_LIMITS__FRAME_RATE_PER_S": "100000", "CHATD_LIMITS__FRAME_BURST": "100000"}


async def send_until_acked(sender: Member, room: str, cmid: str,
                           stats: dict[str, int]) -> dict[str, Any]:
    for attempt in range(50):
        await sender.check()  # reopened (resume) if the server closed it with 4009
        ws, rid = sender.ws, f"{cmid}.{attempt}"
        try:
            await ws.send({"type": "send", "id": rid, "room_id": room,
                           "client_msg_id": cmid, "body": cmid})
            reply = await ws.wait_for(lambda f, rid=rid: f.get("id") == rid, timeout=15)
        except (AssertionError, ConnectionError):
            if ws.closed_code is None:
                raise
            continue  # closed meanwhile: check() asserts it was a 4009
        if reply["type"] == "ack":
            return reply
        assert reply["code"] == "unavailable", reply  # retry is safe: same client_msg_id
        stats["unavailable"] += 1
        await asyncio.sleep(0.05)
    raise AssertionError(f"{cmid} never acked")


async def test_acked_messages_survive_redis_connection_kills(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    nodes = await chatd_nodes.start(3, redis_url=valkey, env=ENV)
    admin = valkey.client()
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, nodes[0].url)
            (sender, *users), room = await api.group_of(7, name="drops")
            sender_m = Member(http, nodes[0].ws_url, sender, [room])
            members = [Member(http, nodes[i % 3].ws_url, u, [room]) for i, u in enumerate(users)]
            for m in (sender_m, *members):
                await m.open()

            stats = {"unavailable": 0, "acked as duplicate": 0}
            acks: dict[str, int] = {}

            async def stream() -> None:
                for k in range(COUNT):
                    cmid = f"m{k:04d}"
                    ack = await send_until_acked(sender_m, room, cmid, stats)
                    stats["acked as duplicate"] += ack["duplicate"]
                    acks[cmid] = ack["seq"]
                    await asyncio.sleep(0.01)

            killed = []

            async def chaos() -> None:
                await asyncio.sleep(0.4)
                for _ in range(KILLS):
                    killed.append(await admin.execute_command("CLIENT", "KILL", "TYPE", "normal"))
                    await asyncio.sleep(0.5)

            started = time.monotonic()
            watcher = asyncio.create_task(keep_resuming(members))
            try:
                await asyncio.gather(stream(), chaos())
                elapsed = time.monotonic() - started
                assert all(n >= 3 for n in killed), killed  # chatd's connections really died
                # Each client_msg_id stored once, seqs in send order with no gap.
                assert [acks[f"m{k:04d}"] for k in range(COUNT)] == list(range(1, COUNT + 1))
                deadline = time.monotonic() + 20
                everyone = (sender_m, *members)
                while not all(len(m.seqs(room)) >= COUNT for m in everyone):
                    assert not watcher.done(), watcher.result()  # a close other than 4009
                    assert time.monotonic() < deadline, [len(m.seqs(room)) for m in everyone]
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                assert not watcher.done(), watcher.result()
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

            expected = sorted(acks.values())
            for m in members:
                assert m.seqs(room) == expected, (m.user.username, m.resumes)
            assert sender_m.seqs(room) == expected  # the sending connection sees every seq too
            # The log itself: one message per client_msg_id, in send order.
            status, page = await api.call("GET", f"/api/v1/rooms/{room}/messages?after_seq=0"
                                          "&limit=200", user=users[0])
            assert status == 200
            assert [m["client_msg_id"] for m in page["messages"]] == [
                f"m{k:04d}" for k in range(200)]
            print(f"\nredis drop: {COUNT} messages in {elapsed:.2f}s, {KILLS} CLIENT KILLs "
                  f"({killed} connections), send errors {stats}, "
                  f"4009 resumes {[m.resumes for m in (sender_m, *members)]}")
            for m in (sender_m, *members):
                await m.close()
            for node in nodes:
                assert node.running
    finally:
        await admin.aclose()


# --- the lost XREADGROUP reply ----------------------------------------------------------
#
# XREADGROUP with ">" moves the group past entries when the server builds the reply. If
# the connection dies after that and before the reply is read, the group has moved on
# but the node never saw them. Sending the entry and killing the blocked reader's
# connection in one pipeline makes that happen every time: Valkey serves the blocked
# reader right after the write, then frees it (and its unsent reply) on the kill.


async def _blocked_readers(admin: Any) -> list[str]:
    listing = (await admin.execute_command("CLIENT", "LIST", "TYPE", "normal")).decode()
    ids = []
    for line in listing.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split(" ") if "=" in kv)
        if fields.get("cmd") == "xreadgroup" and "b" in fields.get("flags", ""):
            ids.append(fields["id"])
    return ids


async def _write_and_kill_reader(admin: Any, write: Any) -> bool:
    """Run `write(pipe)` and kill the blocked inbox reader in the same pipeline; True when
    the reader was blocked at that moment (so the reply was built and then lost)."""
    for _ in range(100):
        readers = await _blocked_readers(admin)
        if len(readers) == 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("no blocked inbox reader found")
    async with admin.pipeline(transaction=False) as pipe:
        pipe.execute_command("CLIENT", "LIST", "ID", readers[0])
        write(pipe)
        pipe.execute_command("CLIENT", "KILL", "ID", readers[0])
        replies = await pipe.execute(raise_on_error=True)
    return re.search(r"\bflags=\S*b", replies[0].decode()) is not None and replies[-1] == 1


@pytest.mark.parametrize("entry", ["message", "revoke"])
async def test_entry_delivered_when_the_reader_connection_dies_with_its_reply(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes, entry: str) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=ENV)
    async with valkey.client() as admin, aiohttp.ClientSession() as http:
        (alice, bob), room = await Api(http, node.url).group_of(2)
        bob_ws, alice_ws = await connect_all(http, (node, bob), (node, alice))
        assert (await alice_ws.send_message(room, "warm up"))["seq"] == 1
        await bob_ws.wait_messages(room, 1)
        p = keys.partition_of(room, PARTITIONS)

        if entry == "message":
            # What any node's send does (messages.send): one script, stored and fanned out.
            source = scripts.sources()["send_message"]

            def write(pipe: Any) -> None:
                pipe.eval(source, 6, keys.room(p, room), keys.room_members(p, room),
                          keys.room_log(p, room), keys.room_nodes(p, room),
                          keys.inbox_prefix(keys.inbox_partition(p, cluster=False)),
                          keys.idempotency(p, room, alice.user_id, "lost-reply"),
                          room, alice.user_id, "lost-reply", json.dumps("stored"),
                          86_400_000, "maxlen", 1_000_000, 100_000)
        else:
            # What logout does (auth.logout): delete the session, notify bob's nodes.
            def write(pipe: Any) -> None:
                pipe.delete(keys.session(bob.user_id, bob.session_id))
                pipe.xadd(keys.control(node.node_id),
                          {"k": "x", "u": bob.user_id, "sid": bob.session_id})

        handed = await metric(http, node.url, "chatd_inbox_entries_total")
        if not await _write_and_kill_reader(admin, write):
            pytest.skip("the reader was between two reads: the scenario did not happen")
        if entry == "message":
            # Acked and stored as seq 2: every member's open connection must get it.
            got = await bob_ws.wait_messages(room, 2, timeout=3)
            assert [m["seq"] for m in got] == [1, 2]
        else:
            # The session is revoked: its connection must close with 4001 within 2 s.
            assert await bob_ws.wait_closed(timeout=2) == 4001
        # The catch-up reads after the node's own cursor: the lost entry, once,
        # and nothing handed over before it (at most 2: the warm-up's and the lost).
        await asyncio.sleep(0.2)
        assert await metric(http, node.url, "chatd_inbox_entries_total") - handed <= 2
        await alice_ws.close()
        await bob_ws.close()


# --- a connection that closes while Redis is down ----------------------------------------


async def _close_during_outage(valkey: ValkeyProcess, chatd_nodes: ChatdNodes,
                               http: aiohttp.ClientSession) -> tuple[Any, Any, User, str, Ws]:
    """alice (node a) and bob (node b) share a room; Valkey goes down, alice's only
    connection closes, Valkey comes back. Returns (a, b, alice, room, bob's connection)."""
    a, b = await chatd_nodes.start(2, redis_url=valkey, env=ENV)
    chatd_nodes.report_log_problems = False  # the outage is on purpose
    (alice, bob), room = await Api(http, a.url).group_of(2)
    bob_b, alice_a = await connect_all(http, (b, bob), (a, alice))
    await bob_b.wait_type("presence", user_id=alice.user_id, online=True)
    await valkey.stop()
    await alice_a.close()
    await asyncio.sleep(1.5)  # node a's clean-up attempts run (and fail) now
    await valkey.start()
    await a.wait_ready()
    await b.wait_ready()
    return a, b, alice, room, bob_b


async def test_interest_of_a_room_left_during_an_outage_is_removed_afterwards(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    async with aiohttp.ClientSession() as http:
        a, _, _, room, bob_b = await _close_during_outage(valkey, chatd_nodes, http)
        redis = valkey.client(decode_responses=True)
        try:
            key = keys.room_nodes(keys.partition_of(room, PARTITIONS), room)
            deadline = time.monotonic() + 4
            while a.node_id in await redis.smembers(key):
                # node a holds no connection of the room: it must not stay interested
                assert time.monotonic() < deadline, "stale interest of node a"
                await asyncio.sleep(0.1)
        finally:
            await redis.aclose()
            await bob_b.close()


async def test_user_whose_last_connection_closed_during_an_outage_goes_offline(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    async with aiohttp.ClientSession() as http:
        _, _, alice, _, bob_b = await _close_during_outage(valkey, chatd_nodes, http)
        try:
            frame = await bob_b.wait_type("presence", user_id=alice.user_id, online=False,
                                          timeout=6)
            assert frame["last_seen"] > 0
        finally:
            await bob_b.close()
