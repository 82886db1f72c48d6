"""chatd.conn.Conn ordering logic without a socket: offer / accept / drain_backlog keep
each room's frames in strictly increasing seq with no gap, and the queue bound closes
with 4009 (resume required) rather than skip. Most tests never start writing, so
frames stay in the queue; the last ones write to a recording transport."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from chatd.conn import CORK_MAX_BYTES, Conn, Cursor, WriteBatch
from chatd.protocol import CLOSE_RESUME_REQUIRED, ws_text_frame

ROOM = "room-a"
OTHER = "room-b"


def f(seq: int, room: str = ROOM) -> bytes:
    return f'{{"type":"message","room_id":"{room}","seq":{seq}}}'.encode()


def make(max_queue: int = 100, rooms: dict[str, int] | None = None) -> Conn:
    """A conn whose cursors are live (not filling) at the given next seqs."""
    dummy_ws: Any = SimpleNamespace(closed=False)
    no_socket: Any = SimpleNamespace(transport=None)
    conn = Conn(dummy_ws, no_socket, "user", "session", max_queue)
    for room_id, next_seq in (rooms or {ROOM: 1}).items():
        cur = Cursor()
        cur.next = next_seq
        cur.filling = False
        conn.cursors[room_id] = cur
    return conn


def test_new_cursor_waits_for_its_start() -> None:
    cur = Cursor()
    assert cur.filling and cur.backlog == []
    conn = make(rooms={})
    conn.cursors[ROOM] = cur
    assert conn.offer(ROOM, 5, f(5)) is False  # held, not sent, no fill requested
    assert list(conn.queue) == [] and cur.backlog == [(5, f(5))]
    cur.next = 5  # what go_live does once the position is known
    assert conn.drain_backlog(cur) is None
    assert list(conn.queue) == [f(5)] and not cur.filling and cur.next == 6


def test_in_order_frames_go_straight_out() -> None:
    conn = make()
    for seq in (1, 2, 3):
        assert conn.offer(ROOM, seq, f(seq)) is False
    assert list(conn.queue) == [f(1), f(2), f(3)]
    assert conn.cursors[ROOM].next == 4


def test_duplicates_and_old_frames_are_dropped() -> None:
    conn = make(rooms={ROOM: 3})
    assert conn.offer(ROOM, 1, f(1)) is False
    assert conn.offer(ROOM, 2, f(2)) is False
    assert conn.offer(ROOM, 3, f(3)) is False
    assert conn.offer(ROOM, 3, f(3)) is False
    assert conn.offer(ROOM, 2, f(2)) is False
    assert list(conn.queue) == [f(3)]
    assert conn.cursors[ROOM].next == 4 and not conn.cursors[ROOM].filling


def test_unknown_room_is_ignored() -> None:
    conn = make()
    assert conn.offer(OTHER, 1, f(1, OTHER)) is False
    assert list(conn.queue) == []
    assert OTHER not in conn.cursors


def test_gap_holds_and_asks_for_one_fill() -> None:
    conn = make()
    cur = conn.cursors[ROOM]
    assert conn.offer(ROOM, 1, f(1)) is False
    assert conn.offer(ROOM, 3, f(3)) is True  # seq 2 is missing: start a fill
    assert cur.filling
    # While filling, later frames (and repeats) are held, with no second fill request.
    assert conn.offer(ROOM, 4, f(4)) is False
    assert conn.offer(ROOM, 3, f(3)) is False
    assert list(conn.queue) == [f(1)]
    # Nothing may go out while 2 is missing.
    assert conn.drain_backlog(cur) == 2
    assert list(conn.queue) == [f(1)] and cur.filling
    # The fill reads 2 from the log, then the backlog drains in order, once each.
    conn.accept(cur, 2, f(2))
    assert conn.drain_backlog(cur) is None
    assert list(conn.queue) == [f(1), f(2), f(3), f(4)]
    assert not cur.filling and cur.backlog == [] and cur.next == 5
    # Live again.
    assert conn.offer(ROOM, 5, f(5)) is False
    assert list(conn.queue)[-1] == f(5)


def test_backlog_out_of_order_drains_sorted_and_keeps_the_rest_behind_a_new_gap() -> None:
    conn = make()
    cur = conn.cursors[ROOM]
    assert conn.offer(ROOM, 4, f(4)) is True
    for seq in (7, 3, 5, 2):
        assert conn.offer(ROOM, seq, f(seq)) is False
    conn.accept(cur, 1, f(1))
    assert conn.drain_backlog(cur) == 6  # 1..5 out, 6 still missing
    assert list(conn.queue) == [f(s) for s in (1, 2, 3, 4, 5)]
    assert cur.filling and [s for s, _ in cur.backlog] == [7]
    conn.accept(cur, 6, f(6))
    assert conn.drain_backlog(cur) is None
    assert list(conn.queue) == [f(s) for s in range(1, 8)]


def test_accept_skips_what_was_sent_already() -> None:
    conn = make(rooms={ROOM: 4})
    cur = conn.cursors[ROOM]
    cur.filling = True
    conn.accept(cur, 2, f(2))
    conn.accept(cur, 3, f(3))
    assert list(conn.queue) == []
    conn.accept(cur, 4, f(4))
    conn.accept(cur, 4, f(4))
    assert list(conn.queue) == [f(4)] and cur.next == 5


def test_rooms_are_independent() -> None:
    conn = make(rooms={ROOM: 1, OTHER: 10})
    assert conn.offer(ROOM, 2, f(2)) is True  # a gap in ROOM ...
    assert conn.offer(OTHER, 10, f(10, OTHER)) is False  # ... does not hold OTHER
    assert conn.offer(OTHER, 11, f(11, OTHER)) is False
    assert list(conn.queue) == [f(10, OTHER), f(11, OTHER)]
    assert conn.cursors[ROOM].filling and not conn.cursors[OTHER].filling


def test_full_queue_closes_4009_and_drops_the_rest() -> None:
    conn = make(max_queue=3)
    for seq in (1, 2, 3):
        conn.offer(ROOM, seq, f(seq))
    assert conn.close_code is None and len(conn.queue) == 3
    conn.offer(ROOM, 4, f(4))
    assert conn.close_code == CLOSE_RESUME_REQUIRED and conn.closing
    assert list(conn.queue) == []  # the client resumes from the log anyway
    conn.push(b'{"type":"pong"}')
    conn.offer(ROOM, 5, f(5))
    assert list(conn.queue) == []


def test_full_backlog_closes_4009() -> None:
    conn = make(max_queue=2)
    assert conn.offer(ROOM, 3, f(3)) is True
    conn.offer(ROOM, 4, f(4))
    assert conn.close_code is None
    conn.offer(ROOM, 5, f(5))
    assert conn.close_code == CLOSE_RESUME_REQUIRED


def test_close_keeps_the_first_code_and_flush_keeps_the_queue() -> None:
    conn = make()
    conn.push(b"a")
    conn.push(b"b")
    conn.close(1001, flush=True)
    assert conn.close_code == 1001 and list(conn.queue) == [b"a", b"b"]
    conn.close(CLOSE_RESUME_REQUIRED)
    assert conn.close_code == 1001
    conn.push(b"c")
    assert list(conn.queue) == [b"a", b"b"]


class RecordingTransport:
    """Stands in for the socket's transport: records writes, reports a buffer size."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 16_384, 65_536

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)


