"""Authorization matrix over the WebSocket (issue 7, part 2; PROTOCOL.md s1 "not_found,
never forbidden", Guarantee 4 "checked on every frame").

Every frame that names a room (`send`, `delivered`, `read`, `typing`, `history`, and
`resume` in `hello`), sent by

* an outsider, a member of no room at all;
* a removed member, removed while its connection stays open (its connection had the room);
* a member of another room;
* a member of the room itself, naming forged or guessed room ids,

gets `not_found` (echoing `id`); `resume` of a foreign room simply delivers nothing of it.
Afterwards nothing was stored (the log, the room's seq, no idempotency key), nothing was
delivered to the room's members (no message, typing or receipt from an attacker), and no
watermark moved. The room's members sit on the other node, so a leak through fanout would
show. The HTTP side of the matrix is tests/integration/test_rooms.py
(test_authorization_matrix) and tests/integration/test_history.py.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from typing import Any

import aiohttp

from chatd import keys
from tests.client import Api, User, Ws, connect
from tests.harness import ChatdNodes, ValkeyProcess
from tests.security.support import BASE_ENV, assert_log_clean, summary

PARTITIONS = 16  # config.toml default of redis.partitions
_ids = itertools.count()


def attack_frames(room: str) -> list[dict[str, Any]]:
    """Every client frame that names a room, with the seqs that would be valid for a member
    (0, at or below the watermark, and the room's last seq)."""
    frames: list[dict[str, Any]] = [
        {"type": "send", "room_id": room, "client_msg_id": "attack", "body": "intruder"},
        {"type": "send", "room_id": room, "client_msg_id": f"a-{secrets.token_hex(4)}",
         "body": "intruder again"},
        {"type": "typing", "room_id": room, "active": True},
        {"type": "typing", "room_id": room, "active": False},
        {"type": "history", "room_id": room},
        {"type": "history", "room_id": room, "after_seq": 0, "limit": 200},
        {"type": "history", "room_id": room, "before_seq": 3},
    ]
    for kind in ("delivered", "read"):
        frames += [{"type": kind, "room_id": room, "seq": seq} for seq in (0, 1, 3)]
    return frames


def forged_ids(room: str) -> dict[str, str]:
    flip = "A" if room[-1] != "A" else "B"
    return {
        "guessed (same alphabet and length)": secrets.token_urlsafe(len(room) * 3 // 4),
        "last character changed": room[:-1] + flip,
        "one character short": room[:-1],
        "one character more": room + "A",
        "case swapped": room.swapcase(),
        "hash tag injected": "{0}" + room,
        "key suffix injected": f"{room}:members",
        "glob": "*",
        "NUL appended": room + "\x00",
        "other partition key": f"{room}}}{{1",
    }


async def request(ws: Ws, frame: dict[str, Any]) -> dict[str, Any]:
    rid = f"authz-{next(_ids)}"
    await ws.send({**frame, "id": rid})
    return await ws.wait_for(lambda f: f.get("id") == rid)


async def room_state(redis: Any, api: Api, owner: User, room: str) -> dict[str, Any]:
    """Everything an attack could have changed: the log, the seq, the watermarks, the
    members, the idempotency keys."""
    p = keys.partition_of(room, PARTITIONS)
    status, page = await api.call("GET", f"/api/v1/rooms/{room}/messages?limit=200",
                                  user=owner)
    assert status == 200
    return {
        "messages": [(m["seq"], m["sender_id"], m["body"]) for m in page["messages"]],
        "seq": await redis.hget(keys.room(p, room), "seq"),
        "marks": await redis.hgetall(keys.room_marks(p, room)),
        "members": await redis.hgetall(keys.room_members(p, room)),
        "idempotency keys": sorted([k async for k in redis.scan_iter(
            match=keys.room(p, room) + ":idem:*", count=1000)]),
        "log length": await redis.xlen(keys.room_log(p, room)),
    }


async def test_frames_naming_a_room_are_refused_to_everyone_outside_it(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    home, away = await chatd_nodes.start(2, redis_url=valkey, env=BASE_ENV)
    redis = valkey.client(decode_responses=True)
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, home.url)
            owner, member, outsider, removed, other = [await api.register() for _ in range(5)]
            room = await api.group(owner, [member, removed], name="the target")
            other_room = await api.group(other, [], name="somewhere else")

            # The room's members on `home`; every attacker on `away`.
            owner_ws = await connect(http, home.ws_url, owner)
            member_ws = await connect(http, home.ws_url, member)
            removed_ws = await connect(http, away.ws_url, removed)
            for n in range(3):
                assert (await owner_ws.send_message(room, f"secret {n}"))["seq"] == n + 1
            await removed_ws.wait_messages(room, 3)
            await removed_ws.send({"type": "read", "room_id": room, "seq": 2})
            await member_ws.wait_type("receipt", user_id=removed.user_id, read_seq=2)
            assert (await other_ws_send(http, away, other, other_room))["seq"] == 1

            status, _ = await api.call("DELETE", f"/api/v1/rooms/{room}/members/"
                                       f"{removed.user_id}", user=owner)
            assert status == 204
            await removed_ws.wait_type("member", room_id=room, event="removed")
            before = await room_state(redis, api, owner, room)
            assert before["marks"][f"r:{removed.user_id}"] == "2"

            start = [len(ws.frames) for ws in (owner_ws, member_ws)]  # the attack starts
            attackers = {
                "outsider": await connect(http, away.ws_url, outsider),
                "removed member (connection open since before)": removed_ws,
                "member of another room": await connect(http, away.ws_url, other),
            }
            refused: dict[str, int] = {}
            wrong: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
            for who, ws in attackers.items():
                for frame in attack_frames(room):
                    reply = await request(ws, frame)
                    if reply.get("type") != "error" or reply.get("code") != "not_found":
                        wrong.append((who, frame, reply))
                    refused[who] = refused.get(who, 0) + 1
            # A member naming forged or guessed ids: the same answer, never another room.
            forged_ws = await connect(http, away.ws_url, member)
            for label, forged in forged_ids(room).items():
                for frame in attack_frames(forged):
                    reply = await request(forged_ws, frame)
                    if reply.get("type") != "error" or reply.get("code") != "not_found":
                        wrong.append((f"member with {label} id", frame, reply))
                    refused["forged ids"] = refused.get("forged ids", 0) + 1
            assert not wrong, "\n".join(map(str, wrong))

            # resume of the room by each attacker: a welcome without it, nothing of it.
            resumed = {}
            for who, user in (("outsider", outsider), ("removed member", removed),
                              ("member of another room", other)):
                ws = await connect(http, away.ws_url, user, resume={room: 0, "x" * 20: 0})
                assert room not in [r["room_id"] for r in ws.of_type("welcome")[0]["rooms"]]
                resumed[who] = ws

            # A fence: a message every member sees. What an attack could have caused
            # (a message, typing, receipt) would have been fanned out before it.
            fence = await owner_ws.send_message(room, "fence")
            assert fence["seq"] == 4
            for ws in (owner_ws, member_ws):
                await ws.wait_type("message", room_id=room, seq=4)
            await asyncio.sleep(0.5)  # and a moment for anything slower
            attacker_ids = {outsider.user_id, removed.user_id, other.user_id}
            for ws, first in zip((owner_ws, member_ws), start, strict=True):
                leaked = [f for f in ws.frames[first:]
                          if (f.get("user_id") in attacker_ids
                              and f.get("type") in ("typing", "receipt"))
                          or f.get("sender_id") in attacker_ids]
                assert not leaked, leaked
                assert [m["seq"] for m in ws.messages(room)] == [1, 2, 3, 4]
            # ... and nothing of the room reached an attacker after it lost (or never had)
            # the room: no message, typing, receipt or member frame.
            for who, ws in [*attackers.items(), *resumed.items()]:
                seen = [f for f in ws.frames if f.get("room_id") == room]
                if ws is removed_ws:
                    removal = next(i for i, f in enumerate(seen) if f.get("type") == "member"
                                   and f.get("event") == "removed")
                    seen = seen[removal + 1:]
                assert not [f for f in seen if f.get("type") != "error"], (who, seen)

            after = await room_state(redis, api, owner, room)
            # The only change is the fence: one more message, seq 4, by the owner.
            assert after["messages"] == [*before["messages"], (4, owner.user_id, "fence")]
            assert after["seq"] == "4" and after["log length"] == 4
            for field in ("marks", "members"):
                assert after[field] == before[field], field
            new_keys = set(after["idempotency keys"]) - set(before["idempotency keys"])
            assert len(new_keys) == 1 and f":idem:{owner.user_id}:" in new_keys.pop()  # fence
            assert not [k async for k in redis.scan_iter(match="*attack*", count=1000)]

            for ws in (owner_ws, member_ws, forged_ws, *attackers.values(),
                       *resumed.values()):
                await ws.close()
    finally:
        await redis.aclose()
    assert_log_clean(home)
    assert_log_clean(away)
    summary("ws authorization matrix", frames_refused=refused,
            resumes_without_leak=len(resumed), stored=0, delivered=0, watermarks_moved=0)


async def other_ws_send(http: aiohttp.ClientSession, node: Any, user: User,
                        room: str) -> dict[str, Any]:
    ws = await connect(http, node.ws_url, user)
    try:
        return await ws.send_message(room, "elsewhere")
    finally:
        await ws.close()
