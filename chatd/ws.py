"""The WebSocket endpoint `/ws`: origin check, `hello`, welcome and resume, the read loop.

The handler task is the only reader of its socket. Frames are processed one
at a time, so a client's sends are stored in the order it sent them; replies
and room traffic go out through the connection (`conn.py`), in order.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from dataclasses import dataclass

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter
from redis.exceptions import RedisError

from chatd import auth, keys, messages, presence, protocol, ratelimit, rooms
from chatd.appkeys import FANOUT, HELLO_WAITS, NODE, SETTINGS, WELCOMES
from chatd.auth import Principal
from chatd.conn import Conn
from chatd.errors import ChatError, TooManyConnections
from chatd.fanout import Fanout
from chatd.hellowaits import HelloWait, HelloWaits
from chatd.http import client_key
from chatd.logs import error_text
from chatd.node import Node
from chatd.protocol import (
    CLOSE_HELLO_TIMEOUT,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    FrameError,
)
from chatd.redisconn import storage_failure

log = logging.getLogger("chatd.ws")

# Extension: `welcome` carries the presence of this many co-members at most.
_PRESENCE_IN_WELCOME = 1000


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """No Origin (a non-browser client) is fine; a browser must come from an allowed one."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    own = f"{request.scheme}://{request.host}"
    return origin == own or origin in allowed


