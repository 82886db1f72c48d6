"""Whole-machine stalls: when an idle thread that asked to wake every few
milliseconds woke much later.

The thread lives in the bench's own process, which sleeps while a step runs,
so it is always ready at once when its timer fires. On the machine this
benchmark was built on, a wake-up 10 ms or more late coincided every time
with every process of the run stopping for the same stretch, and such stalls
came from the disk (docs/performance.md): a latency percentile of a step that
had them says as much about the machine as about the servers. Each step
reports how many there were and how long they lasted in total.
"""

from __future__ import annotations

import threading
import time

PERIOD_S = 0.005
STALL_S = 0.010


class StallProbe:
    def __init__(self) -> None:
        self._stalls: list[tuple[float, float]] = []  # (wall time woken, seconds late)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)

    def __enter__(self) -> StallProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        due = time.monotonic() + PERIOD_S
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            now = time.monotonic()
            if now - due >= STALL_S:
                self._stalls.append((time.time(), now - due))
            due = now + PERIOD_S

    def between(self, t0: float, t1: float) -> tuple[int, float]:
        """Stalls that ended within [t0, t1] (wall time): how many, and their total ms."""
        late = [s for t, s in list(self._stalls) if t0 <= t <= t1]
        return len(late), 1000 * sum(late)
