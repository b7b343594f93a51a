"""Reading journal files while the service appends: pages by cursor, the tail, a start by time,
the rate of recent minutes, and following appends.

Why it is built this way:

* **Only whole acknowledged requests.** What may be read ends where
  :func:`leitstand.storage.datadir.length` says: the length taken under the journal's lock,
  shared and for a moment, cut back to the last whole request and the last ``\\n``. A commit
  under way, a torn line or the first lines of an unfinished batch are never served, and
  nothing served is ever taken back. Readers never take the writers' exclusive lock and never
  write to the data dir.
* **Cursors** are opaque text: a version (``1``) and the URL-safe base64 of the file's inode
  and the byte offset where the next line begins. The inode ties a cursor to one file: a
  file that was replaced (restored, or later sealed into a segment) is not read at the offset
  of another. Anything else, or an offset that is not the start of a whole line, is refused.
* **Tail** seeks from the end, so its cost does not grow with the file.
* **Since** looks the second up in the time index (:mod:`leitstand.storage.timeindex`).
* **Bounded.** A page holds at most ``limit`` lines and :data:`PAGE_BYTES` (at least one
  line); a follower reads page by page, so a slow one holds one page, not a backlog.

Nothing here knows HTTP or JSON beyond bytes: lines are handed out as stored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from leitstand.storage import datadir, timeindex
from leitstand.storage.durable import CHUNK, read_range
from leitstand.storage.journal import last_line_end

MAX_LIMIT = 1000
PAGE_BYTES = 16 << 20
CURSOR_VERSION = "1"
_CURSOR = struct.Struct("<QQ")
_CURSOR_LENGTH = 1 + 22  # version, 16 bytes in base64 without padding
_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# A minute of more than this many bytes has its lines estimated from a sample of its end.
_COUNT_EXACTLY = 64 << 10
_SAMPLE = 16 << 10


class ReadError(ValueError):
    """A read that cannot be done as asked; the message is one line for the caller."""


@dataclass(frozen=True)
class Cursor:
    """Where reading goes on: the file (its inode) and the offset of the next line."""

    file: int
    offset: int

    def __str__(self) -> str:
        return CURSOR_VERSION + base64.urlsafe_b64encode(_CURSOR.pack(self.file, self.offset)).decode()[:-2]

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor ``text`` stands for; :class:`ReadError` for anything that is not one of ours."""
        if len(text) != _CURSOR_LENGTH or text[0] != CURSOR_VERSION or not _ALPHABET.issuperset(text[1:]):
            raise ReadError("invalid cursor")
        try:
            raw = base64.urlsafe_b64decode(text[1:] + "==")
        except (binascii.Error, ValueError):
            raise ReadError("invalid cursor") from None
        cursor = cls(*_CURSOR.unpack(raw))
        if str(cursor) != text:  # non-canonical padding bits
            raise ReadError("invalid cursor")
        return cursor


@dataclass(frozen=True)
class Page:
    """Lines as stored (without ``\\n``), the offset just after each, and where to go on."""

    lines: list[bytes]
    ends: list[int]
    next: Cursor

    def cursor(self, n: int) -> Cursor:
        """The cursor that goes on after line ``n``."""
        return Cursor(self.next.file, self.ends[n])


