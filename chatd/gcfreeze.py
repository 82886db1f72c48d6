"""Keep the collector's full collections proportional to what is new, not to what is held.

A full collection scans every tracked object and stops the event loop while
it does. Each connection holds about 65 of them (docs/performance.md), so on
a node with many connections every full collection is long, and they come
often while connections arrive: one each time the long-lived objects have
grown by a quarter. After each full collection the survivors are moved out
of the collector's reach (`gc.freeze`): the next one scans only what arrived
since, and a reconnect storm's collections add up to about one pass instead
of one pass each.

Frozen objects are still freed by reference counting, but not their cycles,
and a connection is made of cycles. So when a quarter of the connections
frozen since the last complete collection have closed, or the oldest freeze
is `max_frozen_s` old, everything is thawed (`gc.unfreeze`) and the next
full collection covers all of it: memory of closed connections comes back
one collection later, as it does without freezing.

`gc.callbacks` and the frozen generation are the process's: `watch` while the
node runs, `unwatch` after. The callback can run on any thread that allocates
(the password hashing pool), and the counts here are read and bumped without
a lock: they steer a heuristic, and a count off by one changes nothing that
matters.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

# A thaw once this share of the frozen connections has closed bounds what their
# cycles keep to a quarter of the frozen connections, the same slack as the
# collector's own rule (a full collection once long-lived objects grew by 25%).
_THAW_SHARE = 0.25


class FreezeSurvivors:
    def __init__(self, max_frozen_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_frozen_s = max_frozen_s
        self._clock = clock
        self.open = 0  # connections open now
        self.frozen = 0  # connections frozen since the last thaw, open or closed since
        self.closed_frozen = 0  # those of them that have closed
        self._frozen_since: float | None = None  # the oldest freeze not thawed yet
        # Bumped by every freeze and thaw: a connection opened at an older epoch than a
        # freeze that is not thawed yet is frozen.
        self._epoch = 0

    def opened(self) -> int:
        """A connection opened; pass what this returns to `closed`."""
        self.open += 1
        return self._epoch

    def closed(self, opened_at: int) -> None:
        self.open -= 1
        if self._frozen_since is None or opened_at == self._epoch:
            return  # nothing frozen, or opened after the last freeze
        self.closed_frozen += 1
        if self.closed_frozen > self.frozen * _THAW_SHARE:
            self.thaw()

    def thaw(self) -> None:
        """Give everything frozen back to the collector: the next full collection covers it."""
        gc.unfreeze()
        self.frozen = self.closed_frozen = 0
        self._frozen_since = None
        self._epoch += 1

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        now = self._clock()
        if self._frozen_since is None:
            self._frozen_since = now
        elif now - self._frozen_since > self.max_frozen_s:
            self.thaw()
            return
        gc.freeze()
        self._epoch += 1
        self.frozen = self.open + self.closed_frozen

    def watch(self) -> None:
        gc.callbacks.append(self._on_gc)

    def unwatch(self) -> None:
        """Stop, and give back what was frozen: whatever runs next in the process
        (another node, a test) is not left with cycles nobody will thaw."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        self.thaw()
