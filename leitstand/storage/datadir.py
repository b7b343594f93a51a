"""The data directory seen from outside the server: which file is what, and how much of it is whole.

The operator commands (verify, backup, stats, tail, check-config) read the files while
the service may be appending. A commit holds ``flock`` across write and sync, so the
length read under that lock, cut back to the last whole request (by the request log, see
:mod:`leitstand.storage.keylog`) and to the last ``\\n``, is a prefix that no running server changes
any more: the journal only appends, and cuts a file back only to a length it had when the
lock was last released, or past what a crash left of a request that was never acknowledged.
"""

from __future__ import annotations

import enum
import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from leitstand.intake import domains
from leitstand.storage import journal, keylog
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
    return Kind.JOURNAL if is_journal_name(name) else Kind.STRAY


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


@contextmanager
def opened(path: Path) -> Iterator[int]:
    """A read-only descriptor that never follows a symbolic link."""
    fd = os.open(path, _READ_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


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
    rest = b""
    for chunk in read_range(fd, 0, end):
        *complete, rest = (rest + chunk).split(b"\n")
        yield from complete
