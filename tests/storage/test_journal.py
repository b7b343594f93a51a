"""The journal on its own, on real files: group commit, the file cache, recovery, rollback."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from leitstand.storage import datadir, quickcalls
from leitstand.storage import journal as journal_module
from leitstand.storage.journal import Appended, Journal, StorageFull, StorageRefused, StorageUnavailable
from leitstand.storage.keylog import RECORD


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def opened(directory: Path, **kw: object) -> Journal:
    directory.mkdir(exist_ok=True)
    journal = Journal(directory, **kw)  # type: ignore[arg-type]
    await journal.open()
    return journal


def record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, every fdatasync still syncs and is listed by its descriptor."""
    syncs: list[int] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    return syncs


def test_concurrent_appends_share_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = record_syncs(monkeypatch)

    async def main() -> None:
        journal = await opened(tmp_path)
        await asyncio.gather(*(journal.append("a.jsonl", b"%d\n" % n) for n in range(500)))
        await journal.close()

    run(main())
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    assert sorted(map(int, lines)) == list(range(500))
    assert 1 <= len(syncs) < 100, "appends waiting together must share one fdatasync"


def test_no_sync_when_fsync_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fdatasync", lambda fd: pytest.fail("fdatasync with fsync off"))

    async def main() -> None:
        journal = await opened(tmp_path, fsync=False)
        await journal.append("a.jsonl", b"x\n")
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"x\n"


def test_new_file_syncs_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.path.samestat(os.fstat(fd), os.stat(tmp_path)))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)

    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("new.jsonl", b"x\n")
        await journal.append("new.jsonl", b"y\n")
        await journal.close()

    run(main())
    assert synced == [True], "exactly one directory fsync, for the creation"


def test_open_files_are_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        journal = await opened(tmp_path, max_open_files=3)
        for n in range(10):
            await journal.append(f"f{n}.jsonl", b"x\n")
            assert journal.open_files <= 3
        await journal.append("f0.jsonl", b"again\n")
        await journal.close()

    run(main())
    assert (tmp_path / "f0.jsonl").read_bytes() == b"x\nagain\n"
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) < 50


async def repaired_at_open(directory: Path) -> int:
    """How many torn tails a journal opened on ``directory`` repairs, as a starting server does."""
    journal = Journal(directory)
    repaired = await journal.open()
    await journal.close()
    return repaired


def test_torn_tails_are_repaired_at_open(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"1\n2\nfrag")
    (tmp_path / "b.jsonl").write_bytes(b"no newline at all")
    (tmp_path / "c.jsonl").write_bytes(b"fine\n")

    assert run(repaired_at_open(tmp_path)) == 2
    assert (tmp_path / "a.jsonl").read_bytes() == b"1\n2\n"
    assert (tmp_path / "b.jsonl").read_bytes() == b""
    assert (tmp_path / "c.jsonl").read_bytes() == b"fine\n"
    torn = {p.name.split(".torn-")[0]: p.read_bytes() for p in tmp_path.glob("*.torn-*")}
    assert torn == {"a.jsonl": b"frag", "b.jsonl": b"no newline at all"}


@pytest.mark.parametrize("moment", ["before the open", "between the open and the lock"])
def test_a_file_sealed_by_another_process_while_the_journal_opens_is_left_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """A worker that starts while another one (or ``leitstand rotate``) seals a file it has just
    listed starts all the same, and writes nothing for the segment that the name now is."""
    (tmp_path / "a.jsonl").write_bytes(b"1\nfrag")
    (tmp_path / "b.jsonl").write_bytes(b"whole\n")
    sealed: dict[str, str | None] = {}
    sealing: list[bool] = []

    def seal_b_once() -> None:
        if not sealing:
            sealing.append(True)
            sealed.update(journal_module.seal(tmp_path, ["b.jsonl"], key_window=60, max_keys=10))

    real_open, real_flock = os.open, fcntl.flock

    def opening(path: Any, *args: Any, **kw: Any) -> int:
        if moment == "before the open" and path == "b.jsonl":
            seal_b_once()
        return real_open(path, *args, **kw)

    def locking(fd: int, operation: int) -> None:
        if moment == "between the open and the lock" and operation == fcntl.LOCK_EX and not sealing:
            if os.fstat(fd).st_ino == (tmp_path / "b.jsonl").stat().st_ino:
                seal_b_once()
        real_flock(fd, operation)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(fcntl, "flock", locking)

    assert run(repaired_at_open(tmp_path)) == 1
    segment = sealed["b.jsonl"]
    assert segment is not None
    assert (tmp_path / segment).read_bytes() == b"whole\n"
    assert not (tmp_path / "b.jsonl").exists()
    assert not (tmp_path / ".leitstand" / "times" / "b.jsonl.idx").exists()
    assert (tmp_path / "a.jsonl").read_bytes() == b"1\n"


