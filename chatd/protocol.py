"""WebSocket frames: decode and validate client frames, encode server frames. No I/O.

Client frames are msgspec structs tagged by `type`: one strict decode checks
JSON syntax, field types and static bounds at once; what depends on settings
(body length) is checked in `validate`. Unknown fields are ignored, as the
protocol asks.
"""

from __future__ import annotations

import re
import struct
from typing import Annotated, Any

import msgspec

from chatd.errors import ChatError

# Close codes (PROTOCOL.md section 3).
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_UNAUTHORIZED = 4001
CLOSE_HELLO_TIMEOUT = 4002
CLOSE_POLICY = 4008
CLOSE_RESUME_REQUIRED = 4009
CLOSE_TOO_MANY = 4029

MAX_SEQ = 2**53  # JSON-safe integers only: a bigger seq cannot exist
CLIENT_MSG_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

RequestId = Annotated[str, msgspec.Meta(max_length=64)]
RoomId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=200)]
ClientMsgId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\Z")]


class _Frame(msgspec.Struct, tag_field="type", kw_only=True):
    id: RequestId | None = None


class Hello(_Frame, tag="hello"):
    token: str | None = None
    resume: dict[RoomId, Seq] | None = None


class Send(_Frame, tag="send"):
    room_id: RoomId
    client_msg_id: ClientMsgId
    body: str


class Delivered(_Frame, tag="delivered"):
    room_id: RoomId
    seq: Seq


class Read(_Frame, tag="read"):
    room_id: RoomId
    seq: Seq


class Typing(_Frame, tag="typing"):
    room_id: RoomId
    active: bool


class History(_Frame, tag="history"):
    room_id: RoomId
    after_seq: Seq | None = None
    before_seq: Seq | None = None
    limit: Limit = 50


class Ping(_Frame, tag="ping"):
    pass


ClientFrame = Hello | Send | Delivered | Read | Typing | History | Ping

_decoder = msgspec.json.Decoder(ClientFrame)
_raw_decoder = msgspec.json.Decoder()


class FrameError(Exception):
    """An invalid client frame: answered with `bad_request`, echoing `id` when known."""

    def __init__(self, message: str, request_id: str | None, code: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.code = code


def decode(data: bytes | str, max_body_chars: int) -> ClientFrame:
    try:
        frame: ClientFrame = _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError,
            RecursionError) as e:  # RecursionError: nested deeper than msgspec's limit
        raise FrameError(_explain(e), _request_id(data)) from None
    if isinstance(frame, Send):
        _check_body(frame, max_body_chars)
    return frame


def _check_body(frame: Send, max_body_chars: int) -> None:
    if not frame.body:
        raise FrameError("body must not be empty", frame.id)
    if len(frame.body) > max_body_chars:
        raise FrameError(f"body is longer than {max_body_chars} characters", frame.id,
                         code="too_large")
    if not _is_utf8(frame.body):
        raise FrameError("body contains unpaired surrogates", frame.id)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _request_id(data: bytes | str) -> str | None:
    try:
        raw = _raw_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(raw, dict):
        rid = raw.get("id")
        if isinstance(rid, str) and len(rid) <= 64:
            return rid
    return None


def _explain(e: Exception) -> str:
    text = str(e)
    if isinstance(e, UnicodeDecodeError):
        return "frame is not valid UTF-8"
    if isinstance(e, RecursionError):
        return "frame is nested too deeply"
    if not isinstance(e, msgspec.ValidationError):  # ValidationError subclasses DecodeError
        return "frame is not valid JSON"
    if text.startswith("Invalid value") and "$.type" in text:
        return "unknown frame type"
    if "Object missing required field `type`" in text:
        return "frame has no 'type'"
    return text.replace("`", "'")


# --- server frames -------------------------------------------------------------

def encode(frame: dict[str, Any]) -> bytes:
    """Compact JSON, UTF-8 as is (what json.dumps(ensure_ascii=False) gives, faster)."""
    return msgspec.json.encode(frame)


def error_frame(err: ChatError | FrameError, request_id: str | None) -> bytes:
    frame: dict[str, Any] = {"type": "error"}
    if request_id is not None:
        frame["id"] = request_id
    frame["code"] = err.code
    frame["message"] = err.message
    retry = getattr(err, "retry_after_ms", None)
    if retry is not None:
        frame["retry_after_ms"] = retry
    return encode(frame)


def ws_text_frame(payload: bytes) -> bytes:
    """A server-to-client WebSocket text frame (RFC 6455 5.2: FIN, no mask, no RSV bits),
    built here so fanout writes it straight to the socket."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 0x10000:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


# A server-to-client ping: FIN, opcode 0x9, no mask, no payload (heartbeat.py).
PING_FRAME = bytes((0x89, 0))


def pong_frame(payload: bytes) -> bytes:
    """The answer to a client's ping, echoing its payload (control frames carry at most
    125 bytes; aiohttp's reader refuses longer ones)."""
    return bytes((0x8A, len(payload))) + payload


def message_frame(message_json: bytes) -> bytes:
    """The `message` frame for a stored message object, without re-encoding it."""
    return b'{"type":"message",' + message_json[1:]
