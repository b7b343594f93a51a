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
import itertools
import os
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from leitstand.storage import datadir, segments, timeindex
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
        return _cursor_texts([self.file], [self.offset])[0].decode()

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
    """Lines as stored (without ``\\n``), the file (inode) and offset just after each, and where to
    go on; ``done``: the scan reached the end of the file it read (the next file of the history
    comes next)."""

    lines: list[bytes]
    files: list[int]
    ends: list[int]
    next: Cursor
    done: bool = True

    def cursor(self, n: int) -> Cursor:
        """The cursor that goes on after line ``n``."""
        return Cursor(self.files[n], self.ends[n])

    def ids(self) -> list[bytes]:
        """The cursor after each line as text, all in one go: a stream sends one with every event,
        and one :class:`Cursor` and one base64 call per line cost more than reading the line."""
        return _cursor_texts(self.files, self.ends)


def _cursor_texts(files: list[int], offsets: list[int]) -> list[bytes]:
    """Cursors as text: the version and the URL-safe base64 of inode and offset, without padding.
    Each is packed with two zero bytes more, so that it fills whole base64 groups and one
    encoding serves them all; the first characters of each group are the cursor's own."""
    packed = struct.pack("<" + "QQxx" * len(files), *itertools.chain.from_iterable(zip(files, offsets)))
    text = base64.urlsafe_b64encode(packed)
    version, width = CURSOR_VERSION.encode(), _CURSOR_LENGTH - 1
    return [version + text[at : at + width] for at in range(0, 24 * len(files), 24)]


def _empty(inode: int, end: int) -> Page:
    return Page([], [], [], Cursor(inode, end))


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

    def forward(self, start: int, end: int, limit: int, q: bytes | None = None, size: int | None = None) -> Page:
        """Up to ``limit`` lines (with ``q`` in them) from ``start`` on; ``next`` is where the scan stopped."""
        if q is not None and b"\n" in q:
            return _empty(self.inode, end)
        return _forward(self.inode, read_range(self.fd, start, end), start, limit, q, size)

    def backward(self, end: int, count: int, floor: int = 0, q: bytes | None = None) -> Page:
        """The last ``count`` lines (with ``q`` in them) that begin at ``floor`` or later, oldest first."""
        if count <= 0 or (q is not None and b"\n" in q):
            return _empty(self.inode, end)
        if q is None:
            start = max(floor, last_line_end(self.fd, end, count + 1))
            if end - start > PAGE_BYTES:
                # The newest lines that fit, at least the last one.
                start = min(_next_line(self.fd, end - PAGE_BYTES, end), last_line_end(self.fd, end, 2))
            page = self.forward(max(start, floor), end, count)
            return Page(page.lines, page.files, page.ends, Cursor(self.inode, end))
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
        lines, ends = [line for line, _ in found], [e for _, e in found]
        return Page(lines, [self.inode] * len(found), ends, Cursor(self.inode, end))

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


