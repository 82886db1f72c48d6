"""Helpers shared by the cluster, scale-out and multi-node tests: which master serves a
room, sends retried until acked, and connections that resume after a 4009."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from chatd import keys
from tests.client import User, Ws, connect
from tests.harness import ValkeyCluster

PARTITIONS = 16  # config.toml default

_ids = itertools.count()

LOAD_ENV = {
    "CHATD_LIMITS__SEND_RATE_PER_S": "100000",
    "CHATD_LIMITS__SEND_BURST": "100000",
    "CHATD_LIMITS__FRAME_RATE_PER_S": "100000",
    "CHATD_LIMITS__FRAME_BURST": "100000",
}


async def room_slot(cluster: ValkeyCluster, room_id: str) -> int:
    return await cluster.keyslot(keys.room(keys.partition_of(room_id, PARTITIONS), room_id))


async def room_master(cluster: ValkeyCluster, room_id: str) -> int:
    """Port of the master that serves the room's partition now."""
    return await cluster.slot_owner(await room_slot(cluster, room_id))


async def request(ws: Ws, frame: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """Send a frame with a fresh id; the reply echoing it (ack, error, ...)."""
    rid = f"req{next(_ids)}"
    await ws.send(frame | {"id": rid})
    return await ws.wait_for(lambda f: f.get("id") == rid, timeout)


async def send(ws: Ws, room: str, cmid: str, body: str | None = None,
               timeout: float = 15.0) -> dict[str, Any]:
    return await request(ws, {"type": "send", "room_id": room, "client_msg_id": cmid,
                              "body": body or cmid}, timeout)


class Member:
    """A member's connection that resumes (hello + resume) after a close with 4009,
    which the protocol allows instead of a gap; any other close fails the check."""

    def __init__(self, http: aiohttp.ClientSession, ws_url: str, user: User,
                 rooms: list[str]) -> None:
        self.http, self.ws_url, self.user, self.rooms = http, ws_url, user, rooms
        self.conns: list[Ws] = []
        self.resumes = 0

    async def open(self) -> None:
        resume = None
        if self.conns:
            resume = {r: (self.seqs(r)[-1] if self.seqs(r) else 0) for r in self.rooms}
        self.conns.append(await connect(self.http, self.ws_url, self.user, resume=resume))

    @property
    def ws(self) -> Ws:
        return self.conns[-1]

    def seqs(self, room: str) -> list[int]:
        return [m["seq"] for ws in self.conns for m in ws.messages(room)]

    def messages(self, room: str) -> list[dict[str, Any]]:
        return [m for ws in self.conns for m in ws.messages(room)]

    async def check(self) -> None:
        if self.ws.closed_code is not None:
            assert self.ws.closed_code == 4009, f"closed with {self.ws.closed_code}"
            self.resumes += 1
            await self.open()

    async def close(self) -> None:
        await self.ws.close()


async def keep_resuming(members: Sequence[Member]) -> None:
    """Until cancelled, every 50 ms: `check` each member (resume after a 4009); any other
    close ends the task with the failed assertion."""
    while True:
        for m in members:
            await m.check()
        await asyncio.sleep(0.05)


async def send_until_acked(member: Member, room: str, cmid: str, *, within_s: float = 30.0,
                           stats: dict[str, int] | None = None,
                           stop: asyncio.Event | None = None) -> dict[str, Any] | None:
    """Send, and retry with the same client_msg_id while the answer is `unavailable`
    or the connection was closed with 4009 (then resumed). None if `stop` is set first."""
    deadline = time.monotonic() + within_s
    while True:
        if stop is not None and stop.is_set():
            return None
        await member.check()
        try:
            reply = await send(member.ws, room, cmid, timeout=max(1.0, deadline -
                                                                  time.monotonic()))
        except (AssertionError, ConnectionError):
            if member.ws.closed_code is None:
                raise
            continue  # closed meanwhile: check() asserts it was a 4009 and resumes
        if reply["type"] == "ack":
            return reply
        assert reply["code"] == "unavailable", reply
        if stats is not None:
            stats["unavailable"] = stats.get("unavailable", 0) + 1
        assert time.monotonic() < deadline, f"{cmid} not acked within {within_s}s"
        await asyncio.sleep(0.05)


async def history(http: aiohttp.ClientSession, base_url: str, user: User,
                  room: str) -> list[dict[str, Any]]:
    """Every message of the room, from the log (GET .../messages, paged)."""
    out: list[dict[str, Any]] = []
    while True:
        async with http.get(f"{base_url}/api/v1/rooms/{room}/messages",
                            params={"after_seq": str(out[-1]["seq"] if out else 0),
                                    "limit": "200"}, headers=user.headers) as r:
            assert r.status == 200, (r.status, await r.text())
            page = await r.json()
        out += page["messages"]
        if not page["has_more"]:
            return out
