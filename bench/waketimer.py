"""Sleep until an exact wall-clock time without spinning: the open-loop sender's clock.

uvloop's timers have millisecond resolution and round a shorter delay to 0.
A sender that sleeps until its next send is due (1 ms apart at 1000 sends/s)
therefore wakes early and re-polls the event loop until the time has come:
on the rooms scenario that spin was about 30% of a load generator's CPU at
1000 sends/s per process (alone, without sockets, it takes all of a core from
2000/s). On Linux a
timerfd armed with the absolute due time, watched by the event loop, wakes it
once, typically well under 0.5 ms after the time (the spinning sleep was
about as late at 1000/s), and leaves the loop to the sockets meanwhile.
Elsewhere this falls back to ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import time

_CLOCK_REALTIME = 0  # the clock of time.time(), which the send schedule uses
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class WakeTimer:
    """One per event loop; one waiter at a time (the process's step runs alone)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._fd = -1
        if sys.platform == "linux":
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._fd = self._libc.timerfd_create(_CLOCK_REALTIME, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if self._fd >= 0:
            self._loop.add_reader(self._fd, self._fired)

    async def sleep_until(self, when: float) -> None:
        """Return at ``when`` (a time.time() value) or just after it; at once if it is past."""
        if self._fd < 0:
            await asyncio.sleep(max(0.0, when - time.time()))
            return
        ns = int(when * 1e9)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // 1_000_000_000, ns % 1_000_000_000))
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime")
        # A due time already past fires at once, through the loop like any other.
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiry count; reading it re-arms the fd's readiness
        except BlockingIOError:
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
