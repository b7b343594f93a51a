"""Tail: the last lines of a domain's file, found from its end, and the lines appended after them.

Only whole lines between two commits are shown (see :mod:`leitstand.storage.datadir`), so a line
is never printed half, nor one that a failed commit is about to take back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from leitstand.storage import datadir, durable, journal


def last(path: Path, count: int) -> tuple[bytes, int]:
    """The last ``count`` whole lines of the file, and the offset where they end."""
    with datadir.opened(path) as fd:
        end = datadir.length(fd, path).whole
        # They begin just after the newline ``count + 1`` back from ``end``, which ends a line.
        start = journal.last_line_end(fd, end, count + 1) if count > 0 else end
        return b"".join(durable.read_range(fd, start, end)), end


def follow(path: Path, offset: int, interval: float = 0.2) -> Iterator[bytes]:
    """Whole lines appended after ``offset``, as they come; waits for the file if it does not exist yet.

    A file that got shorter (rewritten, or restored) is followed again from its start.
    """
    while True:
        try:
            with datadir.opened(path) as fd:
                end = datadir.length(fd, path).whole
                if end < offset:
                    offset = 0
                if end > offset:
                    yield b"".join(durable.read_range(fd, offset, end))
                    offset = end
        except FileNotFoundError:
            offset = 0
        time.sleep(interval)
