"""A small chatd client for tests: HTTP API calls and WebSocket connections.

Tests talk to real chatd processes through this, the way a real client would:
JSON over HTTP with a bearer token, and a WebSocket that starts with `hello`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from tests.harness import ChatdNode

PASSWORD = "correct horse battery"

# Fast argon2 and generous login limits: tests create many users quickly.
FAST_ENV = {
    "CHATD_AUTH__ARGON2_MEMORY_KIB": "1024",
    "CHATD_AUTH__ARGON2_TIME_COST": "1",
    "CHATD_AUTH__ARGON2_PARALLELISM": "1",
    "CHATD_AUTH__LOGIN_RATE_PER_S": "1000",
    "CHATD_AUTH__LOGIN_BURST": "1000",
}

_ids = itertools.count(1)


@dataclass
class User:
    username: str
    user_id: str
    token: str
    session_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Api:
    """HTTP calls against one node; returns (status, json body)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base = base_url.rstrip("/")

    async def call(self, method: str, path: str, *, user: User | None = None,
                   json_body: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        hdrs = dict(user.headers) if user else {}
        hdrs.update(headers or {})
        async with self.session.request(method, f"{self.base}{path}", json=json_body, data=data,
                                        headers=hdrs) as r:
            text = await r.text()
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = text
            return r.status, body

    async def get(self, path: str, user: User | None = None) -> Any:
        """GET that must answer 200; returns the body."""
        status, body = await self.call("GET", path, user=user)
        assert status == 200, (path, status, body)
        return body

    async def messages(self, user: User, room_id: str) -> list[dict[str, Any]]:
        """What the room has stored (up to 200 messages), as `user` sees it over HTTP."""
        body = await self.get(f"/api/v1/rooms/{room_id}/messages?limit=200", user)
        return list(body["messages"])

    async def users(self, count: int) -> list[User]:
        """`count` fresh users, registered and logged in."""
        return [await self.register() for _ in range(count)]

    async def group_of(self, count: int, name: str = "room") -> tuple[list[User], str]:
        """`count` fresh users and a group room the first of them made with the others."""
        users = await self.users(count)
        return users, await self.group(users[0], users[1:], name)

    async def register(self, username: str | None = None) -> User:
        name = username or f"u{next(_ids)}_{secrets.token_hex(3)}"
        status, body = await self.call("POST", "/api/v1/register",
                                       json_body={"username": name, "password": PASSWORD})
        assert status == 201, (status, body)
        return await self.login(name)

    async def login(self, username: str) -> User:
        status, body = await self.call("POST", "/api/v1/login",
                                       json_body={"username": username, "password": PASSWORD})
        assert status == 200, (status, body)
        return User(body["username"], body["user_id"], body["token"], body["session_id"])

    async def group(self, owner: User, members: list[User], name: str = "room") -> str:
        status, body = await self.call("POST", "/api/v1/rooms", user=owner, json_body={
            "kind": "group", "name": name, "members": [m.user_id for m in members]})
        assert status == 201, (status, body)
        return str(body["room_id"])

    async def direct(self, a: User, b: User) -> str:
        status, body = await self.call("POST", "/api/v1/rooms", user=a, json_body={
            "kind": "direct", "members": [b.user_id]})
        assert status in (200, 201), (status, body)
        return str(body["room_id"])

    async def logout(self, user: User, *conns: Ws) -> tuple[list[int | None], float]:
        """Log `user` out; the close codes of `conns` (each waited for up to 2.5 s) and the
        seconds from the request until the last of them closed."""
        started = time.monotonic()
        status, _ = await self.call("POST", "/api/v1/logout", user=user)
        assert status == 204
        codes = await asyncio.gather(*(ws.wait_closed(timeout=2.5) for ws in conns))
        return list(codes), time.monotonic() - started


@dataclass
class Ws:
    """One WebSocket connection; frames are read by a background task into `frames`."""

    ws: aiohttp.ClientWebSocketResponse
    frames: list[dict[str, Any]] = field(default_factory=list)
    closed_code: int | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(json.loads(msg.data))
                self._arrived.set()
        self.closed_code = self.ws.close_code
        self._arrived.set()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def send_raw(self, data: Any) -> None:
        """Send a str as a text frame as it is, bytes as a binary frame, anything else as
        JSON text."""
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        elif isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_str(json.dumps(data))

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send `frame` with a fresh `id`; return the reply (or error) echoing it."""
        rid = f"q{next(_ids)}"
        await self.send({**frame, "id": rid})
        return await self.wait_for(lambda f: f.get("id") == rid, timeout)

    async def ping(self) -> None:
        """A ping round trip, asserting the pong: the connection is open, and as frames of
        one connection are handled in order, the ones sent before it are done."""
        reply = await self.request({"type": "ping"})
        assert reply == {"type": "pong", "id": reply.get("id")}, reply

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def messages(self, room_id: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.of_type("message") if room_id is None or f["room_id"] == room_id]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """The first frame (oldest first) matching `predicate`, waiting for it if needed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if predicate(frame):
                    return frame
            seen = len(self.frames)
            if self.closed_code is not None:
                raise AssertionError(f"closed with {self.closed_code} while waiting")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame in {timeout}s; last: {self.frames[-5:]}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def wait_type(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: f.get("type") == kind and all(f.get(k) == v for k, v in match.items()),
            timeout)

    async def wait_messages(self, room_id: str, count: int, timeout: float = 20.0) -> list[
            dict[str, Any]]:
        await self.wait_for(lambda f: len(self.messages(room_id)) >= count, timeout)
        return self.messages(room_id)

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.closed_code

    async def send_message(self, room_id: str, body: str, client_msg_id: str | None = None,
                           timeout: float = 10.0) -> dict[str, Any]:
        """Send and wait for the ack (or error) echoing our request id."""
        return await self.request({"type": "send", "room_id": room_id,
                                   "client_msg_id": client_msg_id or secrets.token_hex(8),
                                   "body": body}, timeout)

    async def close(self) -> None:
        await self.ws.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


async def connect(session: aiohttp.ClientSession, ws_url: str, user: User | None, *,
                  resume: dict[str, int] | None = None, hello: bool = True,
                  welcome: bool = True, **ws_options: Any) -> Ws:
    """Open /ws (`ws_options` go to `ws_connect`, e.g. `headers`, `autoping`) and, by
    default, say hello and wait for `welcome` (`welcome=False`: do not wait for the answer)."""
    ws = Ws(await session.ws_connect(ws_url, **{"autoping": True, **ws_options}))
    ws.start()
    if hello and user is not None:
        frame: dict[str, Any] = {"type": "hello", "token": user.token}
        if resume is not None:
            frame["resume"] = resume
        await ws.send(frame)
        if welcome:
            await ws.wait_type("welcome")
    return ws


async def connect_all(session: aiohttp.ClientSession,
                      *on: tuple[ChatdNode, User]) -> list[Ws]:
    """`connect` each (node, user), one after the other; the connections in that order."""
    return [await connect(session, node.ws_url, user) for node, user in on]


class Chat:
    """A client of one node: an HTTP session, its `Api`, and the WebSockets opened through
    `connect` / `raw`. `async with Chat(node) as chat:` closes them all, then the session."""

    def __init__(self, node: ChatdNode) -> None:
        self.node = node
        self.http = aiohttp.ClientSession()
        self.api = Api(self.http, node.url)
        self._conns: list[Ws] = []

    async def __aenter__(self) -> Chat:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            for ws in self._conns:
                await ws.close()
        finally:
            await self.http.close()

    async def connect(self, user: User | None, **options: Any) -> Ws:
        """`connect` to this node; closed on the way out."""
        ws = await connect(self.http, self.node.ws_url, user, **options)
        self._conns.append(ws)
        return ws

    async def raw(self, **ws_options: Any) -> Ws:
        """A connection that has not said hello yet."""
        return await self.connect(None, **ws_options)


async def metric(http: aiohttp.ClientSession, base_url: str, name: str,
                 labels: dict[str, str] | None = None) -> float:
    """One sample of a node's /metrics (0 when absent)."""
    want = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    async with http.get(base_url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
