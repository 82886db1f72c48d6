"""What a load-generator process records, and how the parent turns it into loss and latency.

Message bodies carry ``"<intended_send_ns> <step> <sender_idx> <n> <padding>"``:
the receiving client computes latency from the intended send time (all
processes share one machine's clock; the intended time, not the actual one,
so that a client falling behind its schedule shows up instead of hiding),
and the step it belongs to.

Order and loss are checked per *stream* per receiving connection: for chatd a
stream is a room and numbers are the room's ``seq``; for the peer (no seq) it
is one sender in one room and numbers are that sender's counter. A number
above ``last + 1`` opens a gap (remembered as missing); a missing number that
arrives later is an order violation ("late"); anything else at or below
``last`` is a duplicate. Loss = numbers acked by the server but never received
by a connection of the stream's room by the end of the drain.
"""

from __future__ import annotations

import bisect
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

FEED_STEP = -1  # messages sent outside the stepped load (e.g. the resume feeder)


def make_body(intended_ns: int, step: int, sender: int, n: int, chars: int) -> str:
    head = f"{intended_ns} {step} {sender} {n} "
    return head + "x" * max(1, chars - len(head))


class Track:
    """One stream as seen by one connection."""

    __slots__ = ("last", "missing")

    def __init__(self, last: int = 0) -> None:
        self.last = last
        self.missing: set[int] | None = None


@dataclass
class Recorder:
    """Counters and samples of one load-generator process (all its connections)."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    skipped: int = 0  # due while the connection was down: never sent
    deliveries: int = 0  # first receptions of bench messages
    expected: int = 0  # sum of recipients over acked sends
    other_frames: int = 0
    reconnects: int = 0
    latency_us: dict[int, array[int]] = field(default_factory=dict)
    ack_us: dict[int, array[int]] = field(default_factory=dict)
    lag_us: dict[int, array[int]] = field(default_factory=dict)
    late: Counter[int] = field(default_factory=Counter)
    dups: Counter[int] = field(default_factory=Counter)
    acked_by_stream: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)

    def counters(self) -> dict[str, int]:
        return {"sent": self.sent, "acked": self.acked, "failed": self.failed,
                "skipped": self.skipped, "deliveries": self.deliveries,
                "expected": self.expected, "other_frames": self.other_frames,
                "reconnects": self.reconnects,
                "pending": self.sent - self.acked - self.failed}

    def _sample(self, table: dict[int, array[int]], step: int, value: int) -> None:
        samples = table.get(step)
        if samples is None:
            samples = table[step] = array("q")
        samples.append(value)

    def sent_one(self, step: int, intended_ns: int, now_ns: int) -> None:
        self.sent += 1
        if step >= 0:
            self._sample(self.lag_us, step, (now_ns - intended_ns) // 1000)

    def ack(self, stream: str, n: int, step: int, recipients: int, sent_ns: int) -> None:
        self.acked += 1
        self.expected += recipients
        acked = self.acked_by_stream.get(stream)
        if acked is None:
            acked = self.acked_by_stream[stream] = []
        acked.append((n, step))
        if step >= 0:
            self._sample(self.ack_us, step, (time.time_ns() - sent_ns) // 1000)

    def fail(self, code: str) -> None:
        self.failed += 1
        self.errors[code] += 1

    def delivery(self, tracks: dict[str, Track], stream: str, n: int, body: str) -> None:
        """A bench message reached a connection: order, duplicates, latency."""
        parts = body.split(" ", 2)
        try:
            intended_ns = int(parts[0])
            step = int(parts[1])
        except (ValueError, IndexError):
            self.other_frames += 1
            return
        tr = tracks.get(stream)
        if tr is None:
            tr = tracks[stream] = Track()
        last = tr.last
        if n == last + 1:
            tr.last = n
        elif n > last:
            if tr.missing is None:
                tr.missing = set()
            tr.missing.update(range(last + 1, n))
            tr.last = n
        elif tr.missing is not None and n in tr.missing:
            tr.missing.discard(n)
            self.late[step] += 1
        else:
            self.dups[step] += 1
            return
        self.deliveries += 1
        if step >= 0:
            self._sample(self.latency_us, step, (time.time_ns() - intended_ns) // 1000)


# ---------------------------------------------------------------- parent side


def merge_samples(parts: list[dict[int, array[int]]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for part in parts:
        for step, samples in part.items():
            out.setdefault(step, []).extend(samples)
    for merged in out.values():
        merged.sort()
    return out


def percentile(sorted_samples: list[int], q: float) -> float | None:
    """Nearest-rank percentile of sorted samples (None when there are none)."""
    if not sorted_samples:
        return None
    rank = max(0, min(len(sorted_samples) - 1, int(q * len(sorted_samples) + 0.5) - 1))
    return float(sorted_samples[rank])


def count_loss(acked_by_stream: dict[str, list[tuple[int, int]]],
               tracks: dict[tuple[int, str], tuple[int, list[int]]],
               receivers_of: dict[str, list[int]]) -> Counter[int]:
    """Lost deliveries per step: acked numbers a receiving connection never got.

    ``tracks`` maps (connection, stream) to (last number, missing numbers).
    """
    lost: Counter[int] = Counter()
    for stream, acked in acked_by_stream.items():
        acked.sort()
        numbers = [n for n, _ in acked]
        step_of = dict(acked)
        for conn in receivers_of.get(stream, []):
            last, missing = tracks.get((conn, stream), (0, []))
            for _n, step in acked[bisect.bisect_right(numbers, last):]:
                lost[step] += 1
            for n in missing:
                missed_step = step_of.get(n)
                if missed_step is not None:
                    lost[missed_step] += 1
    return lost


def export_tracks(per_conn: dict[int, dict[str, Track]]) -> dict[tuple[int, str], tuple[
        int, list[int]]]:
    return {(conn, stream): (tr.last, sorted(tr.missing or ()))
            for conn, tracks in per_conn.items() for stream, tr in tracks.items()}


def results_payload(rec: Recorder, per_conn: dict[int, dict[str, Track]]) -> dict[str, Any]:
    return {"counters": rec.counters(), "latency_us": rec.latency_us, "ack_us": rec.ack_us,
            "lag_us": rec.lag_us, "late": dict(rec.late), "dups": dict(rec.dups),
            "acked_by_stream": rec.acked_by_stream, "errors": dict(rec.errors),
            "closes": dict(rec.closes), "tracks": export_tracks(per_conn)}
