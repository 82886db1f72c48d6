"""One WebSocket connection's outgoing side: per-room seq cursors and a bounded queue.

The handler task is the only reader of the socket. Fanout hands over frames
already encoded; while the socket keeps up (nothing queued, its write buffer
below the transport's high-water mark) a frame is written to the transport
at once, so delivering a message to N local sockets is N writes, not N task
switches. Otherwise it waits in a bounded queue that a writer task drains at
the socket's pace (the task exists only while there is a backlog). A full
queue is the slow-consumer signal: the connection is closed with 4009
(resume required) rather than skipping messages or growing without bound.

While a `WriteBatch` is open (an inbox batch or a page of the room log being
handed out), each connection's frames are joined into one write instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from chatd.metrics import Tally
from chatd.protocol import CLOSE_RESUME_REQUIRED, ws_text_frame

log = logging.getLogger("chatd.conn")

_CLOSE_HANDSHAKE_S = 5.0
_RECHECK_S = 0.01
# A connection's coalesced frames go out once this many bytes are waiting, so a
# batch never holds more per connection than a fraction of the write buffer.
CORK_MAX_BYTES = 16384


class Cursor:
    """Where a connection stands in one room: the next seq it must receive.

    While `filling`, frames wait in `backlog` until the gap before them has
    been read from the room's log, so nothing goes out of order.
    """

    __slots__ = ("backlog", "filling", "next")

    def __init__(self) -> None:
        self.next = 0
        self.filling = True  # a new cursor waits until its start position is known
        self.backlog: list[tuple[int, bytes]] = []


class WriteBatch:
    """While open, frames written to a connection wait and go out as one write per
    connection when it closes. A loopback write costs 15-20 us here whatever its
    size, and a node that fell behind reads hundreds of entries at once, several
    per room: one write per connection instead of one per frame is what lets it
    catch up. Opened only around synchronous loops, so nothing else writes meanwhile."""

    __slots__ = ("corked", "open")

    def __init__(self) -> None:
        self.open = False
        self.corked: list[Conn] = []

    def begin(self) -> None:
        self.open = True

    def end(self) -> None:
        self.open = False
        for conn in self.corked:
            conn.uncork()
        self.corked.clear()

    def __enter__(self) -> WriteBatch:
        self.begin()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


class Conn:
    __slots__ = ("_batch", "_cork", "_high_water", "_out", "_room_waiter", "_started",
                 "_task", "close_code", "cursors", "frames_out", "last_heard", "max_queue",
                 "ping_sent", "queue", "session_ends", "session_id", "user_id", "ws")

    def __init__(self, ws: web.WebSocketResponse, out: AbstractStreamWriter, user_id: str,
                 session_id: str, max_queue: int, frames_out: Tally | None = None,
                 batch: WriteBatch | None = None, session_ends: float = math.inf) -> None:
        """`out` is what `ws.prepare()` returned: the socket's transport and its drain.
        `batch` is the node's: while it is open, writes are coalesced. `session_ends`
        is when the session expires, on time.monotonic()'s clock."""
        self.ws = ws
        self._out = out
        self._batch = batch
        self._cork: bytearray | None = None
        transport = out.transport
        self._high_water = transport.get_write_buffer_limits()[1] if transport else 0
        self.user_id = user_id
        self.session_id = session_id
        self.session_ends = session_ends
        self.max_queue = max_queue
        self.cursors: dict[str, Cursor] = {}
        # A list, not a deque: empty it costs 56 bytes instead of 760 on every idle
        # connection; pop(0) moves at most send_queue_max pointers, on the slow path only.
        self.queue: list[bytes] = []
        self.close_code: int | None = None
        # Made only while a log read waits for the queue to shrink: an idle connection
        # should not carry an Event (and its deque) it never uses.
        self._room_waiter: asyncio.Future[None] | None = None
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self.frames_out = frames_out or Tally()
        # time.monotonic() (heartbeat.py): of the last frame from the client, of our last ping.
        self.last_heard = time.monotonic()
        self.ping_sent = 0.0

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def start(self) -> None:
        """Begin writing: frames pushed until now (the welcome first) go out in order, at
        once while the socket keeps up, so a connection that then stays idle never needs
        a writer task."""
        self._started = True
        while self.queue and self._write(self.queue[0]):
            self.queue.pop(0)
        if self.queue or self.close_code is not None:
            self._kick()

    def push(self, frame: bytes) -> None:
        if self.close_code is not None or self.ws.closed:
            return  # closing: a resuming client gets it from the log
        if not self.queue and self._started and self._write(frame):
            return
        if len(self.queue) >= self.max_queue:
            self.close(CLOSE_RESUME_REQUIRED)
            return
        self.queue.append(frame)
        self._kick()

    def _write(self, frame: bytes) -> bool:
        """Write now if the socket keeps up; False when the frame must wait."""
        transport = self._out.transport
        if transport is None or transport.is_closing() or \
                transport.get_write_buffer_size() > self._high_water:
            return False
        data = ws_text_frame(frame)
        if self._batch is None or not self._batch.open:
            transport.write(data)
        elif self._cork is None:
            self._cork = bytearray(data)
            self._batch.corked.append(self)
        else:
            self._cork += data
            if len(self._cork) >= CORK_MAX_BYTES:
                self.uncork()
        self.frames_out.value += 1
        return True

    def uncork(self) -> None:
        """Write what the open batch coalesced (`WriteBatch.end`, or a full cork)."""
        cork, self._cork = self._cork, None
        transport = self._out.transport
        if cork and transport is not None and not transport.is_closing():
            transport.write(cork)

    def control(self, frame: bytes) -> None:
        """Write a ping or pong now, ahead of anything queued: RFC 6455 lets control
        frames go between messages, and a backlog must not hold up a pong."""
        transport = self._out.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame)

    def drop(self) -> None:
        """The client stopped answering pings: end the connection without a close
        handshake it would not answer either. The reader sees the end and cleans up."""
        transport = self._out.transport
        if transport is not None:
            transport.abort()

    def _kick(self) -> None:
        if self._started and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._writer())

    def free(self) -> int:
        """How many more frames the queue takes before the connection must close."""
        return self.max_queue - len(self.queue)

    async def roomy(self) -> None:
        """Wait until the queue is at most half full, or the connection is closing: reading
        the room log (a resume, a gap) goes at the pace the client reads, rather than
        overflowing the queue with a page and closing a client that was keeping up."""
        while len(self.queue) > self.max_queue // 2 and self.close_code is None:
            if self._room_waiter is None:
                self._room_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room_waiter)

    def _made_room(self, *, ended: bool = False) -> None:
        waiter = self._room_waiter
        if waiter is not None and (ended or self.closing or
                                   len(self.queue) <= self.max_queue // 2):
            self._room_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def push_first(self, frame: bytes) -> None:
        """Before `start`: ahead of whatever was pushed already."""
        self.queue.insert(0, frame)

    def offer(self, room_id: str, seq: int, frame: bytes) -> bool:
        """Queue a room message in seq order. True means a gap opened: start a fill."""
        cur = self.cursors.get(room_id)
        if cur is None:
            return False
        if cur.filling:
            self._hold(cur, seq, frame)
            return False
        if seq < cur.next:
            return False
        if seq == cur.next:
            cur.next += 1
            self.push(frame)
            return False
        cur.filling = True
        self._hold(cur, seq, frame)
        return True

    def accept(self, cur: Cursor, seq: int, frame: bytes) -> None:
        """A frame read from the log while filling: in order by construction."""
        if seq < cur.next:
            return
        cur.next = seq + 1  # a higher seq means retention trimmed the ones before it
        self.push(frame)

    def drain_backlog(self, cur: Cursor) -> int | None:
        """Send what the backlog holds in order; returns the seq still missing, if any."""
        cur.backlog.sort(key=lambda item: item[0])
        for i, (seq, frame) in enumerate(cur.backlog):
            if seq < cur.next:
                continue
            if seq > cur.next:
                cur.backlog = cur.backlog[i:]
                return cur.next
            cur.next += 1
            self.push(frame)
        cur.backlog = []
        cur.filling = False
        return None

    def _hold(self, cur: Cursor, seq: int, frame: bytes) -> None:
        if len(cur.backlog) >= self.max_queue:
            self.close(CLOSE_RESUME_REQUIRED)
            return
        cur.backlog.append((seq, frame))

    def close(self, code: int, *, flush: bool = False) -> None:
        """Close from any task. With `flush` what is queued goes out first (a drain);
        without, it is dropped (a slow consumer must resume from the log anyway)."""
        if self.close_code is None:
            self.close_code = code
            if not flush:
                self.queue.clear()
            self._made_room()
            self._kick()

    async def closed(self, timeout_s: float) -> None:
        """Wait for the writer to finish a requested close."""
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout_s)

    async def stop(self) -> None:
        """End the writer. A requested close may finish its handshake first, so the
        client reads our close code rather than a dropped connection."""
        self._made_room(ended=True)  # a fill waiting for room finds the connection gone
        task = self._task
        if task is not None:
            if self.close_code is not None:
                await asyncio.wait([task], timeout=_CLOSE_HANDSHAKE_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.close_code is not None and not self.ws.closed:
            await self.ws.close(code=self.close_code)

    async def _writer(self) -> None:
        """Drain the backlog at the socket's pace, then end (push starts another)."""
        try:
            try:
                while self.queue:
                    if self._write(self.queue[0]):
                        self.queue.pop(0)
                        self._made_room()
                        continue
                    transport = self._out.transport
                    if transport is None or transport.is_closing():
                        return  # the peer is gone; the reader notices and cleans up
                    await self._out.drain()  # above the high-water mark: wait for the socket
                    if transport.get_write_buffer_size() > self._high_water:
                        # drain() waits only while the protocol is paused; never spin here.
                        await asyncio.sleep(_RECHECK_S)
            except (ConnectionError, RuntimeError):
                return
            if self.close_code is not None:
                await self.ws.close(code=self.close_code)
        finally:
            # A finished task kept here would cost every idle connection its Task and
            # coroutine (about 500 bytes); `stop` and `closed` hold their own reference.
            self._task = None
