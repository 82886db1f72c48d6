"""`chatd.listen.bind`: the listening sockets, with the send timeout their connections
inherit (checked on a real accepted connection)."""

from __future__ import annotations

import socket

import pytest

from chatd import listen

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"),
                                reason="TCP_USER_TIMEOUT is Linux only")


def test_accepted_connections_inherit_the_send_timeout() -> None:
    (server,) = listen.bind("127.0.0.1", 0, 2.5)
    try:
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
    finally:
        server.close()


def test_a_port_in_use_is_an_error() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            listen.bind("127.0.0.1", taken.getsockname()[1], 30)
    finally:
        taken.close()


def test_every_address_of_the_host_gets_a_socket() -> None:
    families = {info[0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    try:
        sockets = listen.bind("localhost", 0, 30)
    except OSError as e:  # e.g. ::1 listed but IPv6 disabled in this sandbox
        pytest.skip(f"cannot bind every address of localhost here: {e}")
    try:
        assert {s.family for s in sockets} == families
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
                   for s in sockets)
    finally:
        for s in sockets:
            s.close()
