"""Each lua/*.lua script on fakeredis: a fresh FakeServer per test (the `fake_redis` fixture).

Scripts are run the way chatd ships them (`chatd.scripts.sources()`: `_*.lua` libraries
prepended) with plain EVAL, on keys built by `chatd/keys.py`. Every call is checked to
stay inside one hash slot, the property that lets the same scripts run on a Cluster.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
from redis.crc import key_slot
from redis.exceptions import ResponseError

from chatd import keys
from chatd.scripts import sources

SOURCES = sources()

P = 3  # the partition every room of these tests lives in
ROOM = "room_a"
ALICE, BOB, CAROL, OUTSIDER = "alice", "bob", "carol", "mallory"
DAY_MS = 86_400_000
INBOX_MAX = 1000


async def run(r: fakeredis.FakeAsyncRedis, name: str, keys_: Sequence[str],
              args: Sequence[Any]) -> Any:
    assert len({key_slot(k.encode()) for k in keys_}) == 1, (name, keys_)
    return await r.eval(SOURCES[name], len(keys_), *keys_, *args)


async def error_of(r: fakeredis.FakeAsyncRedis, name: str, keys_: Sequence[str],
                   args: Sequence[Any]) -> str:
    with pytest.raises(ResponseError) as info:
        await run(r, name, keys_, args)
    return str(info.value)


def s(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


# --- take_token -----------------------------------------------------------------------------

BUCKET = keys.send_bucket(ALICE)


async def take(r: fakeredis.FakeAsyncRedis, rate: float, burst: int,
               cost: int = 1) -> list[int]:
    return list(await run(r, "take_token", [BUCKET], [rate, burst, cost]))


async def test_take_token_burst_then_refusal(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    for _ in range(5):
        assert await take(fake_redis, 1, 5) == [1, 0]
    ok, retry_after_ms = await take(fake_redis, 1, 5)
    assert ok == 0
    assert 0 < retry_after_ms <= 1000  # one token at 1/s
    ok, retry_after_ms = await take(fake_redis, 0.5, 5)
    assert ok == 0 and 1000 < retry_after_ms <= 2000  # slower refill, longer wait


async def test_take_token_refused_call_takes_nothing(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    # A request bigger than the whole bucket is refused and leaves it full.
    ok, retry_after_ms = await take(fake_redis, 1, 3, cost=5)
    assert ok == 0 and retry_after_ms > 0
    for _ in range(3):
        assert await take(fake_redis, 1, 3) == [1, 0]
    before = await fake_redis.hgetall(BUCKET)
    for _ in range(3):
        assert (await take(fake_redis, 1, 3))[0] == 0
    assert await fake_redis.hgetall(BUCKET) == before


async def test_take_token_refills_and_expires(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    assert await take(fake_redis, 2, 2) == [1, 0]
    assert await take(fake_redis, 2, 2) == [1, 0]
    assert (await take(fake_redis, 2, 2))[0] == 0
    await asyncio.sleep(1.1)  # 2/s: 2.2 tokens' worth, capped at the burst of 2
    assert await take(fake_redis, 2, 2) == [1, 0]
    assert await take(fake_redis, 2, 2) == [1, 0]
    assert (await take(fake_redis, 2, 2))[0] == 0
    tokens = float(await fake_redis.hget(BUCKET, "tokens"))
    assert 0 <= tokens < 1
    assert 0 < await fake_redis.pttl(BUCKET) <= 2 * 500 + 1000  # gone once it would be full


# --- release_lock / extend_lock -------------------------------------------------------------

LOCK = keys.JANITOR_LOCK


async def test_release_lock_only_by_the_owner(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await fake_redis.set(LOCK, "owner-token", px=10_000)
    assert await run(fake_redis, "release_lock", [LOCK], ["someone-else"]) == 0
    assert await fake_redis.get(LOCK) == b"owner-token"
    assert await run(fake_redis, "release_lock", [LOCK], ["owner-token"]) == 1
    assert await fake_redis.exists(LOCK) == 0
    assert await run(fake_redis, "release_lock", [LOCK], ["owner-token"]) == 0
    # A new holder's lock cannot be released by the old one.
    await fake_redis.set(LOCK, "new-token", px=10_000)
    assert await run(fake_redis, "release_lock", [LOCK], ["owner-token"]) == 0
    assert await fake_redis.get(LOCK) == b"new-token"


async def test_extend_lock_only_by_the_owner(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await fake_redis.set(LOCK, "owner-token", px=1000)
    assert await run(fake_redis, "extend_lock", [LOCK], ["someone-else", 60_000]) == 0
    assert 0 < await fake_redis.pttl(LOCK) <= 1000
    assert await run(fake_redis, "extend_lock", [LOCK], ["owner-token", 60_000]) == 1
    assert 1000 < await fake_redis.pttl(LOCK) <= 60_000
    await fake_redis.delete(LOCK)
    assert await run(fake_redis, "extend_lock", [LOCK], ["owner-token", 60_000]) == 0
    assert await fake_redis.exists(LOCK) == 0  # never re-creates a lost lock


# --- send_message ---------------------------------------------------------------------------


async def make_room(r: fakeredis.FakeAsyncRedis, room: str = ROOM,
                    nodes: Sequence[str] = ()) -> None:
    await r.hset(keys.room(P, room), mapping={"kind": "group", "seq": 0})
    await r.hset(keys.room_members(P, room), mapping={ALICE: "owner", BOB: "member",
                                                      CAROL: "member"})
    if nodes:
        await r.sadd(keys.room_nodes(P, room), *nodes)


async def send(r: fakeredis.FakeAsyncRedis, body: str, cmid: str, *, sender: str = ALICE,
               room: str = ROOM, retention: str = "maxlen",
               retention_value: int = 1_000_000) -> list[int]:
    result = await run(r, "send_message", [
        keys.room(P, room), keys.room_members(P, room), keys.room_log(P, room),
        keys.room_nodes(P, room), keys.inbox_prefix(P),
        keys.idempotency(P, room, sender, cmid),
    ], [room, sender, cmid, json.dumps(body, ensure_ascii=False), DAY_MS, retention,
        retention_value, INBOX_MAX])
    return [int(v) for v in result]


async def log_of(r: fakeredis.FakeAsyncRedis, room: str = ROOM) -> list[tuple[str, dict[
        str, str]]]:
    entries = await r.xrange(keys.room_log(P, room))
    return [(eid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for eid, fields in entries]


async def inbox_of(r: fakeredis.FakeAsyncRedis, node_id: str) -> list[dict[str, str]]:
    entries = await r.xrange(keys.inbox(P, node_id))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def test_send_assigns_consecutive_seqs(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis)
    results = [await send(fake_redis, f"hello {i}", f"c{i}", sender=(ALICE, BOB)[i % 2])
               for i in range(3)]
    assert [seq for seq, _, _ in results] == [1, 2, 3]
    assert all(dup == 0 for _, _, dup in results)
    timestamps = [ts for _, ts, _ in results]
    assert timestamps == sorted(timestamps) and timestamps[0] > 1_600_000_000_000
    assert await fake_redis.hget(keys.room(P, ROOM), "seq") == b"3"


async def test_send_log_entry(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis)
    body = 'quotes " and \\ backslash, \u00e9t\u00e9, \U0001f600, newline\n'
    seq, ts, _ = await send(fake_redis, body, "c-1")
    [(entry_id, fields)] = await log_of(fake_redis)
    assert entry_id == f"{seq}-0" == "1-0"
    message = json.loads(fields["m"])
    assert message == {"room_id": ROOM, "seq": 1, "sender_id": ALICE, "client_msg_id": "c-1",
                       "body": body, "ts": ts}
    assert fields["u"] == ALICE and int(fields["t"]) == ts
    await send(fake_redis, "second", "c-2", sender=BOB)
    assert [eid for eid, _ in await log_of(fake_redis)] == ["1-0", "2-0"]


async def test_send_duplicate_returns_the_original(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1"])
    seq1, ts1, dup1 = await send(fake_redis, "first", "same-id")
    await send(fake_redis, "other", "other-id")
    log_before = await log_of(fake_redis)
    inbox_before = await inbox_of(fake_redis, "n1")
    await asyncio.sleep(0.002)  # a new ts would differ
    assert await send(fake_redis, "first (retried)", "same-id") == [seq1, ts1, 1]
    assert dup1 == 0
    assert await log_of(fake_redis) == log_before  # not appended again
    assert await inbox_of(fake_redis, "n1") == inbox_before  # not delivered again
    assert await fake_redis.hget(keys.room(P, ROOM), "seq") == b"2"
    # The same client_msg_id from another sender is another message.
    assert (await send(fake_redis, "bob's", "same-id", sender=BOB))[::2] == [3, 0]
    idem_ttl = await fake_redis.pttl(keys.idempotency(P, ROOM, ALICE, "same-id"))
    assert DAY_MS - 60_000 < idem_ttl <= DAY_MS


async def test_send_by_a_non_member_is_not_found(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1"])
    message = await error_of(fake_redis, "send_message", [
        keys.room(P, ROOM), keys.room_members(P, ROOM), keys.room_log(P, ROOM),
        keys.room_nodes(P, ROOM), keys.inbox_prefix(P),
        keys.idempotency(P, ROOM, OUTSIDER, "x"),
    ], [ROOM, OUTSIDER, "x", '"hi"', DAY_MS, "maxlen", 1000, INBOX_MAX])
    assert message.startswith("CHATD_NOT_FOUND")
    with pytest.raises(ResponseError, match=r"^CHATD_NOT_FOUND"):
        await send(fake_redis, "hi", "y", room="no_such_room")
    assert await fake_redis.hget(keys.room(P, ROOM), "seq") == b"0"
    assert await log_of(fake_redis) == []
    assert await inbox_of(fake_redis, "n1") == []
    assert await fake_redis.exists(keys.idempotency(P, ROOM, OUTSIDER, "x")) == 0


async def test_send_fans_out_to_each_interested_node(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1", "n2"])
    await make_room(fake_redis, room="room_b")  # nobody interested
    seq, ts, _ = await send(fake_redis, "to everyone", "c1")
    await send(fake_redis, "nobody listens", "c2", room="room_b")
    for node_id in ("n1", "n2"):
        [entry] = await inbox_of(fake_redis, node_id)
        assert set(entry) == {"k", "r", "s", "f"}
        assert entry["k"] == "m" and entry["r"] == ROOM and entry["s"] == str(seq)
        frame = json.loads(entry["f"])
        assert frame == {"type": "message", "room_id": ROOM, "seq": seq, "sender_id": ALICE,
                         "client_msg_id": "c1", "body": "to everyone", "ts": ts}
    assert await fake_redis.exists(keys.inbox(P, "n3")) == 0
    await send(fake_redis, "again", "c3")
    assert [e["s"] for e in await inbox_of(fake_redis, "n1")] == ["1", "2"]
    assert [e["s"] for e in await inbox_of(fake_redis, "n2")] == ["1", "2"]
    assert len(await fake_redis.keys(keys.inbox_prefix(P) + "*")) == 2


async def test_send_with_the_bucket_takes_a_token_or_refuses(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    """On a standalone Redis the send script takes the sender's token itself."""
    await make_room(fake_redis)
    bucket = keys.send_bucket(ALICE)

    async def send_limited(cmid: str) -> Any:
        return await fake_redis.eval(sources()["send_message"], 7, *[
            keys.room(P, ROOM), keys.room_members(P, ROOM), keys.room_log(P, ROOM),
            keys.room_nodes(P, ROOM), keys.inbox_prefix(P),
            keys.idempotency(P, ROOM, ALICE, cmid), bucket,
        ], ROOM, ALICE, cmid, json.dumps("hi"), DAY_MS, "maxlen", 1_000_000, INBOX_MAX,
            0.001, 2)

    assert [int(v) for v in await send_limited("a")][::2] == [1, 0]
    assert [int(v) for v in await send_limited("b")][::2] == [2, 0]
    with pytest.raises(ResponseError, match=r"^CHATD_RATE_LIMITED \d+$"):
        await send_limited("c")
    assert len(await log_of(fake_redis)) == 2  # the refused one stored nothing
    # A duplicate is answered even with the bucket empty.
    assert [int(v) for v in await send_limited("a")][::2] == [1, 1]


