"""Helpers of the security suite (tests/security).

* :class:`Bystanders`: a well-behaved pair chatting in a direct room at a steady pace
  while a test attacks the node; ``await stop()`` asserts that every message was acked
  and arrived, once and in order, on both connections, and returns the figures.
* :func:`rss_kib`: resident memory of a chatd process (``/proc/<pid>/status`` VmRSS).
* :func:`assert_log_clean`: no traceback and no "unhandled" anywhere in a node's log.
* :class:`RawWs`: a WebSocket client on a bare socket, for clients that misbehave below
  what aiohttp lets a client do: never reading, lying frame headers, fragments.
* :func:`fuzz_settings` / :func:`run_given`: hypothesis settings shared by the fuzz tests
  (``CHATD_FUZZ_EXAMPLES=N`` for a longer run), and a way to drive a synchronous
  hypothesis test from an async test whose event loop keeps serving the connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp
from hypothesis import HealthCheck, Phase, settings

from tests.client import FAST_ENV, Api, User, Ws, connect
from tests.harness import ChatdNode, assert_clean_logs

T = TypeVar("T")

# Error codes of PROTOCOL.md section 1, and the close codes of section 3.
ERROR_CODES = frozenset({"bad_request", "unauthorized", "forbidden", "not_found", "conflict",
                         "rate_limited", "too_large", "unavailable", "internal"})
ERROR_KEYS = frozenset({"type", "id", "code", "message", "retry_after_ms"})
HTTP_STATUS = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
               "conflict": 409, "too_large": 413, "rate_limited": 429, "internal": 500,
               "unavailable": 503}
CLOSE_TOO_BIG = 1009
CLOSE_UNAUTHORIZED = 4001
CLOSE_HELLO_TIMEOUT = 4002
CLOSE_POLICY = 4008
CLOSE_RESUME_REQUIRED = 4009

MAX_FRAME_BYTES = 65536  # config.toml default of limits.max_frame_bytes

# Limits that would otherwise throttle a test's own driver (not the behaviour under test).
UNTHROTTLED = {"CHATD_LIMITS__SEND_RATE_PER_S": "100000", "CHATD_LIMITS__SEND_BURST": "100000",
               "CHATD_LIMITS__FRAME_RATE_PER_S": "100000",
               "CHATD_LIMITS__FRAME_BURST": "100000"}
BASE_ENV = dict(FAST_ENV)


# --- hypothesis ------------------------------------------------------------------------

# Shrinking replays examples against a live node, thousands for a 600 kB frame: off with
# CHATD_FUZZ_SHRINK=0 (the failure message still names every failing frame).
PHASES = tuple(p for p in Phase if p is not Phase.explain and (
    p is not Phase.shrink or os.environ.get("CHATD_FUZZ_SHRINK", "1") != "0"))


def fuzz_examples(default: int = 150) -> int:
    return int(os.environ.get("CHATD_FUZZ_EXAMPLES", default))


def fuzz_settings(max_examples: int | None = None) -> settings:
    """Bounded, reproducible runs: the same examples on every run (derandomize), no
    example database written into the tree."""
    return settings(max_examples=max_examples or fuzz_examples(), deadline=None,
                    derandomize=True, database=None, print_blob=True, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example,
                                           HealthCheck.filter_too_much])


async def run_given(test: Callable[[], None]) -> None:
    """Run a synchronous ``@given`` test in a worker thread, so that the event loop keeps
    running the connections the examples talk through (see :func:`on_loop`)."""
    await asyncio.to_thread(test)


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T],
            timeout: float = 60.0) -> T:
    """From the hypothesis thread: run ``coro`` on the test's event loop and wait."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


# --- the node ----------------------------------------------------------------------------

def rss_kib(pid: int | None) -> int:
    """VmRSS of a process in KiB."""
    assert pid is not None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def assert_log_clean(node: ChatdNode) -> None:
    """No traceback and no "unhandled" anywhere in the node's log (the harness checks only
    error-level JSON lines for "unhandled"; this is stricter)."""
    text = node.log_text()
    assert "Traceback" not in text, node.log_tail(80)
    assert "unhandled" not in text.lower(), node.log_tail(80)
    assert_clean_logs(node)


# --- the well-behaved pair ---------------------------------------------------------------

