"""nginx in front of two chatd nodes, with the configuration printed in docs/scaling.md
(the test reads it from there, so the documented block is the tested one).

nginx runs in the foreground (`daemon off`) with a generated nginx.conf around the
documented block, on a free loopback port. When nginx is missing and apt-get can
install it (root, Debian), the test installs `nginx-light`; otherwise it is skipped
with the reason.

Checked through nginx: the HTTP API and /readyz; WebSocket upgrades (the `welcome`s
name both nodes: round robin, no stickiness needed); a client through nginx chats
with one connected to a node directly, both ways, with receipts; a connection idle for
longer than nginx's proxy_read_timeout survives thanks to chatd's pings; the Origin
check sees the browser's host through `Host $http_host`; and when a node is stopped,
its clients (closed with 1001) reconnect through nginx with `resume` and land on the
other node with no gap. With nginx in `server.trusted_proxies`, the login limit counts
each client behind it apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.client import FAST_ENV, Api, Ws, connect
from tests.cluster.support import request, send
from tests.harness import REPO_ROOT, ChatdNodes, ValkeyProcess, free_port, release_port

DOC = REPO_ROOT / "docs" / "scaling.md"
MARKER = "<!-- nginx-config:"
HEARTBEAT_S = 1.0
PROXY_READ_TIMEOUT_S = 3


def documented_block() -> str:
    text = DOC.read_text()
    start = text.index(MARKER)
    match = re.search(r"```nginx\n(.*?)```", text[start:], re.S)
    assert match, f"no nginx block after {MARKER} in {DOC}"
    return match.group(1)


def render(block: str, port: int, upstreams: list[str]) -> str:
    """The documented block, pointed at our nodes and port (and a short read timeout,
    against a short chatd heartbeat, so the idle check takes seconds)."""
    servers = re.findall(r"^\s*server 10\.0\.0\.\d+:8080 (.*);$", block, re.M)
    assert len(servers) == 2, block
    lines = "\n".join(f"    server {u} {servers[0]};" for u in upstreams)
    block = re.sub(r"(?:^\s*server 10\.0\.0\.\d+:8080 .*;\n)+", lines + "\n", block, flags=re.M)
    block = block.replace("listen 80;", f"listen 127.0.0.1:{port};")
    assert "proxy_read_timeout 60s;" in block
    return block.replace("proxy_read_timeout 60s;", f"proxy_read_timeout {PROXY_READ_TIMEOUT_S}s;")


def nginx_conf(tmp: Path, http_block: str) -> str:
    temps = "\n".join(f"    {kind}_temp_path {tmp / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
daemon off;
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} info;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp / "access.log"};
{temps}
{http_block}
}}
"""


def find_or_install_nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("nginx is not installed and cannot be installed here "
                    "(needs apt-get and root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "install", "-y", "--no-install-recommends", "nginx-light"],
                 ["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", "nginx-light"]):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, timeout=90, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing nginx timed out ({' '.join(argv)})")
        if argv[1] == "install" and done.returncode == 0:
            break
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                      else None)
    if not found:
        pytest.skip(f"could not install nginx-light: {done.stderr.decode()[-300:]}")
    return found


def write_and_check(binary: str, tmp: Path, conf: str) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "nginx.conf").write_text(conf)
    test = subprocess.run([binary, "-t", "-p", str(tmp), "-e", str(tmp / "error.log"),
                           "-c", str(tmp / "nginx.conf")], capture_output=True, check=False)
    assert test.returncode == 0, test.stderr.decode()


