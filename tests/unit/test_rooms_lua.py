"""Room scripts and the two-step membership on fakeredis (a fresh FakeServer per test).

Every script call is checked to stay inside one hash slot, the property that
lets the same scripts run on Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import fakeredis
import pytest
from redis.crc import key_slot

from chatd import config, keys, rooms
from chatd.errors import ChatError
from chatd.metrics import Metrics
from chatd.node import Node
from chatd.redisconn import RedisConn
from chatd.scripts import Scripts

OWNER, ADMIN, MEMBER, OUTSIDER, NEW = "owner1", "admin1", "member1", "outsider1", "new1"


class SlotCheckedScripts(Scripts):
    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        assert len({key_slot(k.encode()) for k in keys}) == 1, (name, keys)
        return await super().run(name, keys, args)


@pytest.fixture
async def node(fake_redis_server: fakeredis.FakeServer) -> AsyncIterator[Node]:
    client = fakeredis.FakeAsyncRedis(server=fake_redis_server, decode_responses=True)
    settings = config.load(None, {}, {"limits.max_room_members": 5, "redis.partitions": 8})
    metrics = Metrics()
    # As on a cluster, where a partition's inboxes share its slot (keys.inbox_partition).
    node = Node(settings=settings, node_id="n-test",
                redis=RedisConn(cmd=client, raw=client, reader=client, is_cluster=True),
                scripts=SlotCheckedScripts(client, metrics), metrics=metrics)
    for uid in (OWNER, ADMIN, MEMBER, OUTSIDER, NEW, "extra1", "extra2"):
        await client.hset(keys.user(uid), mapping={"username": uid})
    try:
        yield node
    finally:
        await client.aclose()


async def group(node: Node) -> str:
    """A group room: OWNER (owner), ADMIN (admin), MEMBER (member)."""
    room = await rooms.create_group(node, OWNER, "team", [MEMBER])
    await rooms.add_member(node, room["room_id"], OWNER, ADMIN, "admin")
    return str(room["room_id"])


async def pending(node: Node, room_id: str) -> list[dict[str, str]]:
    p = keys.partition_of(room_id, node.partitions)
    return [f for _, f in await node.redis.cmd.xrange(keys.index_pending(p))]


async def code_of(call: Any) -> str:
    with pytest.raises(ChatError) as info:
        await call
    return info.value.code


# --- creation ---------------------------------------------------------------------

async def test_create_group_writes_truth_index_and_clears_intents(node: Node) -> None:
    room = await rooms.create_group(node, OWNER, "team", [MEMBER, MEMBER, OWNER])
    room_id = room["room_id"]
    assert len(room_id) >= 26  # 160 random bits, url-safe base64
    assert room["kind"] == "group" and room["name"] == "team" and room["created_by"] == OWNER
    assert [(m["user_id"], m["role"]) for m in room["members"]] == [(OWNER, "owner"),
                                                                     (MEMBER, "member")]
    assert await rooms.user_room_ids(node, OWNER) == [room_id]
    assert await rooms.user_room_ids(node, MEMBER) == [room_id]
    assert await rooms.user_room_ids(node, OUTSIDER) == []
    assert await pending(node, room_id) == []


async def test_create_group_validation(node: Node) -> None:
    assert await code_of(rooms.create_group(node, OWNER, "x", ["nobody"])) == "bad_request"
    assert await code_of(rooms.create_group(node, OWNER, "x", ["a}{b"])) == "bad_request"
    assert await code_of(rooms.create_group(node, OWNER, "", [])) == "bad_request"
    assert await code_of(rooms.create_group(node, OWNER, "n" * 101, [])) == "bad_request"
    too_many = [ADMIN, MEMBER, OUTSIDER, NEW, "extra1"]  # 5 + the owner > 5
    assert await code_of(rooms.create_group(node, OWNER, "x", too_many)) == "bad_request"
    assert await node.redis.cmd.keys("chatd:{*}:room:*") == []


async def test_new_members_are_notified(node: Node) -> None:
    await node.redis.cmd.hset(keys.user_nodes(MEMBER), "n-b", "1")
    room = await rooms.create_group(node, OWNER, "team", [MEMBER])
    [(_, notice)] = await node.redis.cmd.xrange(keys.control("n-b"))
    assert notice["k"] == "e" and notice["ev"] == "added" and notice["u"] == MEMBER
    assert notice["r"] == room["room_id"] and notice["s"] == "0"
    assert json.loads(notice["f"]) == {"type": "member", "room_id": room["room_id"],
                                       "event": "added", "user_id": MEMBER, "by": OWNER}


async def test_direct_room_is_one_per_pair(node: Node) -> None:
    first, created = await rooms.create_direct(node, OWNER, MEMBER)
    again, created_again = await rooms.create_direct(node, OWNER, MEMBER)
    reverse, created_reverse = await rooms.create_direct(node, MEMBER, OWNER)
    assert (created, created_again, created_reverse) == (True, False, False)
    assert first["room_id"] == again["room_id"] == reverse["room_id"]
    assert first["kind"] == "direct" and first["name"] is None
    assert [(m["user_id"], m["role"]) for m in first["members"]] == [(MEMBER, "member"),
                                                                      (OWNER, "member")]
    assert keys.partition_of(first["room_id"], 8) == keys.direct_pair_partition(OWNER, MEMBER, 8)
    other, _ = await rooms.create_direct(node, OWNER, ADMIN)
    assert other["room_id"] != first["room_id"]
    assert sorted(await rooms.user_room_ids(node, OWNER)) == sorted(
        [first["room_id"], other["room_id"]])


async def test_direct_room_validation(node: Node) -> None:
    assert await code_of(rooms.create_direct(node, OWNER, OWNER)) == "bad_request"
    assert await code_of(rooms.create_direct(node, OWNER, "nobody")) == "bad_request"


# --- roles ------------------------------------------------------------------------

@pytest.mark.parametrize(("actor", "role", "expected"), [
    (OWNER, "member", None), (OWNER, "admin", None), (ADMIN, "member", None),
    (ADMIN, "admin", "forbidden"), (MEMBER, "member", "forbidden"),
    (OUTSIDER, "member", "not_found"),
])
async def test_add_member_rules(node: Node, actor: str, role: str, expected: str | None) -> None:
    room_id = await group(node)
    call = rooms.add_member(node, room_id, actor, NEW, role)
    if expected is None:
        await call
        assert await rooms.require_member(node, room_id, NEW) == role
        assert await rooms.user_room_ids(node, NEW) == [room_id]
    else:
        assert await code_of(call) == expected
        assert await code_of(rooms.require_member(node, room_id, NEW)) == "not_found"


@pytest.mark.parametrize(("actor", "subject", "expected"), [
    (OWNER, MEMBER, None), (OWNER, ADMIN, None), (ADMIN, MEMBER, None),
    (MEMBER, MEMBER, None), (ADMIN, ADMIN, None), (OWNER, OWNER, None),
    (ADMIN, OWNER, "forbidden"), (MEMBER, ADMIN, "forbidden"), (MEMBER, OWNER, "forbidden"),
    (OWNER, OUTSIDER, "not_found"), (MEMBER, OUTSIDER, "forbidden"),
    (OUTSIDER, MEMBER, "not_found"), (OUTSIDER, OUTSIDER, "not_found"),
])
async def test_remove_member_rules(node: Node, actor: str, subject: str,
                                   expected: str | None) -> None:
    room_id = await group(node)
    call = rooms.remove_member(node, room_id, actor, subject)
    if expected is None:
        await call
        assert await code_of(rooms.require_member(node, room_id, subject)) == "not_found"
        assert await rooms.user_room_ids(node, subject) == []
        assert not await node.redis.cmd.sismember(keys.user_rooms(subject), room_id)
    else:
        assert await code_of(call) == expected


async def test_direct_membership_never_changes(node: Node) -> None:
    room, _ = await rooms.create_direct(node, OWNER, MEMBER)
    room_id = room["room_id"]
    assert await code_of(rooms.add_member(node, room_id, OWNER, NEW)) == "forbidden"
    assert await code_of(rooms.remove_member(node, room_id, OWNER, MEMBER)) == "forbidden"
    assert await code_of(rooms.remove_member(node, room_id, OWNER, OWNER)) == "forbidden"
    assert await code_of(rooms.add_member(node, room_id, OUTSIDER, NEW)) == "not_found"
    assert len((await rooms.get_room(node, room_id, OWNER))["members"]) == 2


async def test_add_member_edge_cases(node: Node) -> None:
    room_id = await group(node)
    assert await code_of(rooms.add_member(node, room_id, OWNER, "nobody")) == "bad_request"
    assert await code_of(rooms.add_member(node, room_id, OWNER, NEW, "owner")) == "bad_request"
    assert await code_of(rooms.add_member(node, "no-such-room", OWNER, NEW)) == "not_found"
    await rooms.add_member(node, room_id, OWNER, MEMBER, "admin")  # existing: no-op
    assert await rooms.require_member(node, room_id, MEMBER) == "member"
    await rooms.add_member(node, room_id, OWNER, NEW)
    await rooms.add_member(node, room_id, OWNER, OUTSIDER)  # 5 members: full
    assert await code_of(rooms.add_member(node, room_id, OWNER, "extra1")) == "conflict"


# --- events -----------------------------------------------------------------------

async def test_membership_changes_publish_member_events(node: Node) -> None:
    room_id = await group(node)
    p = keys.partition_of(room_id, node.partitions)
    cmd = node.redis.cmd
    await cmd.sadd(keys.room_nodes(p, room_id), "n-a")
    await cmd.hset(keys.room(p, room_id), "seq", 7)
    await cmd.hset(keys.user_nodes(NEW), "n-b", "1")
    await rooms.add_member(node, room_id, ADMIN, NEW)
    await rooms.add_member(node, room_id, ADMIN, NEW)  # no-op: no second event
    await rooms.remove_member(node, room_id, NEW, NEW)
    inbox = [f for _, f in await cmd.xrange(keys.inbox(p, "n-a"))]
    control = [f for _, f in await cmd.xrange(keys.control("n-b"))]
    assert inbox == control
    assert [(f["k"], f["r"], f["s"], f["u"], f["ev"]) for f in inbox] == [
        ("e", room_id, "7", NEW, "added"), ("e", room_id, "7", NEW, "removed")]
    assert [json.loads(f["f"]) for f in inbox] == [
        {"type": "member", "room_id": room_id, "event": "added", "user_id": NEW, "by": ADMIN},
        {"type": "member", "room_id": room_id, "event": "removed", "user_id": NEW, "by": NEW}]


# --- crash between the room side and the user side ---------------------------------

async def crash(*args: Any, **kwargs: Any) -> None:
    raise ConnectionError("node died between the two steps")


async def test_crash_after_add_is_repaired(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    room_id = await group(node)
    monkeypatch.setattr(rooms, "_settle", crash)
    with pytest.raises(ConnectionError):
        await rooms.add_member(node, room_id, OWNER, NEW)
    monkeypatch.undo()
    assert await rooms.require_member(node, room_id, NEW) == "member"  # the truth
    assert await rooms.user_room_ids(node, NEW) == []  # the index lags ...
    assert await pending(node, room_id) == [{"op": "add", "u": NEW, "r": room_id}]
    assert await rooms.repair_index(node, older_than_ms=60_000) == 0  # too recent to repair
    assert await rooms.repair_index(node, older_than_ms=0) == 1
    assert await rooms.user_room_ids(node, NEW) == [room_id]  # ... until the repair
    assert await pending(node, room_id) == []


async def test_crash_after_remove_never_shows_the_room(node: Node,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    room_id = await group(node)
    monkeypatch.setattr(rooms, "_settle", crash)
    with pytest.raises(ConnectionError):
        await rooms.remove_member(node, room_id, OWNER, MEMBER)
    monkeypatch.undo()
    cmd = node.redis.cmd
    assert await cmd.sismember(keys.user_rooms(MEMBER), room_id)  # stale index entry
    assert await code_of(rooms.get_room(node, room_id, MEMBER)) == "not_found"
    assert await code_of(rooms.require_member(node, room_id, MEMBER)) == "not_found"
    assert await rooms.list_rooms(node, MEMBER) == []
    assert not await cmd.sismember(keys.user_rooms(MEMBER), room_id)  # repaired on read
    assert await rooms.repair_index(node, older_than_ms=0) == 1
    assert await pending(node, room_id) == []


async def test_repair_follows_the_truth_not_the_intent(node: Node,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    room_id = await group(node)
    monkeypatch.setattr(rooms, "_settle", crash)
    with pytest.raises(ConnectionError):
        await rooms.add_member(node, room_id, OWNER, NEW)
    with pytest.raises(ConnectionError):
        await rooms.remove_member(node, room_id, OWNER, NEW)
    monkeypatch.undo()
    assert await rooms.repair_index(node, older_than_ms=0) == 2
    assert not await node.redis.cmd.sismember(keys.user_rooms(NEW), room_id)


async def test_index_step_converges_when_truth_changes_under_it(node: Node,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """A stale add lands after a removal: the read after the write puts it right."""
    room_id = await group(node)
    await rooms.remove_member(node, room_id, OWNER, MEMBER)
    assert await rooms._settle(node, MEMBER, room_id, member=True) is False
    assert not await node.redis.cmd.sismember(keys.user_rooms(MEMBER), room_id)


# --- views ------------------------------------------------------------------------

def message(room_id: str, seq: int, sender: str) -> str:
    return json.dumps({"room_id": room_id, "seq": seq, "sender_id": sender,
                       "client_msg_id": f"c{seq}", "body": f"b{seq}", "ts": 1000 + seq})


async def test_list_rooms_summary(node: Node) -> None:
    room_id = await group(node)
    empty, _ = await rooms.create_direct(node, MEMBER, OWNER)
    p = keys.partition_of(room_id, node.partitions)
    cmd = node.redis.cmd
    for seq, sender in enumerate([OWNER, MEMBER, OWNER, MEMBER, OWNER], start=1):
        await cmd.xadd(keys.room_log(p, room_id),
                       {"m": message(room_id, seq, sender), "u": sender, "t": 1000 + seq},
                       id=f"{seq}-0")
    await cmd.hset(keys.room(p, room_id), "seq", 5)
    await cmd.hset(keys.room_marks(p, room_id), "r:" + MEMBER, 1)
    listed = {r["room_id"]: r for r in await rooms.list_rooms(node, MEMBER)}
    summary = listed[room_id]
    assert (summary["last_seq"], summary["unread"]) == (5, 2)  # seqs 3 and 5, not own 2 and 4
    assert summary["last_message"] == json.loads(message(room_id, 5, OWNER))
    assert summary["members"] == (await rooms.get_room(node, room_id, MEMBER))["members"]
    direct = listed[empty["room_id"]]
    assert (direct["last_seq"], direct["unread"], direct["last_message"]) == (0, 0, None)
    owner_view = {r["room_id"]: r for r in await rooms.list_rooms(node, OWNER)}
    assert owner_view[room_id]["unread"] == 2  # nothing read: MEMBER's 2 and 4
    assert "last_seq" not in await rooms.get_room(node, room_id, MEMBER)
