"""Idempotent sends across nodes (PROTOCOL.md s1 client_msg_id, s3 `send`).

The same (sender, room, client_msg_id) sent at the same moment from two
connections of one user on two nodes is stored once: one ack is the original,
the other a duplicate with the same seq and ts, and every connection gets the
message once.
"""

from __future__ import annotations

import asyncio
import secrets

import aiohttp

from tests.client import FAST_ENV, Api, connect_all
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes

ROUNDS = 20


async def test_same_client_msg_id_on_two_nodes_is_stored_once(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    a, b, c = await chatd_nodes.start(3, **redis_backend.chatd_args, env=FAST_ENV | {
        "CHATD_LIMITS__SEND_RATE_PER_S": "1000", "CHATD_LIMITS__SEND_BURST": "1000"})
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        (alice, bob), room = await api.group_of(2)
        on_a, on_b, bob_c = await connect_all(http, (a, alice), (b, alice), (c, bob))

        # Several rounds, so that the race between the two nodes really happens
        # in both directions; each round is one client_msg_id sent on both at once.
        cmids = [f"dup-{n}-{secrets.token_hex(4)}" for n in range(ROUNDS)]
        for n, cmid in enumerate(cmids):
            frame = {"type": "send", "room_id": room, "client_msg_id": cmid, "body": f"once {n}"}
            await asyncio.gather(on_a.send(frame | {"id": f"a{n}"}),
                                 on_b.send(frame | {"id": f"b{n}"}))
            ack_a, ack_b = await asyncio.gather(
                on_a.wait_for(lambda f, n=n: f.get("id") == f"a{n}"),
                on_b.wait_for(lambda f, n=n: f.get("id") == f"b{n}"))
            assert ack_a["type"] == ack_b["type"] == "ack", (ack_a, ack_b)
            assert ack_a["seq"] == ack_b["seq"] == n + 1, (ack_a, ack_b)
            assert ack_a["ts"] == ack_b["ts"]
            assert ack_a["client_msg_id"] == ack_b["client_msg_id"] == cmid
            assert sorted([ack_a["duplicate"], ack_b["duplicate"]]) == [False, True], (
                ack_a, ack_b)

        # Every connection (both of alice's, bob's) got each message exactly once.
        for ws in (on_a, on_b, bob_c):
            got = await ws.wait_messages(room, ROUNDS)
            await asyncio.sleep(0.3)
            got = ws.messages(room)
            assert [m["seq"] for m in got] == list(range(1, ROUNDS + 1))
            assert [m["client_msg_id"] for m in got] == cmids
            assert all(m["sender_id"] == alice.user_id for m in got)

        # The log holds one message per client_msg_id.
        status, page = await api.call("GET", f"/api/v1/rooms/{room}/messages?after_seq=0"
                                      f"&limit=200", user=bob)
        assert status == 200
        assert [m["client_msg_id"] for m in page["messages"]] == cmids

        # A later retry (say, after a lost ack) gets the original back, on any node.
        retry = await bob_c.send_message(room, "other body", client_msg_id=cmids[0])
        assert retry["type"] == "ack" and retry["duplicate"] is False  # bob's own key
        again = await on_b.send_message(room, "changed body", client_msg_id=cmids[0])
        assert again["type"] == "ack" and again["duplicate"] is True
        assert again["seq"] == 1
        status, body = await api.call("POST", f"/api/v1/rooms/{room}/messages", user=alice,
                                      json_body={"client_msg_id": cmids[1], "body": "x"})
        assert status == 200 and body["duplicate"] is True and body["seq"] == 2, (status, body)
        for ws in (on_a, on_b, bob_c):
            await ws.wait_messages(room, ROUNDS + 1)
        await asyncio.sleep(0.3)
        for ws in (on_a, on_b, bob_c):
            assert [m["seq"] for m in ws.messages(room)] == list(range(1, ROUNDS + 2))
        for ws in (on_a, on_b, bob_c):
            await ws.close()


async def test_retry_of_an_unconfirmed_send_is_not_acked_before_replicas_confirm(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    """With `durability.replicas = 1` and no replica attached, WAIT never confirms: the
    first send is stored but answered `unavailable` ("retry with the same client_msg_id").
    The retry must not turn into an ack ("stored durably") while still no replica has it."""
    a, b = await chatd_nodes.start(2, **redis_backend.chatd_args, env=FAST_ENV | {
        "CHATD_DURABILITY__REPLICAS": "1", "CHATD_DURABILITY__WAIT_TIMEOUT_MS": "100"})
    async with aiohttp.ClientSession() as http:
        (alice, _bob), room = await Api(http, a.url).group_of(2)
        alice_a, alice_b = await connect_all(http, (a, alice), (b, alice))
        first = await alice_a.send_message(room, "needs a replica", client_msg_id="durable-1")
        assert first["type"] == "error" and first["code"] == "unavailable", first
        for ws in (alice_a, alice_b):  # on the same node and on another one
            retry = await ws.send_message(room, "needs a replica", client_msg_id="durable-1")
            assert retry["type"] == "error" and retry["code"] == "unavailable", retry
        status, body = await Api(http, b.url).call(
            "POST", f"/api/v1/rooms/{room}/messages", user=alice,
            json_body={"client_msg_id": "durable-1", "body": "needs a replica"})
        assert status == 503, (status, body)
        await alice_a.close()
        await alice_b.close()
