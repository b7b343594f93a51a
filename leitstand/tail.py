"""Tail: the last lines of a domain's file, found from its end, and the lines appended after them.

Only whole lines between two commits are shown (see :mod:`leitstand.datadir`), so a line
is never printed half, nor one that a failed commit is about to take back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from leitstand import datadir


def last(path: Path, count: int) -> tuple[bytes, int]:
    """The last ``count`` whole lines of the file, and the offset where they end."""
    with datadir.opened(path) as fd:
        end = datadir.length(fd).whole
        start = _start_of_last(fd, end, count)
        return b"".join(datadir.read_range(fd, start, end)), end


def _start_of_last(fd: int, end: int, count: int) -> int:
    """Where the last ``count`` lines before ``end`` begin: just after the newline ``count + 1`` from the end."""
    if count <= 0:
        return end
    seen = 0
    pos = end
    while pos > 0:
        start = max(0, pos - datadir.CHUNK)
        chunk = os.pread(fd, pos - start, start)
        index = len(chunk)
        while (index := chunk.rfind(b"\n", 0, index)) >= 0:
            seen += 1
            if seen == count + 1:
                return start + index + 1
        pos = start
    return 0


def follow(path: Path, offset: int, interval: float = 0.2) -> Iterator[bytes]:
    """Whole lines appended after ``offset``, as they come; waits for the file if it does not exist yet.

    A file that got shorter (rewritten, or restored) is followed again from its start.
    """
    while True:
        try:
            with datadir.opened(path) as fd:
                end = datadir.length(fd).whole
                if end < offset:
                    offset = 0
                if end > offset:
                    yield b"".join(datadir.read_range(fd, offset, end))
                    offset = end
        except FileNotFoundError:
            offset = 0
        time.sleep(interval)
