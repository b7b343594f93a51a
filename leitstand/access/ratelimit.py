"""Rate limits: failed logins per client address, and requests per token.

Both live in the memory of one worker process; with ``N`` workers a client gets up to
``N`` times the limit, which still stops guessing and runaway producers. The tables are
bounded, so a flood of new addresses cannot grow them without end.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Hashable

_RATE = re.compile(r"(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)", re.IGNORECASE)
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_KEYS = 65536


def parse_rate(raw: str) -> tuple[int, float] | None:
    """``"10/min"`` as ``(10, 60.0)``; ``"0"`` or ``"off"`` as None (no limit)."""
    if raw.strip().lower() in ("0", "off"):
        return None
    match = _RATE.fullmatch(raw.strip())
    if match is None:
        raise ValueError(raw)
    count = int(match.group(1))
    return (count, _PERIODS[match.group(2)[0].lower()]) if count else None


def retry_after(seconds: float) -> bytes:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds))).encode()


class FailureLimit:
    """At most ``limit`` failures per ``period`` and key; after that the key waits out the period."""

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period
        # key -> [failures, start of the window]
        self._windows: dict[Hashable, list[float]] = {}

    def blocked(self, key: Hashable, now: float | None = None) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        window = self._windows.get(key)
        if window is None or window[0] < self.limit:
            return 0.0
        left = window[1] + self.period - (time.monotonic() if now is None else now)
        if left <= 0:
            del self._windows[key]
            return 0.0
        return left

    def failed(self, key: Hashable, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        window = self._windows.get(key)
        if window is None or now - window[1] >= self.period:
            if window is None and len(self._windows) >= MAX_KEYS:
                self._prune(now)
            self._windows[key] = [1, now]
        else:
            window[0] += 1

    def _prune(self, now: float) -> None:
        expired = [key for key, (_, start) in self._windows.items() if now - start >= self.period]
        for key in expired or list(self._windows)[: MAX_KEYS // 2]:
            del self._windows[key]


class TokenBucket:
    """``rate`` requests per ``period`` and key, in bursts of up to ``rate``."""

    def __init__(self, rate: int, period: float) -> None:
        self.capacity = float(rate)
        self.per_second = rate / period
        # key -> [tokens left, time of the last refill]
        self._buckets: dict[Hashable, list[float]] = {}

    def take(self, key: Hashable, now: float | None = None) -> float:
        """0 if ``key`` may go ahead (and it is counted), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_KEYS:
                self._buckets.clear()
            bucket = self._buckets[key] = [self.capacity, now]
        else:
            bucket[0] = min(self.capacity, bucket[0] + (now - bucket[1]) * self.per_second)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.per_second
