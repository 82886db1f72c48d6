"""WebSocket connections that have not said `hello` yet, counted per client address.

Until its hello a connection is anonymous: it holds a socket and a handler on this
node for up to `limits.auth_timeout_s` and proves nothing. One address may hold
`limits.hello_waits_per_ip` of them at a time; the next upgrade is refused with 429
before it becomes a WebSocket. Counted per node: a connection waits on one node.
"""

from __future__ import annotations

from chatd.errors import ChatError


class HelloWait:
    """One connection's place in the count, until `leave()` or the end of its `with`."""

    __slots__ = ("_address", "_waits")

    def __init__(self, waits: HelloWaits, address: str) -> None:
        self._waits: HelloWaits | None = waits
        self._address = address

    def __enter__(self) -> HelloWait:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

    def leave(self) -> None:
        if self._waits is not None:
            self._waits.release(self._address)
            self._waits = None


class HelloWaits:
    def __init__(self, per_address: int, retry_after_ms: int) -> None:
        self._per_address = per_address
        self._retry_after_ms = retry_after_ms
        self._counts: dict[str, int] = {}

    def enter(self, address: str) -> HelloWait:
        """A place for one more connection from `address`, or `rate_limited`."""
        count = self._counts.get(address, 0)
        if count >= self._per_address:
            # The wait is the longest an existing one may still hold its place.
            raise ChatError("rate_limited",
                            "too many connections from this address waiting for hello",
                            retry_after_ms=self._retry_after_ms)
        self._counts[address] = count + 1
        return HelloWait(self, address)

    def release(self, address: str) -> None:
        count = self._counts[address] - 1
        if count:
            self._counts[address] = count
        else:
            del self._counts[address]  # the map holds only addresses now waiting
