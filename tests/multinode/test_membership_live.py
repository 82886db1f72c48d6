"""Membership changes reach open connections on other nodes (PROTOCOL.md s3 `member`,
Guarantee 4): an added member's open connection starts receiving the room without a
reconnect; a removed member's connections receive nothing of the room afterwards and
every frame naming the room is refused as `not_found`."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp

from tests.client import FAST_ENV, Api, Ws, connect_all
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes

_ids = itertools.count()

ENV = FAST_ENV | {"CHATD_LIMITS__SEND_RATE_PER_S": "1000", "CHATD_LIMITS__SEND_BURST": "1000"}


def member_frames(ws: Ws, room: str) -> list[tuple[str, str]]:
    return [(f["event"], f["user_id"]) for f in ws.of_type("member") if f["room_id"] == room]


def _windows(ws: Ws, room: str) -> list[list[int]]:
    """The seqs received between each `added` frame and the next `removed` frame."""
    out: list[list[int]] = []
    for f in ws.frames:
        if f.get("room_id") != room:
            continue
        if f["type"] == "member":
            if f["event"] == "added":
                out.append([])
        elif f["type"] == "message":
            assert out, f"a message before dave was ever added: {f}"
            out[-1].append(f["seq"])
    return out


async def request(ws: Ws, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a frame with an id and wait for the reply echoing it."""
    rid = f"m{next(_ids)}"
    await ws.send(frame | {"id": rid})
    return await ws.wait_for(lambda f: f.get("id") == rid)


