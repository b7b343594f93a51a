"""Tail: the last lines of a domain's file, found from its end, and the lines appended after them.

The reading is :mod:`leitstand.storage.reader`'s, as for the read API: only whole requests
between two commits are shown, so a line is never printed half, nor one that a failed commit
is about to take back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from leitstand.storage import reader


def last(path: Path, count: int) -> tuple[bytes, int]:
    """The last ``count`` whole lines of the file, and the offset where they end."""
    page = reader.tail(path.parent, path.name, count)
    return b"".join(line + b"\n" for line in page.lines), page.next.offset


def follow(path: Path, offset: int) -> Iterator[bytes]:
    """Whole lines appended after ``offset``, as they come (see :func:`leitstand.storage.reader.follow`)."""
    return reader.follow(path, offset)
