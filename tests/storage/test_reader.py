"""The reader on real files written by the real journal: cursors, pages, tail, q, since, and never a torn tail."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import struct
import time
from pathlib import Path

import orjson
import pytest

from leitstand.storage import journal as journal_module
from leitstand.storage import reader, segments, timeindex
from leitstand.storage.journal import Journal
from leitstand.storage.keylog import RECORD
from leitstand.storage.reader import Cursor, ReadError

NAME = "app.jsonl"


def lines_of(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [
        orjson.dumps({"n": i, "pad": "x" * rng.randrange(400), "tag": "needle" if i % 7 == 0 else "hay"})
        for i in range(n)
    ]


def write(directory: Path, lines: list[bytes], extra: bytes = b"") -> None:
    directory.mkdir(exist_ok=True)
    (directory / NAME).write_bytes(b"".join(line + b"\n" for line in lines) + extra)


def all_pages(directory: Path, limit: int, q: bytes | None = None) -> list[bytes]:
    found: list[bytes] = []
    after = None
    while True:
        page = reader.page(directory, NAME, after, limit, q)
        if not page.lines and q is None:
            assert after is None or page.next == after, "an empty page goes on where it was asked to"
        found += page.lines
        if not page.lines:
            return found
        after = page.next


@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_pages_give_every_line_once_in_order(tmp_path: Path, limit: int) -> None:
    lines = lines_of(3000)
    # A torn last line is never served.
    write(tmp_path, lines, b'{"n":3000,"torn')
    assert all_pages(tmp_path, limit) == lines
    assert all_pages(tmp_path, limit, b"needle") == [line for line in lines if b"needle" in line]


@pytest.mark.parametrize("count", [0, 1, 2, 10, 999, 2999, 3000, 5000])
def test_tail_is_the_last_lines_and_goes_on_from_the_end(tmp_path: Path, count: int) -> None:
    lines = lines_of(3000)
    write(tmp_path, lines, b'{"torn')
    page = reader.tail(tmp_path, NAME, count)
    assert page.lines == (lines[-count:] if count else [])
    assert page.next.offset == sum(len(line) + 1 for line in lines)
    needles = [line for line in lines if b"needle" in line]
    assert reader.tail(tmp_path, NAME, count, b"needle").lines == (needles[-count:] if count else [])
    # Each event's own cursor goes on right after it.
    for n in range(len(page.lines)):
        following = reader.page(tmp_path, NAME, page.cursor(n), 1).lines
        assert following == lines[len(lines) - len(page.lines) + n + 1 :][:1]


def test_paging_while_a_writer_appends_skips_and_repeats_nothing(tmp_path: Path) -> None:
    async def main() -> list[bytes]:
        tmp_path.mkdir(exist_ok=True)
        journal = Journal(tmp_path, fsync=False)
        await journal.open()
        loop = asyncio.get_running_loop()
        read: list[bytes] = []
        after = None
        written = 0
        while written < 2000 or after is None or after.offset < (tmp_path / NAME).stat().st_size:
            if written < 2000:
                # Batches (with a request record) and single lines, interleaved with reads.
                batch = [b'{"n":%d}\n' % (written + i) for i in range(1 + written % 3)]
                await journal.append(NAME, b"".join(batch))
                written += len(batch)
            page = await loop.run_in_executor(None, reader.page, tmp_path, NAME, after, 5)
            read += page.lines
            after = page.next
        await journal.close()
        return read

    read = asyncio.run(main())
    assert [orjson.loads(line)["n"] for line in read] == list(range(len(read)))
    assert len(read) >= 2000


def test_the_first_lines_of_an_unfinished_batch_are_never_served(tmp_path: Path) -> None:
    """A request log record names a request whose lines are not all there yet (a commit under
    way, or a crash): the reader stops before it, as the verify and backup commands do."""
    lines = lines_of(10)
    write(tmp_path, lines)
    whole = (tmp_path / NAME).stat().st_size
    partial = b'{"n":10}\n{"n":11}\n'
    with open(tmp_path / NAME, "ab") as f:
        f.write(partial)
    requests = tmp_path / ".leitstand" / "requests"
    requests.mkdir(parents=True)
    (requests / f"{NAME}.log").write_bytes(RECORD.pack(time.time(), bytes(16), bytes(16), whole, whole + 3 * 9))
    assert all_pages(tmp_path, 100) == lines
    assert reader.tail(tmp_path, NAME, 5).lines == lines[-5:]
    assert reader.tail(tmp_path, NAME, 5).next.offset == whole


def test_cursors_are_strict(tmp_path: Path) -> None:
    write(tmp_path, lines_of(5))
    cursor = reader.tail(tmp_path, NAME, 2).next
    text = str(cursor)
    assert Cursor.parse(text) == cursor and text.startswith("1") and len(text) == 23
    for bad in ["", "1", "2" + text[1:], text[:-1], text + "A", text[:-1] + "=", "1" + "+" * 22, " " + text[1:],
                # The same 16 bytes with padding bits set: not the canonical text.
                text[:-1] + chr(ord(text[-1]) + 1)]:
        if bad == text:
            continue
        with pytest.raises(ReadError, match="invalid cursor"):
            Cursor.parse(bad)
    # Ours in form, but not a line start of this file, or past its end.
    for offset in (1, cursor.offset - 1, cursor.offset + 1):
        with pytest.raises(ReadError, match="invalid cursor"):
            reader.page(tmp_path, NAME, Cursor(cursor.file, offset), 1)
    with pytest.raises(ReadError, match="another file"):
        reader.page(tmp_path, NAME, Cursor(cursor.file + 1, 0), 1)
    # A file replaced by a copy (a restore) has another inode: its cursors do not carry over.
    os.rename(tmp_path / NAME, tmp_path / "old")
    write(tmp_path, lines_of(5))
    with pytest.raises(ReadError, match="another file"):
        reader.page(tmp_path, NAME, cursor, 1)


class Clock:
    """The journal's clock, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_since_is_exact_to_the_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1_000_000.2)
    monkeypatch.setattr(journal_module.time, "time", clock.time)
    times = [1_000_000.2, 1_000_000.9, 1_000_001.0, 1_000_001.5, 1_000_004.99, 1_000_005.0]

    async def main() -> None:
        journal = Journal(tmp_path, fsync=False)
        await journal.open()
        for n, when in enumerate(times):
            clock.now = when
            await journal.append(NAME, b'{"n":%d}\n' % n)
        await journal.close()

    tmp_path.mkdir(exist_ok=True)
    asyncio.run(main())
    for since, first in [(999_999, 0), (1_000_000, 0), (1_000_000.5, 0), (1_000_001, 2), (1_000_002, 4),
                         (1_000_004.7, 4), (1_000_005, 5), (1_000_006, None)]:
        page = reader.page(tmp_path, NAME, None, 100, since=since)
        assert [orjson.loads(line)["n"] for line in page.lines] == ([] if first is None else list(range(first, 6)))
        # With tail: the last events of those from since on.
        tailed = reader.tail(tmp_path, NAME, 2, since=since)
        expected = [] if first is None else list(range(first, 6))[-2:]
        assert [orjson.loads(line)["n"] for line in tailed.lines] == expected


