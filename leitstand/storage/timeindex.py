"""The time index: when each part of a journal file was written, exact to the second.

Stored lines stay as sent, so they carry no time of their own. Instead the journal keeps a
sparse side index per journal file, ``<data dir>/.leitstand/times/<name>.idx``: 16-byte
records ``(second, offset)``, one for the first commit of each second, meaning "the lines
from ``offset`` on were written in ``second`` or later". The first record is a header that
names the journal file's inode, so that an index never speaks for another file (a restore
copies only the ``.jsonl`` files).

Why it is built this way:

* **Almost free on the hot path.** A commit compares the current second with the last one it
  recorded; once a second it appends one record, under the journal file's lock (so records
  of several workers stay in file order), with a plain ``write`` and no sync.
* **"Received" means written.** A line's time is the second of the commit that wrote it,
  which lies between the arrival of its request and its ``200``. ``since=T`` starts at the
  first record of a second ``>= T``: every line before it was written before ``T``.
* **Never skips, when unsure.** The index is not synced. A clean stop ends each file's index
  with a record at the file's end. At start, an index that does not end there (a crash; after
  a power cut its last records may be gone) gets a record that counts the lines after its
  last record as written at the start: ``since`` may then include a few lines written up to
  that much earlier, and never skips one. A missing or foreign index (a restore) is rebuilt
  as one record at the file's mtime (which ``leitstand restore``, ``cp -p`` and ``rsync -t``
  keep): every old line counts as written then, and ``since`` after it skips them all.
* **Segments keep theirs.** A seal renames the index with the file, to
  ``<segment>.idx`` (the header keeps naming the inode the file had while live, which a cursor
  into it holds, also after compression made a new file); retention removes it with the
  segment. A segment without one (a restore) counts every line as written at its seal.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from leitstand.storage import keylog, quickcalls
from leitstand.storage.durable import write_whole

TIMES_DIR = "times"
SUFFIX = ".idx"
# (second, offset); the header is (-1, inode of the journal file).
RECORD = struct.Struct("<qQ")
_HEADER = -1
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def index_name(journal_name: str) -> str:
    return keylog.log_name(journal_name, SUFFIX)


def open_times_dir(data_dir: int, create: bool) -> int | None:
    """``.leitstand/times`` inside the data dir; None if it does not exist and ``create`` is false."""
    return keylog.open_state_dir(data_dir, TIMES_DIR, create, fsync=False)


class TimeLog:
    """The index of one journal file, as its writer sees it; every method runs under the file's lock."""

    __slots__ = ("fd", "last", "name", "second", "size")

    def __init__(self, journal_name: str) -> None:
        self.name = index_name(journal_name)
        self.fd: int | None = None
        # The last second this process knows to be recorded; -1 until it has looked.
        self.second = -1
        # The index's length (whole records) when this process last read or wrote its last
        # record, and that record: while the length is the same, nobody else has added one.
        self.size = -1
        self.last: tuple[int, int] | None = None

    def close(self) -> list[int]:
        fd, self.fd, self.second, self.size = self.fd, None, -1, -1
        return [] if fd is None else [fd]

    def note(self, times_dir: int, data_fd: int, offset: int, now: float, quick: bool = False) -> None:
        """A commit writes at ``offset`` now: the first of its second gets a record.

        With ``quick``, the length and the write keep the GIL (:mod:`leitstand.storage.quickcalls`):
        with many domains most commits are the first of their second for their file.
        """
        second = int(now)
        if second <= self.second:
            return
        fd = self._open(times_dir, data_fd)
        size = (quickcalls.length(fd) if quick else os.fstat(fd).st_size) // RECORD.size * RECORD.size
        # Another worker's record (under the journal file's lock, as this one) changes the length.
        last = self.last if size == self.size else _last_of(fd, size)
        if last is None or last[0] < second:
            # Without a record yet (a new index, or one lost while the service ran), the lines
            # before count as written now.
            last = (second, offset if last is not None else 0)
            write_whole(fd, RECORD.pack(*last), quickcalls.write if quick else None)
            size += RECORD.size
        self.size, self.last = size, last
        self.second = last[0]

    def settle(self, times_dir: int, data_fd: int, size: int, now: float) -> None:
        """At start: make the index speak for the file as it is, never later than the truth."""
        fd = self._open(times_dir, data_fd)
        last = _last(fd)
        if last is None or last[1] > size:
            # Empty, foreign (rebuilt below by _open), or longer than the file: start afresh.
            os.ftruncate(fd, RECORD.size)
            if size:
                write_whole(fd, RECORD.pack(int(os.fstat(data_fd).st_mtime), 0))
        elif last[1] < size:
            # Records may be lost after the last one: its lines count as written at the start.
            write_whole(fd, RECORD.pack(max(int(now), last[0]), last[1]))
        self.second = max(int(now), last[0] if last else 0)
        self.size = -1

    def mark(self, times_dir: int, data_fd: int, size: int, now: float) -> None:
        """At a clean stop: a record at the file's end says that no record was lost."""
        fd = self._open(times_dir, data_fd)
        last = _last(fd)
        if last is not None and last[1] < size:
            write_whole(fd, RECORD.pack(max(int(now), last[0]), size))
        self.size = -1

    def _open(self, times_dir: int, data_fd: int) -> int:
        """The index, with a header naming ``data_fd``'s inode: a foreign or torn one is emptied first."""
        if self.fd is not None:
            return self.fd
        fd = os.open(self.name, _OPEN_FLAGS, 0o600, dir_fd=times_dir)
        inode = os.fstat(data_fd).st_ino
        size = os.fstat(fd).st_size
        if size < RECORD.size or RECORD.unpack(os.pread(fd, RECORD.size, 0)) != (_HEADER, inode):
            os.ftruncate(fd, 0)
            write_whole(fd, RECORD.pack(_HEADER, inode))
        elif size % RECORD.size:
            os.ftruncate(fd, size - size % RECORD.size)
        self.fd = fd
        return fd


