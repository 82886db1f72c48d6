"""chatd setup through the public HTTP API (not measured): users, logins, rooms."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from bench.cluster import BenchError
from bench.plan import Topology

PASSWORD = "bench-password-1"
# Creating a room runs up to 16 member updates at once on chatd's Redis pool
# (redis.max_connections, 64 per client): a few concurrent creations are enough
# (setup is not measured; before chatd c75be9d a full pool failed the request).
ROOM_CONCURRENCY = 2
_T = TypeVar("_T")


class SetupError(BenchError):
    pass


async def _call(session: aiohttp.ClientSession, method: str, url: str, *,
                token: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(5):
        try:
            async with session.request(method, url, json=body, headers=headers) as r:
                return r.status, await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError):
            if attempt == 4:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


async def _bounded(items: list[_T], limit: int, fn: Callable[[_T], Awaitable[Any]]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(item: _T) -> Any:
        async with sem:
            return await fn(item)

    return list(await asyncio.gather(*(one(i) for i in items)))


async def setup_chatd(http_urls: list[str], topo: Topology,
                      concurrency: int = 16) -> tuple[list[str], list[str]]:
    """Register and log in every user (on its own node), create every room.

    Returns (tokens by user index, room ids by room index).
    """
    tag = secrets.token_hex(3)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def user(u: int) -> tuple[str, str]:
            base = http_urls[u % len(http_urls)] + "/api/v1"
            creds = {"username": f"b{tag}_{u}", "password": PASSWORD}
            status, body = await _call(session, "POST", base + "/register", body=creds)
            if status != 201:
                raise SetupError(f"register {u}: {status} {body}")
            status, body = await _call(session, "POST", base + "/login", body=creds)
            if status != 200:
                raise SetupError(f"login {u}: {status} {body}")
            return str(body["token"]), str(body["user_id"])

        users = await _bounded(list(range(topo.n_users)), concurrency, user)
        tokens = [t for t, _ in users]
        user_ids = [uid for _, uid in users]

        async def room(j: int) -> str:
            members = topo.rooms[j]
            owner = members[0]
            base = http_urls[owner % len(http_urls)] + "/api/v1"
            if topo.kind == "direct":
                payload: dict[str, Any] = {"kind": "direct", "members": [user_ids[members[1]]]}
            else:
                payload = {"kind": "group", "name": f"bench {j}",
                           "members": [user_ids[m] for m in members[1:]]}
            status, body = await _call(session, "POST", base + "/rooms", token=tokens[owner],
                                       body=payload)
            if status not in (200, 201):
                raise SetupError(f"create room {j}: {status} {body}")
            return str(body["room_id"])

        room_ids = await _bounded(list(range(len(topo.rooms))), ROOM_CONCURRENCY, room)
    return tokens, room_ids