class JournalFile:
    """One journal file, open read-only (never through a symbolic link)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self.name = name
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        self.inode = os.fstat(self.fd).st_ino

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> JournalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def length(self) -> datadir.Length:
        return datadir.length(self.fd, self.path)

    def end(self) -> int:
        """Where the whole requests end now."""
        return self.length().whole

    def count(self, start: int, end: int) -> int:
        """Lines between two line boundaries."""
        return sum(chunk.count(b"\n") for chunk in read_range(self.fd, start, end))

    def start(self, cursor: Cursor, end: int) -> int:
        """The offset of ``cursor``, once it is sure to be the start of a line of this file."""
        if cursor.file != self.inode:
            raise ReadError("cursor of another file: the domain's file was replaced, read again without a cursor")
        offset = cursor.offset
        if offset > end or (offset and os.pread(self.fd, 1, offset - 1) != b"\n"):
            raise ReadError("invalid cursor")
        return offset

    def since(self, when: float, end: int) -> int:
        """Where the lines written in the second of ``when`` or later begin."""
        with self._times() as times:
            return min(end, times.offset(int(when), (int(os.fstat(self.fd).st_mtime), end)))

    def forward(self, start: int, end: int, limit: int, q: bytes | None = None) -> Page:
        """Up to ``limit`` lines (with ``q`` in them) from ``start`` on; ``next`` is where the scan stopped."""
        lines: list[bytes] = []
        ends: list[int] = []
        if q is not None and b"\n" in q:
            return Page(lines, ends, Cursor(self.inode, end))
        size = 0
        rest = b""
        base = start
        for chunk in read_range(self.fd, start, end):
            buf = rest + chunk
            cut = buf.rfind(b"\n") + 1
            for first, last in _lines(buf, cut, q):
                lines.append(buf[first:last])
                ends.append(base + last + 1)
                size += last - first
                if len(lines) >= limit or size >= PAGE_BYTES:
                    return Page(lines, ends, Cursor(self.inode, ends[-1]))
            rest, base = buf[cut:], base + cut
        return Page(lines, ends, Cursor(self.inode, end))

    def backward(self, end: int, count: int, floor: int = 0, q: bytes | None = None) -> Page:
        """The last ``count`` lines (with ``q`` in them) that begin at ``floor`` or later, oldest first."""
        if count <= 0 or (q is not None and b"\n" in q):
            return Page([], [], Cursor(self.inode, end))
        if q is None:
            start = max(floor, last_line_end(self.fd, end, count + 1))
            if end - start > PAGE_BYTES:
                # The newest lines that fit, at least the last one.
                start = min(_next_line(self.fd, end - PAGE_BYTES, end), last_line_end(self.fd, end, 2))
            page = self.forward(max(start, floor), end, count)
            return Page(page.lines, page.ends, Cursor(self.inode, end))
        found: list[tuple[bytes, int]] = []
        size = 0
        top, rest = end, b""
        while top > floor and len(found) < count and size < PAGE_BYTES:
            bottom = max(floor, top - CHUNK)
            buf = os.pread(self.fd, top - bottom, bottom) + rest
            # Lines begin after the first \n, unless the chunk begins at the floor.
            skip = 0 if bottom == floor else buf.find(b"\n") + 1
            if bottom > floor and skip == 0:
                rest, top = buf, bottom
                continue
            whole = buf[skip:]
            matches = [(whole[first:last], bottom + skip + last + 1) for first, last in _lines(whole, len(whole), q)]
            for line, line_end in reversed(matches):
                found.append((line, line_end))
                size += len(line)
                if len(found) >= count or size >= PAGE_BYTES:
                    break
            rest, top = buf[:skip], bottom
        found.reverse()
        return Page([line for line, _ in found], [e for _, e in found], Cursor(self.inode, end))

    def activity(self, end: int, now: float, known: dict[int, int]) -> tuple[list[int], int]:
        """Lines written in each of the last 60 minutes (the current one last), and in the last 60 s.

        ``known`` keeps the counts of minutes that are over, by their first second, between calls.
        """
        this_minute = int(now) // 60 * 60
        minutes = [this_minute - 60 * n for n in range(59, -1, -1)]
        with self._times() as times:
            fallback = (int(os.fstat(self.fd).st_mtime), end)

            def offset(second: int) -> int:
                return min(end, times.offset(second, fallback))

            counts = []
            for first in minutes:
                if first in known:
                    counts.append(known[first])
                    continue
                count = self._count(offset(first), offset(first + 60))
                if first < this_minute:
                    known[first] = count
                counts.append(count)
            recent = self._count(offset(int(now) - 59), end)
        for first in [m for m in list(known) if m < minutes[0]]:
            known.pop(first, None)
        return counts, recent

    def _count(self, start: int, end: int) -> int:
        """Lines between two line boundaries; estimated from a sample of the end past a size."""
        if end - start <= _COUNT_EXACTLY:
            return self.count(start, end)
        sample = os.pread(self.fd, _SAMPLE, end - _SAMPLE)
        return round((end - start) * sample.count(b"\n") / _SAMPLE)

    @contextlib.contextmanager
    def _times(self) -> Iterator[timeindex.Times]:
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            times_dir = timeindex.open_times_dir(directory, create=False)
        finally:
            os.close(directory)
        try:
            with timeindex.Times(times_dir, self.name, self.inode) as times:
                yield times
        finally:
            if times_dir is not None:
                os.close(times_dir)


def _lines(buf: bytes, cut: int, q: bytes | None) -> Iterator[tuple[int, int]]:
    """(start, end) of each line in ``buf[:cut]`` (``end`` is its ``\\n``) that holds ``q``."""
    i = 0
    if q is None:
        while (j := buf.find(b"\n", i, cut)) >= 0:
            yield i, j
            i = j + 1
        return
    while (k := buf.find(q, i, cut)) >= 0:
        j = buf.find(b"\n", k, cut)
        if j < 0:
            return
        first = buf.rfind(b"\n", i, k)
        yield (i if first < 0 else first + 1), j
        i = j + 1


def _next_line(fd: int, offset: int, end: int) -> int:
    """The start of the first line at ``offset`` or after."""
    for chunk_start in range(offset - 1, end, CHUNK):
        chunk = os.pread(fd, min(CHUNK, end - chunk_start), chunk_start)
        found = chunk.find(b"\n")
        if found >= 0:
            return chunk_start + found + 1
    return end


def page(
    directory: Path, name: str, after: Cursor | None, limit: int, q: bytes | None = None, since: float | None = None
) -> Page:
    """Lines from ``after`` (or the start), from ``since`` on if given."""
    with JournalFile(directory, name) as journal:
        end = journal.end()
        start = 0 if after is None else journal.start(after, end)
        if since is not None:
            start = max(start, journal.since(since, end))
        return journal.forward(start, end, limit, q)


def tail(directory: Path, name: str, count: int, q: bytes | None = None, since: float | None = None) -> Page:
    """The last ``count`` lines, from ``since`` on if given; ``next`` follows from the end."""
    with JournalFile(directory, name) as journal:
        end = journal.end()
        floor = 0 if since is None else journal.since(since, end)
        return journal.backward(end, count, floor, q)


def follow(path: Path, offset: int, interval: float = 0.2) -> Iterator[bytes]:
    """Whole lines appended after ``offset``, as they come; waits for the file if it does not exist yet.

    A file that got shorter or was replaced is followed again from its start.
    """
    inode = None
    while True:
        try:
            with JournalFile(path.parent, path.name) as journal:
                end = journal.end()
                if end < offset or (inode is not None and journal.inode != inode):
                    offset = 0
                inode = journal.inode
                if end > offset:
                    yield b"".join(read_range(journal.fd, offset, end))
                    offset = end
        except FileNotFoundError:
            offset, inode = 0, None
        time.sleep(interval)


class Watch:
    """Tells the followers of a file in this process when it may have grown: one ``stat`` per file
    and interval for all of them, on the event loop (it never blocks on a local file system),
    so that every worker sees what any worker appended within one interval."""

    def __init__(self, directory: Path, interval: float = 0.25) -> None:
        self.directory = directory
        self.interval = interval
        self._files: dict[str, _Watched] = {}

    @contextlib.asynccontextmanager
    async def watching(self, name: str) -> AsyncIterator[_Watched]:
        watched = self._files.get(name)
        if watched is None:
            watched = self._files[name] = _Watched()
            watched.task = asyncio.get_running_loop().create_task(self._poll(name, watched))
        watched.followers += 1
        try:
            yield watched
        finally:
            watched.followers -= 1
            if not watched.followers:
                del self._files[name]
                assert watched.task is not None
                watched.task.cancel()

    async def _poll(self, name: str, watched: _Watched) -> None:
        path = self.directory / name
        while True:
            try:
                st = os.stat(path, follow_symlinks=False)
                stamp: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                stamp = ()
            if stamp != watched.stamp:
                watched.stamp = stamp
                watched.changed()
            await asyncio.sleep(self.interval)


class _Watched:
    __slots__ = ("event", "followers", "stamp", "task")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.followers = 0
        self.stamp: tuple[int, ...] | None = None
        self.task: asyncio.Task[None] | None = None

    def changed(self) -> None:
        event, self.event = self.event, asyncio.Event()
        event.set()