async def test_added_member_receives_live_and_removed_member_is_cut_off(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    a, b, c = await chatd_nodes.start(3, **redis_backend.chatd_args, env=ENV)
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        owner, bob, dave = await api.users(3)
        room = await api.group(owner, [bob], name="live membership")
        other = await api.group(owner, [dave], name="dave's other room")

        # dave is not in `room` yet; his second device is on bob's node.
        owner_a, bob_b, dave_c, dave_b = await connect_all(
            http, (a, owner), (b, bob), (c, dave), (b, dave))
        for n in range(3):
            assert (await owner_a.send_message(room, f"before {n}"))["type"] == "ack"
        await bob_b.wait_messages(room, 3)

        # --- add: dave's open connections join the room, with no reconnect.
        status, _ = await Api(http, b.url).call("POST", f"/api/v1/rooms/{room}/members",
                                                user=owner, json_body={"user_id": dave.user_id})
        assert status == 204
        for ws in (dave_c, dave_b, owner_a, bob_b):
            frame = await ws.wait_type("member", room_id=room, event="added")
            assert frame["user_id"] == dave.user_id and frame["by"] == owner.user_id
        for n in range(3, 6):
            assert (await bob_b.send_message(room, f"after add {n}"))["type"] == "ack"
        ack = await dave_c.send_message(room, "dave is here")
        assert ack["type"] == "ack" and ack["seq"] == 7, ack
        for ws in (dave_c, dave_b):
            got = await ws.wait_messages(room, 4)
            # Only messages above the room's last seq at the add; earlier ones via history.
            assert [m["seq"] for m in got] == [4, 5, 6, 7]
            assert ws.closed_code is None
        history = await request(dave_c, {"type": "history", "room_id": room, "after_seq": 0})
        assert [m["seq"] for m in history["messages"]] == [1, 2, 3, 4, 5, 6, 7]
        for ws in (owner_a, bob_b):
            await ws.wait_messages(room, 7)

        # --- remove: dave's connections are told, then cut off from the room.
        status, _ = await Api(http, c.url).call(
            "DELETE", f"/api/v1/rooms/{room}/members/{dave.user_id}", user=owner)
        assert status == 204
        for ws in (dave_c, dave_b, owner_a, bob_b):
            frame = await ws.wait_type("member", room_id=room, event="removed")
            assert frame["user_id"] == dave.user_id and frame["by"] == owner.user_id
        for n in range(5):
            assert (await bob_b.send_message(room, f"after remove {n}"))["type"] == "ack"
        await bob_b.send({"type": "typing", "room_id": room, "active": True})
        await bob_b.send({"type": "read", "room_id": room, "seq": 12})
        assert (await owner_a.send_message(other, "dave still has this room"))["type"] == "ack"
        for ws in (owner_a, bob_b):
            await ws.wait_messages(room, 12)
        await owner_a.wait_type("receipt", room_id=room, user_id=bob.user_id, read_seq=12)
        await owner_a.wait_type("typing", room_id=room, user_id=bob.user_id)
        for ws in (dave_c, dave_b):
            await ws.wait_messages(other, 1)  # his other room still works
            await asyncio.sleep(0.2)
            assert [m["seq"] for m in ws.messages(room)] == [4, 5, 6, 7]
            removed_at = next(i for i, f in enumerate(ws.frames) if f.get("type") == "member"
                              and f["event"] == "removed")
            late = [f for f in ws.frames[removed_at + 1:] if f.get("room_id") == room]
            assert late == [], late

        # Every frame of dave's naming the room is refused as if it did not exist.
        for frame in ({"type": "send", "room_id": room, "client_msg_id": "x1", "body": "hi"},
                      {"type": "read", "room_id": room, "seq": 1},
                      {"type": "delivered", "room_id": room, "seq": 1},
                      {"type": "typing", "room_id": room, "active": True},
                      {"type": "history", "room_id": room}):
            for ws in (dave_c, dave_b):
                reply = await request(ws, frame)
                assert reply["type"] == "error" and reply["code"] == "not_found", (frame, reply)
        status, _ = await Api(http, a.url).call("GET", f"/api/v1/rooms/{room}/messages",
                                                user=dave)
        assert status == 404
        # ... and nothing he tried reached the others.
        await asyncio.sleep(0.2)
        assert [m["seq"] for m in bob_b.messages(room)] == list(range(1, 13))
        assert not [f for f in owner_a.of_type("typing") if f["user_id"] == dave.user_id]

        # Membership frames, as seen by the others, in order.
        for ws in (owner_a, bob_b):
            assert member_frames(ws, room) == [("added", dave.user_id), ("removed", dave.user_id)]
        for ws in (dave_c, dave_b):
            assert member_frames(ws, room) == [("added", dave.user_id), ("removed", dave.user_id)]
        for ws in (owner_a, bob_b, dave_c, dave_b):
            assert ws.closed_code is None
            await ws.close()


async def test_membership_changes_in_a_busy_room_keep_the_order(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    """Add and remove while messages stream in from two nodes: the added member's open
    connections get a gap-free run of seqs starting right after the add, in order; after
    the `removed` frame nothing of the room arrives."""
    a, b, c = await chatd_nodes.start(3, **redis_backend.chatd_args, env=ENV | {
        "CHATD_LIMITS__FRAME_RATE_PER_S": "100000", "CHATD_LIMITS__FRAME_BURST": "100000"})
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        owner, bob, dave = await api.users(3)
        room = await api.group(owner, [bob], name="busy")
        owner_a, bob_b, *daves = await connect_all(
            http, (a, owner), (b, bob), (c, dave), (a, dave))
        acked: list[int] = []
        sent_at: list[tuple[float, int]] = []  # (when the send was issued, its seq)
        streaming = True

        async def stream(ws: Ws, tag: str) -> None:
            n = 0
            while streaming:
                issued = time.monotonic()
                reply = await ws.send_message(room, f"{tag}{n}")
                assert reply["type"] == "ack", reply
                acked.append(reply["seq"])
                sent_at.append((issued, reply["seq"]))
                n += 1

        streams = [asyncio.create_task(stream(owner_a, "o")),
                   asyncio.create_task(stream(bob_b, "b"))]
        try:
            for cycle in range(3):
                await asyncio.sleep(0.3)
                before = max(acked, default=0)  # the room's seq is at least this at the add
                status, _ = await Api(http, b.url).call(
                    "POST", f"/api/v1/rooms/{room}/members", user=owner,
                    json_body={"user_id": dave.user_id})
                assert status == 204
                added_at = time.monotonic()
                await asyncio.sleep(0.3)
                status, _ = await Api(http, c.url).call(
                    "DELETE", f"/api/v1/rooms/{room}/members/{dave.user_id}", user=owner)
                assert status == 204
                # Sent after the add returned, so stored after it: dave must have it.
                first_after_add = min(seq for t, seq in sent_at if t > added_at)
                for ws in daves:
                    await ws.wait_for(lambda f, ws=ws, n=cycle + 1: len(
                        member_frames(ws, room)) >= 2 * n)
                    window = _windows(ws, room)[cycle]
                    assert window, f"cycle {cycle}: no message while a member"
                    assert window == list(range(window[0], window[0] + len(window))), window
                    assert before < window[0] <= first_after_add, (before, window[:3],
                                                                   first_after_add)
        finally:
            streaming = False
            await asyncio.gather(*streams)
        await asyncio.sleep(0.3)
        for ws in daves:
            frames = [f for f in ws.frames if f.get("room_id") == room]
            # Three (added ... removed) windows, nothing outside them.
            kinds = [f["type"] if f["type"] != "member" else f["event"] for f in frames]
            text = "".join({"added": "(", "removed": ")", "message": "m"}[k] for k in kinds)
            assert text.count("(") == 3 and text.count(")") == 3, text
            assert text.startswith("(") and text.endswith(")"), text
            assert ")m" not in text and "((" not in text and "))" not in text, text
        for ws in (owner_a, bob_b):
            seqs = [m["seq"] for m in ws.messages(room)]
            assert seqs == list(range(1, len(seqs) + 1))
            assert len(seqs) == len(acked)
        for ws in (owner_a, bob_b, *daves):
            assert ws.closed_code is None
            await ws.close()