async def test_send_max_age_trims_old_entries(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis)
    for i in range(3):
        await send(fake_redis, f"old {i}", f"old{i}", retention="max_age",
                   retention_value=150)
    assert len(await log_of(fake_redis)) == 3  # nothing is old yet
    await asyncio.sleep(0.3)
    seq, _, _ = await send(fake_redis, "new", "new", retention="max_age", retention_value=150)
    assert seq == 4  # seqs keep counting: trimming never renumbers
    assert [eid for eid, _ in await log_of(fake_redis)] == ["4-0"]


async def test_send_max_age_keeps_young_entries(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis)
    for i in range(3):
        await send(fake_redis, f"m{i}", f"m{i}", retention="max_age", retention_value=60_000)
    assert [eid for eid, _ in await log_of(fake_redis)] == ["1-0", "2-0", "3-0"]


async def test_send_max_age_catches_up_with_a_backlog(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    """More expired entries than one send trims: every later send trims some more."""
    await make_room(fake_redis)
    for i in range(20):
        await send(fake_redis, f"old {i}", f"old{i}", retention="max_age", retention_value=150)
    await asyncio.sleep(0.3)
    for i in range(3):
        await send(fake_redis, f"new {i}", f"new{i}", retention="max_age", retention_value=150)
    remaining = [eid for eid, _ in await log_of(fake_redis)]
    assert remaining[-3:] == ["21-0", "22-0", "23-0"]
    assert len(remaining) < 23
    for i in range(3, 8):  # each send trims a bounded head: a few more clear the backlog
        await send(fake_redis, f"new {i}", f"new{i}", retention="max_age", retention_value=150)
    assert [eid for eid, _ in await log_of(fake_redis)] == [f"{n}-0" for n in range(21, 29)]


# --- mark_seen ------------------------------------------------------------------------------


async def mark(r: fakeredis.FakeAsyncRedis, user: str, kind: str, seq: int) -> list[int]:
    result = await run(r, "mark_seen", [
        keys.room(P, ROOM), keys.room_members(P, ROOM), keys.room_marks(P, ROOM),
        keys.room_nodes(P, ROOM), keys.inbox_prefix(P),
    ], [ROOM, user, kind, seq, INBOX_MAX])
    return [int(v) for v in result]


async def receipts(r: fakeredis.FakeAsyncRedis, node_id: str = "n1") -> list[dict[str, Any]]:
    out = []
    for entry in await inbox_of(r, node_id):
        assert entry["k"] == "r" and entry["r"] == ROOM
        frame = json.loads(entry["f"])
        assert frame["type"] == "receipt" and frame["room_id"] == ROOM
        assert frame["user_id"] == entry["u"]
        out.append(frame)
    return out


async def test_mark_seen_moves_forward_only(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1"])
    await fake_redis.hset(keys.room(P, ROOM), "seq", 5)
    assert await mark(fake_redis, BOB, "delivered", 3) == [1, 3, 0]
    assert await mark(fake_redis, BOB, "delivered", 2) == [0, 3, 0]
    assert await mark(fake_redis, BOB, "delivered", 3) == [0, 3, 0]
    assert await mark(fake_redis, BOB, "read", 2) == [1, 3, 2]
    assert await mark(fake_redis, BOB, "read", 1) == [0, 3, 2]
    assert await mark(fake_redis, BOB, "delivered", 0) == [0, 3, 2]
    marks = await fake_redis.hgetall(keys.room_marks(P, ROOM))
    assert marks == {b"d:bob": b"3", b"r:bob": b"2"}


async def test_mark_seen_read_implies_delivered(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1"])
    await fake_redis.hset(keys.room(P, ROOM), "seq", 5)
    assert await mark(fake_redis, CAROL, "read", 4) == [1, 4, 4]
    assert await mark(fake_redis, CAROL, "delivered", 4) == [0, 4, 4]
    assert await mark(fake_redis, CAROL, "delivered", 5) == [1, 5, 4]
    [first, second] = await receipts(fake_redis)
    assert (first["delivered_seq"], first["read_seq"]) == (4, 4)
    assert (second["delivered_seq"], second["read_seq"]) == (5, 4)


async def test_mark_seen_above_last_seq_is_bad_request(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1"])
    await fake_redis.hset(keys.room(P, ROOM), "seq", 5)
    for kind in ("delivered", "read"):
        message = await error_of(fake_redis, "mark_seen", [
            keys.room(P, ROOM), keys.room_members(P, ROOM), keys.room_marks(P, ROOM),
            keys.room_nodes(P, ROOM), keys.inbox_prefix(P),
        ], [ROOM, BOB, kind, 6, INBOX_MAX])
        assert message.startswith("CHATD_BAD_REQUEST")
    assert await mark(fake_redis, BOB, "read", 5) == [1, 5, 5]  # the last seq itself is fine
    assert await fake_redis.hgetall(keys.room_marks(P, ROOM)) == {b"d:bob": b"5",
                                                                  b"r:bob": b"5"}
    assert len(await receipts(fake_redis)) == 1


async def test_mark_seen_by_a_non_member_is_not_found(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1"])
    await fake_redis.hset(keys.room(P, ROOM), "seq", 5)
    message = await error_of(fake_redis, "mark_seen", [
        keys.room(P, ROOM), keys.room_members(P, ROOM), keys.room_marks(P, ROOM),
        keys.room_nodes(P, ROOM), keys.inbox_prefix(P),
    ], [ROOM, OUTSIDER, "read", 1, INBOX_MAX])
    assert message.startswith("CHATD_NOT_FOUND")
    assert await fake_redis.exists(keys.room_marks(P, ROOM)) == 0


async def test_mark_seen_receipt_only_when_moved(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await make_room(fake_redis, nodes=["n1", "n2"])
    await fake_redis.hset(keys.room(P, ROOM), "seq", 5)
    await mark(fake_redis, BOB, "delivered", 2)
    await mark(fake_redis, BOB, "delivered", 1)  # no move
    await mark(fake_redis, BOB, "read", 2)
    await mark(fake_redis, BOB, "read", 2)  # no move
    await mark(fake_redis, ALICE, "read", 1)
    for node_id in ("n1", "n2"):
        frames = await receipts(fake_redis, node_id)
        assert [(f["user_id"], f["delivered_seq"], f["read_seq"]) for f in frames] == [
            (BOB, 2, 0), (BOB, 2, 2), (ALICE, 1, 1)]


# --- interest -------------------------------------------------------------------------------


async def interest(r: fakeredis.FakeAsyncRedis, node_id: str, room: str, op: str) -> int:
    return int(await run(r, "interest", [keys.room_nodes(P, room), keys.node_rooms(P, node_id)],
                         [node_id, room, op]))


async def assert_consistent(r: fakeredis.FakeAsyncRedis, nodes: Sequence[str],
                            rooms: Sequence[str]) -> set[tuple[str, str]]:
    by_room = {(n.decode(), room) for room in rooms
               for n in await r.smembers(keys.room_nodes(P, room))}
    by_node = {(node, rm.decode()) for node in nodes
               for rm in await r.smembers(keys.node_rooms(P, node))}
    assert by_room == by_node
    return by_room


async def test_interest_add_remove(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    assert await interest(fake_redis, "n1", "r1", "add") == 1
    assert await interest(fake_redis, "n1", "r1", "add") == 0
    assert await interest(fake_redis, "n1", "r2", "add") == 1
    assert await interest(fake_redis, "n2", "r1", "add") == 1
    assert await assert_consistent(fake_redis, ["n1", "n2"], ["r1", "r2"]) == {
        ("n1", "r1"), ("n1", "r2"), ("n2", "r1")}
    assert await interest(fake_redis, "n1", "r1", "remove") == 1
    assert await interest(fake_redis, "n1", "r1", "remove") == 0
    assert await assert_consistent(fake_redis, ["n1", "n2"], ["r1", "r2"]) == {
        ("n1", "r2"), ("n2", "r1")}


async def test_interest_random_ops_keep_both_sets_consistent(
        fake_redis: fakeredis.FakeAsyncRedis) -> None:
    rng = random.Random(7)
    nodes, rooms = ["n1", "n2", "n3"], ["r1", "r2", "r3", "r4"]
    model: set[tuple[str, str]] = set()
    for _ in range(120):
        node, room, op = rng.choice(nodes), rng.choice(rooms), rng.choice(["add", "remove"])
        changed = await interest(fake_redis, node, room, op)
        before = set(model)
        if op == "add":
            model.add((node, room))
        else:
            model.discard((node, room))
        assert changed == int(model != before)
    assert await assert_consistent(fake_redis, nodes, rooms) == model


# --- presence_conn --------------------------------------------------------------------------


async def presence(r: fakeredis.FakeAsyncRedis, node_id: str, op: str,
                   limit: int = 3, user: str = ALICE) -> int:
    edge, last_seen = await run(r, "presence_conn",
                                [keys.user_nodes(user), keys.user_presence(user)],
                                [node_id, op, limit])
    assert int(await r.hget(keys.user_presence(user), "last_seen")) == last_seen
    return int(edge)


async def counts(r: fakeredis.FakeAsyncRedis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await r.hgetall(keys.user_nodes(ALICE))).items()}


async def test_presence_open_close_edges(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    assert await presence(fake_redis, "n1", "open") == 1  # came online
    assert await presence(fake_redis, "n1", "open") == 0
    assert await presence(fake_redis, "n2", "open") == 0
    assert await counts(fake_redis) == {"n1": 2, "n2": 1}
    assert await presence(fake_redis, "n1", "close") == 0
    assert await presence(fake_redis, "n2", "close") == 0
    assert await counts(fake_redis) == {"n1": 1}
    assert await presence(fake_redis, "n1", "close") == -1  # went offline
    assert await counts(fake_redis) == {}
    assert await fake_redis.hexists(keys.user_presence(ALICE), "last_seen")
    assert await presence(fake_redis, "n2", "open") == 1  # online again


async def test_presence_drop_forgets_a_node(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    for node_id in ("n1", "n1", "n2"):
        await presence(fake_redis, node_id, "open", limit=10)
    assert await presence(fake_redis, "n1", "drop") == 0  # still online through n2
    assert await counts(fake_redis) == {"n2": 1}
    assert await presence(fake_redis, "n2", "drop") == -1
    assert await counts(fake_redis) == {}
    assert await presence(fake_redis, "n2", "drop") == 0  # already offline: no second edge


async def test_presence_limit_is_too_many(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    for node_id in ("n1", "n2", "n2"):
        await presence(fake_redis, node_id, "open", limit=3)
    for node_id in ("n1", "n3"):  # the limit spans every node
        message = await error_of(fake_redis, "presence_conn",
                                 [keys.user_nodes(ALICE), keys.user_presence(ALICE)],
                                 [node_id, "open", 3])
        assert message.startswith("CHATD_TOO_MANY")
    assert await counts(fake_redis) == {"n1": 1, "n2": 2}  # the refused open counts nothing
    await presence(fake_redis, "n2", "close")
    assert await presence(fake_redis, "n3", "open") == 0  # room again after a close
    assert await presence(fake_redis, "n3", "open", user=BOB) == 1  # per user


async def test_presence_last_seen_kept_offline(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await presence(fake_redis, "n1", "open")
    await asyncio.sleep(0.01)
    edge, offline_at = await run(fake_redis, "presence_conn",
                                 [keys.user_nodes(ALICE), keys.user_presence(ALICE)],
                                 ["n1", "close", 3])
    assert edge == -1
    assert int(await fake_redis.hget(keys.user_presence(ALICE), "last_seen")) == offline_at


# --- node_heartbeat -------------------------------------------------------------------------


async def beat(r: fakeredis.FakeAsyncRedis, node_id: str, mode: str) -> tuple[int, int]:
    ok, now = await run(r, "node_heartbeat", [keys.NODES], [node_id, mode])
    return int(ok), int(now)


async def test_node_heartbeat(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    ok, joined_at = await beat(fake_redis, "n1", "join")
    assert ok == 1
    assert await fake_redis.zscore(keys.NODES, "n1") == joined_at
    await asyncio.sleep(0.005)
    ok, beat_at = await beat(fake_redis, "n1", "beat")
    assert ok == 1 and beat_at > joined_at
    assert await fake_redis.zscore(keys.NODES, "n1") == beat_at


async def test_node_heartbeat_fails_after_removal(fake_redis: fakeredis.FakeAsyncRedis) -> None:
    await beat(fake_redis, "n1", "join")
    await beat(fake_redis, "n2", "join")
    await fake_redis.zrem(keys.NODES, "n1")  # what the janitor does to a silent node
    assert (await beat(fake_redis, "n1", "beat"))[0] == 0
    assert await fake_redis.zscore(keys.NODES, "n1") is None  # not silently re-registered
    assert (await beat(fake_redis, "n2", "beat"))[0] == 1
    assert (await beat(fake_redis, "n1", "join"))[0] == 1  # joining again is explicit
    assert (await beat(fake_redis, "n1", "beat"))[0] == 1
    assert (await beat(fake_redis, "never-joined", "beat"))[0] == 0