def test_tail_torn_by_another_writer_is_repaired_before_appending(tmp_path: Path) -> None:
    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"1\n")
        with open(tmp_path / "a.jsonl", "ab") as other:  # another process, dying mid-line
            other.write(b"half")
        await journal.append("a.jsonl", b"2\n")
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"1\n2\n"
    assert [p.read_bytes() for p in tmp_path.glob("a.jsonl.torn-*")] == [b"half"]


def fail_next_sync(monkeypatch: pytest.MonkeyPatch, error: int = errno.EIO) -> list[int]:
    """Make the next fdatasync fail with ``error``; returns the descriptor it failed on."""
    real = os.fdatasync
    failed: list[int] = []

    def failing(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(error, os.strerror(error))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    return failed


@pytest.mark.parametrize(
    ("error", "kind"),
    [(errno.EIO, StorageUnavailable), (errno.ENOSPC, StorageFull), (errno.EDQUOT, StorageFull)],
)
def test_failed_sync_rolls_back_and_reopens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, kind: type[Exception]
) -> None:
    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"good\n")
        failing = fail_next_sync(monkeypatch, error)
        with pytest.raises(kind):
            await journal.append("a.jsonl", b"lost\n")
        assert (tmp_path / "a.jsonl").read_bytes() == b"good\n"
        with pytest.raises(OSError):
            os.fstat(failing[0])  # the descriptor that failed is closed, never used again
        await journal.append("a.jsonl", b"after\n")
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"good\nafter\n"


@pytest.mark.parametrize("calls", ["os", "quickcalls"])
def test_short_write_is_an_error_and_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: str) -> None:
    # The same short write through either way the journal writes: os.write, or a quick call
    # that keeps the GIL (chosen by the filesystem, here forced either way).
    monkeypatch.setattr(quickcalls, "usable", lambda dir_fd, filesystem: calls == "quickcalls")
    module = os if calls == "os" else quickcalls
    real = module.write

    def short(fd: int, data: bytes) -> int:
        if len(data) > 10:
            real(fd, data[:5])
            raise_next.append(True)
            return 5
        if raise_next:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    raise_next: list[bool] = []

    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"ok\n")
        monkeypatch.setattr(module, "write", short)
        with pytest.raises(StorageFull):
            await journal.append("a.jsonl", b"a long line\n")
        monkeypatch.setattr(module, "write", real)
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"ok\n"


def test_names_outside_the_directory_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        journal = await opened(tmp_path)
        for name in ("../x.jsonl", "a/b.jsonl", "x.txt"):
            with pytest.raises(ValueError):
                await journal.append(name, b"x\n")
        await journal.close()

    run(main())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("plant", ["symlink", "dangling symlink", "directory", "fifo"])
def test_a_name_that_is_not_a_regular_file_is_refused(tmp_path: Path, plant: str) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    planted = data / "a.jsonl"
    if plant == "symlink":
        planted.symlink_to(outside)
    elif plant == "dangling symlink":
        planted.symlink_to(tmp_path / "would-be-created")
    elif plant == "directory":
        planted.mkdir()
    else:
        os.mkfifo(planted)

    async def main() -> None:
        journal = await opened(data)
        with pytest.raises(StorageRefused):
            await journal.append("a.jsonl", b"x\n")
        await journal.append("b.jsonl", b"y\n")  # other files are not affected
        await journal.close()

    run(main())
    assert outside.read_bytes() == b""
    assert not (tmp_path / "would-be-created").exists()
    assert (data / "b.jsonl").read_bytes() == b"y\n"


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_new_files_get_the_configured_mode(tmp_path: Path, mode: int) -> None:
    async def main() -> None:
        journal = Journal(tmp_path, file_mode=mode)
        await journal.open()
        await journal.append("a.jsonl", b"x\n")
        await journal.close()

    old = os.umask(0o022)
    try:
        run(main())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.jsonl").stat().st_mode) == mode