def _forward(
    inode: int, chunks: Iterable[bytes], start: int, limit: int, q: bytes | None, size: int | None = None
) -> Page:
    """Up to ``limit`` lines (with ``q`` in them) and ``size`` bytes (:data:`PAGE_BYTES` if None) of
    ``chunks``, which begin at ``start`` of the file ``inode`` and end where a line ends; ``next``
    is where the scan stopped."""
    bound = PAGE_BYTES if size is None else size
    if q is not None and b"\n" in q:
        return _empty(inode, start + sum(len(chunk) for chunk in chunks))
    lines: list[bytes] = []
    ends: list[int] = []
    taken = 0
    base, rest = start, b""
    for chunk in chunks:
        buf = rest + chunk
        cut = buf.rfind(b"\n") + 1
        if q is None:
            # Every stream reads this way: split in C, not line by line.
            found = buf.split(b"\n")
            found.pop()  # what follows the last \n
            found_ends = list(itertools.accumulate([len(line) + 1 for line in found], initial=base))[1:]
        else:
            spans = list(_lines(buf, cut, q))
            found = [buf[first:last] for first, last in spans]
            found_ends = [base + last + 1 for _, last in spans]
        take = min(len(found), limit - len(lines))
        more = sum(map(len, found[:take]))
        if taken + more >= bound:
            # The line that reaches the bound is the last one taken.
            totals = itertools.accumulate(map(len, found), initial=taken)
            take, total = next((n, total) for n, total in enumerate(totals) if total >= bound)
            more = total - taken
        lines += found[:take]
        ends += found_ends[:take]
        taken += more
        if len(lines) >= limit or taken >= bound:
            # (No line at all for a limit of 0, which only checks that a line begins at ``start``.)
            return Page(lines, [inode] * len(lines), ends, Cursor(inode, ends[-1] if ends else base), done=False)
        rest, base = buf[cut:], base + cut
    return Page(lines, [inode] * len(lines), ends, Cursor(inode, base))


class Compressed:
    """A compressed segment: read by decompressing it from its start (zstd and gzip streams cannot be
    entered in the middle), so its cost grows with the offset read from."""

    def __init__(self, directory: Path, segment: segments.Segment, inode: int) -> None:
        self.directory = directory
        self.segment = segment
        self.name = segment.name
        self.inode = inode

    def chunks(self, start: int) -> Iterator[bytes]:
        """The content from ``start`` on; :class:`ReadError` unless a line begins there."""
        pos, before = 0, b"\n"
        started = False
        for chunk in segments.content(self.directory, self.segment):
            if not started and pos + len(chunk) <= start:
                pos += len(chunk)
                before = chunk[-1:] or before
                continue
            if not started:
                cut = start - pos
                if cut:
                    before = chunk[cut - 1 : cut]
                if start and before != b"\n":
                    raise ReadError("invalid cursor")
                started, chunk = True, chunk[cut:]
            yield chunk
        if not started and (pos < start or (start and before != b"\n")):
            raise ReadError("invalid cursor")

    def forward(self, start: int, limit: int, q: bytes | None = None, size: int | None = None) -> Page:
        return _forward(self.inode, self.chunks(start), start, limit, q, size)

    def backward(self, count: int, floor: int = 0, q: bytes | None = None) -> Page:
        """The last ``count`` lines (with ``q`` in them) that begin at ``floor`` or later, oldest first:
        one pass over the segment, keeping the last ones."""
        kept: deque[tuple[bytes, int]] = deque(maxlen=max(count, 0))
        base, rest = floor, b""
        for chunk in self.chunks(floor):
            buf = rest + chunk
            cut = buf.rfind(b"\n") + 1
            if count > 0 and (q is None or b"\n" not in q):
                kept.extend((buf[first:last], base + last + 1) for first, last in _lines(buf, cut, q))
            rest, base = buf[cut:], base + cut
        size = sum(len(line) for line, _ in kept)
        while size > PAGE_BYTES and len(kept) > 1:
            size -= len(kept.popleft()[0])
        lines, ends = [line for line, _ in kept], [e for _, e in kept]
        return Page(lines, [self.inode] * len(kept), ends, Cursor(self.inode, base))

    def end(self) -> int:
        return sum(len(chunk) for chunk in segments.content(self.directory, self.segment))

    def since(self, when: float, times_dir: int | None) -> int | None:
        """Where the lines written in the second of ``when`` or later begin; None: it holds none."""
        if when > self.segment.sealed:
            return None
        with timeindex.Times(times_dir, self.segment.stem, self.inode) as times:
            offset = times.offset(int(when), (int(self.segment.sealed), _PAST_THE_END))
        return None if offset == _PAST_THE_END else offset

    def close(self) -> None:
        """Nothing is kept open: a compressed segment is opened for each read."""


