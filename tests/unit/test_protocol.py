"""chatd.protocol without I/O: decode() of every client frame, valid and invalid, and the
shape of server frames (PROTOCOL.md sections 1 and 3)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatd import protocol
from chatd.errors import ChatError
from chatd.protocol import (
    Delivered,
    FrameError,
    Hello,
    History,
    Ping,
    Read,
    Send,
    Typing,
    decode,
    error_frame,
)

MAX_BODY = 4000


def dec(frame: Any, max_body: int = MAX_BODY) -> protocol.ClientFrame:
    return decode(frame if isinstance(frame, str | bytes) else json.dumps(frame), max_body)


def fails(frame: Any, max_body: int = MAX_BODY) -> FrameError:
    with pytest.raises(FrameError) as info:
        dec(frame, max_body)
    assert isinstance(info.value.message, str) and info.value.message
    return info.value


# --- valid frames ----------------------------------------------------------------------


def test_hello() -> None:
    assert dec({"type": "hello", "token": "t"}) == Hello(token="t")
    frame = dec({"type": "hello", "id": "h", "token": "t", "resume": {"r1": 0, "r2": 17}})
    assert isinstance(frame, Hello)
    assert (frame.id, frame.token, frame.resume) == ("h", "t", {"r1": 0, "r2": 17})
    bare = dec({"type": "hello"})  # the token may come in the Authorization header
    assert isinstance(bare, Hello) and bare.token is None and bare.resume is None


def test_send() -> None:
    frame = dec({"type": "send", "id": "q1", "room_id": "r", "client_msg_id": "A-z_09",
                 "body": "hi \u00e9 \U0001f600"})
    assert frame == Send(id="q1", room_id="r", client_msg_id="A-z_09",
                         body="hi \u00e9 \U0001f600")
    no_id = dec({"type": "send", "room_id": "r", "client_msg_id": "c", "body": "x"})
    assert isinstance(no_id, Send) and no_id.id is None
    longest = dec({"type": "send", "room_id": "r", "client_msg_id": "c" * 64,
                   "body": "\U0001f600" * MAX_BODY})
    assert isinstance(longest, Send) and len(longest.body) == MAX_BODY


def test_delivered_read_typing_ping() -> None:
    assert dec({"type": "delivered", "room_id": "r", "seq": 5}) == Delivered(room_id="r", seq=5)
    assert dec({"type": "read", "room_id": "r", "seq": 0, "id": "x"}) == Read(
        id="x", room_id="r", seq=0)
    assert dec({"type": "read", "room_id": "r", "seq": 2**53}) == Read(room_id="r", seq=2**53)
    assert dec({"type": "typing", "room_id": "r", "active": False}) == Typing(
        room_id="r", active=False)
    assert dec({"type": "ping", "id": "p"}) == Ping(id="p")
    assert dec({"type": "ping"}) == Ping()
    assert dec({"type": "ping", "id": "i" * 64}) == Ping(id="i" * 64)


def test_history_defaults_and_bounds() -> None:
    frame = dec({"type": "history", "room_id": "r"})
    assert isinstance(frame, History)
    assert (frame.after_seq, frame.before_seq, frame.limit) == (None, None, 50)
    frame = dec({"type": "history", "id": "h", "room_id": "r", "after_seq": 3, "limit": 200})
    assert isinstance(frame, History) and (frame.id, frame.after_seq, frame.limit) == (
        "h", 3, 200)
    assert isinstance(dec({"type": "history", "room_id": "r", "limit": 1}), History)


def test_unknown_fields_are_ignored() -> None:
    frame = dec({"type": "ping", "id": "p", "extra": {"deep": [1, 2]}, "n": None})
    assert frame == Ping(id="p")
    frame = dec({"type": "send", "room_id": "r", "client_msg_id": "c", "body": "b",
                 "attachments": [], "ts": 1})
    assert frame == Send(room_id="r", client_msg_id="c", body="b")


def test_bytes_and_str_input() -> None:
    assert decode(b'{"type":"ping","id":"b"}', MAX_BODY) == Ping(id="b")
    assert decode('{"type":"ping","id":"s"}', MAX_BODY) == Ping(id="s")


# --- invalid frames ----------------------------------------------------------------------

SEND = {"type": "send", "id": "q", "room_id": "r", "client_msg_id": "c", "body": "b"}
MARK = {"id": "q", "room_id": "r", "seq": 1}
TYPING = {"type": "typing", "id": "q", "room_id": "r", "active": True}
HISTORY = {"type": "history", "id": "q", "room_id": "r"}


def _without(frame: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != key}


INVALID_WITH_ID: list[tuple[str, dict[str, Any]]] = [
    *[(f"send without {k}", _without(SEND, k)) for k in ("room_id", "client_msg_id", "body")],
    ("send room_id int", {**SEND, "room_id": 1}),
    ("send room_id empty", {**SEND, "room_id": ""}),
    ("send room_id too long", {**SEND, "room_id": "r" * 129}),
    ("send body list", {**SEND, "body": ["b"]}),
    ("send body int", {**SEND, "body": 1}),
    ("send body null", {**SEND, "body": None}),
    ("send body empty", {**SEND, "body": ""}),
    ("send client_msg_id empty", {**SEND, "client_msg_id": ""}),
    ("send client_msg_id 65", {**SEND, "client_msg_id": "c" * 65}),
    ("send client_msg_id space", {**SEND, "client_msg_id": "a b"}),
    ("send client_msg_id unicode", {**SEND, "client_msg_id": "\u00e9"}),
    ("send client_msg_id int", {**SEND, "client_msg_id": 12}),
    *[(f"{t} without {k}", _without({"type": t, **MARK}, k))
      for t in ("delivered", "read") for k in ("room_id", "seq")],
    *[(f"{t} seq={v!r}", {"type": t, **MARK, "seq": v})
      for t in ("delivered", "read") for v in ("1", 1.5, 1.0, True, -1, None, [1], 2**53 + 1)],
    ("typing without active", _without(TYPING, "active")),
    ("typing without room_id", _without(TYPING, "room_id")),
    ("typing active string", {**TYPING, "active": "true"}),
    ("typing active int", {**TYPING, "active": 1}),
    ("history without room_id", _without(HISTORY, "room_id")),
    ("history limit 0", {**HISTORY, "limit": 0}),
    ("history limit 201", {**HISTORY, "limit": 201}),
    ("history limit string", {**HISTORY, "limit": "10"}),
    ("history after_seq negative", {**HISTORY, "after_seq": -1}),
    ("history after_seq float", {**HISTORY, "after_seq": 0.5}),
    ("hello token int", {"type": "hello", "id": "q", "token": 5}),
    ("hello resume list", {"type": "hello", "id": "q", "resume": ["r"]}),
    ("hello resume negative", {"type": "hello", "id": "q", "resume": {"r": -1}}),
    ("hello resume string seq", {"type": "hello", "id": "q", "resume": {"r": "1"}}),
    ("unknown type", {"type": "shout", "id": "q"}),
    ("type capitals", {"type": "Ping", "id": "q"}),
    ("type int", {"type": 1, "id": "q"}),
    ("no type", {"id": "q", "room_id": "r"}),
    ("server frame type", {"type": "ack", "id": "q"}),
]


@pytest.mark.parametrize(("label", "frame"), INVALID_WITH_ID, ids=[c[0] for c in INVALID_WITH_ID])
def test_invalid_frames_are_bad_request_echoing_id(label: str, frame: dict[str, Any]) -> None:
    err = fails(frame)
    assert (err.code, err.request_id) == ("bad_request", "q"), label


INVALID_WITHOUT_ID: list[tuple[str, str | bytes]] = [
    ("not json", "hello"),
    ("truncated", '{"type":"ping","id":"q"'),
    ("empty", ""),
    ("array", '[{"type":"ping","id":"q"}]'),
    ("string", '"ping"'),
    ("number", "1"),
    ("null", "null"),
    ("id int", '{"type":"ping","id":1}'),
    ("id too long", '{"type":"ping","id":"' + "q" * 65 + '"}'),
    ("lone surrogate", '{"type":"send","room_id":"r","client_msg_id":"c","body":"\\ud800"}'),
]


@pytest.mark.parametrize(("label", "raw"), INVALID_WITHOUT_ID,
                         ids=[c[0] for c in INVALID_WITHOUT_ID])
def test_invalid_frames_without_a_readable_id(label: str, raw: str | bytes) -> None:
    err = fails(raw)
    assert (err.code, err.request_id) == ("bad_request", None), label


def test_invalid_utf8_is_a_frame_error() -> None:
    err = fails(b'{"type":"ping","id":"\xff"}')
    assert (err.code, err.request_id) == ("bad_request", None)


def test_body_over_max_is_too_large_counting_code_points() -> None:
    err = fails({**SEND, "body": "x" * (MAX_BODY + 1)})
    assert (err.code, err.request_id) == ("too_large", "q")
    err = fails({**SEND, "body": "\U0001f600" * (MAX_BODY + 1)})
    assert err.code == "too_large"
    err = fails({**SEND, "body": "abcdef"}, max_body=5)
    assert err.code == "too_large"
    assert isinstance(dec({**SEND, "body": "abcde"}, max_body=5), Send)
    assert isinstance(dec({**SEND, "body": "\u00e9" * 5}, max_body=5), Send)


def test_client_msg_id_with_trailing_newline_is_rejected_by_decode() -> None:
    err = fails({**SEND, "client_msg_id": "abc\n"})
    assert (err.code, err.request_id) == ("bad_request", "q")


# --- server frames -----------------------------------------------------------------------


def test_error_frame_shape() -> None:
    frame = json.loads(error_frame(ChatError("not_found", "no such room"), "q1"))
    assert frame == {"type": "error", "id": "q1", "code": "not_found",
                     "message": "no such room"}
    frame = json.loads(error_frame(ChatError("bad_request", "nope"), None))
    assert frame == {"type": "error", "code": "bad_request", "message": "nope"}
    frame = json.loads(error_frame(
        ChatError("rate_limited", "slow down", retry_after_ms=250), "q2"))
    assert frame == {"type": "error", "id": "q2", "code": "rate_limited",
                     "message": "slow down", "retry_after_ms": 250}
    frame = json.loads(error_frame(FrameError("bad frame", "q3"), "q3"))
    assert frame == {"type": "error", "id": "q3", "code": "bad_request",
                     "message": "bad frame"}
    frame = json.loads(error_frame(FrameError("big", None, code="too_large"), None))
    assert frame == {"type": "error", "code": "too_large", "message": "big"}
    assert "retry_after_ms" not in json.loads(error_frame(FrameError("x", None), None))


def test_encode_and_message_frame() -> None:
    raw = protocol.encode({"type": "pong", "id": "\u00e9"})
    assert isinstance(raw, bytes) and json.loads(raw) == {"type": "pong", "id": "\u00e9"}
    message = {"room_id": "r", "seq": 3, "sender_id": "u", "client_msg_id": "c",
               "body": "hi", "ts": 1}
    frame = json.loads(protocol.message_frame(json.dumps(message).encode()))
    assert frame == {"type": "message", **message}


def test_close_codes() -> None:
    assert (protocol.CLOSE_GOING_AWAY, protocol.CLOSE_TOO_BIG, protocol.CLOSE_INTERNAL,
            protocol.CLOSE_UNAUTHORIZED, protocol.CLOSE_HELLO_TIMEOUT, protocol.CLOSE_POLICY,
            protocol.CLOSE_RESUME_REQUIRED, protocol.CLOSE_TOO_MANY) == (
        1001, 1009, 1011, 4001, 4002, 4008, 4009, 4029)
