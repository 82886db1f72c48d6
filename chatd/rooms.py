"""Rooms: creation, membership, and each user's room index.

Two records describe membership, under different hash tags:

- the room's members hash (`{p}`, next to the room's log): **the truth**. Every
  room endpoint and every frame checks it, so a removed member loses the room
  at the moment the room-side script returns.
- the user's room index (`{u:<id>}`, a set of room ids): derived, used to list
  the user's rooms and to join them on connect.

On a cluster one script cannot write both, so each change runs in two steps:
the room-side script changes the members hash and appends an intent to the
partition's pending stream; then the user-side step updates the index and
deletes the intent. A crash between the two leaves the intent, and
`repair_index` (run by the janitor) finishes it. Reads repair too:
`user_room_ids` drops index entries the truth does not back.

The user-side step is a single SADD or SREM (already atomic and idempotent, so
no script), followed by a read of the truth, repeated until the two agree (see
`_settle`). That makes concurrent changes of one membership converge whatever
order their user-side steps land in.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

from chatd import control, keys
from chatd.errors import ChatError
from chatd.node import Node

Event = Literal["added", "removed"]
T = TypeVar("T")
R = TypeVar("R")

ROLES = ("owner", "admin", "member")
GRANTABLE_ROLES = ("admin", "member")

# Unread counts scan at most this many messages for the caller's own (room_view.lua).
UNREAD_SCAN_CAP = 1000
# Concurrent Redis calls for one request touching many rooms or users: bounded, because
# the client's connection pool refuses requests beyond its size instead of queueing them.
_WIDTH = 16
# Write-then-read rounds before the user-side step leaves the rest to the repair sweep;
# more than one is only needed while the same membership keeps changing.
_SETTLE_ROUNDS = 4
_REPAIR_BATCH = 500
_USERNAME_CACHE = 100_000


# --- reading -------------------------------------------------------------------

async def require_member(node: Node, room_id: str, user_id: str) -> str:
    """The user's role in the room; `not_found` whether the room is missing or not theirs."""
    role = None
    if keys.is_valid_id(room_id):
        p = keys.partition_of(room_id, node.partitions)
        role = await node.redis.cmd.hget(keys.room_members(p, room_id), user_id)
    if role is None:
        raise ChatError("not_found", "no such room")
    return str(role)


async def get_room(node: Node, room_id: str, user_id: str) -> dict[str, Any]:
    """The room object of PROTOCOL.md for a member; `not_found` for anyone else."""
    room, _ = await _view(node, room_id, user_id, summary=False)
    return room


async def list_rooms(node: Node, user_id: str) -> list[dict[str, Any]]:
    """The user's rooms with last_seq, unread and last_message, most recent activity first."""
    async def one(room_id: str) -> dict[str, Any] | None:
        try:
            room, extra = await _view(node, room_id, user_id, summary=True)
        except ChatError as e:
            if e.code != "not_found":
                raise
            return None  # removed since the index was read
        return room | extra

    rooms = [r for r in await _bounded(one, await user_room_ids(node, user_id)) if r]
    rooms.sort(key=_activity, reverse=True)
    return rooms


async def user_room_ids(node: Node, user_id: str) -> list[str]:
    """The rooms the user is a member of: the index, checked against the truth.

    An index entry the members hash does not back (a half-done removal) is
    dropped here rather than waiting for the repair sweep.
    """
    indexed = sorted(await node.redis.execute("SMEMBERS", keys.user_rooms(user_id)))

    async def backed(room_id: str) -> bool:
        if await _is_member(node, room_id, user_id):
            return True
        return await _settle(node, user_id, room_id, member=False) is True

    checks = await _bounded(backed, indexed)
    return [room_id for room_id, ok in zip(indexed, checks, strict=True) if ok]


