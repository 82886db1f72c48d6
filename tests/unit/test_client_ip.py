"""Which address a request is counted against (`chatd.http.forwarded_client`, `limit_unit`,
`server.trusted_proxies`). Pure: addresses in, address out."""

from __future__ import annotations

import pytest

from chatd.http import forwarded_client, limit_unit

PROXIES = ("10.0.0.5", "10.1.0.0/16", "fd00::/8")


@pytest.mark.parametrize(("peer", "forwarded", "trusted", "client"), [
    # No proxy trusted: the peer, whatever the header says.
    ("203.0.113.7", ["198.51.100.1"], (), "203.0.113.7"),
    ("10.0.0.5", ["198.51.100.1"], (), "10.0.0.5"),
    # A peer that is not a trusted proxy: its header is the client's own word.
    ("203.0.113.7", ["198.51.100.1"], PROXIES, "203.0.113.7"),
    # One trusted proxy: the address it appended.
    ("10.0.0.5", ["198.51.100.1"], PROXIES, "198.51.100.1"),
    # The client wrote its own X-Forwarded-For; the proxy appended the real peer.
    ("10.0.0.5", ["1.2.3.4, 198.51.100.1"], PROXIES, "198.51.100.1"),
    ("10.0.0.5", ["garbage, 198.51.100.1"], PROXIES, "198.51.100.1"),
    # Two proxies in a row, the header split over two lines.
    ("10.0.0.5", ["1.2.3.4, 198.51.100.1", "10.1.2.3"], PROXIES, "198.51.100.1"),
    # Every hop trusted: the leftmost one.
    ("10.0.0.5", ["10.1.0.9"], PROXIES, "10.1.0.9"),
    # A trusted proxy that sent no header, or a hop that is not an address.
    ("10.0.0.5", [], PROXIES, "10.0.0.5"),
    ("10.0.0.5", [""], PROXIES, "10.0.0.5"),
    ("10.0.0.5", ["198.51.100.1, unknown"], PROXIES, "10.0.0.5"),
    # IPv6, and spacing.
    ("fd00::1", ["  2001:db8::7  "], PROXIES, "2001:db8::7"),
    ("fd00::1", ["2001:DB8:0::7"], PROXIES, "2001:db8::7"),
    # A peer that is not an IP address (a unix socket) is never a proxy.
    ("unknown", ["198.51.100.1"], PROXIES, "unknown"),
])
def test_forwarded_client(peer: str, forwarded: list[str], trusted: tuple[str, ...],
                          client: str) -> None:
    assert forwarded_client(peer, forwarded, trusted) == client


@pytest.mark.parametrize(("address", "unit"), [
    ("203.0.113.7", "203.0.113.7"),
    ("127.0.0.1", "127.0.0.1"),
    # Every address of a /64 is one client.
    ("2001:db8::7", "2001:db8::/64"),
    ("2001:db8::ffff:ffff:ffff:fffe", "2001:db8::/64"),
    ("2001:db8:0:1::7", "2001:db8:0:1::/64"),
    ("::1", "::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    # An IPv4 client seen through a dual-stack socket or header counts as itself.
    ("::ffff:198.51.100.1", "198.51.100.1"),
    ("unknown", "unknown"),
])
def test_limit_unit(address: str, unit: str) -> None:
    assert limit_unit(address) == unit
