"""No secret and no message content in the logs at the default level (issue 7, part 6).

A node is run the way an operator would: default log level and format, a configured
signing secret, a Redis password in the URL. Traffic carries recognisable markers as
passwords (right, wrong, refused), message bodies (WebSocket and HTTP, stored and refused),
a group name, and the session token itself (in `hello`, in the upgrade header, on HTTP,
tampered, after logout); Redis connections are killed mid-traffic so that the error paths
log too. Afterwards the node's log file contains none of the markers, nor the token, the
secret or the Redis password; it does contain the redacted Redis URL.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp

from tests.client import Api, User, Ws, connect
from tests.harness import ChatdNodes, ValkeyBinaries, ValkeyProcess
from tests.security.support import BASE_ENV, assert_log_clean, summary


def marker(kind: str) -> str:
    return f"MARK{kind.upper()}{secrets.token_hex(6)}"


async def test_no_password_token_secret_or_body_in_the_log(
        valkey_binaries: ValkeyBinaries, tmp_path: Path, chatd_nodes: ChatdNodes) -> None:
    redis_password = marker("redispw")
    server = ValkeyProcess(valkey_binaries, tmp_path / "valkey")
    await server.start()  # (it waits for a PONG: the password is set afterwards)
    try:
        async with server.client() as r:
            await r.config_set("requirepass", redis_password)
        await run_traffic(server, redis_password, chatd_nodes)
    finally:
        server.close()


async def run_traffic(server: ValkeyProcess, redis_password: str,
                      chatd_nodes: ChatdNodes) -> None:
    secret = marker("secret") + "-at-least-32-characters-long"
    url = f"redis://:{redis_password}@{server.host}:{server.port}/0"
    (node,) = await chatd_nodes.start(1, redis_url=url, env={
        **BASE_ENV, "CHATD_AUTH__SECRET": secret})
    markers = {"redis password": redis_password, "auth secret": secret}
    async with aiohttp.ClientSession() as http:
        api = Api(http, node.url)
        password, wrong = marker("password"), marker("wrongpw")
        markers |= {"password": password, "wrong password": wrong}
        name = f"alice_{secrets.token_hex(3)}"
        status, _ = await api.call("POST", "/api/v1/register",
                                   json_body={"username": name, "password": password})
        assert status == 201
        status, body = await api.call("POST", "/api/v1/login",
                                      json_body={"username": name, "password": password})
        assert status == 200
        alice = User(body["username"], body["user_id"], body["token"], body["session_id"])
        markers["token"] = alice.token
        markers["token signature"] = alice.token.rsplit(".", 1)[1]
        for username, pw in ((name, wrong), ("nobody_here", wrong), (name.upper(), wrong)):
            status, _ = await api.call("POST", "/api/v1/login",
                                       json_body={"username": username, "password": pw})
            assert status == 401
        refused_pw = marker("shortpw")[:7]  # too short to register
        markers["refused password"] = refused_pw
        status, _ = await api.call("POST", "/api/v1/register",
                                   json_body={"username": "bob_x", "password": refused_pw})
        assert status == 400
        bob = await api.register()

        group_name = marker("roomname")
        body_ws, body_http = marker("bodyws"), marker("bodyhttp")
        too_long, elsewhere = marker("toolong"), marker("elsewhere")
        markers |= {"group name": group_name, "ws body": body_ws, "http body": body_http,
                    "refused body": too_long, "body to a foreign room": elsewhere}
        room = await api.group(alice, [bob], name=group_name)
        foreign = await api.direct(bob, await api.register())

        alice_ws = await connect(http, node.ws_url, alice)
        by_header = Ws(await http.ws_connect(node.ws_url, headers=alice.headers))
        by_header.start()
        await by_header.send({"type": "hello"})
        await by_header.wait_type("welcome")
        assert (await alice_ws.send_message(room, body_ws))["type"] == "ack"
        reply = await alice_ws.send_message(room, too_long * 400)
        assert reply["code"] == "too_large"
        reply = await alice_ws.send_message(foreign, elsewhere)
        assert reply["code"] == "not_found"
        status, _ = await api.call("POST", f"/api/v1/rooms/{room}/messages", user=alice,
                                   json_body={"client_msg_id": "h1", "body": body_http})
        assert status == 201

        # The error paths: every chatd connection to Redis killed, twice, mid-traffic.
        async with server.client(password=redis_password) as admin:
            for _ in range(2):
                await admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
                for k in range(5):
                    reply = await alice_ws.send_message(room, f"{body_ws} again {k}")
                    assert reply["type"] in ("ack", "error"), reply
                await asyncio.sleep(0.3)

        # A tampered token and, after logout, the revoked one.
        tampered = alice.token[:-6] + "AAAAAA"
        markers["tampered token"] = tampered
        status, _ = await api.call("GET", "/api/v1/me", headers={
            "Authorization": f"Bearer {tampered}"})
        assert status == 401
        status, _ = await api.call("POST", "/api/v1/logout", user=alice)
        assert status == 204
        assert await alice_ws.wait_closed() == 4001
        revoked = Ws(await http.ws_connect(node.ws_url))
        revoked.start()
        await revoked.send({"type": "hello", "token": alice.token})
        assert await revoked.wait_closed() == 4001
        await by_header.wait_closed()
        status, _ = await api.call("GET", "/api/v1/rooms", user=alice)
        assert status == 401

    await node.stop()  # the drain and shutdown lines are in the log too
    # What chatd wrote, without the harness's own "=== harness: start" lines (they show
    # the command line, --redis-url included: see docs/security.md on passing secrets).
    log = "".join(line for line in node.log_text().splitlines(keepends=True)
                  if not line.startswith("=== harness:"))
    leaked = {what: value for what, value in markers.items() if value in log}
    assert not leaked, f"in the log: {sorted(leaked)}"
    assert "MARK" not in log  # no marker at all, also not a part of one
    assert f"redis://:***@{server.host}:{server.port}/0" in log  # redacted, not omitted
    assert "node started" in log and "chatd ready" in log
    lines = log.count("\n")
    assert_log_clean(node)
    summary("secrets in logs", markers_checked=len(markers), log_lines=lines,
            log_bytes=len(log), leaked=0)