async def _view(node: Node, room_id: str, user_id: str,
                *, summary: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    if not keys.is_valid_id(room_id):
        raise ChatError("not_found", "no such room")
    p = keys.partition_of(room_id, node.partitions)
    kind, name, created_at, created_by, flat, last_seq, unread, last = await node.scripts.run(
        "room_view",
        [keys.room(p, room_id), keys.room_members(p, room_id), keys.room_marks(p, room_id),
         keys.room_log(p, room_id)],
        [user_id, int(summary), UNREAD_SCAN_CAP])
    names = await usernames(node, [flat[i] for i in range(0, len(flat), 2)])
    members = sorted(({"user_id": flat[i], "role": flat[i + 1], "username": names.get(flat[i])}
                      for i in range(0, len(flat), 2)),
                     key=lambda m: (ROLES.index(m["role"]), m["user_id"]))
    room = {"room_id": room_id, "kind": kind, "name": name if kind == "group" else None,
            "created_at": int(created_at), "created_by": created_by, "members": members}
    extra = {"last_seq": int(last_seq), "unread": int(unread),
             "last_message": json.loads(last) if last else None}
    return room, extra


async def usernames(node: Node, user_ids: Sequence[str]) -> dict[str, str]:
    """user id -> username. Names never change, so a node remembers them."""
    cache = node.usernames
    missing = [u for u in user_ids if u not in cache]
    if missing:
        async with node.redis.cmd.pipeline(transaction=False) as pipe:
            for user_id in missing:
                pipe.hget(keys.user(user_id), "username")
            for user_id, name in zip(missing, await pipe.execute(), strict=True):
                if name is not None:
                    if len(cache) >= _USERNAME_CACHE:
                        del cache[next(iter(cache))]
                    cache[user_id] = name
    return {u: cache[u] for u in user_ids if u in cache}


def _activity(room: dict[str, Any]) -> int:
    last = room["last_message"]
    return int(last["ts"]) if last else int(room["created_at"])


# --- creating ----------------------------------------------------------------------

async def create_group(node: Node, creator: str, name: str,
                       member_ids: Sequence[str]) -> dict[str, Any]:
    """A new group room: the creator is its owner, the listed users its members."""
    if not 1 <= len(name) <= node.settings.limits.max_name_chars:
        raise ChatError("bad_request",
                        f"name must be 1 to {node.settings.limits.max_name_chars} characters")
    others = [m for m in dict.fromkeys(member_ids) if m != creator]
    if len(others) + 1 > node.settings.limits.max_room_members:
        raise ChatError("bad_request", f"a room has at most "
                        f"{node.settings.limits.max_room_members} members")
    await _require_users(node, others)
    await _require_room_space(node, [creator, *others])
    room_id = secrets.token_urlsafe(20)
    p = keys.partition_of(room_id, node.partitions)
    roles = {creator: "owner"} | {m: "member" for m in others}
    room, _ = await _create(node, p, room_id, "group", name, creator, roles, pair=None)
    return room


async def create_direct(node: Node, creator: str, other: str) -> tuple[dict[str, Any], bool]:
    """The one direct room of the pair, created if needed; True when this call created it.

    Exactly one room per pair, on any number of nodes, with no lock: the pair
    claim lives in partition `direct_pair_partition(a, b)`, and the new room id
    is drawn (rejection sampling, about P draws of 160 random bits) until the
    room falls in that same partition. The claim and the room then share a
    slot, so `create_room.lua` checks the claim and writes both in one atomic
    step, on a standalone server and on a cluster alike: of any number of
    concurrent calls exactly one creates, the others get its room id.
    """
    if other == creator:
        raise ChatError("bad_request", "a direct room needs another user than yourself")
    await _require_users(node, [other])
    p = keys.direct_pair_partition(creator, other, node.partitions)
    pair = keys.direct_pair(p, creator, other)
    if not await node.redis.cmd.exists(pair):  # the pair's room is theirs at any count
        await _require_room_space(node, [creator, other])
    room_id = secrets.token_urlsafe(20)
    while keys.partition_of(room_id, node.partitions) != p:
        room_id = secrets.token_urlsafe(20)
    return await _create(node, p, room_id, "direct", "", creator,
                         {creator: "member", other: "member"}, pair=pair)


async def _create(node: Node, p: int, room_id: str, kind: str, name: str, creator: str,
                  roles: dict[str, str], *, pair: str | None) -> tuple[dict[str, Any], bool]:
    room_keys = [keys.room(p, room_id), keys.room_members(p, room_id), keys.index_pending(p)]
    args = [room_id, kind, name, creator, *(x for item in roles.items() for x in item)]
    created, room_id, *entries = await node.scripts.run(
        "create_room", [*room_keys, *([pair] if pair else [])], args)
    if not created:
        # An existing room (or a retried call) still gets the index steps: idempotent, and
        # they finish a creation whose creator crashed before its own.
        entries = [None] * len(roles)

    async def index_and_notify(item: tuple[str, str | None]) -> None:
        user_id, entry = item
        await _index_step(node, p, room_id, user_id, member=True, entry=entry)
        if created:
            await _notify(node, room_id, 0, user_id, "added", by=creator)

    await _bounded(index_and_notify, zip(roles, entries, strict=True))
    return await get_room(node, room_id, creator), bool(created)


async def _require_users(node: Node, user_ids: Sequence[str]) -> None:
    ok = all(keys.is_valid_id(u) for u in user_ids)
    if ok and user_ids:
        ok = await node.redis.cmd.exists(*(keys.user(u) for u in user_ids)) == len(user_ids)
    if not ok:
        raise ChatError("bad_request", "unknown user id in members")


async def _require_room_space(node: Node, user_ids: Sequence[str]) -> None:
    """For a new room: each user may join one more."""
    full = await _full_users(node, user_ids)
    if full:
        raise ChatError("conflict", f"user {full[0]} is in the maximum number of rooms "
                        "(limits.max_rooms_per_user)")


async def _full_users(node: Node, user_ids: Sequence[str],
                      room_id: str | None = None) -> list[str]:
    """The users who may join no more rooms (`room_id`, if given, they may be in already).

    Every room of a user is joined again at each of its connections' welcome, and
    others choose the rooms a user is added to: without a cap, another account
    could make that user's every connection as costly as it liked. Read before the
    room side runs, so concurrent additions may pass it together."""
    cap = node.settings.limits.max_rooms_per_user
    async with node.redis.cmd.pipeline(transaction=False) as pipe:
        for user_id in user_ids:
            pipe.scard(keys.user_rooms(user_id))
            pipe.sismember(keys.user_rooms(user_id), room_id or "")
        replies = await pipe.execute()
    return [user_id for user_id, count, member
            in zip(user_ids, replies[::2], replies[1::2], strict=True)
            if count >= cap and not member]


# --- membership ------------------------------------------------------------------

async def add_member(node: Node, room_id: str, actor: str, subject: str,
                     role: str = "member") -> None:
    """Add `subject` to a group room; a no-op if it is a member already.

    Owner and admins add members; only the owner adds admins (`lua/_roles.lua`).
    """
    if role not in GRANTABLE_ROLES:
        raise ChatError("bad_request", "role must be 'member' or 'admin'")
    exists = keys.is_valid_id(subject) and bool(await node.redis.cmd.exists(keys.user(subject)))
    # Judged by the script after the actor's rights, so that it tells nobody else.
    full = exists and bool(await _full_users(node, [subject], room_id))
    added, seq, *entry = await _room_side(node, "add_member", room_id, actor, subject, "added",
                                          [role, int(exists),
                                           node.settings.limits.max_room_members, int(full)])
    if added:
        await _index_step(node, keys.partition_of(room_id, node.partitions), room_id, subject,
                          member=True, entry=entry[0])
        await _notify(node, room_id, seq, subject, "added", by=actor)


async def remove_member(node: Node, room_id: str, actor: str, subject: str) -> None:
    """Remove `subject` from a group room, or leave it when `subject` is the actor.

    Owner and admins remove members; only the owner removes admins; the owner
    is removed by nobody but itself, and a room whose owner left keeps its
    admins as managers. The members of a direct room never change.
    """
    seq, entry = await _room_side(node, "remove_member", room_id, actor, subject, "removed", [])
    await _index_step(node, keys.partition_of(room_id, node.partitions), room_id, subject,
                      member=False, entry=entry)
    await _notify(node, room_id, seq, subject, "removed", by=actor)


async def _room_side(node: Node, script: str, room_id: str, actor: str, subject: str,
                     event: Event, extra: list[Any]) -> Any:
    """Run a room-side membership script: it checks the rules, writes, records the intent
    and publishes the member event to the nodes interested in the room."""
    if not keys.is_valid_id(room_id):
        raise ChatError("not_found", "no such room")
    p = keys.partition_of(room_id, node.partitions)
    return await node.scripts.run(
        script,
        [keys.room(p, room_id), keys.room_members(p, room_id), keys.index_pending(p),
         keys.room_nodes(p, room_id), node.inbox_prefix(p)],
        [room_id, actor, subject, *extra, node.settings.fanout.inbox_max_len,
         member_frame(room_id, event, subject, actor)])


def member_frame(room_id: str, event: Event, user_id: str, by: str) -> str:
    return json.dumps({"type": "member", "room_id": room_id, "event": event,
                       "user_id": user_id, "by": by}, separators=(",", ":"))


async def _notify(node: Node, room_id: str, seq: int, user_id: str, event: Event,
                  *, by: str) -> None:
    """Tell the nodes holding the user's connections, after the index step (truth first)."""
    await control.notify_user(node, user_id, {
        "k": "e", "r": room_id, "s": str(seq), "u": user_id, "ev": event,
        "f": member_frame(room_id, event, user_id, by)})


# --- the user-side step and its repair -----------------------------------------------

async def _index_step(node: Node, p: int, room_id: str, user_id: str, *, member: bool,
                      entry: str | None) -> None:
    if await _settle(node, user_id, room_id, member=member) is not None and entry:
        await node.redis.cmd.xdel(keys.index_pending(p), entry)


async def _settle(node: Node, user_id: str, room_id: str, *, member: bool) -> bool | None:
    """Write `member` to the user's index, then read the truth, until they agree.

    Reading after our own write is what makes concurrent steps converge: the
    last room-side change is followed by its own index write, so whichever
    write lands last, the read that follows it sees the final truth and, if
    needed, writes it. Returns the membership settled on, or None when the truth
    kept changing for `_SETTLE_ROUNDS` rounds (the pending entry then stays for
    `repair_index`).
    """
    cmd = node.redis.cmd
    for _ in range(_SETTLE_ROUNDS):
        if member:
            await cmd.sadd(keys.user_rooms(user_id), room_id)
        else:
            await cmd.srem(keys.user_rooms(user_id), room_id)
        truth = await _is_member(node, room_id, user_id)
        if truth == member:
            return member
        member = truth
    return None


async def _is_member(node: Node, room_id: str, user_id: str) -> bool:
    p = keys.partition_of(room_id, node.partitions)
    return bool(await node.redis.execute("HEXISTS", keys.room_members(p, room_id), user_id))


async def repair_index(node: Node, older_than_ms: int) -> int:
    """Finish the user-side steps of intents older than `older_than_ms`; returns how many.

    An intent that old belongs to a step that crashed (or is very slow: redoing
    it is harmless, every step is idempotent and re-checks the truth). The index
    is set to what the members hash says now, not to what the intent said.
    """
    cmd = node.redis.cmd
    seconds, micros = await cmd.time()
    cutoff = str(seconds * 1000 + micros // 1000 - older_than_ms)
    repaired = 0
    for p in range(node.partitions):
        start = "-"
        while entries := await cmd.xrange(keys.index_pending(p), start, cutoff,
                                          count=_REPAIR_BATCH):
            await _bounded(functools.partial(_repair_entry, node, p), entries)
            repaired += len(entries)
            # Exclusive start: an entry whose truth kept changing stays for the next sweep.
            start = f"({entries[-1][0]}"
    return repaired


async def _repair_entry(node: Node, p: int, item: tuple[str, dict[str, str]]) -> None:
    entry, intent = item
    member = await _is_member(node, intent["r"], intent["u"])
    await _index_step(node, p, intent["r"], intent["u"], member=member, entry=entry)


async def _bounded(fn: Callable[[T], Awaitable[R]], items: Iterable[T]) -> list[R]:
    """`fn` over `items`, at most `_WIDTH` at a time, results in order."""
    gate = asyncio.Semaphore(_WIDTH)

    async def run(item: T) -> R:
        async with gate:
            return await fn(item)

    return list(await asyncio.gather(*(run(item) for item in items)))