class Bystanders:
    """Two users chatting in a direct room, taking turns, one message every `interval`
    seconds, each waiting for its ack, while a test attacks the same node."""

    def __init__(self, http: aiohttp.ClientSession, node: ChatdNode,
                 interval: float = 0.05) -> None:
        self.http = http
        self.node = node
        self.api = Api(http, node.url)
        self.interval = interval
        self.acked: list[int] = []
        self.ack_ms: list[float] = []
        self.room = ""
        self.users: list[User] = []
        self.conns: list[Ws] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Bystanders:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        """Clean up, also when the test failed before :meth:`stop`."""
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        for ws in self.conns:
            if not ws.ws.closed:
                await ws.close()

    async def start(self) -> Bystanders:
        self.users = [await self.api.register(), await self.api.register()]
        self.room = await self.api.direct(*self.users)
        self.conns = [await connect(self.http, self.node.ws_url, u) for u in self.users]
        self._task = asyncio.create_task(self._chat())
        return self

    async def _chat(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            ws = self.conns[n % 2]
            rid = f"bystander-{n}"
            t0 = time.monotonic()
            await ws.send({"type": "send", "id": rid, "room_id": self.room,
                           "client_msg_id": rid, "body": f"bystander message {n}"})
            reply = await ws.wait_for(lambda f, rid=rid: f.get("id") == rid, timeout=15)
            assert reply["type"] == "ack" and reply["duplicate"] is False, reply
            self.ack_ms.append((time.monotonic() - t0) * 1000)
            self.acked.append(reply["seq"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    def check_running(self) -> None:
        """Raise now if the chat already failed (e.g. a bystander was disconnected)."""
        if self._task is not None and self._task.done():
            self._task.result()
            raise AssertionError("the bystanders stopped chatting")

    async def stop(self) -> dict[str, Any]:
        """Stop, check every acked message reached both, once and in order; the figures."""
        assert self._task is not None
        self._stop.set()
        await asyncio.wait_for(self._task, 30)
        sent = len(self.acked)
        assert sent > 0
        assert self.acked == list(range(1, sent + 1)), self.acked
        delivered = []
        for ws in self.conns:
            await ws.wait_messages(self.room, sent, timeout=20)
            await asyncio.sleep(0.1)
            seqs = [m["seq"] for m in ws.messages(self.room)]
            assert seqs == list(range(1, sent + 1)), seqs  # none lost, duplicated, reordered
            assert not ws.of_type("error"), ws.of_type("error")
            assert ws.closed_code is None
            delivered.append(len(seqs))
        return {"sent": sent, "acked": sent, "delivered": delivered, "lost": 0,
                "duplicated": 0, "out_of_order": 0,
                "max_ack_ms": round(max(self.ack_ms), 1),
                "median_ack_ms": round(sorted(self.ack_ms)[len(self.ack_ms) // 2], 1)}


# --- slow HTTP clients on a bare socket ---------------------------------------------------

SILENT, TRICKLING, SHORT_BODY = "silent", "trickling headers", "short body"


async def slow_http_client(node: ChatdNode, kind: str, *, within_s: float,
                           path: str = "/api/v1/login") -> tuple[bytes, float]:
    """One slow client: SILENT sends nothing, TRICKLING sends a header that never ends
    (4 bytes every 100 ms), SHORT_BODY a POST to `path` whose body stops 100 bytes short.
    Returns what the node sent until it closed the connection, and the seconds from
    connect; AssertionError if it is still open after `within_s`."""
    reader, writer = await asyncio.open_connection(node.host, node.port)
    started = time.monotonic()

    async def trickle() -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while True:
            writer.write(b"X-a:")
            await writer.drain()
            await asyncio.sleep(0.1)

    task = asyncio.create_task(trickle()) if kind == TRICKLING else None
    if kind == SHORT_BODY:
        body = b'{"username": "slow", '
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body) + 100) + body)
    data = b""
    try:
        async with asyncio.timeout(within_s):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"{kind}: still open after {within_s} s; got {data!r}") from None
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return data, time.monotonic() - started


def summary(name: str, **figures: Any) -> None:
    """The one-line figures a test reports (run pytest with -s to see them)."""
    print(f"\n[security] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()),
          flush=True)


# --- a WebSocket client on a bare socket ----------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True,
                 claimed_length: int | None = None) -> bytes:
    """A masked client frame; `claimed_length` lies about the payload length."""
    length = len(payload) if claimed_length is None else claimed_length
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if len(payload) < 4096 \
        else _mask_fast(payload, mask)
    return head + mask + masked


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class RawWs:
    """A WebSocket client that reads only when told to.

    The socket's receive buffer is made small and the stream's buffer limit tiny, so a
    client that stops calling :meth:`read_frame` really stops draining the connection:
    the server's writes back up into its own buffers, as with a stalled phone.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, node: ChatdNode, *, headers: Mapping[str, str] | None = None,
                   rcvbuf: int = 4096) -> RawWs:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (node.host, node.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        lines = ["GET /ws HTTP/1.1", f"Host: {node.host}:{node.port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        status = b""
        while not status.endswith(b"\r\n\r\n"):
            chunk = await asyncio.wait_for(reader.read(1), 10)
            assert chunk, f"connection closed during the upgrade: {status!r}"
            status += chunk
        assert status.startswith(b"HTTP/1.1 101"), status
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send(client_frame(text.encode()))

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (fragments are not reassembled)."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return head[0] & 0x0F, await self.reader.readexactly(length)

    async def read_until_close(self, timeout: float = 20.0,
                               on_text: Callable[[bytes], None] | None = None) -> int | None:
        """Read (answering nothing) until the server's close frame; its close code, or
        None when the connection ends without one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                opcode, payload = await self.read_frame(max(0.1, deadline - time.monotonic()))
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == OP_CLOSE:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            if opcode == OP_TEXT and on_text is not None:
                on_text(payload)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
