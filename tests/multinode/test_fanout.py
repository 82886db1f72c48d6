"""Fanout across nodes: a message sent on one node reaches every member connection,
on every node, the sender's other connections included."""

from __future__ import annotations

import aiohttp

from tests.client import FAST_ENV, Api, connect_all
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes


async def test_group_message_reaches_every_connection_on_every_node(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    a, b, c = await chatd_nodes.start(3, **redis_backend.chatd_args, env=FAST_ENV)
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        (alice, bob, carol), room = await api.group_of(3)
        direct = await api.direct(alice, bob)
        sender, sender_other, on_b, on_c = await connect_all(
            http, (a, alice), (c, alice), (b, bob), (c, carol))

        ack = await sender.send_message(room, "hello group")
        assert ack["type"] == "ack" and ack["seq"] == 1 and ack["duplicate"] is False
        ack = await sender.send_message(direct, "hello bob")
        assert ack["type"] == "ack" and ack["seq"] == 1

        for ws in (sender, sender_other, on_b, on_c):
            got = await ws.wait_messages(room, 1)
            assert [(m["seq"], m["body"], m["sender_id"]) for m in got] == [
                (1, "hello group", alice.user_id)]
        for ws in (sender, sender_other, on_b):
            got = await ws.wait_messages(direct, 1)
            assert [m["body"] for m in got] == ["hello bob"]
        assert on_c.messages(direct) == []  # carol is not in the direct room

        # Presence crossed nodes too: bob saw carol (another node) come online.
        presence = await on_b.wait_type("presence", user_id=carol.user_id)
        assert presence["online"] is True
        for ws in (sender, sender_other, on_b, on_c):
            await ws.close()
