"""One Redis connection shared by every concurrent caller: the hot path's client.

RESP answers commands in the order they were sent, so a command is written
in the loop turn that issued it and its reply is simply the next one parsed
(hiredis): no pool to check a connection out of, no retry wrapper, no
timeout context per read.
redis-py's asyncio client spends about 140-200 us of CPU per call on this
machine, this about 30-40 (`python -m bench.redis_client` measures both);
with a send costing a script call and each node an inbox read and an ack,
that was most of the server's CPU per delivered message.

Used on a standalone server for what runs per message: scripts, inbox reads
and acks, room log pages. Everything else, and everything on a Redis Cluster
(slot routing, MOVED/ASK), stays on redis-py (`redisconn.py`).

Failure model: a lost connection, a protocol error or a reply later than its
deadline fails every command in flight (redis-py's `ConnectionError` and
`TimeoutError`, so callers handle both clients alike) and drops the socket;
the next command connects again. A client made with `retries` runs a command
again after such a failure (with a short backoff), like redis-py's clients:
only for commands that are safe to run twice (chatd's scripts are idempotent,
reads are reads). A blocking command (XREADGROUP BLOCK) holds up everything
behind it, so it gets a client of its own.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float

_FIRST_BACKOFF_S = 0.02
_MAX_BACKOFF_S = 0.25


class _Wire(asyncio.Protocol):
    """The socket side: writes commands, resolves replies in order, enforces deadlines."""

    def __init__(self, decode: bool) -> None:
        self._parser = hiredis.Reader(replyError=ResponseError,
                                      encoding="utf-8" if decode else None)
        self._waiting: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._unsent: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, commands: Sequence[Sequence[Arg]], timeout_s: float,
             step_s: float = 0.0) -> list[asyncio.Future[Any]]:
        """Queue the commands; the i-th reply is due within `timeout_s + i * step_s`."""
        if self.lost or self._transport is None:
            raise RedisConnectionError("connection to Redis lost")
        deadline = self._loop.time() + timeout_s
        futures = [self._loop.create_future() for _ in commands]
        self._waiting.extend((deadline + i * step_s, future) for i, future in enumerate(futures))
        # Commands issued in one turn of the event loop (sends read from several
        # sockets at once) leave in one write: one syscall here, one read in Redis.
        if not self._unsent:
            self._loop.call_soon(self._flush)
        # hiredis's stub types the tuple as one element; it takes any number.
        self._unsent.extend(hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
                            for args in commands)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return futures

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._check_deadline)

    def _flush(self) -> None:
        if not self.lost and self._transport is not None:
            self._transport.write(b"".join(self._unsent))
        self._unsent.clear()

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while self._waiting:
                reply = self._parser.gets()
                if reply is False:
                    return
                _, future = self._waiting.popleft()
                if future.done():  # the caller was cancelled; its reply still had to be read
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as e:
            self.close(RedisConnectionError(f"Redis protocol error: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by server'}"))

    def close(self, error: Exception) -> None:
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: Exception) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def _check_deadline(self) -> None:
        # One timer for the whole queue, at its earliest deadline (a cancelled caller's
        # command counts: its reply must still come). Deadlines are not in queue order
        # when callers queue blocking commands with longer ones ahead of short ones.
        self._timer = None
        if not self._waiting:
            return
        deadline = min(d for d, _ in self._waiting)
        if deadline <= self._loop.time():
            self.close(RedisTimeoutError("Redis did not answer in time"))
            return
        self._arm(deadline)


class Multiplexed:
    """A pipelined client to one standalone server, connected on first use.

    `timeout_s` bounds every reply (plus `extra_s` for a blocking command)."""

    def __init__(self, url: str, *, decode: bool, connect_timeout_s: float,
                 timeout_s: float, retries: int = 0) -> None:
        self._params = parse_url(url)
        self._decode = decode
        self._retries = retries
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._wire: _Wire | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Arg, extra_s: float = 0.0) -> Any:
        return (await self.pipeline((args,), extra_s=extra_s))[0]

    async def pipeline(self, commands: Sequence[Sequence[Arg]], *,
                       extra_s: float = 0.0) -> list[Any]:
        """Send the commands back to back (one write) and return their replies; raise the
        first error once all replies are in, so none is left unread."""
        delay = _FIRST_BACKOFF_S
        attempt = 0
        while True:
            try:
                return await self._once(commands, extra_s)
            except (RedisConnectionError, RedisTimeoutError):
                if attempt == self._retries:
                    raise
            attempt += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)

    async def submit(self, commands: Sequence[Sequence[Arg]], *, extra_s: float = 0.0,
                     step_s: float = 0.0) -> list[asyncio.Future[Any]]:
        """Write the commands and return a future per reply, without waiting for them:
        for a caller that keeps commands in flight. The i-th reply may take `extra_s +
        i * step_s` beyond the timeout. No retries; a caller that gives up on replies
        must cancel their futures (or close the client, if they may still come)."""
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._connected()
        return wire.send(commands, self._timeout_s + extra_s, step_s)

    async def _once(self, commands: Sequence[Sequence[Arg]], extra_s: float) -> list[Any]:
        futures = await self.submit(commands, extra_s=extra_s)
        replies: list[Any] = []
        error: BaseException | None = None
        for i, future in enumerate(futures):
            try:
                replies.append(await future)  # replies come in order: one wait each
            except asyncio.CancelledError:
                for rest in futures[i:]:
                    rest.cancel()  # the replies are still read, and dropped
                raise
            except Exception as e:
                error = error or e
        if error is not None:
            raise error
        return replies

    async def close(self) -> None:
        if self._wire is not None:
            self._wire.close(RedisConnectionError("client closed"))
            self._wire = None

    async def _connected(self) -> _Wire:
        async with self._connecting:
            if self._wire is None or self._wire.lost:
                self._wire = await self._connect()
            return self._wire

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        p = self._params
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if "path" in p:
                    _, wire = await loop.create_unix_connection(
                        lambda: _Wire(self._decode), p["path"])
                else:
                    tls = ssl.create_default_context() \
                        if p.get("connection_class") is SSLConnection else None
                    _, wire = await loop.create_connection(
                        lambda: _Wire(self._decode), p.get("host", "localhost"),
                        p.get("port", 6379), ssl=tls)
                hello: list[tuple[Arg, ...]] = []
                if p.get("password") is not None:
                    user = p.get("username")
                    hello.append(("AUTH", user, p["password"]) if user else
                                 ("AUTH", p["password"]))
                if p.get("db"):
                    hello.append(("SELECT", p["db"]))
                try:
                    for future in wire.send(hello, self._connect_timeout_s) if hello else ():
                        await future
                except BaseException as e:  # AUTH refused, or a timeout: do not leak it
                    wire.close(RedisConnectionError(f"Redis handshake failed: {e}"))
                    raise
        except TimeoutError:
            raise RedisTimeoutError("timed out connecting to Redis") from None
        except OSError as e:
            raise RedisConnectionError(f"cannot connect to Redis: {e}") from e
        return wire


def entries(reply: list[Any] | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """A stream range (XRANGE, one stream of an XREAD) as redis-py shapes it: field
    lists become dicts."""
    out = []
    for entry_id, flat in reply or ():
        it = iter(flat or ())
        out.append((entry_id, dict(zip(it, it, strict=True))))
    return out