def _last(fd: int) -> tuple[int, int] | None:
    """The last record after the header, or None."""
    return _last_of(fd, os.fstat(fd).st_size // RECORD.size * RECORD.size)


def _last_of(fd: int, size: int) -> tuple[int, int] | None:
    """The last record after the header of an index of ``size`` bytes (whole records), or None."""
    if size < 2 * RECORD.size:
        return None
    second, offset = RECORD.unpack(os.pread(fd, RECORD.size, size - RECORD.size))
    return second, offset


def indexed_inode(times_dir: int | None, journal_name: str) -> int | None:
    """The inode the index of ``journal_name`` speaks for, or None if it has none: for a segment
    (whose index the seal renamed with it), the inode it had as the live file, also once it was
    compressed into a new file."""
    if times_dir is None:
        return None
    try:
        fd = os.open(index_name(journal_name), _READ_FLAGS, dir_fd=times_dir)
    except FileNotFoundError:
        return None
    try:
        header = os.pread(fd, RECORD.size, 0)
    finally:
        os.close(fd)
    if len(header) < RECORD.size:
        return None
    second, inode = RECORD.unpack(header)
    return inode if second == _HEADER else None


def forget(data_dir: Path, journal_name: str) -> None:
    """Remove the index of ``journal_name`` (a segment that retention removed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(data_dir / keylog.STATE_DIR / TIMES_DIR / index_name(journal_name))


class Times(Sequence[tuple[int, int]]):
    """The records of one journal file's index, read without a lock (whole records only, each
    with one ``pread``, so that a long index is never read whole).

    Empty when there is no index, or when it speaks for another file (an inode other than
    ``inode``): then the caller falls back to the file's mtime.
    """

    def __init__(self, times_dir: int | None, journal_name: str, inode: int) -> None:
        self._fd = -1
        self._count = 0
        if times_dir is None:
            return
        try:
            fd = os.open(index_name(journal_name), _READ_FLAGS, dir_fd=times_dir)
        except FileNotFoundError:
            return
        count = os.fstat(fd).st_size // RECORD.size - 1
        if count < 1 or RECORD.unpack(os.pread(fd, RECORD.size, 0)) != (_HEADER, inode):
            os.close(fd)
            return
        self._fd, self._count = fd, count

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Times:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[int, int]:  # type: ignore[override]
        if not 0 <= index < self._count:
            raise IndexError(index)
        second, offset = RECORD.unpack(os.pread(self._fd, RECORD.size, (index + 1) * RECORD.size))
        return second, offset

    def offset(self, second: int, fallback: tuple[int, int]) -> int:
        """Where the lines written in ``second`` or later begin; ``fallback`` is (mtime, end) for a
        file without an index of its own: all of it or nothing."""
        if not self._count:
            mtime, end = fallback
            return 0 if second <= mtime else end
        index = bisect.bisect_left(self, second, key=lambda record: record[0])
        return self[index][1] if index < self._count else fallback[1]
