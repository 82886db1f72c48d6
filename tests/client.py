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
from dataclasses import dataclass, field
from typing import Any

import aiohttp

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
        rid = f"q{next(_ids)}"
        await self.send({"type": "send", "id": rid, "room_id": room_id,
                         "client_msg_id": client_msg_id or secrets.token_hex(8), "body": body})
        return await self.wait_for(lambda f: f.get("id") == rid, timeout)

    async def close(self) -> None:
        await self.ws.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


async def connect(session: aiohttp.ClientSession, ws_url: str, user: User | None, *,
                  resume: dict[str, int] | None = None, hello: bool = True) -> Ws:
    """Open /ws and (by default) say hello, waiting for `welcome`."""
    ws = Ws(await session.ws_connect(ws_url, autoping=True))
    ws.start()
    if hello and user is not None:
        frame: dict[str, Any] = {"type": "hello", "token": user.token}
        if resume is not None:
            frame["resume"] = resume
        await ws.send(frame)
        await ws.wait_type("welcome")
    return ws


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
