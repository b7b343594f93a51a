"""Stats: how many events each domain holds, how many bytes, and when it got its first and last one.

Events carry no time of their own (they are stored as sent), so the times come from the
file: the last event is the file's mtime, the first is its birth time (``statx``), which
is when the server created the file for the domain's first event. A file that was
restored from a backup was born at the restore; where the file system keeps no birth
time, the first time is unknown (``None``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leitstand.intake import domains
from leitstand.storage import datadir, reader

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BTIME = 0x800
# struct statx: stx_mask at 0, stx_btime (tv_sec int64, tv_nsec uint32) at 80.
_STATX_SIZE = 256
_BTIME_OFFSET = 80


@dataclass(frozen=True)
class DomainStats:
    file: str
    domain: str
    events: int
    bytes: int
    first: float | None
    last: float


def stats(directory: Path) -> list[DomainStats]:
    found = []
    for name in datadir.journal_names(directory):
        path = directory / name
        with reader.JournalFile(directory, name) as journal:
            length = journal.length()
            events = journal.count(0, length.whole)
            mtime = os.fstat(journal.fd).st_mtime
        domain = name.removesuffix(domains.SUFFIX)
        found.append(DomainStats(name, domain, events, length.size, _birth_time(path), mtime))
    return found


@functools.cache
def _statx() -> Any:
    """glibc's statx (2.28 and later), or None: Python 3.11 has no birth time on Linux."""
    return getattr(ctypes.CDLL(None, use_errno=True), "statx", None)


def _birth_time(path: Path) -> float | None:
    statx = _statx()
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW, _STATX_BTIME, buf) != 0:
        return None
    (mask,) = struct.unpack_from("=I", buf.raw, 0)
    if not mask & _STATX_BTIME:
        return None
    seconds, nanoseconds = struct.unpack_from("=qI", buf.raw, _BTIME_OFFSET)
    return float(seconds + nanoseconds / 1e9)
