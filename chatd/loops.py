"""Supervised background loops: retried with capped backoff, health visible to /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from chatd.logs import error_text
from chatd.metrics import Metrics

log = logging.getLogger("chatd.loops")


class Loop:
    """Runs `step` forever, sleeping `interval_s` after each success (0 for steps that block).

    A step that raises is logged, counted and retried after a backoff that
    doubles up to `max_backoff_s`; the loop reports unhealthy until a step
    succeeds again. Cancellation always propagates.
    """

    def __init__(self, name: str, step: Callable[[], Awaitable[None]], metrics: Metrics,
                 *, interval_s: float = 0.0, max_backoff_s: float = 2.0) -> None:
        self.name = name
        self._step = step
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.healthy = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"chatd-{self.name}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        backoff = 0.05
        task = asyncio.current_task()
        assert task is not None
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if task.cancelling():
                    # redis-py's internal wait_for can turn our cancellation into a
                    # connection error (Python 3.11); the cancel still stands.
                    raise asyncio.CancelledError from e
                self.healthy = False
                self._metrics.loop_errors.labels(self.name).inc()
                log.warning("background loop failed, retrying",
                            extra={"loop": self.name, "error": error_text(e), "backoff_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
            else:
                if task.cancelling():
                    raise asyncio.CancelledError
                self.healthy = True
                backoff = 0.05
                if self._interval_s:
                    await asyncio.sleep(self._interval_s)

