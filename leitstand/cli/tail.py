"""Tail: the last lines of a domain, found from the end, and the lines appended after them.

Only whole lines between two commits are shown (see :mod:`leitstand.storage.datadir`), so a line
is never printed half, nor one that a failed commit is about to take back. Where the live file
holds fewer lines than asked for, the rest come from the newest segments. ``follow`` keeps the
file it follows open, like ``tail -F``: once the name stands for another file (sealed, or
renamed), it reads what the old file got until then, and goes on with the new one from its start.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from leitstand.storage import datadir, durable, journal, segments

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def last(directory: Path, name: str, count: int) -> tuple[bytes, int, int | None]:
    """The last ``count`` whole lines of the journal file ``name`` and its segments; the offset where they
    end in the live file, and its inode (None: there is none). Raises FileNotFoundError if there is nothing."""
    path = directory / name
    text, end, inode = b"", 0, None
    sealed = segments.of(directory, name)
    try:
        with datadir.opened(path) as fd:
            end = datadir.length(fd, path).whole
            inode = os.fstat(fd).st_ino
            # They begin just after the newline ``count + 1`` back from ``end``, which ends a line.
            start = journal.last_line_end(fd, end, count + 1) if count > 0 else end
            text = b"".join(durable.read_range(fd, start, end))
    except FileNotFoundError:
        if not sealed:
            raise
    missing = count - text.count(b"\n")
    for segment in reversed(sealed):
        if missing <= 0:
            break
        kept: deque[bytes] = deque(maxlen=missing)
        kept.extend(datadir.split_lines(segments.content(directory, segment)))
        text = b"".join(line + b"\n" for line in kept) + text
        missing -= len(kept)
    return text, end, inode


def follow(path: Path, offset: int, inode: int | None, interval: float = 0.2) -> Iterator[bytes]:
    """Whole lines appended after ``offset`` to the file ``inode``, then to each file under ``path`` after it, as
    they come; waits for the file if there is none yet. A file that got shorter is followed again from its start."""
    fd: int | None = None
    try:
        while True:
            if fd is None:
                try:
                    fd = os.open(path, _READ_FLAGS)
                except FileNotFoundError:
                    time.sleep(interval)
                    continue
                if os.fstat(fd).st_ino != inode:
                    offset, inode = 0, os.fstat(fd).st_ino
            # Looked at before the length: a file sealed by then gets nothing more, so it is read to its end.
            replaced = not datadir.is_named(fd, path)
            end = datadir.length(fd, path).whole
            if end < offset:
                offset = 0
            if end > offset:
                yield b"".join(durable.read_range(fd, offset, end))
                offset = end
            if replaced:
                os.close(fd)
                fd, inode = None, None
            else:
                time.sleep(interval)
    finally:
        if fd is not None:
            os.close(fd)