def test_the_index_after_a_restart_a_crash_and_a_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(2_000_000.5)
    monkeypatch.setattr(journal_module.time, "time", clock.time)
    tmp_path.mkdir(exist_ok=True)

    async def append(*whens: float, close: bool = True) -> Journal:
        journal = Journal(tmp_path, fsync=False)
        await journal.open()
        for when in whens:
            clock.now = when
            await journal.append(NAME, b'{"t":%f}\n' % when)
        if close:
            await journal.close()
        return journal

    def first(since: float) -> float | None:
        lines = reader.page(tmp_path, NAME, None, 100, since=since).lines
        return orjson.loads(lines[0])["t"] if lines else None

    asyncio.run(append(2_000_000.5, 2_000_000.7))
    # A clean stop and a start a minute later: the index stays exact.
    clock.now = 2_000_060.0
    asyncio.run(append(2_000_061.0))
    assert first(2_000_001) == 2_000_061.0

    # A crash (no clean stop) after a line of second 2_000_070, and a start at 2_000_100: the lines
    # after the last record count as written at the start; since never skips them.
    asyncio.run(append(2_000_070.0, close=False))
    clock.now = 2_000_100.0
    asyncio.run(append())
    assert first(2_000_071) == 2_000_070.0
    assert first(2_000_101) is None

    # A restore: the journal file is a new copy (another inode) with the old mtime.
    data = (tmp_path / NAME).read_bytes()
    os.unlink(tmp_path / NAME)
    (tmp_path / NAME).write_bytes(data)
    os.utime(tmp_path / NAME, (2_000_080, 2_000_080))
    # Before the service looks at it, the reader falls back to the mtime: all or nothing.
    assert first(2_000_080) == 2_000_000.5
    assert first(2_000_081) is None
    # The service rebuilds the index at start the same way.
    clock.now = 2_000_200.0
    asyncio.run(append(2_000_201.0))
    assert first(2_000_080) == 2_000_000.5
    assert first(2_000_081) == 2_000_201.0
    index = tmp_path / ".leitstand" / timeindex.TIMES_DIR / f"{NAME}{timeindex.SUFFIX}"
    assert index.stat().st_size % timeindex.RECORD.size == 0