# The offset that stands for "after every line" where a compressed segment's length is not known.
_PAST_THE_END = 1 << 62
_Part = JournalFile | Compressed


class History:
    """What a journal file holds, oldest first: its segments (see :mod:`leitstand.storage.segments`),
    then the live file, if there is one. Listed so that no seal falls between the listing and
    the opening of the live file: the live file is opened first, and the listing is taken
    again if by then the name stands for another file. Raises FileNotFoundError if there is
    neither."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.parts: list[_Part] = []
        while True:
            try:
                live: JournalFile | None = JournalFile(directory, name)
            except FileNotFoundError:
                live = None
            sealed = segments.of(directory, name)
            if live is None:
                if not os.path.lexists(directory / name):
                    break
            elif datadir.is_named(live.fd, live.path):
                break
            else:
                live.close()
        try:
            for segment in sealed:
                part = self._open(segment)
                if part is not None:
                    self.parts.append(part)
        except BaseException:
            self.close()
            if live is not None:
                live.close()
            raise
        if live is not None:
            self.parts.append(live)
        if not self.parts:
            raise FileNotFoundError(f"no file of {name}")

    def _open(self, segment: segments.Segment) -> _Part | None:
        """A segment as a part: a plain one is read like the live file, a compressed one by decompressing."""
        if not segment.codec:
            try:
                return JournalFile(self.directory, segment.name)
            except FileNotFoundError:
                segment = next((s for s in segments.of(self.directory, self.name) if s.stem == segment.stem), segment)
        with self._times_dir() as times_dir:
            inode = timeindex.indexed_inode(times_dir, segment.stem)
        if inode is None:
            try:
                inode = os.stat(self.directory / segment.name, follow_symlinks=False).st_ino
            except FileNotFoundError:
                return None  # removed by retention meanwhile
        return Compressed(self.directory, segment, inode)

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _times_dir(self) -> Iterator[int | None]:
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            times_dir = timeindex.open_times_dir(directory, create=False)
        finally:
            os.close(directory)
        try:
            yield times_dir
        finally:
            if times_dir is not None:
                os.close(times_dir)

    @property
    def live(self) -> JournalFile | None:
        last = self.parts[-1]
        return last if isinstance(last, JournalFile) and last.name == self.name else None

    def find(self, cursor: Cursor) -> int:
        """The index of the part ``cursor`` points into."""
        for index, part in enumerate(self.parts):
            if part.inode == cursor.file:
                return index
        raise ReadError("cursor of another file: the domain's file was replaced or its segment removed, read again without a cursor")

    def end(self) -> Cursor:
        """The cursor after the last whole line of the last part."""
        last = self.parts[-1]
        return Cursor(last.inode, last.end())

    def since(self, when: float, index: int = 0, start: int = 0) -> tuple[int, int]:
        """The part and offset where the lines written in the second of ``when`` or later begin, at
        ``index``, ``start`` or later."""
        with self._times_dir() as times_dir:
            for at in range(index, len(self.parts)):
                part = self.parts[at]
                if isinstance(part, Compressed):
                    offset = part.since(when, times_dir)
                else:
                    end = part.end()
                    offset = part.since(when, end)
                    offset = None if offset >= end and at < len(self.parts) - 1 else offset
                if offset is not None:
                    return at, max(offset, start) if at == index else offset
        return len(self.parts) - 1, self.end().offset

    def forward(self, index: int, start: int, limit: int, q: bytes | None = None, size: int | None = None) -> Page:
        """Up to ``limit`` lines from ``start`` of part ``index`` on, into the parts after it; the
        bytes of the parts before count against the page's bound."""
        room = PAGE_BYTES if size is None else size
        lines: list[bytes] = []
        files: list[int] = []
        ends: list[int] = []
        while True:
            part = self.parts[index]
            if isinstance(part, JournalFile):
                end = part.end()
                page = part.forward(part.start(Cursor(part.inode, start), end), end, limit - len(lines), q, room)
            else:
                page = part.forward(start, limit - len(lines), q, room)
            lines += page.lines
            files += page.files
            ends += page.ends
            room -= sum(map(len, page.lines))
            if not page.done or len(lines) >= limit or index == len(self.parts) - 1:
                return Page(lines, files, ends, page.next, page.done)
            index, start = index + 1, 0

    def backward(self, count: int, floor: tuple[int, int] = (0, 0), q: bytes | None = None) -> Page:
        """The last ``count`` lines (with ``q`` in them) from part ``floor[0]`` at ``floor[1]`` on, oldest first."""
        lines: list[bytes] = []
        files: list[int] = []
        ends: list[int] = []
        next_cursor = None
        for index in range(len(self.parts) - 1, floor[0] - 1, -1):
            part = self.parts[index]
            low = floor[1] if index == floor[0] else 0
            if isinstance(part, JournalFile):
                page = part.backward(part.end(), count - len(lines), low, q)
            else:
                page = part.backward(count - len(lines), low, q)
            next_cursor = next_cursor or page.next
            lines[:0], files[:0], ends[:0] = page.lines, page.files, page.ends
            if len(lines) >= count:
                break
        assert next_cursor is not None
        return Page(lines, files, ends, next_cursor)


