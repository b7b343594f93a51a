"""Idempotency keys in the journal, on real files: records that count only with their data, rollback,
compaction, two journals (as two workers) on one directory, and no cost for appends without a key."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from storage.test_journal import opened, run

from leitstand.storage import keylog
from leitstand.storage.journal import Appended, Journal, StorageFull, StorageUnavailable
from leitstand.storage.keylog import NO_KEY, RECORD, key_hash, lines_hash

REQUESTS = Path(".leitstand") / "requests"


def is_file(fd: int, path: Path) -> bool:
    return os.fstat(fd).st_ino == path.stat().st_ino


def records(directory: Path, name: str = "a.jsonl") -> list[tuple[float, bytes, bytes, int, int]]:
    return list(RECORD.iter_unpack((directory / REQUESTS / f"{name}.log").read_bytes()))


def test_a_key_is_recorded_with_the_length_its_data_ends_at(tmp_path: Path) -> None:
    async def main() -> None:
        journal = await opened(tmp_path)
        assert await journal.append("a.jsonl", b"x\n") is Appended.STORED
        assert await journal.append("a.jsonl", b"one\n", b"k1") is Appended.STORED
        assert await journal.append("a.jsonl", b"one\n", b"k1") is Appended.DUPLICATE
        assert await journal.append("a.jsonl", b"two\n", b"k1") is Appended.CONFLICT
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"x\none\n"
    ((_, key, lines, start, end),) = records(tmp_path)
    assert (key, lines, start, end) == (key_hash("a.jsonl", b"k1"), lines_hash(b"one\n"), 2, 6)


def test_concurrent_appends_with_one_key_store_once(tmp_path: Path) -> None:
    async def main() -> list[Appended]:
        journal = await opened(tmp_path)
        results = await asyncio.gather(*(journal.append("a.jsonl", b"same\n", b"k") for _ in range(50)))
        await journal.close()
        return results

    results = run(main())
    assert results.count(Appended.STORED) == 1 and results.count(Appended.DUPLICATE) == 49
    assert (tmp_path / "a.jsonl").read_bytes() == b"same\n"


def test_a_record_whose_data_never_arrived_is_cut_and_not_believed(tmp_path: Path) -> None:
    """As after a crash between the key write and the data write: the retry must store."""
    (tmp_path / REQUESTS).mkdir(parents=True)
    (tmp_path / "a.jsonl").write_bytes(b"old\n")
    stale = RECORD.pack(time.time(), key_hash("a.jsonl", b"k"), lines_hash(b"new\n"), 4, 8)
    (tmp_path / REQUESTS / "a.jsonl.log").write_bytes(stale + b"torn")

    async def main() -> None:
        journal = await opened(tmp_path)
        # Appends without a key come first: they must not make the stale record look true.
        await journal.append("a.jsonl", b"abc\n")
        assert await journal.append("a.jsonl", b"new\n", b"k") is Appended.STORED
        assert await journal.append("a.jsonl", b"new\n", b"k") is Appended.DUPLICATE
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"old\nabc\nnew\n"
    assert [r[3:] for r in records(tmp_path)] == [(8, 12)]


@pytest.mark.parametrize("failing", ["a.jsonl", ".leitstand/requests/a.jsonl.log"])
def test_a_failed_sync_rolls_back_data_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    real = os.fdatasync
    failed: list[int] = []

    def fail_once(fd: int) -> None:
        if not failed and is_file(fd, tmp_path / failing):
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"zero\n", b"k0")
        monkeypatch.setattr(os, "fdatasync", fail_once)
        with pytest.raises(StorageUnavailable):
            await journal.append("a.jsonl", b"one\n", b"k")
        assert failed
        assert (tmp_path / "a.jsonl").read_bytes() == b"zero\n"
        assert len(records(tmp_path)) == 1
        assert await journal.append("a.jsonl", b"one\n", b"k") is Appended.STORED
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"zero\none\n"
    assert [r[3:] for r in records(tmp_path)] == [(0, 5), (5, 9)]


def test_a_key_log_that_cannot_be_written_writes_no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write

    def full_key_log(fd: int, data: bytes) -> int:
        if is_file(fd, tmp_path / REQUESTS / "a.jsonl.log"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"one\n", b"k")
        monkeypatch.setattr(os, "write", full_key_log)
        with pytest.raises(StorageFull):
            await journal.append("a.jsonl", b"two\n", b"k2")
        assert await journal.append("a.jsonl", b"three\n") is Appended.STORED
        monkeypatch.setattr(os, "write", real)
        assert await journal.append("a.jsonl", b"two\n", b"k2") is Appended.STORED
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"one\nthree\ntwo\n"
    assert [r[3:] for r in records(tmp_path)] == [(0, 4), (10, 14)]


def test_two_journals_on_one_directory_see_each_others_keys(tmp_path: Path) -> None:
    """Also when the second has looked for ``.leitstand/requests`` before the first made it (until
    then each round looks, in ``.leitstand``, kept open for that): a commit of the second without
    a key reads the first's records too (they also say where a request cut short by a crash
    begins), and afterwards it knows the key."""

    async def main() -> None:
        first, second = await opened(tmp_path), await opened(tmp_path)
        assert await first.append("a.jsonl", b"zero\n") is Appended.STORED
        assert await second.append("a.jsonl", b"zero\n") is Appended.STORED
        assert (tmp_path / ".leitstand").is_dir() and not (tmp_path / ".leitstand" / "requests").exists()
        assert await first.append("a.jsonl", b"one\n", b"k1") is Appended.STORED
        assert await second.append("a.jsonl", b"plain\n") is Appended.STORED
        assert second.keys.find(key_hash("a.jsonl", b"k1"), time.time()) is not None
        assert await first.append("a.jsonl", b"two\n", b"k2") is Appended.STORED
        # Not in second's index yet: found in the commit, under the lock, in first's record.
        assert await second.append("a.jsonl", b"two\n", b"k2") is Appended.DUPLICATE
        assert await second.append("a.jsonl", b"three\n", b"k2") is Appended.CONFLICT
        await first.close()
        await second.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"zero\nzero\none\nplain\ntwo\n"


def test_key_logs_are_compacted_to_the_window_and_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keylog, "COMPACT_AT", 20 * RECORD.size)

    async def main() -> None:
        journal = await opened(tmp_path, max_keys=5)
        other = await opened(tmp_path, max_keys=5)
        for n in range(19):
            await journal.append("a.jsonl", b"%d\n" % n, b"k%d" % n)
        inode = (tmp_path / REQUESTS / "a.jsonl.log").stat().st_ino
        # The 20th record passes the bound: only the newest 5 are kept, atomically renamed in.
        await journal.append("a.jsonl", b"19\n", b"k19")
        assert len(records(tmp_path)) == 5
        assert (tmp_path / REQUESTS / "a.jsonl.log").stat().st_ino != inode
        assert list((tmp_path / REQUESTS).iterdir()) == [tmp_path / REQUESTS / "a.jsonl.log"]
        # Another worker reads the new file and keeps its records in force.
        assert await other.append("a.jsonl", b"19\n", b"k19") is Appended.DUPLICATE
        # The journal goes on appending to the new file.
        await journal.append("a.jsonl", b"20\n", b"k20")
        assert await other.append("a.jsonl", b"20\n", b"k20") is Appended.DUPLICATE
        assert len(records(tmp_path)) == 6
        await journal.close()
        await other.close()

    run(main())


def test_expired_keys_are_dropped_at_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keylog, "COMPACT_AT", 4 * RECORD.size)

    async def main() -> None:
        journal = await opened(tmp_path, key_window=1.0)
        for n in range(3):
            await journal.append("a.jsonl", b"%d\n" % n, b"k%d" % n)
        await asyncio.sleep(1.1)
        await journal.append("a.jsonl", b"3\n", b"k3")
        assert len(records(tmp_path)) == 1
        assert len(journal.keys) == 1
        await journal.close()

    run(main())


def test_compaction_keeps_the_newest_keyed_records_in_the_window_whole_and_in_order(tmp_path: Path) -> None:
    """Record by record: keyed and unkeyed requests mixed, some keys expired; a seal keeps the same
    records with their offsets zeroed."""
    now = time.time()
    written = [
        (now - 7200 if n % 5 == 0 else now - 60 + n, NO_KEY if n % 3 == 0 else key_hash("a.jsonl", b"k%d" % n),
         NO_KEY if n % 3 == 0 else lines_hash(b"%d\n" % n), 10 * n, 10 * n + 10)
        for n in range(1, 40)
    ]
    wanted = [r for r in written if r[1] != NO_KEY and r[0] > now - 3600][-7:]
    assert len(wanted) == 7 and wanted[0] != written[0]  # the bound cuts some in the window too
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rewrite, expected in (
            ("compact", wanted),
            ("forget_offsets", [(when, key, lines, 0, 0) for when, key, lines, _, _ in wanted]),
        ):
            log = keylog.RequestLog("a.jsonl")
            packed = b"".join(RECORD.pack(*r) for r in written)
            log.write(directory, packed, fsync=False)
            log.committed(len(packed))
            log.compact_at = 0
            getattr(log, rewrite)(directory, keylog.KeyIndex(3600, 7), False)
            assert list(RECORD.iter_unpack((tmp_path / "a.jsonl.log").read_bytes())) == expected
            assert (log.end, log.size) == (7 * RECORD.size, 7 * RECORD.size)
            for fd in log.close():
                os.close(fd)
            (tmp_path / "a.jsonl.log").unlink()
    finally:
        os.close(directory)


def test_appends_without_a_key_make_no_request_log_and_no_extra_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])

    async def main() -> None:
        journal = await opened(tmp_path)
        for n in range(5):
            await journal.append("a.jsonl", b"%d\n" % n)
        await journal.close()

    run(main())
    assert len(syncs) == 5
    # Only the time index, written without a sync, is kept for them.
    assert not (tmp_path / REQUESTS).exists()
    assert [p.name for p in (tmp_path / ".leitstand").iterdir()] == ["times"]


class PausingJournal(Journal):
    """A journal whose commits stop after taking their appends, until the test lets them go on:
    appends made meanwhile wait for the next commit, exactly as under load, but every time."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.taken = threading.Event()
        self.go_on = threading.Event()

    def _lock(self, *args: Any) -> Any:
        commit = super()._lock(*args)
        self.taken.set()
        assert self.go_on.wait(10), "the test never let the commit go on"
        self.go_on.clear()
        return commit


