"""What both lean load-generator clients share: connect, read loop, reconnect, close.

A client is one WebSocket connection of one user, driven by its process's
event loop. Subclasses implement the wire protocol: ``url``, ``handshake``,
``on_text`` and ``send``. Every received text frame is handled synchronously
in the reader task (no task per frame).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from bench.plan import ConnSpec
from bench.tracking import Recorder, Track

MAX_RECONNECTS = 5


class BaseClient:
    def __init__(self, spec: ConnSpec, session: aiohttp.ClientSession, rec: Recorder,
                 body_chars: int) -> None:
        self.spec = spec
        self.session = session
        self.rec = rec
        self.body_chars = body_chars
        self.tracks: dict[str, Track] = {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.up = False
        self.stopping = False
        self.n = 0  # messages this connection sent
        self._ready: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnecting = False
        self._connecting = asyncio.Lock()

    # --- protocol (subclasses) --------------------------------------------------

    def url(self) -> str:
        raise NotImplementedError

    async def handshake(self, ws: aiohttp.ClientWebSocketResponse, resume: bool) -> None:
        raise NotImplementedError

    def on_text(self, data: str) -> None:
        raise NotImplementedError

    async def send(self, step: int, intended_ns: int) -> None:
        raise NotImplementedError

    def on_down(self) -> None:
        """The connection closed: sends without a reply will never get one."""

    def in_flight(self) -> int:
        """Sends not answered yet."""
        return 0

    # --- lifecycle --------------------------------------------------------------

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
            ws = await self.session.ws_connect(self.url(), autoping=True, max_msg_size=0,
                                               timeout=aiohttp.ClientWSTimeout(ws_close=5))
            self.ws = ws
            self._ready = asyncio.get_running_loop().create_future()
            reader = self._reader = asyncio.create_task(self._read(ws))
            try:
                await self.handshake(ws, resume)
                await asyncio.wait_for(asyncio.shield(self._ready), limit_s)
            except BaseException:
                await ws.close()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(reader, 5)
                raise
            self.up = True

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.on_text(msg.data)
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
        finally:
            was_up = self.up and self.ws is ws
            if self.ws is ws:
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
                except (aiohttp.ClientError, OSError, TimeoutError, ConnectionError):
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
        ws, reader = self.ws, self._reader
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(ws.close(), 5)
        if reader is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(reader, 5)
        for task in list(self._tasks):
            task.cancel()
        self.up = False