def page(
    directory: Path,
    name: str,
    after: Cursor | None,
    limit: int,
    q: bytes | None = None,
    since: float | None = None,
    size: int | None = None,
    until: Cursor | None = None,
) -> Page:
    """Lines from ``after`` (or the start of the oldest segment), from ``since`` on if given, across
    segments; at most ``limit`` lines and ``size`` bytes of them (:data:`PAGE_BYTES` if None).

    ``until``: in the live file it names, no line that ends after it (nor before ``after``): readers
    of one change stop at the same line, however much was written between their reads.
    """
    if after is not None and since is None:
        # The common case, following the live file: no listing of the segments.
        with contextlib.suppress(FileNotFoundError), JournalFile(directory, name) as journal:
            if journal.inode == after.file:
                end = journal.end()
                if until is not None and until.file == journal.inode:
                    end = min(end, max(until.offset, after.offset))
                return journal.forward(journal.start(after, end), end, limit, q, size)
    with History(directory, name) as history:
        index, start = (0, 0) if after is None else (history.find(after), after.offset)
        if since is not None:
            index, start = history.since(since, index, start)
        return history.forward(index, start, limit, q, size)


def tail(directory: Path, name: str, count: int, q: bytes | None = None, since: float | None = None) -> Page:
    """The last ``count`` lines, from ``since`` on if given, from the newest segments where the live file
    holds fewer; ``next`` follows from the end."""
    with History(directory, name) as history:
        floor = (0, 0) if since is None else history.since(since)
        if count <= 0:
            end = history.end()
            return _empty(end.file, end.offset)
        return history.backward(count, floor, q)


def start(directory: Path, name: str, after: Cursor | None = None, since: float | None = None) -> Cursor:
    """Where following begins: after the cursor (checked), at ``since``, or at the end (only new lines)."""
    with History(directory, name) as history:
        if after is not None:
            index = history.find(after)
            history.forward(index, after.offset, 0)  # refuses an offset that is not where a line begins
            return after
        if since is not None:
            index, offset = history.since(since)
            return Cursor(history.parts[index].inode, offset)
        return history.end()