@pytest.mark.parametrize(
    "order",
    ["unkeyed then keyed", "keyed then unkeyed", "keyed then keyed", "unkeyed batch then keyed batch"],
)
def test_appends_arriving_during_a_commit_keep_their_own_keys(tmp_path: Path, order: str) -> None:
    """Keyed and unkeyed appends interleaved across commits: each append is stored with its own key,
    under its own lines, and none is answered as a replay of another."""
    first_key = None if order.startswith("unkeyed") else b"k1"
    second_key = b"k2"
    batch = order.startswith("unkeyed batch")
    first = b"a1\na2\n" if batch else b"a\n"
    second = b"b1\nb2\nb3\n" if batch else b"b\n"

    async def main() -> list[Appended]:
        journal = PausingJournal(tmp_path)
        await journal.open()
        committing = asyncio.ensure_future(journal.append("a.jsonl", first, first_key))
        await asyncio.get_running_loop().run_in_executor(None, journal.taken.wait, 10)
        # The first commit has taken its append; these arrive while it is under way.
        during = [asyncio.ensure_future(journal.append("a.jsonl", second, second_key)),
                  asyncio.ensure_future(journal.append("a.jsonl", b"c\n"))]
        await asyncio.sleep(0.01)
        journal.go_on.set()
        results = [await committing]
        journal.go_on.set()
        results += await asyncio.gather(*during)
        assert await journal.append("a.jsonl", second, second_key) is Appended.DUPLICATE
        if first_key is not None:
            assert await journal.append("a.jsonl", first, first_key) is Appended.DUPLICATE
        await journal.close()
        return results

    assert run(main()) == [Appended.STORED] * 3
    assert (tmp_path / "a.jsonl").read_bytes() == first + second + b"c\n"
    keyed = {key: (lines, end) for _, key, lines, _, end in records(tmp_path) if key != bytes(16)}
    expected = {key_hash("a.jsonl", second_key): (lines_hash(second), len(first + second))}
    if first_key is not None:
        expected[key_hash("a.jsonl", first_key)] = (lines_hash(first), len(first))
    assert keyed == expected
