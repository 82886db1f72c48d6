"""A lean client WebSocket (RFC 6455) for the load generators, on an ``asyncio.Protocol``.

Why not aiohttp's client: there every received frame goes through its reader
queue, a future and a task wakeup of the reader loop. A load-generator
process holds hundreds of connections receiving thousands of frames a second,
and its CPU competes with the servers it measures. Here frames are parsed in
``data_received`` and each complete text message goes to ``on_text(str)``
synchronously; sending writes a masked frame straight to the transport.

Scope: what the benchmark's servers speak. No extensions (none offered, so
none may be accepted), no size limit (the bench's frames are small), binary
messages are ignored (the servers send text only), a ping is answered with a
pong, a close is answered with a close (1000, as aiohttp's client does).
Closing on a protocol error sends 1002 (1007 for invalid UTF-8).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # a close frame without a code
CLOSE_ABNORMAL = 1006  # the connection ended without a close frame
CLOSE_INVALID_DATA = 1007
CLOSE_TIMEOUT_S = 5.0  # how long close() waits for the server's close (aiohttp's ws_close)
MAX_RESPONSE_HEAD = 16384
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeError(ConnectionError):
    """The server did not upgrade the connection to a WebSocket."""


def accept_for(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (masking and unmasking alike)."""
    n = len(data)
    if n == 0:
        return b""
    # One big-integer XOR is far cheaper in Python than a loop over the bytes.
    key = int.from_bytes((mask * ((n + 3) // 4))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final client frame: clients must mask every frame (RFC 6455 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


def upgrade_request(host: str, target: str, key: str) -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode("latin-1")


def check_upgrade_response(head: bytes, key: str) -> str | None:
    """Why the response head (status line and headers) is not a valid upgrade, or None."""
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status.split(" ", 2)[1:2] != ["101"]:
        return f"no upgrade: {status!r}"
    if headers.get("upgrade", "").lower() != "websocket":
        return f"bad Upgrade header {headers.get('upgrade')!r}"
    if "upgrade" not in headers.get("connection", "").lower():
        return f"bad Connection header {headers.get('connection')!r}"
    if headers.get("sec-websocket-accept") != accept_for(key):
        return "bad Sec-WebSocket-Accept"
    if headers.get("sec-websocket-extensions"):
        return "an extension was accepted that was not offered"
    return None


class WebSocket(asyncio.Protocol):
    """One client connection: ``open()`` once, then ``send_text()``; ``close()`` at the end.

    ``on_text`` gets every complete text message, in ``data_received``;
    ``on_lost`` is called once when the connection is gone (after a close
    handshake, a protocol error, or a lost TCP connection), with
    ``close_code`` set: the server's code, or 1006 without a close frame.
    """

    def __init__(self, url: str, on_text: Callable[[str], None],
                 on_lost: Callable[[WebSocket], None]) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._on_text = on_text
        self._on_lost = on_lost
        self._key = base64.b64encode(os.urandom(16)).decode()
        # One mask per connection: the RFC's aim (caches on the path cannot be
        # poisoned by chosen bytes) is moot on loopback, and os.urandom per frame costs.
        self._mask = os.urandom(4)
        loop = asyncio.get_running_loop()
        self._opened: asyncio.Future[str | None] = loop.create_future()  # None, or why not
        self._lost: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._buf: bytearray | None = None  # bytes of an incomplete head or frame
        self._upgraded = False
        self._fragments: list[bytes] | None = None  # a fragmented message so far
        self._fragments_op = OP_TEXT
        self._close_sent = False
        self._close_received = False
        self.close_code: int | None = None
        self.pings = 0  # received from the server (the idle scenario's heartbeat count)

    # --- connection ---------------------------------------------------------------

    async def open(self, local_host: str | None = None) -> None:
        """Connect (from ``local_host`` when given) and complete the upgrade handshake."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, self._host, self._port,
                                     local_addr=(local_host, 0) if local_host else None)
        error = await asyncio.shield(self._opened)
        if error is not None:
            raise HandshakeError(error)

    @property
    def is_open(self) -> bool:
        return self._upgraded and not self._close_sent and not self._lost.done()

    def send_text(self, data: bytes | str) -> None:
        """Write one masked text frame (no waiting: the senders are open loop)."""
        if not self.is_open:
            raise ConnectionResetError("the WebSocket is not open")
        assert self._transport is not None
        payload = data.encode() if isinstance(data, str) else data
        self._transport.write(encode_frame(OP_TEXT, payload, self._mask))

    async def close(self) -> None:
        """Close handshake (1000), at most CLOSE_TIMEOUT_S, then drop the connection."""
        transport = self._transport
        if transport is None or self._lost.done():
            return
        if self.is_open:
            self._send_close(CLOSE_NORMAL)
        elif not self._upgraded:
            transport.abort()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_TIMEOUT_S)
        except TimeoutError:
            transport.abort()
            await asyncio.shield(self._lost)

    def _send_close(self, code: int) -> None:
        assert self._transport is not None
        self._close_sent = True
        self._transport.write(encode_frame(OP_CLOSE, code.to_bytes(2, "big"), self._mask))

    def _fail(self, code: int) -> None:
        """A protocol violation by the server: close with ``code`` at once."""
        self.close_code = code
        if self.is_open:
            self._send_close(code)
        self._close_received = True  # stop parsing
        assert self._transport is not None
        self._transport.close()

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        host = self._host if self._port == 80 else f"{self._host}:{self._port}"
        self._transport.write(upgrade_request(host, self._target, self._key))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._opened.done():
            self._opened.set_result(f"connection lost during the handshake ({exc!r})")
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
        self._lost.set_result(None)
        self._on_lost(self)

    def data_received(self, data: bytes) -> None:
        chunk: bytes | bytearray = data
        if self._buf is not None:
            self._buf += data
            chunk, self._buf = self._buf, None
        if not self._upgraded:
            end = chunk.find(b"\r\n\r\n")
            error = None
            if end < 0:
                if len(chunk) <= MAX_RESPONSE_HEAD:
                    self._buf = bytearray(chunk)
                    return
                error = "response head too long"
            else:
                error = check_upgrade_response(bytes(chunk[:end]), self._key)
            self._opened.set_result(error)
            if error is not None:
                assert self._transport is not None
                self._transport.close()
                return
            self._upgraded = True
            chunk = chunk[end + 4:]
        self._parse(chunk)

    def _parse(self, data: bytes | bytearray) -> None:
        pos, end = 0, len(data)
        while end - pos >= 2 and not self._close_received:
            b0, b1 = data[pos], data[pos + 1]
            n = b1 & 0x7F
            start = pos + 2
            if n == 126:
                if end - start < 2:
                    break
                n = int.from_bytes(data[start:start + 2], "big")
                start += 2
            elif n == 127:
                if end - start < 8:
                    break
                n = int.from_bytes(data[start:start + 8], "big")
                start += 8
            if b0 & 0x70 or b1 & 0x80:
                # RSV bits without an extension, or a masked server frame (RFC 6455 5.1).
                self._fail(CLOSE_PROTOCOL_ERROR)
                return
            stop = start + n
            if stop > end:
                break
            pos = stop
            if b0 == 0x80 | OP_TEXT and self._fragments is None:  # the common case
                try:
                    text = data[start:stop].decode()
                except UnicodeDecodeError:
                    self._fail(CLOSE_INVALID_DATA)
                    return
                self._on_text(text)
            else:
                self._frame(b0 & 0x80 != 0, b0 & 0x0F, bytes(data[start:stop]))
        if pos < end and not self._close_received:
            self._buf = data if pos == 0 and isinstance(data, bytearray) else bytearray(
                data[pos:])

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode >= OP_CLOSE:
            if not fin or len(payload) > 125:
                self._fail(CLOSE_PROTOCOL_ERROR)
            elif opcode == OP_PING:
                self.pings += 1
                if self.is_open:
                    assert self._transport is not None
                    self._transport.write(encode_frame(OP_PONG, payload, self._mask))
            elif opcode == OP_CLOSE:
                self._close_received = True
                self.close_code = (int.from_bytes(payload[:2], "big") if len(payload) >= 2
                                   else CLOSE_NO_STATUS)
                if self.is_open:
                    self._send_close(CLOSE_NORMAL)
                assert self._transport is not None
                self._transport.close()
            elif opcode != OP_PONG:
                self._fail(CLOSE_PROTOCOL_ERROR)
            return
        if opcode == OP_CONT:
            if self._fragments is None:
                self._fail(CLOSE_PROTOCOL_ERROR)
                return
            self._fragments.append(payload)
            if not fin:
                return
            opcode, payload = self._fragments_op, b"".join(self._fragments)
            self._fragments = None
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                self._fail(CLOSE_PROTOCOL_ERROR)  # a new message inside a fragmented one
                return
            if not fin:
                self._fragments, self._fragments_op = [payload], opcode
                return
        else:
            self._fail(CLOSE_PROTOCOL_ERROR)
            return
        if opcode == OP_TEXT:
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                self._fail(CLOSE_INVALID_DATA)
                return
            self._on_text(text)
