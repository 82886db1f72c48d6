"""Cross-site WebSocket hijacking and HTTP security headers (issue 7, part 4; PROTOCOL.md
s3 "an Origin not in the allow-list is refused with HTTP 403; no Origin is accepted").

`server.allowed_origins` lists origins allowed besides the server's own (default: none).
A refused upgrade never becomes a WebSocket: 403 with the JSON error, before `hello`.
Look-alike origins (other scheme, other port, suffixes, `null`) are refused; an origin is
compared exactly as browsers send it (scheme://host[:port], lowercase, no path).

Every HTTP response carries X-Content-Type-Options, X-Frame-Options and Referrer-Policy;
the web client's page and files carry a strict Content-Security-Policy; there are no CORS
grants. (tests/integration/test_ws_protocol.py checks one foreign Origin and the own one.)
"""

from __future__ import annotations

import re

import aiohttp

from tests.client import Api, User, Ws, metric
from tests.harness import ChatdNode, ChatdNodes, ValkeyProcess
from tests.security.support import BASE_ENV, assert_log_clean, summary

EXTRA = ["https://chat.example.com", "http://localhost:3000"]
BASE_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer"}


async def upgrade(http: aiohttp.ClientSession, node: ChatdNode, user: User,
                  origin: str | None) -> int:
    """101 (then a welcome) or the refusal's HTTP status."""
    headers = {"Origin": origin} if origin is not None else {}
    try:
        raw = await http.ws_connect(node.ws_url, headers=headers)
    except aiohttp.WSServerHandshakeError as e:
        return e.status
    ws = Ws(raw)
    ws.start()
    await ws.send({"type": "hello", "token": user.token})
    await ws.wait_type("welcome")
    await ws.close()
    return 101


def look_alikes(node: ChatdNode) -> list[str]:
    own = node.url  # http://127.0.0.1:PORT
    return [
        "https://evil.example", "null", "", "file://", own.replace("http:", "https:"),
        f"http://127.0.0.1:{node.port + 1}", f"http://localhost:{node.port}",
        f"{own}.evil.example", f"http://evil.example/{own}", f"{own}@evil.example",
        "https://chat.example.com.evil.example", "https://evil.chat.example.com",
        "http://chat.example.com", "https://chat.example.com:8443", "http://localhost:3001",
        "https://chat.example.co", own + ", https://evil.example",
    ]


async def test_origin_allow_list(valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (default,) = await chatd_nodes.start(1, redis_url=valkey, env=BASE_ENV)
    (listed,) = await chatd_nodes.start(1, redis_url=valkey, env={
        **BASE_ENV, "CHATD_SERVER__ALLOWED_ORIGINS": ", ".join(EXTRA)})
    async with aiohttp.ClientSession() as http:
        user = await Api(http, default.url).register()
        outcomes: dict[str, dict[str, int]] = {}
        for node, allowed in ((default, [None, default.url]),
                              (listed, [None, listed.url, *EXTRA])):
            name = "default" if node is default else "with allowed_origins"
            got = outcomes.setdefault(name, {})
            for origin in allowed:
                got[str(origin)] = await upgrade(http, node, user, origin)
                assert got[str(origin)] == 101, (name, origin)
            refused = look_alikes(node) + ([] if node is listed else EXTRA)
            before = await metric(http, node.url, "chatd_connections")
            for origin in refused:
                got[origin] = await upgrade(http, node, user, origin)
                assert got[origin] == 403, (name, origin)
            # The refusal is the documented JSON error, and no WebSocket was opened.
            async with http.get(node.ws_url.replace("ws:", "http:"), headers={
                    "Origin": "https://evil.example", "Connection": "Upgrade",
                    "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["code"] == "forbidden"
                for header, value in BASE_HEADERS.items():
                    assert resp.headers.get(header) == value, header
            assert await metric(http, node.url, "chatd_connections") == before
    for node in (default, listed):
        assert_log_clean(node)
    summary("origin allow-list", allowed=sum(v == 101 for o in outcomes.values()
                                             for v in o.values()),
            refused_403=sum(v == 403 for o in outcomes.values() for v in o.values()))


def directives(csp: str) -> dict[str, set[str]]:
    out = {}
    for part in csp.split(";"):
        words = part.split()
        if words:
            out[words[0]] = set(words[1:])
    return out


async def test_security_headers_on_every_kind_of_response(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=BASE_ENV)
    async with aiohttp.ClientSession() as http:
        api = Api(http, node.url)
        user = await api.register()
        auth = user.headers
        evil = {"Origin": "https://evil.example"}
        requests = [
            ("GET", "/", {}, None, 200), ("GET", "/static/app.js", {}, None, 200),
            ("GET", "/static/app.css", {}, None, 200), ("GET", "/static/nope.js", {}, None, 404),
            ("GET", "/healthz", {}, None, 200), ("GET", "/readyz", {}, None, 200),
            ("GET", "/metrics", {}, None, 200), ("GET", "/api/v1/me", auth, None, 200),
            ("GET", "/api/v1/me", evil, None, 401), ("GET", "/api/v1/rooms", auth, None, 200),
            ("GET", "/api/v1/nothing", {}, None, 404), ("PUT", "/api/v1/me", auth, None, 405),
            ("POST", "/api/v1/login", evil, b"{", 400),
            ("POST", "/api/v1/login", {}, b"x" * 70000, 413),
            ("OPTIONS", "/api/v1/me", {**evil, "Access-Control-Request-Method": "GET"},
             None, 405),
            ("GET", "/ws", {}, None, 400),  # not an upgrade
        ]
        seen = []
        for method, path, headers, body, status in requests:
            async with http.request(method, node.url + path, headers=headers,
                                    data=body) as resp:
                await resp.read()
                assert resp.status == status, (method, path, resp.status)
                for header, value in BASE_HEADERS.items():
                    assert resp.headers.get(header) == value, (method, path, header)
                # No CORS grant, whatever the Origin.
                assert "Access-Control-Allow-Origin" not in resp.headers, (method, path)
                if resp.status < 300 and path.startswith("/api/"):
                    assert resp.content_type == "application/json", path
                seen.append(f"{method} {path} {resp.status}")

        # The web client: a strict CSP on the page and on its files, also on a 304.
        async with http.get(node.url + "/") as resp:
            page = await resp.text()
            assert resp.content_type == "text/html" and resp.charset == "utf-8"
            csp = directives(resp.headers["Content-Security-Policy"])
            etag = resp.headers["ETag"]
        assert csp["default-src"] == {"'self'"}
        assert csp["script-src"] == {"'self'"}  # no 'unsafe-inline', no 'unsafe-eval'
        assert csp["style-src"] == {"'self'"}
        assert csp["object-src"] == {"'none'"} and csp["base-uri"] == {"'none'"}
        assert csp["frame-ancestors"] == {"'none'"}
        assert csp["connect-src"] == {"'self'"}
        # ... which the page can live with: no inline script, style or event handler.
        assert all("src=" in tag for tag in re.findall(r"<script\b[^>]*>", page)), page
        assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", page, re.IGNORECASE)
        async with http.get(node.url + "/", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
            assert "Content-Security-Policy" in resp.headers
            for header, value in BASE_HEADERS.items():
                assert resp.headers.get(header) == value, header
        async with http.get(node.url + "/static/app.js") as resp:
            assert directives(resp.headers["Content-Security-Policy"]) == csp
            assert resp.content_type == "text/javascript"
    assert_log_clean(node)
    summary("security headers", responses_checked=len(seen) + 3)