async def test_a_socket_that_keeps_up_gets_frames_at_once_and_in_order() -> None:
    transport = RecordingTransport()
    drained = asyncio.Event()

    async def drain() -> None:
        await drained.wait()
        transport.buffered = 0

    ws: Any = SimpleNamespace(closed=False)
    out: Any = SimpleNamespace(transport=transport, drain=drain)
    conn = Conn(ws, out, "user", "session", 10)
    conn.push(b"early")
    conn.push_first(b"welcome")
    assert transport.written == []  # nothing before start, and the welcome goes first
    conn.start()
    await asyncio.sleep(0)
    assert transport.written == [ws_text_frame(b"welcome"), ws_text_frame(b"early")]
    conn.push(b"now")  # written in push itself, no task involved
    assert transport.written[-1] == ws_text_frame(b"now") and not conn.queue
    transport.buffered = 70_000  # the client stopped reading: frames wait in the queue
    conn.push(b"late-1")
    conn.push(b"late-2")
    await asyncio.sleep(0)
    assert list(conn.queue) == [b"late-1", b"late-2"] and len(transport.written) == 3
    drained.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert transport.written[3:] == [ws_text_frame(b"late-1"), ws_text_frame(b"late-2")]
    assert not conn.queue


def test_text_frame_headers_follow_rfc_6455() -> None:
    for size, header in ((0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
                         (65_535, b"\x81\x7e\xff\xff"),
                         (65_536, b"\x81\x7f" + (65_536).to_bytes(8, "big"))):
        frame = ws_text_frame(b"x" * size)
        assert frame[:len(header)] == header and len(frame) == len(header) + size


def started(batch: WriteBatch | None = None) -> tuple[Conn, RecordingTransport]:
    """A started conn on a recording transport that keeps up."""
    transport = RecordingTransport()
    ws: Any = SimpleNamespace(closed=False)
    out: Any = SimpleNamespace(transport=transport)
    conn = Conn(ws, out, "user", "session", 10, batch=batch)
    conn.start()
    return conn, transport


def test_an_open_batch_joins_each_connections_frames_into_one_write() -> None:
    batch = WriteBatch()
    (a, a_out), (b, b_out) = started(batch), started(batch)
    batch.begin()
    for frame in (b"1", b"2", b"3"):
        a.push(frame)
    b.push(b"x")
    assert a_out.written == [] and b_out.written == []  # nothing until the batch ends
    batch.end()
    assert a_out.written == [ws_text_frame(b"1") + ws_text_frame(b"2") + ws_text_frame(b"3")]
    assert b_out.written == [ws_text_frame(b"x")]
    a.push(b"4")  # closed: straight out again
    assert a_out.written[-1] == ws_text_frame(b"4") and batch.corked == []


def test_without_a_batch_every_frame_is_its_own_write() -> None:
    conn, out = started()
    conn.push(b"1")
    conn.push(b"2")
    assert out.written == [ws_text_frame(b"1"), ws_text_frame(b"2")]


def test_a_full_cork_goes_out_before_the_batch_ends() -> None:
    batch = WriteBatch()
    conn, out = started(batch)
    big = b"y" * 6000
    batch.begin()
    for _ in range(3):  # the third takes the cork past CORK_MAX_BYTES
        conn.push(big)
    conn.push(b"z")
    assert out.written == [ws_text_frame(big) * 3]
    batch.end()
    assert out.written == [ws_text_frame(big) * 3, ws_text_frame(b"z")]
    assert 3 * len(ws_text_frame(big)) >= CORK_MAX_BYTES > 2 * len(ws_text_frame(big))


async def test_frames_that_must_wait_follow_the_coalesced_ones() -> None:
    batch = WriteBatch()
    conn, out = started(batch)
    batch.begin()
    conn.push(b"1")
    out.buffered = 70_000  # the client stopped reading mid-batch
    conn.push(b"2")
    batch.end()
    # The coalesced frame is written when the batch ends; the queued one waits for
    # the writer task, which runs only after that.
    assert out.written == [ws_text_frame(b"1")] and conn.queue == [b"2"]
    await conn.stop()


def test_a_socket_closed_during_the_batch_gets_nothing() -> None:
    batch = WriteBatch()
    conn, out = started(batch)
    batch.begin()
    conn.push(b"1")
    out.is_closing = lambda: True  # type: ignore[method-assign]
    batch.end()
    assert out.written == []