def test_a_file_renamed_by_hand_gets_no_more_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"good\n")
        (tmp_path / "a.jsonl").rename(tmp_path / "a.jsonl.1")  # an operator rotating by hand
        fail_next_sync(monkeypatch)
        with pytest.raises(StorageUnavailable):
            await journal.append("a.jsonl", b"lost\n")
        # The failed commit went to a new file under the name, and was cut back there.
        assert (tmp_path / "a.jsonl").read_bytes() == b""
        await journal.append("a.jsonl", b"after\n")
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl.1").read_bytes() == b"good\n"
    assert (tmp_path / "a.jsonl").read_bytes() == b"after\n"


def test_rollback_uses_the_old_descriptor_when_no_fresh_one_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_proc(path, *args, **kw):  # type: ignore[no-untyped-def]
        if str(path).startswith("/proc/self/fd/"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kw)

    async def main() -> None:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"good\n")
        monkeypatch.setattr(os, "open", no_proc)
        fail_next_sync(monkeypatch)
        with pytest.raises(StorageUnavailable):
            await journal.append("a.jsonl", b"lost\n")
        await journal.append("a.jsonl", b"after\n")
        await journal.close()

    run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"good\nafter\n"


def test_appends_waiting_for_the_lock_join_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another worker holds the file lock, new appends join the commit already waiting for it."""

    async def main() -> list[int]:
        journal = await opened(tmp_path)
        await journal.append("a.jsonl", b"0\n")
        other = os.open(tmp_path / "a.jsonl", os.O_RDONLY)  # another worker's descriptor
        fcntl.flock(other, fcntl.LOCK_EX)
        syncs = record_syncs(monkeypatch)
        first = asyncio.ensure_future(journal.append("a.jsonl", b"1\n"))
        await asyncio.sleep(0.05)  # its commit now waits for the lock
        later = [asyncio.ensure_future(journal.append("a.jsonl", b"%d\n" % n)) for n in (2, 3)]
        await asyncio.sleep(0.05)
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        await asyncio.gather(first, *later)
        await journal.close()
        return syncs

    assert len(run(main())) == 1
    assert (tmp_path / "a.jsonl").read_bytes() == b"0\n1\n2\n3\n"


_DIES_MID_WRITE = r"""
import asyncio, fcntl, os, sys
from pathlib import Path
from leitstand.storage import quickcalls
from leitstand.storage.journal import Journal

directory, cut, first = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode().replace(b"|", b"\n")
appends = [(a.encode().replace(b"|", b"\n"), k.encode() or None) for a, k in zip(sys.argv[4::2], sys.argv[5::2])]
real_write, real_quick_write = os.write, quickcalls.write

def dying(fd, data, write=real_write):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
        write(fd, data[:cut])
        os._exit(9)
    return write(fd, data)

