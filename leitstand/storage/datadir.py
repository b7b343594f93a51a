"""The data directory seen from outside the server: which file is what, and how much of it is whole.

The operator commands (verify, backup, stats, tail, check-config) read the files while
the service may be appending. A commit holds ``flock`` across write and sync, so the
length read under that lock, cut back to the last whole request (by the request log, see
:mod:`leitstand.storage.keylog`) and to the last ``\\n``, is a prefix that no running server changes
any more: the journal only appends, and cuts a file back only to a length it had when the
lock was last released, or past what a crash left of a request that was never acknowledged.
A sealed segment (see :mod:`leitstand.storage.segments`) never changes at all; a live file
sealed while a command reads it stays whole under the descriptor the command holds.
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import functools
import os
import re
import struct
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leitstand.intake import domains
from leitstand.storage import journal, keylog, segments
from leitstand.storage.durable import NAME_MAX, read_range

# Where leitstand keeps state of its own (idempotency key logs, the archiver's write-ahead
# record): not a journal.
STATE_DIR = keylog.STATE_DIR
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_TORN = re.compile(r"(?P<journal>.+)\.torn-\d{8}T\d{6}Z(?:-\d+)?")
# A name shortened by domains.file_name: the first labels, "_", 16 hex digits of the hash.
_SHORTENED = re.compile(r"[a-z0-9.-]+_[0-9a-f]{16}\.jsonl")


class Kind(enum.Enum):
    JOURNAL = "journal"
    SEGMENT = "segment"
    TORN = "torn"
    PROBE = "probe"
    STRAY = "stray"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Kind


def kind_of(name: str, *, regular_file: bool = True) -> Kind:
    """What the file ``name`` is: a journal, a set-aside torn tail, a probe, or a stray."""
    if not regular_file:
        return Kind.STRAY
    if name.startswith(journal.PROBE + "-"):
        return Kind.PROBE
    torn = _TORN.fullmatch(name)
    # The journal cuts the name of a long journal down to the filesystem's limit to make room.
    if torn is not None and (is_journal_name(torn["journal"]) or len(name) == NAME_MAX):
        return Kind.TORN
    if is_journal_name(name):
        return Kind.JOURNAL
    return Kind.SEGMENT if is_segment_name(name) else Kind.STRAY


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is a sealed segment (see :mod:`leitstand.storage.segments`) of some valid domain's file."""
    segment = segments.parse(name)
    if segment is None:
        return False
    base = segment.base
    return segments.is_shortened_base(base) or (len(base) <= segments.MAX_BASE and is_journal_name(base))


def is_journal_name(name: str) -> bool:
    """Whether some valid domain owns the file ``name``."""
    if not name.endswith(domains.SUFFIX):
        return False
    if len(name) == domains.MAX_FILE_NAME and _SHORTENED.fullmatch(name):
        return True
    domain = name.removesuffix(domains.SUFFIX)
    return domains.normalize(domain) == domain and domains.file_name(domain) == name


def scan(directory: Path) -> list[Entry]:
    """Every entry of ``directory`` but leitstand's own state dir, sorted by name.

    Symbolic links and other directories are strays.
    """
    with os.scandir(directory) as entries:
        found = [
            Entry(e.name, kind_of(e.name, regular_file=e.is_file(follow_symlinks=False)))
            for e in entries
            if not (e.name == STATE_DIR and e.is_dir(follow_symlinks=False))
        ]
    return sorted(found, key=lambda e: e.name)


def journal_names(directory: Path) -> list[str]:
    return [e.name for e in scan(directory) if e.kind is Kind.JOURNAL]


def sealed(directory: Path) -> list[segments.Segment]:
    """The segments of valid domains' files in ``directory``, oldest first (never a stray that looks like one)."""
    return [segment for segment in segments.every(directory) if is_segment_name(segment.name)]


@dataclass(frozen=True)
class Usage:
    """Bytes on disk in the live journal files and in the sealed segments."""

    live: int
    sealed: int


def usage(directory: Path) -> Usage:
    live = sealed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            kind = kind_of(entry.name)
            if kind is Kind.JOURNAL:
                live += entry.stat(follow_symlinks=False).st_size
            elif kind is Kind.SEGMENT:
                sealed += entry.stat(follow_symlinks=False).st_size
    return Usage(live, sealed)


_AT_EMPTY_PATH = 0x1000
_STATX_BTIME = 0x800
# struct statx: stx_mask at 0, stx_btime (tv_sec int64, tv_nsec uint32) at 80.
_STATX_SIZE = 256
_BTIME_OFFSET = 80


@functools.cache
def _statx() -> Any:
    """glibc's statx (2.28 and later), or None: Python 3.11 has no birth time on Linux."""
    return getattr(ctypes.CDLL(None, use_errno=True), "statx", None)


def birth_time(fd: int) -> float | None:
    """When the file open as ``fd`` was created, where the file system keeps that (``statx``); else None."""
    statx = _statx()
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_BTIME, buf) != 0:
        return None
    (mask,) = struct.unpack_from("=I", buf.raw, 0)
    if not mask & _STATX_BTIME:
        return None
    seconds, nanoseconds = struct.unpack_from("=qI", buf.raw, _BTIME_OFFSET)
    return float(seconds + nanoseconds / 1e9)


@contextmanager
def opened(path: Path) -> Iterator[int]:
    """A read-only descriptor that never follows a symbolic link."""
    fd = os.open(path, _READ_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def is_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not sealed, renamed or removed since)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_ino, named.st_dev) == (held.st_ino, held.st_dev)


@dataclass(frozen=True)
class Length:
    """How long a file was between two commits, and where its last whole request ends."""

    size: int
    whole: int

    @property
    def torn(self) -> bool:
        return self.whole != self.size


def length(fd: int, path: Path) -> Length:
    """The length of the journal file ``path`` (open as ``fd``) between two commits: taken under the
    journal's lock, held only for a moment, together with what its request log says of it."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        requests_dir = keylog.open_requests_dir(directory, create=False, fsync=False)
    finally:
        os.close(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            size = os.fstat(fd).st_size
            whole = size if requests_dir is None else keylog.whole_requests(requests_dir, path.name, size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if requests_dir is not None:
            os.close(requests_dir)
    return Length(size, journal.last_line_end(fd, whole))


def lines(fd: int, end: int) -> Iterator[bytes]:
    """The lines before ``end``, without their ``\\n``; ``end`` is where a line ends."""
    yield from split_lines(read_range(fd, 0, end))


def split_lines(chunks: Iterable[bytes]) -> Generator[bytes, None, bytes]:
    """The whole lines in ``chunks``, without their ``\\n``; returns what follows the last ``\\n``."""
    rest = b""
    for chunk in chunks:
        *complete, rest = (rest + chunk).split(b"\n")
        yield from complete
    return rest
