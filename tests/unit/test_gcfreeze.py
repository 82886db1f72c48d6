"""Freezing the survivors of full collections, and thawing them so closed connections'
memory comes back (chatd/gcfreeze.py), against the interpreter's real collector."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from chatd.gcfreeze import FreezeSurvivors


class Cycle:
    """Stands in for a connection: its objects refer to each other, so only the
    collector frees them, and not while they are frozen."""

    def __init__(self) -> None:
        self.me = self


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def survivors(clock: Clock) -> Iterator[FreezeSurvivors]:
    # Collections only when the test asks: the collector runs them at any allocation.
    gc.disable()
    s = FreezeSurvivors(max_frozen_s=60.0, clock=clock)
    s.watch()
    try:
        yield s
    finally:
        s.unwatch()
        gc.enable()


def open_conns(s: FreezeSurvivors, n: int) -> list[tuple[Cycle, int]]:
    return [(Cycle(), s.opened()) for _ in range(n)]


def close(s: FreezeSurvivors, conns: list[tuple[Cycle, int]], n: int) -> list[weakref.ref[Cycle]]:
    """Close the first n connections; weak references tell whether they were freed."""
    refs = [weakref.ref(c) for c, _ in conns[:n]]
    for _, opened_at in conns[:n]:
        s.closed(opened_at)
    del conns[:n]
    return refs


def test_closed_connections_come_back_once_a_quarter_of_the_frozen_closed(
        survivors: FreezeSurvivors) -> None:
    conns = open_conns(survivors, 100)
    gc.collect()
    assert gc.get_freeze_count() >= 100
    assert survivors.frozen == 100

    refs = close(survivors, conns, 25)
    gc.collect()
    # Frozen, a quarter is not more than a quarter: still held.
    assert all(r() is not None for r in refs)
    assert survivors.closed_frozen == 25

    refs += close(survivors, conns, 1)
    assert gc.get_freeze_count() == 0  # thawed
    gc.collect()
    assert all(r() is None for r in refs)
    # ... and that collection froze the 74 still open.
    assert survivors.frozen == 74
    assert survivors.closed_frozen == 0
    assert gc.get_freeze_count() >= 74


def test_connections_opened_after_the_last_freeze_are_not_counted_as_frozen(
        survivors: FreezeSurvivors) -> None:
    old = open_conns(survivors, 10)
    gc.collect()
    new = open_conns(survivors, 100)
    refs = close(survivors, new, 100)
    assert survivors.closed_frozen == 0
    assert gc.get_freeze_count() > 0  # no thaw
    gc.collect()
    assert all(r() is None for r in refs)  # never frozen, so collected as usual
    assert survivors.frozen == 10
    assert len(old) == 10


def test_a_freeze_older_than_the_bound_is_thawed_at_the_next_full_collection(
        survivors: FreezeSurvivors, clock: Clock) -> None:
    conns = open_conns(survivors, 10)
    gc.collect()
    refs = close(survivors, conns, 2)  # not enough closes to thaw
    clock.now = 30.0
    gc.collect()
    assert gc.get_freeze_count() > 0
    assert all(r() is not None for r in refs)

    clock.now = 61.0
    gc.collect()  # the freeze of t=0 is too old: this collection thaws instead
    assert gc.get_freeze_count() == 0
    gc.collect()  # covers everything, then freezes afresh
    assert all(r() is None for r in refs)
    assert gc.get_freeze_count() > 0
    assert survivors.frozen == 8


def test_young_collections_freeze_nothing(survivors: FreezeSurvivors) -> None:
    open_conns(survivors, 10)
    before = gc.get_freeze_count()
    gc.collect(0)
    gc.collect(1)
    assert gc.get_freeze_count() == before
    assert survivors.frozen == 0


def test_unwatch_gives_back_what_was_frozen(survivors: FreezeSurvivors) -> None:
    conns = open_conns(survivors, 10)
    gc.collect()
    refs = close(survivors, conns, 1)
    survivors.unwatch()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert all(r() is None for r in refs)
    assert survivors.frozen == 0
