"""What both lean load-generator clients share: connect, receive, send, reconnect, close.

A client is one WebSocket connection of one user (bench/wsclient.py), driven
by its process's event loop. Subclasses implement the wire protocol: ``url``,
``handshake``, ``on_text`` and ``send``. Every received text message is
handled synchronously where the socket's data arrives (no task or future per
frame), and every frame is written straight to the socket.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.plan import ConnSpec
from bench.tracking import Recorder, Track, make_body
from bench.wsclient import WebSocket

MAX_RECONNECTS = 5
# TCP connect and upgrade handshake (aiohttp's default sock_connect timeout).
OPEN_TIMEOUT_S = 30.0


class BaseClient:
    def __init__(self, spec: ConnSpec, source: str, rec: Recorder, body_chars: int) -> None:
        self.spec = spec
        self.source = source  # local address to connect from (see loadgen.source_address)
        self.rec = rec
        self.body_chars = body_chars
        self.tracks: dict[str, Track] = {}
        self.ws: WebSocket | None = None
        self.up = False
        self.stopping = False
        self.n = 0  # messages this connection sent
        # Sends not answered yet: request id -> (step, sent_ns, whatever the protocol adds).
        self.pending: dict[str | int, tuple[int, ...]] = {}
        self._ready: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnecting = False
        self._connecting = asyncio.Lock()

    # --- protocol (subclasses) --------------------------------------------------

    def url(self) -> str:
        raise NotImplementedError

    def handshake(self, resume: bool) -> None:
        """The WebSocket is open: say what the server waits for before it accepts."""
        raise NotImplementedError

    def on_text(self, data: str) -> None:
        raise NotImplementedError

    async def send(self, step: int, intended_ns: int) -> None:
        raise NotImplementedError

    # --- lifecycle --------------------------------------------------------------

    def in_flight(self) -> int:
        return len(self.pending)

    def on_down(self) -> None:
        """The connection closed: no reply will come, so the outcome of what is pending
        is unknown and it is expected nowhere."""
        for _ in range(len(self.pending)):
            self.rec.fail("closed_before_ack")
        self.pending.clear()

    def next_message(self, step: int, intended_ns: int) -> tuple[str, str, int] | None:
        """The room, body and send time of this connection's next message, counted as sent;
        None, counted as skipped, when the connection is down or has no room to send to."""
        room = self.spec.send_room
        if room is None or not self.can_send():
            self.rec.skipped += 1
            return None
        self.n += 1
        body = make_body(intended_ns, step, self.spec.idx, self.n, self.body_chars)
        now = time.time_ns()
        self.rec.sent_one(step, intended_ns, now)
        return room, body, now

    def can_send(self) -> bool:
        """Up and no close under way (a server's close is answered before the socket ends)."""
        return self.up and self.ws is not None and self.ws.is_open

    def send_frame(self, data: bytes | str) -> None:
        """Write one text frame; ConnectionResetError when the connection is not open."""
        ws = self.ws
        if ws is None:
            raise ConnectionResetError("never connected")
        ws.send_text(data)

    def ready(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def refuse(self, why: str) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectionError(why))

    async def connect(self, *, resume: bool = False, limit_s: float = 30.0) -> None:
        """Open the connection and wait until the server accepted it.

        One connection per client at a time: a failed attempt is closed and
        awaited here (its caller retries), never reconnected in the background.
        """
        async with self._connecting:
            self.stopping = False
            # Both set before the socket exists: the server may speak first, in the
            # same segment as its upgrade response (socket.io's open packet).
            ws = self.ws = WebSocket(self.url(), self.on_text, self._lost)
            ready = self._ready = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(ws.open(self.source), OPEN_TIMEOUT_S)
                self.handshake(resume)
                await asyncio.wait_for(asyncio.shield(ready), limit_s)
            except BaseException:
                ready.cancel()  # nobody waits for it any more
                await ws.close()
                raise
            self.up = True

    def _lost(self, ws: WebSocket) -> None:
        if self.ws is not ws:
            return
        was_up = self.up
        self.up = False
        self.refuse(f"closed with {ws.close_code}")
        self.on_down()
        if was_up and not self.stopping:
            # Closed by the server while in use: reconnect (chatd: with resume).
            self.rec.closes[str(ws.close_code)] += 1
            self.spawn(self._reconnect())

    async def _reconnect(self) -> None:
        if self._reconnecting:
            return
        self._reconnecting = True
        try:
            for attempt in range(MAX_RECONNECTS):
                await asyncio.sleep(0.1 * (attempt + 1))
                if self.stopping:
                    return
                try:
                    await self.connect(resume=True)
                except (OSError, TimeoutError):
                    continue
                self.rec.reconnects += 1
                return
        finally:
            self._reconnecting = False

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self.stopping = True
        ws = self.ws
        if ws is not None:
            await ws.close()
        for task in list(self._tasks):
            task.cancel()
        self.up = False
