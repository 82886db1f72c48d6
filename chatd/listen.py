"""The node's listening sockets, bound as asyncio's `create_server` binds a host and
port, with TCP_USER_TIMEOUT set on them: every connection they accept inherits it;
and the number of sockets the process may hold.

TCP_USER_TIMEOUT bounds how long data we sent may stay unacknowledged, a receive
window kept shut included. Without it a peer that stops reading holds its socket,
and the handler writing to it, for as long as it likes: aiohttp has no write timeout,
and the kernel probes a shut window for ever.
"""

from __future__ import annotations

import resource
import socket


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one; the limit now in force.

    Every connection is a file. Many systems start processes with a soft limit of
    1024 under a far higher hard one, which would stop a node near a thousand
    connections for no reason: the soft limit is only a default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # an unlimited hard limit is above the kernel's cap
            return soft
    return hard


def http_url(host: str, port: int) -> str:
    """Where the server answers, as a browser takes it."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def bind(host: str, port: int, send_timeout_s: float, *,
         reuse_port: bool = False) -> list[socket.socket]:
    """One socket per address `host` resolves to (OSError when one cannot be bound).

    With `reuse_port` the sockets join those other processes bound to the same
    address with it, and the kernel spreads new connections over them (workers.py)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in dict.fromkeys(
                (family, kind, proto, address) for family, kind, proto, _, address in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # "::" must not also take the IPv4 port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(send_timeout_s * 1000))
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
