"""How long a full garbage collection pauses a chatd node, with and without gc.freeze().

    python -m bench.gc_pause

Imports chatd and builds its application the way `chatd` does before it
listens, then times a full collection (the best of 5, thread CPU time) while
everything loaded so far is tracked by the collector, and again after
`gc.freeze()`, which is what `chatd.cli.serve` calls once the node is up.
A full collection stops the event loop, so its length is a latency floor
for every message in flight on that node at the time.
"""

from __future__ import annotations

import gc
import time

from chatd import config
from chatd.app import create_app


def _full_collection_ms(rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        gc.collect()
        best = min(best, time.thread_time() - t0)
    return best * 1000


def main() -> None:
    _app = create_app(config.load(env={}))  # alive while measuring, as in a node
    before = (len(gc.get_objects()), _full_collection_ms())
    gc.freeze()
    after = (len(gc.get_objects()), _full_collection_ms())
    print("objects the collector scans   full collection (CPU ms)")
    print(f"{before[0]:>29,}   {before[1]:>8.2f}   before gc.freeze()")
    print(f"{after[0]:>29,}   {after[1]:>8.2f}   after gc.freeze() "
          f"({gc.get_freeze_count():,} frozen)")


if __name__ == "__main__":
    main()