def test_a_second_costs_one_index_record_not_one_per_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(3_000_000.0)
    monkeypatch.setattr(journal_module.time, "time", clock.time)
    tmp_path.mkdir(exist_ok=True)

    async def main() -> None:
        journal = Journal(tmp_path, fsync=False)
        await journal.open()
        for n in range(300):
            clock.now = 3_000_000 + n / 100
            await journal.append(NAME, b"{}\n")

    asyncio.run(main())
    index = tmp_path / ".leitstand" / timeindex.TIMES_DIR / f"{NAME}{timeindex.SUFFIX}"
    records = list(timeindex.RECORD.iter_unpack(index.read_bytes()))
    # The header, then one record for each of the three seconds.
    assert [second for second, _ in records[1:]] == [3_000_000, 3_000_001, 3_000_002]
    assert [offset for _, offset in records[1:]] == [0, 300, 600]


@pytest.mark.parametrize("quick", [False, True], ids=["os", "quickcalls"])
def test_a_note_reads_the_index_only_after_another_writer_added_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick: bool
) -> None:
    """A note keeps its index's last record in memory while the index's length stays what it
    left: with many domains nearly every commit notes, and the read was a third of its calls.
    A record another worker added (under the journal file's lock, as every note) is read, so
    no second gets two records and none is skipped."""
    (tmp_path / NAME).write_bytes(b"")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    data_fd = os.open(tmp_path / NAME, os.O_RDONLY)
    times_dir = timeindex.open_times_dir(dir_fd, create=True)
    assert times_dir is not None
    reads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: (reads.append(fd), real_pread(fd, n, at))[1])
    mine, other = timeindex.TimeLog(NAME), timeindex.TimeLog(NAME)
    try:
        mine.note(times_dir, data_fd, 0, 100.2, quick)
        reads.clear()
        mine.note(times_dir, data_fd, 10, 101.5, quick)
        assert reads == []
        other.note(times_dir, data_fd, 20, 102.1, quick)  # another worker, this second's first
        mine_before = len(reads)
        mine.note(times_dir, data_fd, 30, 102.7, quick)
        assert len(reads) == mine_before + 1, "the other worker's record is read"
        mine.note(times_dir, data_fd, 40, 103.0, quick)
        assert len(reads) == mine_before + 1
    finally:
        for fd in (*mine.close(), *other.close(), times_dir, data_fd, dir_fd):
            os.close(fd)
    index = tmp_path / ".leitstand" / timeindex.TIMES_DIR / f"{NAME}{timeindex.SUFFIX}"
    records = list(timeindex.RECORD.iter_unpack(index.read_bytes()))
    assert records[1:] == [(100, 0), (101, 10), (102, 20), (103, 40)]


