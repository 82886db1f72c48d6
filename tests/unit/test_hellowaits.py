"""The per-address count of connections waiting for hello (chatd/hellowaits.py)."""

from __future__ import annotations

import pytest

from chatd.errors import ChatError
from chatd.hellowaits import HelloWaits


def test_the_cap_holds_per_address_and_a_departure_frees_a_place() -> None:
    waits = HelloWaits(2, retry_after_ms=5000)
    first, second = waits.enter("127.0.0.1"), waits.enter("127.0.0.1")
    with pytest.raises(ChatError) as refusal:
        waits.enter("127.0.0.1")
    assert (refusal.value.code, refusal.value.retry_after_ms) == ("rate_limited", 5000)
    with waits.enter("::1"), waits.enter("::1"):  # another address counts on its own
        pass
    first.leave()
    first.leave()  # a second leave is nothing: it must not free another's place
    third = waits.enter("127.0.0.1")
    with pytest.raises(ChatError):
        waits.enter("127.0.0.1")
    second.leave()
    third.leave()
    for _ in range(2):  # all gone: the whole cap again, twice over
        with waits.enter("127.0.0.1"), waits.enter("127.0.0.1"):
            pass
