"""The load generators' WebSocket client (bench/wsclient.py): framing, handshake, close.

Frames are fed to a connection over a fake transport (every split of the
bytes over ``data_received`` calls must parse alike); one test runs the whole
client against a real aiohttp WebSocket server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from bench.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    HandshakeError,
    WebSocket,
    accept_for,
    apply_mask,
    check_upgrade_response,
    encode_frame,
)

MASK = b"\x01\x80\xfe\x7f"


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """An unmasked frame, as a server sends it."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def decode_client_frame(data: bytes) -> tuple[int, bytes, int]:
    """(opcode, unmasked payload, frame length) of the client frame at the start of data."""
    assert data[0] & 0x80, "client frames here are final"
    assert data[1] & 0x80, "client frames must be masked"
    n, pos = data[1] & 0x7F, 2
    if n == 126:
        n, pos = int.from_bytes(data[2:4], "big"), 4
    elif n == 127:
        n, pos = int.from_bytes(data[2:10], "big"), 10
    mask = data[pos:pos + 4]
    payload = data[pos + 4:pos + 4 + n]
    assert len(payload) == n
    return data[0] & 0x0F, apply_mask(payload, mask), pos + 4 + n


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def frames(self) -> list[tuple[int, bytes]]:
        """The client frames written after the upgrade request."""
        data = bytes(self.written[self.written.index(b"\r\n\r\n") + 4:])
        out = []
        while data:
            opcode, payload, size = decode_client_frame(data)
            out.append((opcode, payload))
            data = data[size:]
        return out