def test_activity_counts_lines_per_minute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = 4_000_000 // 60 * 60
    clock = Clock(start)
    monkeypatch.setattr(journal_module.time, "time", clock.time)
    tmp_path.mkdir(exist_ok=True)
    # 3 lines in the minute 10 minutes ago, 1 in the one before the last, 5 in the last (current) one.
    plan = [(start + 50 * 60 + 5, 3), (start + 58 * 60 + 59, 1), (start + 59 * 60 + 1, 5)]

    async def main() -> None:
        journal = Journal(tmp_path, fsync=False)
        await journal.open()
        for when, count in plan:
            for n in range(count):
                clock.now = when + n / 10
                await journal.append(NAME, b"{}\n")
        await journal.close()

    asyncio.run(main())
    now = start + 59 * 60 + 30
    with reader.JournalFile(tmp_path, NAME) as journal:
        known: dict[int, int] = {}
        per_minute, recent = journal.activity(journal.end(), now, known)
    expected = [0] * 60
    expected[50], expected[58], expected[59] = 3, 1, 5
    assert per_minute == expected
    assert recent == 5 + 1  # the last 60 s reach back into the minute before
    assert len(known) == 59  # the minutes that are over are remembered, the current one is not


def test_follow_picks_up_appends_and_a_replaced_file(tmp_path: Path) -> None:
    write(tmp_path, [b'{"n":1}'])
    follower = reader.follow(tmp_path, NAME, None, interval=0.01)
    assert next(follower) == b'{"n":1}\n'
    with open(tmp_path / NAME, "ab") as f:
        f.write(b'{"n":2}\n{"n":')
    assert next(follower) == b'{"n":2}\n'
    os.unlink(tmp_path / NAME)
    write(tmp_path, [b'{"n":9}'] * 3)
    assert next(follower) == b'{"n":9}\n' * 3


def test_many_random_pages_against_a_plain_split(tmp_path: Path) -> None:
    """Every combination of limit, q and start against the obvious (slow) answer."""
    rng = random.Random(7)
    lines = lines_of(400, seed=3)
    write(tmp_path, lines)
    ends = list(itertools.accumulate(len(line) + 1 for line in lines))
    with reader.JournalFile(tmp_path, NAME) as journal:
        for _ in range(300):
            start_line = rng.randrange(len(lines) + 1)
            start = 0 if start_line == 0 else ends[start_line - 1]
            limit = rng.choice([0, 1, 3, 50, 1000])
            q = rng.choice([None, b"needle", b'"n":1', b"zzz"])
            page = journal.forward(start, journal.end(), limit, q)
            found = list(zip(lines, ends, strict=True))[start_line:]
            expected = [line for line, _ in found if q is None or q in line][:limit]
            assert page.lines == expected
            assert page.ends == [end for line, end in found if q is None or q in line][:limit]
            assert page.files == [journal.inode] * len(expected)
            assert page.ids() == [str(page.cursor(n)).encode() for n in range(len(expected))]
            if limit == 0:  # checks the start only
                assert page.next == Cursor(journal.inode, start)


@pytest.mark.parametrize("limit", [1, 2, 1000])
@pytest.mark.parametrize("bound", ["PAGE_BYTES", "size"])
def test_a_page_ends_with_the_line_that_reaches_its_byte_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, bound: str
) -> None:
    """At most ``limit`` lines and PAGE_BYTES (or the ``size`` asked for), always at least one
    line, however long; counted over a sealed segment and the live file together."""
    size = 1000
    if bound == "PAGE_BYTES":
        monkeypatch.setattr(reader, "PAGE_BYTES", size)
    lines = lines_of(300, seed=5)
    write(tmp_path, lines[:150])
    os.rename(tmp_path / NAME, tmp_path / segments.new_name(NAME, [], time.time()))
    write(tmp_path, lines[150:])
    for q in (None, b"needle"):
        wanted = [line for line in lines if q is None or q in line]
        expected: list[list[bytes]] = []
        while wanted:
            sizes = list(itertools.accumulate(len(line) for line in wanted[:limit]))
            take = next((n + 1 for n, total in enumerate(sizes) if total >= size), len(sizes))
            expected.append(wanted[:take])
            wanted = wanted[take:]
        pages: list[list[bytes]] = []
        after = None
        asked = {"size": size} if bound == "size" else {}
        while (page := reader.page(tmp_path, NAME, after, limit, q, **asked)).lines:
            pages.append(page.lines)
            after = page.next
        assert pages == expected