async def main():
    journal = Journal(directory)
    await journal.open()
    await journal.append("a.jsonl", first)
    # Hold the file's lock while appending, so that all appends share one commit.
    held = os.open(directory / "a.jsonl", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    # Both ways the journal writes: os.write, and the quick call for a small commit without records.
    os.write = dying
    quickcalls.write = lambda fd, data: dying(fd, data, real_quick_write)
    pending = [asyncio.ensure_future(journal.append("a.jsonl", data, key)) for data, key in appends]
    await asyncio.sleep(0.05)
    fcntl.flock(held, fcntl.LOCK_UN)
    await asyncio.gather(*pending)
    raise SystemExit("the commit did not die")

asyncio.run(main())
"""


def die_mid_write(directory: Path, cut: int, appends: list[tuple[str, str]], first: str = "0|") -> None:
    """Let a process append ``first`` to ``a.jsonl`` in ``directory``, then ``appends`` in one commit
    (each its lines, ``|`` for a newline, and its key or ``""``), and die after writing ``cut`` bytes
    of that commit's data: as a kill or a power cut leaves a write that was under way."""
    args = [str(directory), str(cut), first, *(part for append in appends for part in append)]
    died = subprocess.run([sys.executable, "-c", _DIES_MID_WRITE, *args], capture_output=True, text=True, check=False)
    assert died.returncode == 9, died.stderr


@pytest.mark.parametrize(
    ("appends", "cut", "kept", "aside"),
    [
        ([("a|b|c|", "")], 3, b"0\n", b"a\nb"),
        ([("a|b|c|", "")], 4, b"0\n", b"a\nb\n"),
        ([("x|", ""), ("a|b|c|", ""), ("y|", "")], 5, b"0\nx\n", b"a\nb"),
        ([("x|", ""), ("y|", ""), ("z|", "")], 5, b"0\nx\ny\n", b"z"),
        ([("a|b|", "k")], 2, b"0\n", b"a\n"),
        ([("x|", "k1"), ("a|b|", "k2")], 4, b"0\nx\n", b"a\n"),
        ([("a|b|", "k")], 0, b"0\n", None),
    ],
    ids=["batch-torn", "batch-whole-lines", "batch-among-singles", "singles", "keyed-batch", "key-then-batch",
         "records-only"],
)
def test_a_request_cut_short_by_a_crash_is_set_aside_whole(
    tmp_path: Path, appends: list[tuple[str, str]], cut: int, kept: bytes, aside: bytes | None
) -> None:
    """Every request is in the file whole or not at all after a crash, with or without a key, and
    what was cut off is set aside once; a retry of a key that was cut off stores it."""
    die_mid_write(tmp_path, cut, appends)
    lost = [(data.replace("|", "\n").encode(), key.encode()) for data, key in appends if key]
    lost = [(lines, key) for lines, key in lost if lines not in kept]

    async def reopen() -> list[int]:
        journal = Journal(tmp_path)
        repaired = [await journal.open()]
        for lines, key in lost:
            assert await journal.append("a.jsonl", lines, key) is Appended.STORED
            assert await journal.append("a.jsonl", lines, key) is Appended.DUPLICATE
        await journal.close()
        journal = Journal(tmp_path)
        repaired.append(await journal.open())
        await journal.close()
        return repaired

    assert run(reopen()) == [0 if aside is None else 1, 0], "set aside once"
    stored = kept + b"".join(lines for lines, _ in lost)
    assert (tmp_path / "a.jsonl").read_bytes() == stored
    assert [p.read_bytes() for p in tmp_path.glob("a.jsonl.torn-*")] == ([] if aside is None else [aside])
    requests = tmp_path / ".leitstand" / "requests" / "a.jsonl.log"
    ends = [r[4] for r in RECORD.iter_unpack(requests.read_bytes())] if requests.exists() else []
    assert all(end <= len(stored) for end in ends), "a record of data that is not in the file"


def test_a_journal_name_at_the_length_limit_keeps_its_records_and_torn_tails(tmp_path: Path) -> None:
    """The request log and the set-aside file of a 255-byte journal name must fit the filesystem too."""
    name = "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 49 + "_0123456789abcdef.jsonl"
    assert len(name) == 255

    async def main() -> None:
        journal = await opened(tmp_path)
        assert await journal.append(name, b"1\n2\n", b"k") is Appended.STORED
        assert await journal.append(name, b"3\n4\n") is Appended.STORED
        await journal.close()
        with open(tmp_path / name, "ab") as other:  # another process, dying mid-line
            other.write(b"half")
        journal = await opened(tmp_path)
        assert await journal.append(name, b"1\n2\n", b"k") is Appended.DUPLICATE
        await journal.close()

    run(main())
    assert (tmp_path / name).read_bytes() == b"1\n2\n3\n4\n"
    (torn,) = [p for p in tmp_path.iterdir() if ".torn-" in p.name]
    assert len(torn.name) == 255 and torn.read_bytes() == b"half"
    assert datadir.kind_of(torn.name) is datadir.Kind.TORN


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """From now on, every call of ``module.name`` still happens and is listed by its first argument."""
    calls: list[int] = []
    real = getattr(module, name)

    def recording(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(module, name, recording)
    return calls


async def appends_in_one_round(journal: Journal, directory: Path, appends: list[tuple[str, bytes]]) -> list[object]:
    """Make ``appends`` wait together for one round: the round before it is held up on the lock
    of a file ``gate.jsonl`` that another descriptor (another worker, as it were) holds."""
    await journal.append("gate.jsonl", b"open\n")
    held = os.open(directory / "gate.jsonl", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    gate = asyncio.ensure_future(journal.append("gate.jsonl", b"gate\n"))
    await asyncio.sleep(0.05)
    waiting = asyncio.gather(*(journal.append(name, data) for name, data in appends), return_exceptions=True)
    await asyncio.sleep(0.05)
    os.close(held)
    await gate
    return await waiting


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fdatasync-each"])
def test_one_round_serves_every_file_and_syncs_them_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    """Appends to many files that wait together are written in one round and made durable by one
    syncfs (where the filesystem is known to report write-back errors), or by an fdatasync each."""
    from leitstand.storage import journal as journal_module

    async def main() -> None:
        journal = await opened(tmp_path, syncfs=syncfs)
        assert journal.syncfs is syncfs, "ext4 under the tests: syncfs is known to work"
        fdatasyncs = count_calls(monkeypatch, os, "fdatasync")
        syncfses = count_calls(monkeypatch, journal_module, "_syncfs")
        await appends_in_one_round(journal, tmp_path, [(f"f{n}.jsonl", b"%d\n" % n) for n in range(50)])
        await journal.close()
        # The gate's two rounds have one file each: an fdatasync of their own.
        if syncfs:
            assert (len(syncfses), len(fdatasyncs)) == (1, 2), "one syncfs for the round of 50 files"
        else:
            assert (syncfses, len(fdatasyncs)) == ([], 52), "an fdatasync per file"

    run(main())
    assert all((tmp_path / f"f{n}.jsonl").read_bytes() == b"%d\n" % n for n in range(50))


def test_a_failed_syncfs_fails_and_rolls_back_every_file_of_its_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leitstand.storage import journal as journal_module

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        journal = await opened(tmp_path)
        await asyncio.gather(*(journal.append(f"f{n}.jsonl", b"before\n") for n in range(5)))
        monkeypatch.setattr(journal_module, "_syncfs", failing)
        results = await appends_in_one_round(journal, tmp_path, [(f"f{n}.jsonl", b"lost\n") for n in range(5)])
        assert all(isinstance(r, StorageUnavailable) for r in results), results
        monkeypatch.undo()
        await asyncio.gather(*(journal.append(f"f{n}.jsonl", b"after\n") for n in range(5)))
        await journal.close()

    run(main())
    assert all((tmp_path / f"f{n}.jsonl").read_bytes() == b"before\nafter\n" for n in range(5))


def test_two_journals_on_many_files_never_wait_for_each_other_in_a_circle(tmp_path: Path) -> None:
    """Rounds of two processes (here two journals, each with its own descriptors and locks) lock
    their files in one order, so they never deadlock, and every line arrives."""

    async def main() -> None:
        first, second = await opened(tmp_path), await opened(tmp_path)
        names = [f"f{n:02d}.jsonl" for n in range(30)]

        async def writer(journal: Journal, tag: bytes, order: list[str]) -> None:
            for round_ in range(20):
                await asyncio.gather(*(journal.append(name, b"%s-%d\n" % (tag, round_)) for name in order))

        await asyncio.wait_for(asyncio.gather(writer(first, b"a", names), writer(second, b"b", names[::-1])), 60)
        await first.close()
        await second.close()

    run(main())
    for n in range(30):
        lines = sorted((tmp_path / f"f{n:02d}.jsonl").read_bytes().splitlines())
        assert lines == sorted([b"a-%d" % r for r in range(20)] + [b"b-%d" % r for r in range(20)])


def test_syncfs_is_used_only_where_it_is_known_to_report_failures(tmp_path: Path) -> None:
    from leitstand.storage.journal import filesystem_type, syncfs_works

    assert filesystem_type(tmp_path) in {"ext4", "xfs", "btrfs", "tmpfs", "overlay"}
    assert syncfs_works(tmp_path) is (filesystem_type(tmp_path) in {"ext4", "xfs", "btrfs"})
    assert filesystem_type(Path("/proc")) == "proc" and not syncfs_works(Path("/proc"))


@pytest.mark.parametrize(("hard", "kept"), [(None, 3 * 4096), (1500, 1500 - 1024)], ids=["enough", "too-low"])
def test_the_descriptor_limit_is_raised_to_fit_the_open_files(tmp_path: Path, hard: int | None, kept: int) -> None:
    """Each open journal file may hold three descriptors: the soft limit is raised to fit them, and
    below the hard limit the files' descriptors get what it leaves beside the spare ones; the
    warning waits until that counts (below)."""
    import resource

    if hard is None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert hard >= 3 * 4096 + 1024, "the machine's hard limit is too low for this test"

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    script = (
        "import logging, resource; from leitstand.storage.journal import Journal; logging.basicConfig(); "
        "j = Journal(__import__('pathlib').Path('.'), max_open_files=4096); "
        "print(j.max_descriptors, resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, preexec_fn=limits, capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    descriptors, soft = map(int, child.stdout.split())
    assert descriptors == kept and soft >= kept + 1024
    assert "raise the limit" not in child.stderr


@pytest.mark.parametrize(
    ("lines", "each", "together"),
    [(b"1\n2\n", 3, 1), (b"1\n", 2, 1), (b"1\n2\n", 3, 50)],
    ids=["with-records", "single-lines", "rounds-of-50-files"],
)
def test_the_files_kept_open_leave_the_spare_descriptors_free(
    tmp_path: Path, lines: bytes, each: int, together: int
) -> None:
    """Under a low limit, the files' descriptors never take more than the limit leaves beside the
    spare descriptors that sockets and the runtime need: else a busy server would fail commits
    with EMFILE. Files written with a request record and a time index hold three descriptors each;
    files of single lines two (no request log), and as many more of those are kept open as fit.
    A round of many new files reserves their descriptors before it opens them. Once a file is
    closed for the limit, one warning says what to raise."""
    import resource

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1500))

    script = """
import asyncio, logging, os, resource
from pathlib import Path
logging.basicConfig()
from leitstand.storage import journal as journal_module
from leitstand.storage.journal import Journal

def held() -> int:
    # Descriptors of journal files, request logs and time indexes: everything under the data dir
    # but its directories.
    root = os.path.realpath(".")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root + "/") and os.path.isfile(target):
            count += 1
    return count

async def main() -> None:
    journal = Journal(Path("."))
    await journal.open()
    most = 0
    for n in range(0, journal.max_descriptors // EACH + 20 * TOGETHER, TOGETHER):
        await asyncio.gather(*(journal.append(f"d{m}.jsonl", LINES) for m in range(n, n + TOGETHER)))
        most = max(most, held())
    kept = journal.open_files
    await journal.close()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    print(most, soft - journal_module._SPARE_DESCRIPTORS, kept)

asyncio.run(main())
"""
    script = f"EACH, LINES, TOGETHER = {each}, {lines!r}, {together}\n" + script
    child = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, preexec_fn=limits, capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    most, allowed, kept = map(int, child.stdout.split())
    assert (tmp_path / ".leitstand" / "times").is_dir()
    assert (tmp_path / ".leitstand" / "requests").is_dir() is (each == 3)
    assert 0 < most <= allowed, f"{most} descriptors held for journal files, {allowed} left beside the spare ones"
    # Every file but those closed to make room for the next round stays open.
    assert allowed // each - 2 * together <= kept <= allowed // each, f"{kept} files kept open, {allowed // each} fit"
    assert child.stderr.count("raise the limit (LimitNOFILE= in systemd, ulimit -n)") == 1, child.stderr
