"""The heartbeat sweep's decisions (chatd/heartbeat.py), on stand-in connections."""

from __future__ import annotations

import math
from typing import Any, cast

from chatd.conn import Conn
from chatd.heartbeat import SWEEPS_PER_HEARTBEAT, sweep
from chatd.protocol import CLOSE_UNAUTHORIZED, PING_FRAME

HEARTBEAT_S = 20.0
# Silent this long, a connection is pinged: by the next sweep it would be a heartbeat.
QUIET_S = HEARTBEAT_S - HEARTBEAT_S / SWEEPS_PER_HEARTBEAT


class FakeConn:
    def __init__(self, last_heard: float, ping_sent: float = 0.0, closing: bool = False,
                 session_ends: float = math.inf) -> None:
        self.last_heard = last_heard
        self.ping_sent = ping_sent
        self.closing = closing
        self.session_ends = session_ends
        self.written: list[bytes] = []
        self.dropped = False
        self.closed_with: list[int] = []

    def close(self, code: int) -> None:
        self.closed_with.append(code)

    def control(self, frame: bytes) -> None:
        self.written.append(frame)

    def drop(self) -> None:
        self.dropped = True


def run(conns: list[FakeConn], now: float) -> int:
    return sweep(cast(list[Conn], conns), now, HEARTBEAT_S)


def test_a_connection_heard_recently_is_left_alone() -> None:
    conn = FakeConn(last_heard=100.0)
    assert run([conn], now=100.0 + QUIET_S - 0.1) == 0
    assert conn.written == [] and not conn.dropped and conn.ping_sent == 0.0


def test_a_silent_connection_is_pinged_once() -> None:
    conn = FakeConn(last_heard=100.0)
    now = 100.0 + QUIET_S
    run([conn], now)
    assert conn.written == [PING_FRAME] and conn.ping_sent == now
    run([conn], now + 1)  # still waiting for the pong: no second ping
    assert conn.written == [PING_FRAME] and not conn.dropped


def test_an_answered_ping_resets_the_wait() -> None:
    conn = FakeConn(last_heard=100.0)
    run([conn], 120.0)
    conn.last_heard = 120.5  # the pong (or any frame)
    assert run([conn], 131.0) == 0  # half a heartbeat after the ping: answered, fine
    assert not conn.dropped and conn.written == [PING_FRAME]
    run([conn], 120.5 + QUIET_S)  # quiet again since the pong: the next ping
    assert conn.written == [PING_FRAME, PING_FRAME] and conn.ping_sent == 120.5 + QUIET_S


def test_an_unanswered_ping_drops_the_connection_after_half_a_heartbeat() -> None:
    conn = FakeConn(last_heard=100.0)
    run([conn], 120.0)
    assert run([conn], 120.0 + HEARTBEAT_S / 2 - 0.1) == 0 and not conn.dropped
    assert run([conn], 120.0 + HEARTBEAT_S / 2) == 1 and conn.dropped


def test_a_closing_connection_is_not_pinged() -> None:
    conn = FakeConn(last_heard=0.0, closing=True)
    run([conn], 1000.0)
    assert conn.written == []


def test_each_connection_is_judged_on_its_own() -> None:
    fresh, silent, mute = FakeConn(90.0), FakeConn(50.0), FakeConn(10.0, ping_sent=80.0)
    conns: list[Any] = [fresh, silent, mute]
    assert run(conns, 100.0) == 1
    assert fresh.written == [] and silent.written == [PING_FRAME] and mute.dropped


def test_a_connection_whose_session_expired_is_closed_unauthorized_not_pinged() -> None:
    expired = FakeConn(last_heard=0.0, session_ends=99.0)
    valid = FakeConn(last_heard=99.5, session_ends=100.5)
    assert run([expired, valid], now=100.0) == 0
    assert expired.closed_with == [CLOSE_UNAUTHORIZED] and expired.written == []
    assert valid.closed_with == [] and not valid.dropped
    run([expired, valid], now=100.5)  # the second's session ends now
    assert valid.closed_with == [CLOSE_UNAUTHORIZED]