def follow(directory: Path, name: str, cursor: Cursor | None, interval: float = 0.2) -> Iterator[bytes]:
    """Whole lines after ``cursor`` (None: the start of the live file), as they come, across seals; waits
    for the file if there is none yet. Where the cursor's file is gone or got shorter, the live file
    is followed again from its start.

    The live file stays open between two reads, so that its inode, which the cursor names, is not
    given to a new file under the name meanwhile (then the cursor could not tell them apart)."""
    held: JournalFile | None = None
    try:
        while True:
            try:
                if cursor is None:
                    with JournalFile(directory, name) as journal:
                        cursor = Cursor(journal.inode, 0)
                found = page(directory, name, cursor, MAX_LIMIT)
            except FileNotFoundError:
                cursor = None  # gone: whatever comes under the name next is new
                time.sleep(interval)
                continue
            except ReadError:
                cursor = None
                continue
            if held is not None:
                held.close()
                held = None
            with contextlib.suppress(FileNotFoundError):
                held = JournalFile(directory, name)
            if found.lines:
                yield b"".join(line + b"\n" for line in found.lines)
            cursor = found.next
            if found.done:
                time.sleep(interval)
    finally:
        if held is not None:
            held.close()


# A change wakes a file's followers in this many turns, spread over the watch's ``spread``.
TURNS = 5


class Watch:
    """Tells the followers of a file in this process when it may have grown: one ``stat`` per file
    and interval for all of them, on the event loop (it never blocks on a local file system),
    so that every worker sees what any worker appended within one interval.

    A change wakes the followers in :data:`TURNS` turns spread over ``spread`` seconds, so that
    what they do then (read, send) does not come in one burst, at the cost of a timer per turn
    instead of one per follower. Every ``beat`` seconds all are woken without a change, so that
    they can tell their clients they are still there without a timer of their own."""

    def __init__(self, directory: Path, interval: float = 0.25, spread: float = 0.0, beat: float = 15.0) -> None:
        self.directory = directory
        self.interval = interval
        self.spread = spread
        self.beat = beat
        self._files: dict[str, Watched] = {}

    @contextlib.asynccontextmanager
    async def watching(self, name: str) -> AsyncIterator[Watched]:
        watched = self._files.get(name)
        if watched is None:
            watched = self._files[name] = Watched(self.spread)
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

    async def _poll(self, name: str, watched: Watched) -> None:
        path = self.directory / name
        loop = asyncio.get_running_loop()
        beat = loop.time() + self.beat
        while True:
            try:
                st = os.stat(path, follow_symlinks=False)
                stamp: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                stamp = ()
            if stamp != watched.stamp:
                watched.stamp = stamp
                watched.changed()
            now = loop.time()
            if now >= beat:
                watched.beaten()
                beat = now + self.beat
            await asyncio.sleep(min(self.interval, beat - now))


class Watched:
    """A followed file: ``turn(place)`` is set at its next change (or beat) in that place's turn;
    ``changes`` and ``beats`` count those so far."""

    __slots__ = ("_turns", "beats", "changes", "followers", "spread", "stamp", "task")

    def __init__(self, spread: float) -> None:
        self._turns = [asyncio.Event() for _ in range(TURNS)]
        self.spread = spread
        self.changes = 0
        self.beats = 0
        self.followers = 0
        self.stamp: tuple[int, ...] | None = None
        self.task: asyncio.Task[None] | None = None

    def turn(self, place: int) -> asyncio.Event:
        """What the follower at ``place`` waits on: its turn after the next change or beat."""
        return self._turns[place % TURNS]

    @property
    def until(self) -> Cursor | None:
        """Where the file ended when it last changed: the reads for that change stop there, so that
        streams that read at different moments end at the same line and share their next read."""
        return Cursor(self.stamp[0], self.stamp[1]) if self.stamp else None

    def changed(self) -> None:
        self.changes += 1
        first, *later = self._next_turns()
        first.set()
        loop = asyncio.get_running_loop()
        for n, event in enumerate(later, 1):
            loop.call_later(self.spread * n / TURNS, event.set)

    def beaten(self) -> None:
        self.beats += 1
        for event in self._next_turns():
            event.set()

    def _next_turns(self) -> list[asyncio.Event]:
        turns, self._turns = self._turns, [asyncio.Event() for _ in range(TURNS)]
        return turns
