"""Deadlines for slow clients: one sweep a second for all requests instead of a timer each.

A timer per request (``asyncio.timeout``) costs several microseconds on every request, and
almost every body is already there when the request starts. Here a request costs a dict
insert and delete; a client that has not finished in time is cut off by the next sweep,
between ``seconds`` and ``seconds + 1`` after it started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

_SWEEP_INTERVAL = 1.0


class Expired(Exception):
    """The awaited step did not finish before its deadline."""


class Deadlines:
    """Runs awaitables under one deadline each; a timer that runs only while one is waiting cancels the late ones."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def run(self, awaitable: Awaitable[T]) -> T:
        """What ``awaitable`` returns, or Expired once it has taken longer than ``seconds``."""
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = time.monotonic() + self.seconds
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_INTERVAL, self._sweep)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            task.uncancel()
            raise Expired from None
        finally:
            del self._deadlines[task]

    def _sweep(self) -> None:
        now = time.monotonic()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        # Stops when nothing is waiting, so an idle server has no timer; the next run() starts it again.
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_INTERVAL, self._sweep) if self._deadlines else None