@contextlib.asynccontextmanager
async def running_nginx(binary: str, tmp: Path, conf: str, port: int) -> AsyncIterator[None]:
    write_and_check(binary, tmp, conf)
    proc = await asyncio.create_subprocess_exec(
        binary, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert proc.returncode is None, (tmp / "error.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "nginx did not listen"
                await asyncio.sleep(0.05)
        yield
    finally:
        if proc.returncode is None:
            proc.terminate()  # SIGTERM: fast shutdown of master and worker
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_two_nodes_behind_nginx(valkey: ValkeyProcess, chatd_nodes: ChatdNodes,
                                      tmp_path: Path) -> None:
    binary = find_or_install_nginx()
    a, b = await chatd_nodes.start(2, redis_url=valkey, env=FAST_ENV | {
        "CHATD_LIMITS__HEARTBEAT_S": str(HEARTBEAT_S)})
    port = free_port()
    conf = nginx_conf(tmp_path / "nginx", render(documented_block(), port, [
        f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]))
    proxy = f"http://127.0.0.1:{port}"
    proxy_ws = f"ws://127.0.0.1:{port}/ws"
    try:
        async with running_nginx(binary, tmp_path / "nginx", conf, port), \
                aiohttp.ClientSession() as http:
            async with http.get(f"{proxy}/readyz") as r:
                assert r.status == 200
            via_proxy = Api(http, proxy)
            alice = await via_proxy.register()  # HTTP API through nginx
            bob = await Api(http, b.url).register()  # directly on node b
            room = await via_proxy.direct(alice, bob)

            # Upgrades through nginx reach both nodes (round robin).
            alice_ws = [await connect(http, proxy_ws, alice) for _ in range(4)]
            landed = {ws.of_type("welcome")[0]["node_id"] for ws in alice_ws}
            assert landed == {a.node_id, b.node_id}, landed
            bob_ws = await connect(http, b.ws_url, bob)

            # Through nginx to a direct client and back, with receipts.
            ack = await send(alice_ws[0], room, "from-proxy", "hello through nginx")
            assert ack["type"] == "ack" and ack["seq"] == 1, ack
            got = await bob_ws.wait_messages(room, 1)
            assert got[0]["body"] == "hello through nginx"
            ack = await send(bob_ws, room, "from-direct", "hello back")
            assert ack["type"] == "ack" and ack["seq"] == 2
            for ws in alice_ws:
                assert [m["seq"] for m in await ws.wait_messages(room, 2)] == [1, 2]
            await bob_ws.send({"type": "read", "room_id": room, "seq": 2})
            for ws in alice_ws:
                await ws.wait_type("receipt", user_id=bob.user_id, read_seq=2)

            # Idle for longer than nginx's proxy_read_timeout: chatd's pings keep it open.
            await asyncio.sleep(PROXY_READ_TIMEOUT_S + 1.5)
            for ws in alice_ws:
                assert ws.closed_code is None
                assert (await request(ws, {"type": "ping"}))["type"] == "pong"

            # The Origin check sees nginx's own origin (Host is passed on), not a stranger.
            own = await http.ws_connect(proxy_ws, headers={"Origin": proxy})
            await own.close()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(proxy_ws, headers={"Origin": "http://evil.example"})
            assert refused.value.status == 403

            # Node a goes away: its clients get 1001 and come back through nginx with
            # resume, on node b, and miss nothing.
            on_a = [ws for ws in alice_ws if ws.of_type("welcome")[0]["node_id"] == a.node_id]
            assert await a.stop() == 0
            for ws in on_a:
                assert await ws.wait_closed(timeout=10) == 1001
            for k in range(3):
                assert (await send(bob_ws, room, f"while-away-{k}"))["type"] == "ack"
            back: list[Ws] = []
            for ws in on_a:
                last = ws.messages(room)[-1]["seq"]
                again = await connect(http, proxy_ws, alice, resume={room: last})
                assert again.of_type("welcome")[0]["node_id"] == b.node_id
                got = await again.wait_messages(room, 5 - last)
                assert [m["seq"] for m in got] == list(range(last + 1, 6))
                back.append(again)
            async with http.get(f"{proxy}/readyz") as r:
                assert r.status == 200  # nginx routes around the stopped node
            for ws in [*alice_ws, *back, bob_ws]:
                if ws.closed_code is None:
                    await ws.close()
            access = (tmp_path / "nginx" / "access.log").read_text()
            assert " 101 " in access  # the upgrades really went through nginx
    finally:
        release_port(port)


async def test_login_limits_count_each_client_behind_nginx(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes, tmp_path: Path) -> None:
    """With nginx's address in `server.trusted_proxies`, the login limit counts the client
    nginx names in X-Forwarded-For: a client over its burst gets 429, another client
    through the same nginx does not, and a client's own X-Forwarded-For changes nothing."""
    binary = find_or_install_nginx()
    burst = 3
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=FAST_ENV | {
        "CHATD_SERVER__TRUSTED_PROXIES": "127.0.0.1",
        "CHATD_AUTH__LOGIN_BURST": str(burst), "CHATD_AUTH__LOGIN_RATE_PER_S": "0.001"})
    port = free_port()
    conf = nginx_conf(tmp_path / "nginx", render(documented_block(), port,
                                                 [f"127.0.0.1:{node.port}"]))
    login = f"http://127.0.0.1:{port}/api/v1/login"
    names = (f"nobody-{i}" for i in itertools.count())  # one username bucket per attempt

    async def attempts(source: str, count: int, headers: dict[str, str] | None = None
                       ) -> list[int]:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            statuses = []
            for _ in range(count):
                body = {"username": next(names), "password": "not the password"}
                async with http.post(login, json=body, headers=headers) as r:
                    statuses.append(r.status)
            return statuses

    try:
        async with running_nginx(binary, tmp_path / "nginx", conf, port):
            assert await attempts("127.0.0.2", burst + 1) == [401] * burst + [429]
            assert await attempts("127.0.0.2", 1, {"X-Forwarded-For": "10.9.9.9"}) == [429]
            assert await attempts("127.0.0.3", burst) == [401] * burst
    finally:
        release_port(port)
