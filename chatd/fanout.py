"""The node-local side of fanout: which local connections are in which room.

Inbox entries (read by `broker.py`) arrive here and become frames on local
sockets. Interest in a room is registered in Redis when its first local
connection appears and dropped when the last goes; a per-room lock orders
the two, so a join never trusts a registration that is being undone.

Joining is race-free by construction: register interest first, then read
the log position, then go live. Frames that arrive meanwhile wait in the
cursor's backlog; a gap is filled from the room's log (XRANGE) before
anything later goes out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping

from redis.exceptions import RedisError

from chatd import keys
from chatd.conn import Conn, Cursor, WriteBatch
from chatd.errors import ChatError
from chatd.logs import error_text
from chatd.node import Node
from chatd.protocol import CLOSE_RESUME_REQUIRED, CLOSE_UNAUTHORIZED, message_frame

log = logging.getLogger("chatd.fanout")

_PAGE = 200


class Fanout:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.rooms: dict[str, set[Conn]] = {}
        # A list, not a set: most users hold one connection per node, and a one-item
        # list costs 64 bytes where a set costs 216.
        self.users: dict[str, list[Conn]] = {}
        self._interested: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._presence_seen: dict[str, set[Conn]] = {}
        # Shared by every local connection: open while a batch of frames is handed out.
        self.batch = WriteBatch()

    # --- connections -----------------------------------------------------------

    def add_conn(self, conn: Conn) -> bool:
        """Track a connection; True when it is the user's first on this node."""
        conns = self.users.get(conn.user_id)
        if conns is None:
            self.users[conn.user_id] = [conn]
            return True
        conns.append(conn)
        return False

    def remove_conn(self, conn: Conn) -> bool:
        """Forget a connection; True when it was the user's last on this node."""
        for room_id in list(conn.cursors):
            self.leave(conn, room_id)
        conns = self.users.get(conn.user_id)
        if conns is None or conn not in conns:
            return False
        conns.remove(conn)
        if conns:
            return False
        del self.users[conn.user_id]
        return True

    def all_conns(self) -> list[Conn]:
        return [c for conns in self.users.values() for c in conns]

    # --- joining and leaving rooms ---------------------------------------------

    async def join(self, conn: Conn, room_ids: list[str]) -> None:
        """Subscribe before reading positions: frames from now on wait in the backlog."""
        for room_id in room_ids:
            self._subscribe(conn, room_id)
        await asyncio.gather(*(self._ensure_interest(r) for r in room_ids))

    def _subscribe(self, conn: Conn, room_id: str) -> None:
        conn.cursors[room_id] = Cursor()
        self.rooms.setdefault(room_id, set()).add(conn)

    def go_live(self, conn: Conn, room_id: str, next_seq: int, last_seq: int) -> None:
        """Start sending from `next_seq`; read the log first when it is behind `last_seq`."""
        cur = conn.cursors.get(room_id)
        if cur is None:
            return
        cur.next = next_seq
        if next_seq <= last_seq:
            self.node.spawn(lambda: self._fill(conn, room_id, cur, last_seq))
        elif conn.drain_backlog(cur) is not None:
            self.node.spawn(lambda: self._fill(conn, room_id, cur, None))

    def leave(self, conn: Conn, room_id: str) -> None:
        conn.cursors.pop(room_id, None)
        conns = self.rooms.get(room_id)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self.rooms[room_id]
            self.node.spawn(lambda: self._drop_interest(room_id), retry=True)

    async def _ensure_interest(self, room_id: str) -> None:
        if room_id in self._interested:
            return
        async with self._lock(room_id):
            if room_id in self._interested:
                return
            await self._interest(room_id, "add")
            self._interested.add(room_id)

    async def _drop_interest(self, room_id: str) -> None:
        """Retried by the caller until it succeeds: a stale interest costs traffic forever."""
        async with self._lock(room_id):
            if room_id in self.rooms:
                return  # a connection came back: its join registers (again) under this lock
            # Forget first: a join that runs while the removal is in flight must
            # register again instead of trusting an interest about to vanish.
            self._interested.discard(room_id)
            await self._interest(room_id, "remove")
        lock = self._locks.get(room_id)
        if lock is not None and not lock.locked():
            del self._locks[room_id]

    async def _interest(self, room_id: str, op: str) -> None:
        p = keys.partition_of(room_id, self.node.partitions)
        await self.node.scripts.run(
            "interest", [keys.room_nodes(p, room_id), keys.node_rooms(p, self.node.node_id)],
            [self.node.node_id, room_id, op])

    def _lock(self, room_id: str) -> asyncio.Lock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock

    def forget_interest(self) -> None:
        """After the janitor removed this node's interest (we were presumed dead)."""
        self._interested.clear()

    # --- gap filling ----------------------------------------------------------

    def _start_fill(self, conn: Conn, room_id: str) -> None:
        cur = conn.cursors[room_id]
        self.node.spawn(lambda: self._fill(conn, room_id, cur, None))

    async def _fill(self, conn: Conn, room_id: str, cur: Cursor, upto: int | None) -> None:
        try:
            while conn.cursors.get(room_id) is cur and not conn.closing:
                target = upto if upto is not None else min(s for s, _ in cur.backlog) - 1
                upto = None
                await self._read_log(conn, room_id, cur, target)
                if conn.drain_backlog(cur) is None:
                    return
        except (ChatError, RedisError, OSError, RuntimeError) as e:
            # RuntimeError: redis-py (cluster) may close a connection under a command in
            # flight during a failover; uncaught, this cursor would stay "filling" for ever.
            # Without the log we cannot promise "no gap": ask the client to resume.
            log.warning("gap fill failed", extra={"room_id": room_id, "error": error_text(e)})
            conn.close(CLOSE_RESUME_REQUIRED)

    async def _read_log(self, conn: Conn, room_id: str, cur: Cursor, target: int) -> None:
        p = keys.partition_of(room_id, self.node.partitions)
        log_key = keys.room_log(p, room_id)
        while cur.next <= target and not conn.closing and conn.cursors.get(room_id) is cur:
            await conn.roomy()  # backpressure: a page never overflows the queue by itself
            if conn.closing or conn.cursors.get(room_id) is not cur:
                return
            count = min(_PAGE, max(1, conn.free()))
            entries = await self.node.redis.log_range(log_key, f"{cur.next}-0", f"{target}-0",
                                                      count)
            taken = 0
            with self.batch:
                for entry_id, fields in entries:
                    if conn.free() <= 0:  # other rooms' fills took the room meanwhile
                        break
                    conn.accept(cur, int(entry_id.split(b"-", 1)[0]),
                                message_frame(fields[b"m"]))
                    taken += 1
            if taken == len(entries) < count:
                cur.next = max(cur.next, target + 1)  # trimmed by retention: gone for everyone

    # --- inbox entries --------------------------------------------------------

    def handle(self, fields: Mapping[bytes, bytes], *, control: bool = False) -> None:
        """Dispatch one inbox entry (`control`: it came from the node's control inbox)."""
        kind = fields.get(b"k")
        if kind == b"m":
            room_id = fields[b"r"].decode()
            seq = int(fields[b"s"])
            frame = fields[b"f"]
            for conn in self.rooms.get(room_id, ()):
                if conn.offer(room_id, seq, frame):
                    self._start_fill(conn, room_id)
        elif kind == b"r":
            self._to_room(fields[b"r"].decode(), fields[b"f"], skip_user=None)
        elif kind == b"t":
            self._to_room(fields[b"r"].decode(), fields[b"f"], skip_user=fields[b"u"].decode())
        elif kind == b"e":
            self._member_event(fields, from_room=not control)
        elif kind == b"p":
            self._presence(fields)
        elif kind == b"x":
            self._revoke(fields[b"u"].decode(), fields[b"sid"].decode())
        else:
            log.warning("unknown inbox entry", extra={"kind": repr(kind)})

    def _to_room(self, room_id: str, frame: bytes, skip_user: str | None) -> None:
        for conn in self.rooms.get(room_id, ()):
            if conn.user_id != skip_user:
                conn.push(frame)

    def _member_event(self, fields: Mapping[bytes, bytes], *, from_room: bool) -> None:
        """Both paths land here: the room inbox (in order with the room's messages,
        for the other members and for subject connections already in the room)
        and the control inbox (for a subject with no connection in the room yet).
        The subject's cursor state makes the pair idempotent."""
        room_id = fields[b"r"].decode()
        subject = fields[b"u"].decode()
        frame = fields[b"f"]
        added = fields[b"ev"] == b"added"
        if from_room:
            self._to_room(room_id, frame, skip_user=subject)
        for conn in list(self.users.get(subject, ())):
            if added and room_id not in conn.cursors:
                conn.push(frame)
                # Subscribed now, so the other path's copy of this event is a no-op.
                self._subscribe(conn, room_id)
                self.node.spawn(functools.partial(self._join_live, conn, room_id,
                                                  int(fields[b"s"]) + 1))
            elif not added and room_id in conn.cursors:
                self.leave(conn, room_id)
                conn.push(frame)

    async def _join_live(self, conn: Conn, room_id: str, next_seq: int) -> None:
        try:
            await self._ensure_interest(room_id)
            p = keys.partition_of(room_id, self.node.partitions)
            last = int(await self.node.redis.cmd.hget(keys.room(p, room_id), "seq") or 0)
        except (ChatError, RedisError, OSError, RuntimeError) as e:  # RuntimeError: see _fill
            log.warning("live join failed", extra={"room_id": room_id, "error": error_text(e)})
            conn.close(CLOSE_RESUME_REQUIRED)
            return
        self.go_live(conn, room_id, next_seq, last)

    def _presence(self, fields: Mapping[bytes, bytes]) -> None:
        # One change reaches a node once per partition of the user's rooms:
        # remember recent changes so each connection hears it once.
        user = fields[b"u"].decode()
        frame = fields[b"f"]
        event = f"{user}:{frame.decode()}"
        seen = self._presence_seen.get(event)
        if seen is None:
            seen = self._presence_seen[event] = set()
            if len(self._presence_seen) > 1024:
                del self._presence_seen[next(iter(self._presence_seen))]
        for room_id in fields[b"rs"].decode().split(","):
            for conn in self.rooms.get(room_id, ()):
                if conn.user_id != user and conn not in seen:
                    seen.add(conn)
                    conn.push(frame)

    def _revoke(self, user_id: str, session_id: str) -> None:
        for conn in list(self.users.get(user_id, ())):
            if conn.session_id == session_id:
                conn.close(CLOSE_UNAUTHORIZED)
