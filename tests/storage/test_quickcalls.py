"""The calls a commit round makes while keeping the GIL, against what ``os`` and ``fcntl`` say."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from leitstand.storage import journal as journal_module
from leitstand.storage import quickcalls
from leitstand.storage.journal import Journal


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_stat_tells_identity_and_length_as_os_stat_does_and_does_not_follow_a_symlink(tmp_path: Path, dir_fd: int) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"12345\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    for name in ("a.jsonl", "link.jsonl"):
        status = os.stat(tmp_path / name, follow_symlinks=False)
        assert quickcalls.stat(dir_fd, name) == ((status.st_dev, status.st_ino), status.st_size)
    assert quickcalls.stat(dir_fd, "link.jsonl") != quickcalls.stat(dir_fd, "a.jsonl")
    assert quickcalls.stat(dir_fd, "missing.jsonl") is None
    with pytest.raises(OSError) as raised:
        quickcalls.stat(dir_fd, "a.jsonl/below")
    assert raised.value.errno == errno.ENOTDIR


def test_try_lock_takes_a_free_lock_and_leaves_a_held_one_to_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.touch()
    mine, other = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        assert quickcalls.try_lock(mine)
        # Held: nobody else gets it, with or without waiting.
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not quickcalls.try_lock(other)
        quickcalls.unlock(mine)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not quickcalls.try_lock(mine)
    finally:
        os.close(mine)
        os.close(other)
    with pytest.raises(OSError) as raised:
        quickcalls.try_lock(mine)
    assert raised.value.errno == errno.EBADF


def test_write_appends_and_reports_an_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "a.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        assert quickcalls.write(fd, b"one\n") == 4
        assert quickcalls.write(fd, b"two\n") == 4
    finally:
        os.close(fd)
    assert (tmp_path / "a.jsonl").read_bytes() == b"one\ntwo\n"
    with pytest.raises(OSError) as raised:
        quickcalls.write(fd, b"three\n")
    assert raised.value.errno == errno.EBADF


def test_length_is_what_fstat_tells_and_an_error_is_raised(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "a.idx", os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        assert quickcalls.length(fd) == 0
        os.write(fd, b"x" * 40)
        assert quickcalls.length(fd) == os.fstat(fd).st_size == 40
    finally:
        os.close(fd)
    with pytest.raises(OSError) as raised:
        quickcalls.length(fd)
    assert raised.value.errno == errno.EBADF


def test_usable_only_on_a_local_filesystem(tmp_path: Path, dir_fd: int) -> None:
    assert quickcalls.usable(dir_fd, "ext4")
    assert quickcalls.usable(dir_fd, "tmpfs")
    for remote in ("nfs4", "fuse.sshfs", "cifs", None):
        assert not quickcalls.usable(dir_fd, remote)


def test_a_commit_round_on_a_local_filesystem_makes_its_calls_through_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single line without a key: lock, stat, write and unlock keep the GIL, and so do the
    length and the write of the time index's note, the first commit of its second; a keyed
    line's data goes through os.write (its record was written and synced with the GIL let go),
    and so does a large one."""
    monkeypatch.setattr(journal_module, "filesystem_type", lambda path: "ext4")
    # One second for all: only the first commit notes its time.
    monkeypatch.setattr(journal_module.time, "time", lambda: 5_000_000.5)
    calls: Counter[str] = Counter()

    def what(name: str, args: tuple[object, ...]) -> str:
        if name != "write":
            return name
        return "write" if os.readlink(f"/proc/self/fd/{args[0]}").endswith(".jsonl") else "write index"

    for name in ("try_lock", "stat", "write", "unlock", "length"):
        real = getattr(quickcalls, name)
        monkeypatch.setattr(
            quickcalls, name, lambda *a, real=real, name=name: (calls.update([what(name, a)]), real(*a))[1]
        )

    async def main() -> None:
        journal = Journal(tmp_path)
        await journal.open()
        calls.clear()
        await journal.append("a.jsonl", b"one\n")
        first = dict(calls)
        calls.clear()
        await journal.append("a.jsonl", b"two\n", b"key")
        second = dict(calls)
        calls.clear()
        await journal.append("a.jsonl", large)
        third = dict(calls)
        await journal.close()
        assert first == {"try_lock": 1, "stat": 1, "write": 1, "unlock": 1, "length": 1, "write index": 1}
        assert second == {"try_lock": 1, "stat": 1, "unlock": 1}
        assert third == {"try_lock": 1, "stat": 1, "unlock": 1}, "a write of more than WRITE_MAX lets go of the GIL"

    large = b'"' + b"x" * quickcalls.WRITE_MAX + b'"\n'
    asyncio.run(main())
    assert (tmp_path / "a.jsonl").read_bytes() == b"one\ntwo\n" + large
