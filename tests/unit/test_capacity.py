"""How many WebSockets a node takes (chatd/capacity.py)."""

from __future__ import annotations

import resource

import pytest

from chatd.capacity import NO_LIMIT_CAP, Sockets, cap_for
from chatd.errors import ChatError


def test_a_configured_cap_wins() -> None:
    assert cap_for(5, open_files=20_000) == 5


@pytest.mark.parametrize(("open_files", "cap"), [
    (20_000, 19_000),  # a twentieth kept back
    (1_048_576, 996_148),
    (1024, 768),  # at least 256 kept back
    (400, 300),  # but at most a quarter
    (128, 96),
    (3, 3),
    (1, 1),
])
def test_by_default_files_are_kept_back_from_the_limit(open_files: int, cap: int) -> None:
    assert cap_for(0, open_files=open_files) == cap


def test_an_unlimited_file_limit_leaves_the_cap_at_its_largest() -> None:
    assert cap_for(0, open_files=resource.RLIM_INFINITY) == NO_LIMIT_CAP


def test_the_socket_over_the_cap_is_refused_and_a_closed_one_frees_its_place() -> None:
    sockets = Sockets(cap=2)
    with sockets.hold(), sockets.hold():
        assert sockets.open == 2
        with pytest.raises(ChatError) as refused, sockets.hold():
            pass
        assert refused.value.code == "unavailable"
        assert sockets.open == 2
    assert sockets.open == 0
    with sockets.hold():
        assert sockets.open == 1