class Conn:
    """A WebSocket wired to a fake transport, recording what it hands out."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.lost: list[int | None] = []
        self.ws = WebSocket("ws://127.0.0.1:8080/socket.io/?EIO=4&transport=websocket",
                            self.texts.append, lambda ws: self.lost.append(ws.close_code))
        self.transport = FakeTransport()
        self.ws.connection_made(self.transport)  # type: ignore[arg-type]

    def request(self) -> str:
        return bytes(self.transport.written).decode("latin-1")

    def key(self) -> str:
        line = next(h for h in self.request().split("\r\n") if h.startswith("Sec-WebSocket-Key"))
        return line.split(": ", 1)[1]

    def response(self, *, status: str = "101 Switching Protocols",
                 accept: str | None = None) -> bytes:
        return (f"HTTP/1.1 {status}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept or accept_for(self.key())}\r\n\r\n").encode()

    def upgrade(self) -> None:
        self.ws.data_received(self.response())
        assert self.ws.is_open


def test_accept_matches_the_rfc_example() -> None:
    assert accept_for("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3


@pytest.mark.parametrize("size", [0, 1, 5, 125, 126, 65535, 65536, 70000])
def test_client_frames_are_masked_in_every_length_form(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = encode_frame(OP_TEXT, payload, MASK)
    opcode, unmasked, length = decode_client_frame(frame)
    assert (opcode, unmasked, length) == (OP_TEXT, payload, len(frame))
    header = 2 if size < 126 else 4 if size < 65536 else 10
    assert frame[header:header + 4] == MASK
    if size >= 4:
        assert frame[header + 4:] != payload


def test_masking_keeps_leading_zero_bytes() -> None:
    assert apply_mask(b"\x01\x80\x00\x00\x00", MASK) == b"\x00\x00\xfe\x7f\x01"
    assert apply_mask(apply_mask(b"\x00\x00abc", MASK), MASK) == b"\x00\x00abc"


async def test_upgrade_request_asks_for_a_websocket_on_the_target() -> None:
    conn = Conn()
    request = conn.request()
    assert request.startswith("GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n")
    assert "Host: 127.0.0.1:8080\r\n" in request
    assert "Upgrade: websocket\r\n" in request and "Sec-WebSocket-Version: 13\r\n" in request
    assert "Sec-WebSocket-Extensions" not in request
    assert request.endswith("\r\n\r\n")


def test_upgrade_response_checks() -> None:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    good = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: upgrade\r\nSec-WebSocket-Accept: {accept_for(key)}")
    assert check_upgrade_response(good.encode(), key) is None
    assert "no upgrade" in str(check_upgrade_response(
        good.replace("101 Switching Protocols", "403 Forbidden").encode(), key))
    assert check_upgrade_response(good.encode(), "b3RoZXIga2V5IDEyMzQ1Ng==") == (
        "bad Sec-WebSocket-Accept")
    assert "Upgrade" in str(check_upgrade_response(
        good.replace("Upgrade: websocket", "Upgrade: h2c").encode(), key))
    assert "extension" in str(check_upgrade_response(
        (good + "\r\nSec-WebSocket-Extensions: permessage-deflate").encode(), key))


async def test_frames_in_the_upgrade_segment_are_delivered() -> None:
    conn = Conn()
    conn.ws.data_received(conn.response() + server_frame(OP_TEXT, b'0{"sid":"x"}'))
    assert conn.ws.is_open and conn.texts == ['0{"sid":"x"}']


async def test_a_refused_upgrade_closes_the_connection() -> None:
    conn = Conn()
    conn.ws.data_received(conn.response(status="403 Forbidden"))
    assert conn.transport.closed and not conn.ws.is_open


async def test_a_wrong_accept_is_refused() -> None:
    conn = Conn()
    conn.ws.data_received(conn.response(accept="c2VjcmV0"))
    assert conn.transport.closed and not conn.ws.is_open


async def test_every_split_of_the_bytes_parses_alike() -> None:
    texts = ["a", "é" * 100, "x" * 300, "y" * 70000]  # 7-bit, 16-bit (twice), 64-bit lengths
    frames = [server_frame(OP_TEXT, t.encode()) for t in texts] + [server_frame(OP_PING, b"hb")]
    stream = b"".join(frames)
    starts = [sum(map(len, frames[:i])) for i in range(len(frames))]
    # Splits in and around every header (up to 10 bytes), inside payloads, before the end.
    splits = {s + d for s in starts for d in range(-1, 12)} | {150, 40000, len(stream) - 1}
    for split in sorted(x for x in splits if 0 < x < len(stream)):
        conn = Conn()
        conn.upgrade()
        conn.ws.data_received(stream[:split])
        conn.ws.data_received(stream[split:])
        assert conn.texts == texts, split
        assert conn.transport.frames() == [(OP_PONG, b"hb")]


async def test_byte_by_byte_including_the_response_head() -> None:
    conn = Conn()
    data = conn.response() + server_frame(OP_TEXT, b"z" * 200) + server_frame(OP_TEXT, b"ok")
    for i in range(len(data)):
        conn.ws.data_received(data[i:i + 1])
    assert conn.texts == ["z" * 200, "ok"]


async def test_fragments_are_joined_and_control_frames_may_interleave() -> None:
    conn = Conn()
    conn.upgrade()
    conn.ws.data_received(
        server_frame(OP_TEXT, b"he", fin=False) + server_frame(OP_CONT, b"l", fin=False)
        + server_frame(OP_PING, b"p") + server_frame(OP_CONT, "lo é".encode()[:5], fin=False)
        + server_frame(OP_CONT, "lo é".encode()[5:]) + server_frame(OP_TEXT, b"next"))
    assert conn.texts == ["hello é", "next"]
    assert conn.transport.frames() == [(OP_PONG, b"p")]


async def test_binary_messages_and_pongs_are_ignored() -> None:
    conn = Conn()
    conn.upgrade()
    conn.ws.data_received(server_frame(OP_BINARY, b"\x00\x01", fin=False)
                          + server_frame(OP_CONT, b"\x02") + server_frame(OP_PONG, b"")
                          + server_frame(OP_TEXT, b"t"))
    assert conn.texts == ["t"] and conn.ws.is_open


async def test_sent_text_is_one_masked_frame() -> None:
    conn = Conn()
    conn.upgrade()
    conn.ws.send_text('{"type":"send"}')
    conn.ws.send_text(b"42" + b"x" * 200)
    assert conn.transport.frames() == [(OP_TEXT, b'{"type":"send"}'), (OP_TEXT, b"42" + b"x" * 200)]


async def test_sending_before_the_upgrade_fails() -> None:
    conn = Conn()
    with pytest.raises(ConnectionResetError):
        conn.ws.send_text("early")


async def test_a_server_close_is_answered_and_its_code_kept() -> None:
    conn = Conn()
    conn.upgrade()
    conn.ws.data_received(server_frame(OP_CLOSE, (4009).to_bytes(2, "big") + b"slow")
                          + server_frame(OP_TEXT, b"after close"))
    assert conn.texts == [] and conn.transport.closed
    assert conn.transport.frames() == [(OP_CLOSE, (1000).to_bytes(2, "big"))]
    with pytest.raises(ConnectionResetError):
        conn.ws.send_text("late")
    conn.ws.connection_lost(None)
    assert conn.lost == [4009]


async def test_a_close_without_a_code_is_1005_and_a_lost_connection_1006() -> None:
    conn = Conn()
    conn.upgrade()
    conn.ws.data_received(server_frame(OP_CLOSE, b""))
    conn.ws.connection_lost(None)
    other = Conn()
    other.upgrade()
    other.ws.connection_lost(ConnectionResetError())
    assert (conn.lost, other.lost) == ([1005], [1006])


@pytest.mark.parametrize("bad", [
    bytes((0x81 | 0x40, 1)) + b"a",  # RSV1 without an extension
    bytes((0x81, 0x80 | 1)) + b"\x00\x00\x00\x00a",  # a masked server frame
    server_frame(OP_CONT, b"a"),  # a continuation of nothing
    server_frame(OP_TEXT, b"a", fin=False) + server_frame(OP_TEXT, b"b"),
    server_frame(OP_PING, b"p", fin=False),
    server_frame(0x3, b"?"),  # a reserved opcode
])
async def test_protocol_errors_close_with_1002(bad: bytes) -> None:
    conn = Conn()
    conn.upgrade()
    conn.ws.data_received(bad + server_frame(OP_TEXT, b"ignored"))
    assert conn.transport.closed and conn.texts == []
    assert conn.transport.frames() == [(OP_CLOSE, (1002).to_bytes(2, "big"))]
    conn.ws.connection_lost(None)
    assert conn.lost == [1002]


async def test_invalid_utf8_closes_with_1007() -> None:
    conn = Conn()
    conn.upgrade()
    conn.ws.data_received(server_frame(OP_TEXT, b"\xff"))
    conn.ws.connection_lost(None)
    assert conn.lost == [1007]


async def test_against_an_aiohttp_server(aiohttp_server: Any) -> None:
    """Handshake, text both ways, pongs to the server's heartbeat, server and client close."""
    closed_with: list[int | None] = []
    remotes: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        remotes.append(request.remote)
        if "refuse" in request.query:
            return web.Response(status=403)
        # Pings every 50 ms; a missing pong would close the connection with 1006.
        ws = web.WebSocketResponse(heartbeat=0.05)
        await ws.prepare(request)
        await ws.send_str("hi")
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            if msg.data == "close me":
                await ws.close(code=4009)
                break
            await ws.send_str("echo " + msg.data)
        closed_with.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    server = await aiohttp_server(app)
    url = f"ws://127.0.0.1:{server.port}/ws"
    texts: list[str] = []
    lost: list[int | None] = []

    async def until(done: Callable[[], bool]) -> None:
        # Polls: the states awaited are set by callbacks of both ends.
        async with asyncio.timeout(5):
            while not done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    ws = WebSocket(url, texts.append, lambda w: lost.append(w.close_code))
    await ws.open("127.0.0.2")  # a source address as the idle scenario uses past 20,000
    await asyncio.sleep(0.3)  # several heartbeats
    ws.send_text("x" * 70000)
    await until(lambda: len(texts) == 2)
    assert texts == ["hi", "echo " + "x" * 70000]
    ws.send_text("close me")
    await until(lambda: bool(lost))
    assert lost == [4009] and not ws.is_open
    await ws.close()  # already closed: returns at once

    ws = WebSocket(url, texts.append, lambda w: lost.append(w.close_code))
    await ws.open()
    await ws.close()
    assert lost == [4009, 1000] and remotes == ["127.0.0.2", "127.0.0.1"]
    await until(lambda: len(closed_with) == 2)
    assert closed_with == [1000, 1000]  # our reply to its close, then our close

    ws = WebSocket(url + "?refuse=1", texts.append, lambda w: lost.append(w.close_code))
    with pytest.raises(HandshakeError, match="403"):
        await ws.open()
    await ws.close()