async def handler(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    limits = node.settings.limits
    if not origin_allowed(request, node.settings.server.allowed_origins):
        raise ChatError("forbidden", "origin not allowed")
    with node.sockets.hold(), request.app[HELLO_WAITS].enter(client_key(request)) as wait:
        # No permessage-deflate: chat frames are small, and compressing every frame
        # for every recipient would cost more CPU than the bytes it saves.
        # aiohttp refuses a message of max_msg_size bytes or more; the protocol refuses
        # only frames *over* max_frame_bytes.
        # No aiohttp heartbeat and no autoping: pings and pongs are ours (heartbeat.py).
        ws = web.WebSocketResponse(autoping=False, max_msg_size=limits.max_frame_bytes + 1,
                                   decode_text=False, compress=False)
        out = await ws.prepare(request)
        opened_at = node.survivors.opened()
        try:
            conn = await _open(request, ws, out, node, wait)
            if conn is not None:
                await _read_loop(ws, node, request.app[FANOUT], conn)
        except (ChatError, RedisError, OSError) as e:
            log.warning("connection ended by a storage error", extra={"error": error_text(e)})
            if not ws.closed:
                await ws.close(code=CLOSE_INTERNAL)
        except Exception:
            # Nothing may reach the HTTP error middleware once the socket is a WebSocket:
            # its JSON error response would be written into the WebSocket stream, which
            # the client sees as a corrupt frame (1002). Seen with redis-py raising
            # RuntimeError on a connection its cluster client closed under it during a
            # failover.
            log.exception("unhandled error in websocket")
            if not ws.closed:
                await ws.close(code=CLOSE_INTERNAL)
        finally:
            node.survivors.closed(opened_at)
            node.metrics.closes.labels(str(ws.close_code)).inc()
    return ws


async def _open(request: web.Request, ws: web.WebSocketResponse, out: AbstractStreamWriter,
                node: Node, wait: HelloWait) -> Conn | None:
    """`hello`, the welcome and going live; None when the connection was refused.

    A coroutine of its own that ends before the read loop starts: the hello, the
    token and the principal go with its frame instead of staying alive as long as
    the connection."""
    hello = await _read_hello(ws, node)
    wait.leave()
    if hello is None:
        return None
    # A reconnect storm brings thousands of hellos at once. Taken all together on a
    # cluster, where their commands use redis-py's pools, most would find no free
    # connection and be closed with 1011, and their retries would add to the storm;
    # in turns, each is quick.
    async with request.app[WELCOMES]:
        admitted = await _admit(request, ws, out, node, hello)
    if isinstance(admitted, Conn):
        return admitted
    await admitted.close(ws)
    return None


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A connection turned away, closed once its welcome's turn is over: the peer paces
    a close (the frame's drain, then up to 10 s for its reply), and a turn held that
    long by a client that never answers would hold up every hello behind it."""

    code: int
    message: bytes = b""
    error: ChatError | None = None
    request_id: str | None = None

    async def close(self, ws: web.WebSocketResponse) -> None:
        if self.error is not None:
            await ws.send_frame(protocol.error_frame(self.error, self.request_id),
                                WSMsgType.TEXT)
        await ws.close(code=self.code, message=self.message)


async def _admit(request: web.Request, ws: web.WebSocketResponse, out: AbstractStreamWriter,
                 node: Node, hello: protocol.Hello) -> Conn | _Refusal:
    token = hello.token or auth.bearer_token(request) or ""
    try:
        principal = await auth.verify_token(node, token)
    except ChatError as e:
        return _Refusal(CLOSE_UNAUTHORIZED, error=e, request_id=hello.id)
    fanout = request.app[FANOUT]
    # The heartbeat sweep closes the connection when its session expires.
    session_ends = node.monotonic_at(principal.expires_at)
    conn = Conn(ws, out, principal.user_id, principal.session_id,
                node.settings.limits.send_queue_max, node.metrics.frames_out, fanout.batch,
                session_ends)
    first = fanout.add_conn(conn)
    try:
        await presence.opened(node, conn.user_id, first)
    except TooManyConnections:
        await presence.refused(node, conn.user_id, fanout.remove_conn(conn))
        return _Refusal(CLOSE_TOO_MANY, b"too many connections")
    except (ChatError, RedisError, OSError):
        await presence.refused(node, conn.user_id, fanout.remove_conn(conn))
        raise
    live = False
    try:
        # Now that this node is listed for the user, a logout notifies us; one that
        # happened before the listing is caught by checking the session again.
        await auth.verify_token(node, token)
        await _welcome(node, fanout, conn, principal, hello)
        live = True
    except ChatError as e:
        if e.code != "unauthorized":
            raise
        return _Refusal(CLOSE_UNAUTHORIZED, error=e, request_id=hello.id)
    finally:
        if not live:
            await _release(node, fanout, conn)
    return conn


async def _release(node: Node, fanout: Fanout, conn: Conn) -> None:
    """Undo `_open` for a connection that went live or failed on the way."""
    last = fanout.remove_conn(conn)
    await conn.stop()
    node.spawn(lambda: presence.closed(node, conn.user_id, last), retry=True)


async def _read_hello(ws: web.WebSocketResponse, node: Node) -> protocol.Hello | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + node.settings.limits.auth_timeout_s
    try:
        while True:
            msg = await ws.receive(timeout=max(0.0, deadline - loop.time()))
            if msg.type not in _CONTROL:
                break
            if msg.type == WSMsgType.PING:
                await ws.pong(msg.data)
    except TimeoutError:
        await ws.close(code=CLOSE_HELLO_TIMEOUT, message=b"hello timeout")
        return None
    if msg.type == WSMsgType.TEXT:
        try:
            frame = protocol.decode(msg.data, node.settings.limits.max_body_chars)
        except FrameError:
            frame = None
        if isinstance(frame, protocol.Hello):
            return frame
    if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
        await ws.close(code=CLOSE_UNAUTHORIZED, message=b"hello first")
    return None  # otherwise closed already (by the client, or by aiohttp with 1009)


async def _welcome(node: Node, fanout: Fanout, conn: Conn, principal: Principal,
                   hello: protocol.Hello) -> None:
    """Join every room, then read positions, then go live: nothing can fall in between."""
    room_ids = await rooms.user_room_ids(node, conn.user_id)
    await fanout.join(conn, room_ids)
    commands: list[tuple[str, ...]] = []
    for room_id in room_ids:
        p = keys.partition_of(room_id, node.partitions)
        commands += [("HGET", keys.room(p, room_id), "seq"),
                     ("HMGET", keys.room_marks(p, room_id), f"d:{conn.user_id}",
                      f"r:{conn.user_id}"),
                     # The truth again, after the join: a removal since the index was read
                     # would otherwise go unnoticed; one after this reaches us as an event.
                     ("HKEYS", keys.room_members(p, room_id))]
    replies = await node.redis.execute_many(commands)
    welcome_rooms = []
    last_seqs = {}
    peers: dict[str, None] = {}
    for i, room_id in enumerate(room_ids):
        last, marks, members = replies[3 * i:3 * i + 3]
        if conn.user_id not in members:
            fanout.leave(conn, room_id)
            continue
        peers.update(dict.fromkeys(members))
        last = int(last or 0)
        delivered, read = (int(v or 0) for v in marks)
        last_seqs[room_id] = last
        welcome_rooms.append({"room_id": room_id, "last_seq": last, "read_seq": read,
                              "delivered_seq": delivered})
    peers.pop(conn.user_id, None)
    present = await presence.snapshot(node, list(peers)[:_PRESENCE_IN_WELCOME])
    # First in the queue: room events may have been queued since the join.
    conn.push_first(protocol.encode({
        "type": "welcome", "user_id": principal.user_id, "session_id": principal.session_id,
        "node_id": node.node_id, "heartbeat_s": node.settings.limits.heartbeat_s,
        "rooms": welcome_rooms, "presence": present}))
    conn.start()
    resume = hello.resume or {}
    for room_id, last in last_seqs.items():
        start = resume[room_id] + 1 if room_id in resume else last + 1
        fanout.go_live(conn, room_id, start, last)


class _Budget:
    """Per-connection limits kept in memory: the connection lives on this node only."""

    __slots__ = ("burst", "invalid", "invalid_max", "invalid_window", "rate", "stamp", "tokens")

    def __init__(self, node: Node) -> None:
        limits = node.settings.limits
        self.rate = limits.frame_rate_per_s
        self.burst = float(limits.frame_burst)
        self.tokens = self.burst
        self.stamp = time.monotonic()
        # Made at the first invalid frame, which most connections never send; a list, not
        # a deque, for the same reason (56 bytes instead of 760).
        self.invalid: list[float] | None = None
        self.invalid_max = limits.invalid_frames_max
        self.invalid_window = limits.invalid_frames_window_s

    def take(self) -> int:
        """0 when the frame may proceed, else the milliseconds to wait."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return int((1 - self.tokens) * 1000 / self.rate) + 1

    def strike(self) -> bool:
        """Count an invalid frame; True when the connection has had too many."""
        now = time.monotonic()
        if self.invalid is None:
            self.invalid = []
        self.invalid.append(now)
        del self.invalid[:bisect.bisect_left(self.invalid, now - self.invalid_window)]
        return len(self.invalid) >= self.invalid_max


_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
_CONTROL = (WSMsgType.PING, WSMsgType.PONG)


async def _read_loop(ws: web.WebSocketResponse, node: Node, fanout: Fanout, conn: Conn) -> None:
    """Read and answer frames until the connection ends, then release it.

    `receive()` rather than `async for`: the iterator's `__anext__` would be one more
    coroutine kept alive on every idle connection."""
    budget = _Budget(node)
    max_body = node.settings.limits.max_body_chars
    metrics = node.metrics
    clock = time.monotonic
    try:
        while True:
            msg = await ws.receive()
            if msg.type in _ENDED or conn.closing:
                break
            conn.last_heard = clock()
            if msg.type in _CONTROL:
                if msg.type == WSMsgType.PING:
                    conn.control(protocol.pong_frame(msg.data))
                continue
            metrics.frames_in.value += 1
            if msg.type == WSMsgType.TEXT:
                try:
                    frame = protocol.decode(msg.data, max_body)
                except FrameError as e:
                    conn.push(protocol.error_frame(e, e.request_id))
                    metrics.errors.labels(e.code).inc()
                    if e.code == "bad_request" and budget.strike():
                        conn.close(CLOSE_POLICY, flush=True)
                    continue
            else:  # binary frames are not part of the protocol
                conn.push(protocol.error_frame(
                    FrameError("binary frames are not accepted", None), None))
                if budget.strike():
                    conn.close(CLOSE_POLICY, flush=True)
                continue
            wait_ms = budget.take()
            if wait_ms:
                err = ChatError("rate_limited", "too many frames", retry_after_ms=wait_ms)
                conn.push(protocol.error_frame(err, frame.id))
                continue
            try:
                await _dispatch(node, conn, frame)
            except ChatError as e:
                _reply_error(conn, node, e, frame.id)
            except Exception as e:
                # RuntimeError and redis-py's own write race: its cluster client may close
                # a connection under a command in flight during a failover (see
                # scripts.py); retrying is safe.
                if not isinstance(e, RuntimeError) and not storage_failure(e):
                    raise
                log.warning("storage error", extra={"error": error_text(e)})
                _reply_error(conn, node, ChatError("unavailable", "storage is unavailable"),
                             frame.id)
    finally:
        await _release(node, fanout, conn)


def _reply_error(conn: Conn, node: Node, err: ChatError, request_id: str | None) -> None:
    node.metrics.errors.labels(err.code).inc()
    conn.push(protocol.error_frame(err, request_id))


async def _dispatch(node: Node, conn: Conn, frame: protocol.ClientFrame) -> None:
    uid = conn.user_id
    if isinstance(frame, protocol.Send):
        sent = await messages.send(node, uid, frame.room_id, frame.client_msg_id, frame.body)
        reply = {"type": "ack", "id": frame.id, "room_id": frame.room_id,
                 "client_msg_id": frame.client_msg_id, "seq": sent.seq, "ts": sent.ts,
                 "duplicate": sent.duplicate}
        if frame.id is None:
            del reply["id"]
        conn.push(protocol.encode(reply))
    elif isinstance(frame, protocol.Delivered | protocol.Read):
        kind = "read" if isinstance(frame, protocol.Read) else "delivered"
        await messages.mark(node, uid, frame.room_id, kind, frame.seq)
    elif isinstance(frame, protocol.Typing):
        await messages.typing(node, uid, frame.room_id, frame.active)
    elif isinstance(frame, protocol.History):
        await ratelimit.take_read(node, uid)
        after = frame.after_seq
        if after is None and frame.before_seq is None:
            after = 0
        page, more = await messages.history(node, uid, frame.room_id, after_seq=after,
                                            before_seq=frame.before_seq, limit=frame.limit)
        conn.push(messages.page_json(frame.room_id, page, more, frame.id))
    elif isinstance(frame, protocol.Ping):
        conn.push(protocol.encode({"type": "pong", "id": frame.id} if frame.id is not None
                                  else {"type": "pong"}))
    else:
        raise ChatError("bad_request", "already said hello")


def add_routes(app: web.Application) -> None:
    limits = app[SETTINGS].limits
    app[HELLO_WAITS] = HelloWaits(limits.hello_waits_per_ip,
                                  retry_after_ms=int(limits.auth_timeout_s * 1000))
    app[WELCOMES] = asyncio.Semaphore(limits.welcomes_at_once)
    app.router.add_get("/ws", handler)
