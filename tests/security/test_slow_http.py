"""Slow HTTP clients cannot hold a node's sockets (`server.request_timeout_s`).

A connection has `server.request_timeout_s` (1 s here) to send a whole request: against
one real node on loopback, over bare sockets,

* a connection that sends nothing is closed, with no response;
* a request whose headers trickle in a few bytes at a time (slowloris) is closed before
  they are complete, however steadily the bytes keep coming;
* a body that stops short of its `Content-Length` is answered (400 `bad_request` where
  chatd reads the body, the usual answer where it does not) and the connection closed;
* a client that stops reading a response larger than the sockets' buffers is dropped
  once it has acknowledged nothing for `server.send_timeout_s` (1 s here): its
  connection is reset, where it used to hold a handler and the rest of the response
  for ever;

while a WebSocket and a keep-alive HTTP client that do their part are not affected: the
WebSocket chats on past several timeouts, and HTTP requests on one connection go on.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import psutil
import pytest

from tests.client import Chat
from tests.conftest import OneNode
from tests.harness import ChatdNode
from tests.security.support import (
    SHORT_BODY,
    SILENT,
    TRICKLING,
    UNTHROTTLED,
    slow_http_client,
    summary,
)

TIMEOUT_S = 1.0
ENV = {"CHATD_SERVER__REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
GRACE_S = 4.0  # on top of the timeout, for a loaded CI machine


@pytest.mark.parametrize(("kind", "label"), [(SILENT, "silent connection"),
                                             (TRICKLING, "trickled headers")])
async def test_a_request_that_never_completes_its_headers_is_cut_off(
        one_node: OneNode, kind: str, label: str) -> None:
    node = await one_node.start(ENV)
    data, elapsed = await slow_http_client(node, kind, within_s=TIMEOUT_S + GRACE_S)
    summary(label, closed_after_s=round(elapsed, 2))
    assert data == b""
    assert elapsed >= TIMEOUT_S * 0.5  # libuv times from its cached loop time


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/api/v1/login", 400, "bad_request"),  # reads its body: waits for it, then gives up
    ("/api/v1/nowhere", 404, "not_found"),  # never reads it: aiohttp lingers for the rest
])
async def test_a_body_that_stops_short_is_answered_and_the_connection_closes(
        one_node: OneNode, path: str, status: int, code: str) -> None:
    node = await one_node.start(ENV)
    data, elapsed = await slow_http_client(node, SHORT_BODY, within_s=TIMEOUT_S + GRACE_S,
                                           path=path)
    head, _, payload = data.partition(b"\r\n\r\n")
    summary(f"short body to {path}", closed_after_s=round(elapsed, 2))
    assert head.startswith(b"HTTP/1.1 %d " % status), data
    assert json.loads(payload)["error"]["code"] == code
    if code == "bad_request":
        assert "did not arrive within 1 s" in json.loads(payload)["error"]["message"]
        assert elapsed >= TIMEOUT_S * 0.5  # libuv times from its cached loop time


async def test_clients_that_do_their_part_are_not_cut_off(one_node: OneNode) -> None:
    async with one_node.chat(ENV) as chat:
        users, room = await chat.api.group_of(2)
        alice, bob = await chat.connect(users[0]), await chat.connect(users[1])
        for i in range(3):
            await asyncio.sleep(TIMEOUT_S * 1.5)
            ack = await alice.send_message(room, f"still here {i}")
            assert ack["type"] == "ack", ack
            status, _ = await chat.api.call("GET", "/api/v1/me", user=users[1])
            assert status == 200
        got = await bob.wait_messages(room, 3)
        assert [m["body"] for m in got] == [f"still here {i}" for i in range(3)]
        await _keep_alive_requests(chat)


async def _keep_alive_requests(chat: Chat) -> None:
    """Requests sent back to back on one connection are each answered on it."""
    reader, writer = await asyncio.open_connection(chat.node.host, chat.node.port)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200 "), status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            await asyncio.sleep(TIMEOUT_S / 2)
    finally:
        writer.close()


BODY_CHARS = 20_000  # 200 of them: a 4 MB history page, more than loopback buffers hold


async def test_a_client_that_stops_reading_a_response_is_dropped(one_node: OneNode) -> None:
    async with one_node.chat({**ENV, "CHATD_SERVER__SEND_TIMEOUT_S": "1",
                              "CHATD_LIMITS__MAX_BODY_CHARS": str(BODY_CHARS),
                              **UNTHROTTLED}) as chat:
        users, room = await chat.api.group_of(2)
        ws = await chat.connect(users[0])
        for i in range(200):
            await ws.send({"type": "send", "id": str(i), "room_id": room,
                           "client_msg_id": f"big-{i}", "body": "x" * BODY_CHARS})
        await ws.wait_for(lambda f: f.get("id") == "199" and f["type"] == "ack", timeout=60)
        request = (f"GET /api/v1/rooms/{room}/messages?limit=200 HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {users[0].token}\r\n\r\n").encode()
        reset_after = await asyncio.to_thread(_request_and_never_read, chat.node, request)
        summary("client that stops reading a 4 MB response", reset_after_s=reset_after)
        assert reset_after is not None, f"still connected after {TIMEOUT_S + GRACE_S + 5} s"
        async with chat.http.get(chat.node.url + "/healthz") as r:
            assert r.status == 200


def _request_and_never_read(node: ChatdNode, request: bytes) -> float | None:
    """Seconds until the node dropped the connection (None: it never did), while the
    client reads nothing: a receive window that stays shut. A connection the kernel
    drops for its user timeout goes without a word to the peer, so the node's side
    is what is looked at."""
    node_process = psutil.Process(node.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect((node.host, node.port))
        mine = sock.getsockname()[1]
        sock.sendall(request)
        start = time.monotonic()
        while time.monotonic() - start < TIMEOUT_S + GRACE_S + 5:
            if not any(c.raddr and c.raddr.port == mine
                       for c in node_process.net_connections("tcp")):
                return round(time.monotonic() - start, 2)
            time.sleep(0.05)
        return None
    finally:
        sock.close()
