"""Tail: the last whole lines of a domain, and with ``-f`` what is appended, like ``tail -F``.

The reading is :mod:`leitstand.storage.reader`'s, as for the read API: only whole requests
between two commits are shown, so a line is never printed half, nor one that a failed commit
is about to take back. Where the live file holds fewer lines than asked for, the rest come
from the newest segments; following goes on across seals, from the segment the last line
came from into the next file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from leitstand.storage import reader
from leitstand.storage.reader import Cursor


def last(directory: Path, name: str, count: int) -> tuple[bytes, Cursor]:
    """The last ``count`` whole lines of the journal file ``name`` and its segments, and where they end;
    raises FileNotFoundError if there is neither."""
    page = reader.tail(directory, name, count)
    return b"".join(line + b"\n" for line in page.lines), page.next


def follow(directory: Path, name: str, cursor: Cursor | None) -> Iterator[bytes]:
    """Whole lines appended after ``cursor`` (None: from the start of the live file), as they come."""
    return reader.follow(directory, name, cursor)
