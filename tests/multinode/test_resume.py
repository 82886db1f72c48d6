"""`hello` with `resume` after a disconnect, on another node (PROTOCOL.md s3 hello,
Guarantee 1): the missed messages of every resumed room come first, in order and
once, then live ones with no gap; rooms left out of `resume` deliver live only."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

from tests.client import FAST_ENV, Api, Ws, connect, connect_all
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes

ENV = FAST_ENV | {"CHATD_LIMITS__SEND_RATE_PER_S": "100000", "CHATD_LIMITS__SEND_BURST": "100000",
                  "CHATD_LIMITS__FRAME_RATE_PER_S": "100000", "CHATD_LIMITS__FRAME_BURST": "100000"}


async def send_acked(ws: Ws, room: str, prefix: str, count: int) -> list[int]:
    """Pipeline `count` sends and return their acked seqs, in send order."""
    ids = [f"{prefix}-{k}" for k in range(count)]
    for rid in ids:
        await ws.send({"type": "send", "id": rid, "room_id": room, "client_msg_id": rid,
                       "body": rid})
    want = set(ids)
    await ws.wait_for(lambda f: not want.difference(
        x.get("id") for x in ws.frames if x.get("type") in ("ack", "error")), timeout=20)
    replies = {f["id"]: f for f in ws.frames if f.get("id") in want}
    assert all(replies[i]["type"] == "ack" for i in ids), [replies[i] for i in ids][:3]
    return [replies[i]["seq"] for i in ids]


async def wait_count(ws: Ws, room: str, count: int, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while len(ws.messages(room)) < count:
        assert ws.closed_code is None, f"closed with {ws.closed_code}"
        assert time.monotonic() < deadline, f"{len(ws.messages(room))} of {count} messages"
        await asyncio.sleep(0.05)


async def test_resume_on_another_node_gets_exactly_the_missed_messages_then_live(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    a, b, c = await chatd_nodes.start(3, **redis_backend.chatd_args, env=ENV)
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        (alice, bob, carol), room = await api.group_of(3, name="resumed")
        long_room = await api.group(bob, [alice, carol], name="resumed from zero")
        live_room = await api.group(alice, [bob, carol], name="live only")
        foreign = await api.group(alice, [bob], name="not carol's")

        alice_b, bob_c, carol_a = await connect_all(http, (b, alice), (c, bob), (a, carol))

        assert await send_acked(alice_b, room, "before", 5) == [1, 2, 3, 4, 5]
        await send_acked(alice_b, live_room, "live-before", 3)
        await wait_count(carol_a, room, 5)
        await wait_count(carol_a, live_room, 3)
        last_seen = max(m["seq"] for m in carol_a.messages(room))
        assert last_seen == 5
        await carol_a.close()

        # While carol is away: 100 in the resumed room (from two nodes), 250 in a room
        # she resumes from 0 (more than one log page), 20 in the live-only room.
        missed = await asyncio.gather(send_acked(alice_b, room, "away-a", 50),
                                      send_acked(bob_c, room, "away-b", 50))
        assert sorted(missed[0] + missed[1]) == list(range(6, 106))
        await send_acked(bob_c, long_room, "long", 250)
        await send_acked(bob_c, live_room, "live-away", 20)
        await send_acked(alice_b, foreign, "foreign", 5)

        # Reconnect to another node while both rooms keep receiving live messages.
        live_task = asyncio.gather(send_acked(alice_b, room, "during", 100),
                                   send_acked(bob_c, live_room, "live-during", 30))
        carol_b = await connect(http, b.ws_url, carol,
                                resume={room: last_seen, long_room: 0, foreign: 0})
        welcome = carol_b.of_type("welcome")[0]
        assert welcome["node_id"] == b.node_id
        await live_task
        after = await send_acked(bob_c, room, "after", 10)
        assert after == list(range(206, 216))
        await send_acked(alice_b, live_room, "live-after", 5)
        live_last = 3 + 20 + 30 + 5

        await wait_count(carol_b, room, 210)
        await wait_count(carol_b, long_room, 250)
        await carol_b.wait_for(lambda f: f.get("type") == "message" and f["room_id"] == live_room
                               and f["seq"] == live_last)
        await asyncio.sleep(0.3)

        # The resumed room: exactly 6..215, once each, in order, with nothing before the gap.
        assert [m["seq"] for m in carol_b.messages(room)] == list(range(6, 216))
        assert [m["body"] for m in carol_b.messages(room)[:100]] == [
            m["client_msg_id"] for m in carol_b.messages(room)[:100]]
        assert [m["seq"] for m in carol_b.messages(long_room)] == list(range(1, 251))

        # The live-only room: nothing from before the welcome, then every later seq in order.
        rooms = {r["room_id"]: r for r in welcome["rooms"]}
        assert set(rooms) == {room, long_room, live_room}
        start = rooms[live_room]["last_seq"]
        assert start >= 23
        assert [m["seq"] for m in carol_b.messages(live_room)] == list(
            range(start + 1, live_last + 1))

        # A room carol is not a member of is ignored in resume, not revealed.
        assert carol_b.messages(foreign) == []
        assert not carol_b.of_type("error")

        # The old connection, closed before, got nothing more.
        assert [m["seq"] for m in carol_a.messages(room)] == [1, 2, 3, 4, 5]
        for ws in (alice_b, bob_c, carol_b):
            with contextlib.suppress(Exception):
                await ws.close()


async def test_welcome_is_the_first_frame_even_in_a_busy_room(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    """`hello` is answered by `welcome`: the client learns its session and rooms before
    anything about them. Checked while another member types without pause (room events
    queued during the hello used to go out before the welcome)."""
    a, b = await chatd_nodes.start(2, **redis_backend.chatd_args, env=ENV)
    async with aiohttp.ClientSession() as http:
        (alice, bob), room = await Api(http, a.url).group_of(2)
        bob_a = await connect(http, a.ws_url, bob)
        assert await send_acked(bob_a, room, "x", 3) == [1, 2, 3]
        await bob_a.close()
        alice_a = await connect(http, a.ws_url, alice)
        typing = True

        async def keep_typing() -> None:
            n = 0
            while typing:
                await alice_a.send({"type": "typing", "room_id": room, "active": n % 2 == 0})
                n += 1
                await asyncio.sleep(0.001)

        typist = asyncio.create_task(keep_typing())
        first = []
        try:
            for _ in range(60):
                ws = await connect(http, b.ws_url, bob, resume={room: 1})
                first.append(ws.frames[0]["type"])
                await ws.close()
                if first[-1] != "welcome":
                    break
        finally:
            typing = False
            await typist
        assert set(first) == {"welcome"}, first
        await alice_a.close()