def test_a_page_stops_where_until_says_in_the_file_it_names(tmp_path: Path) -> None:
    """``until`` (where the file ended when a stream was told of a change) ends the page at the last
    line that ends there or before, the same for every reader whatever came after; it never goes
    back before ``after``, and a cursor of another file leaves the page as it was."""
    lines = lines_of(20)
    write(tmp_path, lines)
    inode = (tmp_path / NAME).stat().st_ino
    ends = list(itertools.accumulate(len(line) + 1 for line in lines))
    start = Cursor(inode, ends[2])
    for until, got in [
        (ends[9], lines[3:10]),  # at a line's end
        (ends[9] + 5, lines[3:10]),  # within the next line
        (ends[1], []),  # before the start: nothing, and the page stays where it was
        (ends[-1] + 100, lines[3:]),  # past the end of the file
    ]:
        page = reader.page(tmp_path, NAME, start, 1000, until=Cursor(inode, until))
        assert page.lines == got, until
        assert page.next == Cursor(inode, ends[2] + sum(len(line) + 1 for line in got))
    # Written after the change: not for this change's page, nor for any reader of it.
    with open(tmp_path / NAME, "ab") as f:
        f.write(b'{"n":"later"}\n')
    assert reader.page(tmp_path, NAME, start, 1000, until=Cursor(inode, ends[-1])).lines == lines[3:]
    assert reader.page(tmp_path, NAME, start, 1000, until=Cursor(inode + 1, ends[9])).lines[-1] == b'{"n":"later"}'


def test_the_ids_of_a_page_are_its_cursors_as_text() -> None:
    """Encoded all at once, they must be exactly what each cursor says on its own, at any size."""
    rng = random.Random(11)
    values = [0, 1, 255, 256, 2**16, 2**32 - 1, 2**32, 2**63, 2**64 - 1] + [rng.randrange(2**64) for _ in range(500)]
    files = [rng.choice(values) for _ in values]
    page = reader.Page([b"x"] * len(values), files, values, Cursor(0, 0))
    ids = page.ids()
    # The format spelled out here, not with the code under test: version 1, base64 of both, no padding.
    spelled = [
        b"1" + base64.urlsafe_b64encode(struct.pack("<QQ", file, end))[:-2]
        for file, end in zip(files, values, strict=True)
    ]
    assert ids == spelled
    assert [str(Cursor(file, end)).encode() for file, end in zip(files, values, strict=True)] == spelled
    assert all(Cursor.parse(text.decode()) == page.cursor(n) for n, text in enumerate(ids))
    assert reader.Page([], [], [], Cursor(0, 0)).ids() == []


def test_a_watch_wakes_its_followers_in_turns_after_a_change_and_all_at_a_beat(tmp_path: Path) -> None:
    """A change sets the first turn at once and the last one about ``spread`` later; a beat, with no
    change, sets every turn at once and counts as a beat, not a change."""
    (tmp_path / "app.jsonl").write_bytes(b'{"n":1}\n')

    async def main() -> tuple[list[float], tuple[int, int], list[float], tuple[int, int]]:
        loop = asyncio.get_running_loop()
        watch = reader.Watch(tmp_path, interval=0.02, spread=0.5, beat=1.5)

        async def woken(watched: reader.Watched) -> list[float]:
            """When each turn was set, in the order of the turns."""

            async def wake(event: asyncio.Event) -> float:
                await event.wait()
                return loop.time()

            return list(await asyncio.gather(*(wake(watched.turn(place)) for place in range(reader.TURNS))))

        async with watch.watching("app.jsonl") as watched:
            await asyncio.sleep(0.1)  # the first look is a change: from nothing to the file
            waiting = asyncio.ensure_future(woken(watched))
            await asyncio.sleep(0)
            with open(tmp_path / "app.jsonl", "ab") as f:
                f.write(b'{"n":2}\n')
            after_change = await waiting
            counts_change = watched.changes, watched.beats
            after_beat = await woken(watched)
            return after_change, counts_change, after_beat, (watched.changes, watched.beats)

    after_change, counts_change, after_beat, counts_beat = asyncio.run(main())
    # One write may be seen as two changes (the kernel sets the time before the size), never as none.
    assert counts_change[0] >= 2 and counts_change[1] == 0
    assert counts_beat == (counts_change[0], 1)
    assert after_change[-1] - after_change[0] > 0.2, after_change  # the last turn 0.4 s after the first
    assert after_beat[-1] - after_beat[0] < 0.05, after_beat  # a beat wakes every turn at once
