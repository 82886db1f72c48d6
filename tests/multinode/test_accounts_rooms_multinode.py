"""Accounts and rooms across real chatd processes sharing one Valkey (and one cluster):
unique usernames, one direct room per pair, tokens and logout seen by every node."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import RedisBackend, ValkeyClusterFactory
from tests.harness import ChatdNode, ChatdNodes, require_chatd

ENV = {"CHATD_AUTH__ARGON2_MEMORY_KIB": "1024", "CHATD_AUTH__ARGON2_TIME_COST": "1",
       "CHATD_AUTH__ARGON2_PARALLELISM": "1", "CHATD_AUTH__LOGIN_BURST": "100000",
       "CHATD_AUTH__LOGIN_RATE_PER_S": "100000"}
PASSWORD = "correct horse battery"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def call(http: aiohttp.ClientSession, node: ChatdNode, method: str, path: str,
               body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, f"{node.url}/api/v1{path}", headers=headers,
                            data=None if body is None else json.dumps(body)) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def user(http: aiohttp.ClientSession, node: ChatdNode, name: str) -> dict[str, Any]:
    """Register on `node` and log in there: the login reply (token, user_id, ...)."""
    assert (await call(http, node, "POST", "/register",
                       {"username": name, "password": PASSWORD}))[0] == 201
    status, session = await call(http, node, "POST", "/login",
                                 {"username": name, "password": PASSWORD})
    assert status == 200
    return dict(session)


@pytest.fixture
async def two_nodes(redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> list[ChatdNode]:
    """Redis is requested first so that it outlives the nodes at teardown."""
    require_chatd()
    return await chatd_nodes.start(2, **redis_backend.chatd_args, env=ENV)


async def test_username_race_has_one_winner(two_nodes: list[ChatdNode],
                                            http: aiohttp.ClientSession) -> None:
    spellings = ["racer", "RACER", "Racer", "rAcEr"] * 5

    async def attempt(i: int, name: str) -> tuple[int, str]:
        password = f"password number {i}"
        status, _ = await call(http, two_nodes[i % 2], "POST", "/register",
                               {"username": name, "password": password})
        return status, password

    results = await asyncio.gather(*(attempt(i, n) for i, n in enumerate(spellings)))
    assert Counter(status for status, _ in results) == {201: 1, 409: len(spellings) - 1}
    [winner] = [password for status, password in results if status == 201]
    for node in two_nodes:
        status, session = await call(http, node, "POST", "/login",
                                     {"username": "Racer", "password": winner})
        assert (status, session["username"]) == (200, "racer")


async def test_fifty_concurrent_direct_creations_make_one_room(
        two_nodes: list[ChatdNode], http: aiohttp.ClientSession) -> None:
    a = await user(http, two_nodes[0], "alpha")
    b = await user(http, two_nodes[1], "bravo")

    async def create(i: int) -> tuple[int, Any]:
        me, other = (a, b) if i % 4 < 2 else (b, a)
        return await call(http, two_nodes[i % 2], "POST", "/rooms",
                          {"kind": "direct", "members": [other["user_id"]]}, token=me["token"])

    results = await asyncio.gather(*(create(i) for i in range(50)))
    assert Counter(status for status, _ in results) == {201: 1, 200: 49}
    assert len({room["room_id"] for _, room in results}) == 1
    room_id = results[0][1]["room_id"]
    for node in two_nodes:
        for who in (a, b):
            _, listed = await call(http, node, "GET", "/rooms", token=who["token"])
            assert [r["room_id"] for r in listed["rooms"]] == [room_id]


async def test_token_and_logout_are_seen_by_every_node(two_nodes: list[ChatdNode],
                                                       http: aiohttp.ClientSession) -> None:
    first, second = two_nodes
    session = await user(http, first, "charlie")
    other_session = await user(http, first, "delta")
    me = {"user_id": session["user_id"], "username": "charlie"}
    assert await call(http, second, "GET", "/me", token=session["token"]) == (200, me)
    async with http.ws_connect(second.ws_url) as ws, http.ws_connect(second.ws_url) as other:
        for socket, token in ((ws, session["token"]), (other, other_session["token"])):
            await socket.send_json({"type": "hello", "token": token})
            assert (await socket.receive_json(timeout=5))["type"] == "welcome"
        assert (await call(http, first, "POST", "/logout", token=session["token"]))[0] == 204
        status, body = await call(http, second, "GET", "/me", token=session["token"])
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        async with asyncio.timeout(2):
            message = await ws.receive()
            while message.type != aiohttp.WSMsgType.CLOSE:
                message = await ws.receive()
        assert message.data == 4001
        await other.send_json({"type": "ping", "id": "still-open"})
        assert await other.receive_json(timeout=5) == {"type": "pong", "id": "still-open"}


async def test_accounts_and_rooms_on_a_cluster(make_valkey_cluster: ValkeyClusterFactory,
                                               chatd_nodes: ChatdNodes,
                                               http: aiohttp.ClientSession) -> None:
    """Every script keeps to one slot: the same flows run unchanged on Redis Cluster."""
    require_chatd()
    cluster = await make_valkey_cluster()
    nodes = await chatd_nodes.start(2, redis_cluster=cluster, env=ENV)
    owner, guest = await user(http, nodes[0], "owner"), await user(http, nodes[1], "guest")
    status, room = await call(http, nodes[1], "POST", "/rooms",
                              {"kind": "group", "name": "ops", "members": []},
                              token=owner["token"])
    assert status == 201
    members = f"/rooms/{room['room_id']}/members"
    assert (await call(http, nodes[0], "POST", members, {"user_id": guest["user_id"]},
                       token=owner["token"]))[0] == 204
    status, listed = await call(http, nodes[1], "GET", "/rooms", token=guest["token"])
    assert [r["room_id"] for r in listed["rooms"]] == [room["room_id"]]
    assert (await call(http, nodes[1], "DELETE", f"{members}/{guest['user_id']}",
                       token=guest["token"]))[0] == 204
    assert (await call(http, nodes[0], "GET", f"/rooms/{room['room_id']}",
                       token=guest["token"]))[0] == 404
    directs = await asyncio.gather(*(
        call(http, nodes[i % 2], "POST", "/rooms",
             {"kind": "direct", "members": [guest["user_id"]]}, token=owner["token"])
        for i in range(10)))
    assert len({r["room_id"] for _, r in directs}) == 1
    assert (await call(http, nodes[0], "POST", "/logout", token=owner["token"]))[0] == 204
    assert (await call(http, nodes[1], "GET", "/me", token=owner["token"]))[0] == 401
