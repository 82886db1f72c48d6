"""HTTP plumbing shared by the API modules: errors as JSON, strict bodies, headers."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from chatd.appkeys import NODE
from chatd.errors import ChatError
from chatd.logs import error_text
from chatd.redisconn import storage_failure

log = logging.getLogger("chatd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's `istr` names, not plain strings: a case-insensitive header map stores a
# lowercased copy of every plain-str name it is given, and a WebSocket's response (with
# these headers) lives as long as the socket, so plain names cost every idle
# connection about 600 bytes.
SECURITY_HEADERS: dict[str, str] = {
    hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff",
    hdrs.X_FRAME_OPTIONS: "DENY",
    hdrs.REFERRER_POLICY: "no-referrer",
    hdrs.CROSS_ORIGIN_OPENER_POLICY: "same-origin",
}


def error_response(err: ChatError) -> web.Response:
    headers = {}
    if err.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, -(-err.retry_after_ms // 1000)))
    return web.json_response(err.body(), status=err.status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the documented JSON error; nothing leaks a traceback."""
    try:
        response = await handler(request)
    except ChatError as e:
        response = error_response(e)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(ChatError("too_large", "request body is too large"))
    except web.HTTPNotFound:
        response = error_response(ChatError("not_found", "no such endpoint"))
    except web.HTTPMethodNotAllowed:
        response = error_response(ChatError("bad_request", "method not allowed"))
        response.set_status(405)
    except web.HTTPException:
        raise
    except Exception as e:
        if not storage_failure(e):
            log.exception("unhandled error in request", extra={"path": request.path})
            response = error_response(ChatError("internal", "internal error"))
        else:
            log.warning("storage error in request",
                        extra={"path": request.path, "error": error_text(e)})
            response = error_response(ChatError("unavailable",
                                                "storage is unavailable, retry later"))
    if isinstance(response, web.Response) and response.status >= 400:
        try:
            code = json.loads(response.text or "{}").get("error", {}).get("code", "")
        except (ValueError, AttributeError):
            code = ""
        if code:
            request.app[NODE].metrics.errors.labels(code).inc()
    return response


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 that says what is wrong."""
    server = request.app[NODE].settings.server
    max_size = server.max_http_body_bytes
    if request.content_length is not None and request.content_length > max_size:
        raise ChatError("too_large", f"request body is larger than {max_size} bytes")
    timeout = server.request_timeout_s
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ChatError("too_large", f"request body is larger than {max_size} bytes") from None
    except TimeoutError:
        # Answered now; aiohttp then reads what is left of the body for at most
        # lingering_time (cli.serve) before it closes the connection.
        raise ChatError("bad_request",
                        f"request body did not arrive within {timeout:g} s") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ChatError("bad_request", "body is not valid JSON") from None
    except RecursionError:
        raise ChatError("bad_request", "body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ChatError("bad_request", "body must be a JSON object")
    try:  # json.loads lets "\ud800" escapes through: such strings cannot be stored
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ChatError("bad_request", "body contains unpaired surrogates") from None
    except RecursionError:
        raise ChatError("bad_request", "body is nested too deeply") from None
    return body


def client_key(request: web.Request) -> str:
    """Who a request is counted against by per-client limits: the address it comes from
    (`server.trusted_proxies`), as `limit_unit` groups it."""
    return limit_unit(forwarded_client(request.remote or "unknown",
                                       request.headers.getall(hdrs.X_FORWARDED_FOR, []),
                                       request.app[NODE].settings.server.trusted_proxies))


def limit_unit(address: str) -> str:
    """An IPv4 address, or the /64 an IPv6 address is in: a host or a site is routed a
    whole /64 and may use any address in it, so one address per limit would let one
    client take 2**64 shares. An IPv4 address mapped into IPv6 is that IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


def forwarded_client(peer: str, forwarded_for: list[str], trusted: tuple[str, ...]) -> str:
    """`peer`, or, while the hop is a trusted proxy, the address it says it got the request
    from: X-Forwarded-For read from the right. The first untrusted address is the client;
    what lies left of it was written by that client, so it is never believed. A hop that
    is not an address ends the walk at the last trusted proxy."""
    networks = _networks(trusted)
    hops = ",".join(forwarded_for).split(",")
    address = peer
    while _is_trusted(address, networks) and hops:
        hop = hops.pop().strip()
        try:
            address = str(ipaddress.ip_address(hop))
        except ValueError:
            break
    return address


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.cache
def _networks(trusted: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in trusted)


def _is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    """One typed field of a JSON body; a wrong type or a missing field is a 400."""
    value = body.get(name)
    if value is None:
        if required:
            raise ChatError("bad_request", f"missing field '{name}'")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ChatError("bad_request", f"field '{name}' must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", list: "a list",
            dict: "an object"}.get(kind, kind.__name__)
