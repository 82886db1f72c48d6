"""Sent -> Delivered -> Read (PROTOCOL.md sections 2 and 3): the `delivered` and `read`
watermarks, `receipt` frames, message status and receipts over HTTP, the watermarks in
`welcome`, and unread counts in GET /rooms. One real chatd node on a real Valkey."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.client import Api, User, Ws
from tests.conftest import OneNode, RedisBackend
from tests.harness import ChatdNodes


@pytest.fixture
def one_node(redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> OneNode:
    """Here the node runs on each Redis backend: one Valkey and a Valkey Cluster."""
    return OneNode(chatd_nodes, redis_backend.chatd_args)


async def status_of(api: Api, user: User, room: str, seq: int) -> dict[str, Any]:
    return dict(await api.get(f"/api/v1/rooms/{room}/messages/{seq}", user))


async def receipts_of(api: Api, user: User, room: str) -> dict[str, tuple[int, int]]:
    body = await api.get(f"/api/v1/rooms/{room}/receipts", user)
    out = {r["user_id"]: (r["delivered_seq"], r["read_seq"]) for r in body["receipts"]}
    assert len(out) == len(body["receipts"])
    return out


async def unread_of(api: Api, user: User) -> dict[str, tuple[int, int, int | None]]:
    """room_id -> (last_seq, unread, seq of last_message)."""
    body = await api.get("/api/v1/rooms", user)
    return {r["room_id"]: (r["last_seq"], r["unread"],
                           r["last_message"]["seq"] if r["last_message"] else None)
            for r in body["rooms"]}


def receipts_from(ws: Ws, user: User) -> list[tuple[int, int]]:
    return [(f["delivered_seq"], f["read_seq"]) for f in ws.of_type("receipt")
            if f["user_id"] == user.user_id]


async def test_direct_room_sent_delivered_read(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob = await api.users(2)
        room = await api.direct(alice, bob)
        alice_ws = await chat.connect(alice)
        bob_ws = await chat.connect(bob)
        bob_other = await chat.connect(bob)

        # Sent: acked, stored, status "sent".
        for i in range(3):
            ack = await alice_ws.send_message(room, f"m{i}")
            assert ack["type"] == "ack" and ack["seq"] == i + 1
        msg = await status_of(api, alice, room, 1)
        assert msg["status"] == "sent"
        assert (msg["seq"], msg["body"], msg["sender_id"]) == (1, "m0", alice.user_id)
        assert msg["receipts"] == [{"user_id": bob.user_id, "delivered": False, "read": False}]
        await bob_ws.wait_messages(room, 3)

        # Delivered: no reply to bob, a receipt to the room (bob's other connection too).
        await bob_ws.send({"type": "delivered", "room_id": room, "seq": 2})
        receipt = await alice_ws.wait_type("receipt", user_id=bob.user_id)
        assert receipt == {"type": "receipt", "room_id": room, "user_id": bob.user_id,
                           "delivered_seq": 2, "read_seq": 0}
        await bob_other.wait_type("receipt", user_id=bob.user_id, delivered_seq=2)
        assert (await status_of(api, alice, room, 1))["status"] == "delivered"
        assert (await status_of(api, alice, room, 2))["receipts"] == [
            {"user_id": bob.user_id, "delivered": True, "read": False}]
        assert (await status_of(api, alice, room, 3))["status"] == "sent"

        # Read: up to 1 only.
        await bob_ws.send({"type": "read", "room_id": room, "seq": 1})
        await alice_ws.wait_type("receipt", user_id=bob.user_id, read_seq=1)
        assert [(await status_of(api, alice, room, s))["status"] for s in (1, 2, 3)] == [
            "read", "delivered", "sent"]
        # Read implies delivered: reading 3 moves both.
        await bob_other.send({"type": "read", "room_id": room, "seq": 3})
        receipt = await alice_ws.wait_type("receipt", user_id=bob.user_id, read_seq=3)
        assert receipt["delivered_seq"] == 3
        assert [(await status_of(api, alice, room, s))["status"] for s in (1, 2, 3)] == [
            "read"] * 3
        assert (await status_of(api, bob, room, 3))["receipts"] == [
            {"user_id": bob.user_id, "delivered": True, "read": True}]
        assert await receipts_of(api, alice, room) == {alice.user_id: (0, 0),
                                                       bob.user_id: (3, 3)}
        # Success gets no reply on the WebSocket.
        await bob_ws.ping()
        assert not bob_ws.of_type("error") and not bob_ws.of_type("ack")
        assert receipts_from(alice_ws, bob) == [(2, 0), (2, 1), (3, 3)]


async def test_group_status_needs_every_other_member(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        users = await api.users(5)
        alice, others = users[0], users[1:]
        room = await api.group(alice, others)
        conns = {u.user_id: await chat.connect(u) for u in users}
        alice_ws = conns[alice.user_id]

        ack = await alice_ws.send_message(room, "to all")
        assert ack["seq"] == 1
        msg = await status_of(api, alice, room, 1)
        assert msg["status"] == "sent"
        assert sorted(r["user_id"] for r in msg["receipts"]) == sorted(u.user_id
                                                                       for u in others)

        async def mark(user: User, kind: str) -> None:
            ws = conns[user.user_id]
            await ws.send({"type": kind, "room_id": room, "seq": 1})
            await alice_ws.wait_type("receipt", user_id=user.user_id,
                                     read_seq=1 if kind == "read" else 0)

        # Each mark moves the status only once the last of the others has made it.
        for kind, before_last in (("delivered", "sent"), ("read", "delivered")):
            for i, user in enumerate(others):
                await mark(user, kind)
                msg = await status_of(api, alice, room, 1)
                expected = kind if i == len(others) - 1 else before_last
                assert msg["status"] == expected, (kind, i, msg)
                assert sum(r[kind] for r in msg["receipts"]) == i + 1
                if kind == "delivered":
                    assert not any(r["read"] for r in msg["receipts"])

        # Every member heard every receipt, the movers' own connections included.
        for user in users:
            got = {f["user_id"] for f in conns[user.user_id].of_type("receipt")}
            if got != {u.user_id for u in others}:
                await asyncio.sleep(0.5)
                got = {f["user_id"] for f in conns[user.user_id].of_type("receipt")}
            assert got == {u.user_id for u in others}, user
        # The receipts list has every member, the sender too.
        marks = await receipts_of(api, others[2], room)
        assert marks == {alice.user_id: (0, 0)} | {u.user_id: (1, 1) for u in others}
        # Status is about the sender's message, whoever asks.
        assert (await status_of(api, others[0], room, 1))["status"] == "read"
        # A new message starts at "sent" again.
        ack = await conns[others[0].user_id].send_message(room, "reply")
        msg = await status_of(api, others[0], room, 2)
        assert msg["status"] == "sent" and msg["sender_id"] == others[0].user_id
        assert sorted(r["user_id"] for r in msg["receipts"]) == sorted(
            u.user_id for u in users if u is not others[0])


async def test_watermarks_never_go_backwards_and_bad_seqs_are_refused(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob, carol = await api.users(3)
        room = await api.direct(alice, bob)
        alice_ws = await chat.connect(alice)
        bob_ws = await chat.connect(bob)
        carol_ws = await chat.connect(carol)
        for i in range(5):
            await alice_ws.send_message(room, f"m{i}")

        await bob_ws.send({"type": "read", "room_id": room, "seq": 3})
        await alice_ws.wait_type("receipt", user_id=bob.user_id, read_seq=3)
        # At or below the watermark: a no-op, no error, no receipt.
        for kind, seq in [("delivered", 1), ("delivered", 3), ("read", 2), ("read", 3),
                          ("read", 0), ("delivered", 0)]:
            await bob_ws.send({"type": kind, "id": f"noop-{kind}-{seq}", "room_id": room,
                               "seq": seq})
        await bob_ws.ping()
        assert not [f for f in bob_ws.frames if str(f.get("id")).startswith("noop")]
        assert await receipts_of(api, alice, room) == {alice.user_id: (0, 0),
                                                       bob.user_id: (3, 3)}
        # Delivered may run ahead of read; read behind it leaves delivered alone.
        await bob_ws.send({"type": "delivered", "room_id": room, "seq": 5})
        await alice_ws.wait_type("receipt", user_id=bob.user_id, delivered_seq=5)
        await bob_ws.send({"type": "read", "room_id": room, "seq": 4})
        await alice_ws.wait_type("receipt", user_id=bob.user_id, read_seq=4)
        assert receipts_from(alice_ws, bob) == [(3, 3), (5, 3), (5, 4)]
        assert await receipts_of(api, bob, room) == {alice.user_id: (0, 0),
                                                     bob.user_id: (5, 4)}

        # Above the room's last seq: bad_request echoing id, nothing moves.
        for kind in ("delivered", "read"):
            reply = await bob_ws.request({"type": kind, "room_id": room, "seq": 6})
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        # A non-member: not_found, nothing recorded for it.
        for kind in ("delivered", "read"):
            reply = await carol_ws.request({"type": kind, "room_id": room, "seq": 1})
            assert reply["type"] == "error" and reply["code"] == "not_found", reply
        status, _ = await api.call("GET", f"/api/v1/rooms/{room}/receipts", user=carol)
        assert status == 404
        status, _ = await api.call("GET", f"/api/v1/rooms/{room}/messages/1", user=carol)
        assert status == 404
        await bob_ws.ping()
        assert await receipts_of(api, alice, room) == {alice.user_id: (0, 0),
                                                       bob.user_id: (5, 4)}
        assert receipts_from(alice_ws, bob) == [(3, 3), (5, 3), (5, 4)]
        assert not carol_ws.of_type("receipt")


async def test_welcome_on_reconnect_carries_the_watermarks(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob = await api.users(2)
        room = await api.direct(alice, bob)
        group = await api.group(bob, [alice])
        alice_ws = await chat.connect(alice)
        for i in range(4):
            await alice_ws.send_message(room, f"m{i}")
        await alice_ws.send_message(group, "g")
        bob_ws = await chat.connect(bob)
        await bob_ws.send({"type": "delivered", "room_id": room, "seq": 4})
        await bob_ws.send({"type": "read", "room_id": room, "seq": 2})
        await bob_ws.ping()
        await bob_ws.close()

        # Another device of the same user sees the same per-user watermarks.
        device = await api.login(bob.username)
        again = await chat.connect(device)
        rooms = {r["room_id"]: r for r in again.of_type("welcome")[0]["rooms"]}
        assert rooms[room] == {"room_id": room, "last_seq": 4, "read_seq": 2,
                               "delivered_seq": 4}
        assert rooms[group] == {"room_id": group, "last_seq": 1, "read_seq": 0,
                                "delivered_seq": 0}
        # ... and moves them for the user as a whole.
        await again.send({"type": "read", "room_id": group, "seq": 1})
        await again.ping()
        third = await chat.connect(bob)
        rooms = {r["room_id"]: r for r in third.of_type("welcome")[0]["rooms"]}
        assert (rooms[group]["read_seq"], rooms[group]["delivered_seq"]) == (1, 1)


async def test_unread_counts_follow_read_seq(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob = await api.users(2)
        room = await api.direct(alice, bob)
        empty = await api.group(bob, [alice], name="quiet")
        alice_ws = await chat.connect(alice)
        bob_ws = await chat.connect(bob)

        assert (await unread_of(api, bob))[room] == (0, 0, None)
        for i in range(3):
            await alice_ws.send_message(room, f"a{i}")
        await bob_ws.send_message(room, "b")  # seq 4: bob's own, never unread for him
        await alice_ws.send_message(room, "a3")  # seq 5
        bob_view = await unread_of(api, bob)
        assert bob_view[room] == (5, 4, 5)
        assert bob_view[empty] == (0, 0, None)
        assert (await unread_of(api, alice))[room] == (5, 1, 5)

        steps = [
            (bob_ws, bob, "delivered", 5, 4),  # delivered does not touch unread; read does
            (bob_ws, bob, "read", 2, 2),
            (bob_ws, bob, "read", 4, 1),
            (bob_ws, bob, "read", 5, 0),
            (bob_ws, bob, "read", 1, 0),  # a lower read afterwards changes nothing
            (alice_ws, alice, "read", 4, 0),  # alice reads bob's message
        ]
        for ws, user, kind, seq, unread in steps:
            await ws.send({"type": kind, "room_id": room, "seq": seq})
            await ws.ping()
            assert (await unread_of(api, user))[room] == (5, unread, 5), (kind, seq)
