"""The journal: append-only ``<name>.jsonl`` files that keep every acknowledged line.

Why it is built this way:

* **Group commit, across files.** Appends that arrive while a commit round is under way
  wait for the next round, which serves every file with appends waiting: one ``os.write``
  per file, then one sync for the lot, then every waiter is answered, with one hand-over to
  a pool thread and one back per round however many files it serves. Up to two files are
  synced with ``fdatasync`` each; from three on, one ``syncfs`` of the data dir's filesystem
  is cheaper (measured: 0.24 ms for 3 files instead of 0.46, 3.6 ms for 100 instead of 34)
  where it is known to report write-back errors (Linux 5.8 and later, on ext4, xfs or
  btrfs; elsewhere, FUSE and network filesystems among them, each file gets its own sync).
  It also flushes what other programs wrote to that filesystem; ``LEITSTAND_SYNCFS=off``
  keeps to one sync per file.
* **Several processes.** A round holds ``flock`` on each of its files across write and sync,
  taking the locks in name order so that two workers' rounds never wait for each other in a
  circle; workers appending to one file never interleave, and each sees what the others wrote.
* **No partial state.** A failed write or sync cuts the file back to its last good length
  through a fresh descriptor (after a failed fsync the old one cannot be trusted).
* **Whole requests.** A commit that holds an append with an idempotency key, or of more
  than one line, first records where each such append starts and ends, and syncs that
  record before it writes the data (see :mod:`leitstand.storage.keylog`). After a crash, a request
  that reached the disk only in part (a power cut keeps any prefix of what was not synced;
  a kill can cut a large write short) is cut off back to its start; a last line without
  ``\\n`` is cut off too. What is cut off is moved aside to ``<name>.torn-<UTC time>``
  before anything is appended after it. Appends of one line without a key, the common case,
  need no record: a line is whole or torn.
* **Idempotency keys.** An append may carry a key; the key is looked up and recorded in the
  commit, under the lock, so two workers with the same key never both store.
* **Times.** The first commit of each second notes where it wrote in the file's time index
  (:mod:`leitstand.storage.timeindex`), unsynced; start and a clean stop settle the index.
* **Sealing.** :meth:`Journal.seal` renames a file to a segment (see
  :mod:`leitstand.storage.segments`) under the same exclusive lock, after cutting it back to
  whole requests and rewriting its request log with only the keys, at offset 0: the keys stay
  known, and no record can name the segment and be taken for an offset into the next file.
  The file's time index goes with it, renamed to the segment's name (its header still names
  the segment's inode), so reads by time and cursors keep working in the segment.
  Every commit checks under the lock that its descriptor is still the file under the name
  (:meth:`Journal._lock`), so nothing is appended to a sealed, renamed or removed file.

* **Few hand-backs of the GIL.** On a local filesystem the calls a round makes for each
  file (lock, ``stat``, a small write, unlock) keep the GIL (:mod:`leitstand.storage.quickcalls`):
  each one that let it go had to wait for the busy event loop to give it back.

All file I/O runs on a small thread pool, never on the event loop. The journal knows
file names and bytes; it knows nothing of HTTP or domains, and tells what it does only to
an :class:`Observer` (the metrics).
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import errno
import fcntl
import logging
import os
import resource
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from leitstand.storage import quickcalls, segments
from leitstand.storage.durable import CHUNK, NAME_MAX, read_range, write_whole
from leitstand.storage.keylog import (
    NO_KEY,
    RECORD,
    REQUESTS_DIR,
    STATE_DIR,
    KeyIndex,
    RequestLog,
    key_hash,
    lines_hash,
    open_dir,
)
from leitstand.storage.timeindex import TimeLog, index_name, open_times_dir

log = logging.getLogger("leitstand.journal")

SUFFIX = ".jsonl"
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# O_NOFOLLOW on a symlink gives ELOOP; O_RDWR on a directory EISDIR.
_REFUSED = frozenset({errno.ELOOP, errno.EISDIR})
PROBE = ".leitstand-probe"
# From this many files in one round on, one syncfs makes them durable instead of an fdatasync each.
SYNCFS_FROM = 3
# Filesystems whose syncfs writes back and flushes every file, and reports a failure (Linux >= 5.8).
_SYNCFS_FILESYSTEMS = frozenset({"ext4", "ext3", "xfs", "btrfs"})


class JournalError(Exception):
    """A commit that did not happen; nothing of it is left in the file."""


class StorageFull(JournalError):
    """The disk or quota is full (ENOSPC, EDQUOT, EFBIG)."""


class StorageUnavailable(JournalError):
    """Any other write or sync failure (EIO, ...); worth retrying later."""


class StorageRefused(JournalError):
    """The name is taken by something that is not a plain file (a symlink, a directory, ...).

    Retrying cannot help: an operator must look at the data dir.
    """


class Observer:
    """Told what the journal does; this one ignores it. Called on pool threads too: be quick, be thread-safe."""

    def committed(self, appends: int, nbytes: int, sync_seconds: float | None) -> None:
        """One commit wrote ``appends`` appends in ``nbytes``; the sync took this long (None: no sync)."""

    def failed(self, error: JournalError) -> None:
        """One commit failed; its appends all get ``error``."""

    def repaired(self) -> None:
        """A torn line or a request cut short by a crash was set aside."""

    def opened(self, delta: int) -> None:
        """The number of open journal files changed by ``delta``."""

    def sealed(self, nbytes: int) -> None:
        """A journal file of ``nbytes`` became a segment."""


class Appended(enum.Enum):
    """What became of an append."""

    STORED = "stored"
    # The key was stored before with the same lines, within the window: nothing written.
    DUPLICATE = "duplicate"
    # The key was stored before with other lines: nothing written.
    CONFLICT = "conflict"


# A key with the hash of the lines it stands for.
_Key = tuple[bytes, bytes]
_Waiter = asyncio.Future[Appended]
# One append: its lines, who waits for it, its key, and whether it needs a record (a key, or
# more than one line).
_Append = tuple[bytes, _Waiter, _Key | None, bool]
# One record of the request log: time, key hash, lines hash, start, end.
_Record = tuple[float, bytes, bytes, int, int]


def probe(directory: Path) -> None:
    """Prove that ``directory`` can take a durable write: create, write, fsync, remove a file.

    Raises the :class:`OSError` that stands in the way (ENOTDIR, EACCES, EROFS, ENOSPC, ...).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    path = directory / f"{PROBE}-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, b"probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)


_REASONS = {
    errno.ENOTDIR: "not a directory",
    errno.EEXIST: "not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "no space left (quota)",
}


def reason(exc: OSError) -> str:
    """What stands in the way, in a few words, without the path."""
    return _REASONS.get(exc.errno or 0) or (exc.strerror or "unknown error").lower()


class _Batch:
    """The appends waiting for the next commit of one file.

    A commit takes the batch whole and leaves a new one behind, so nothing that later appends
    add can reach a commit under way.
    """

    __slots__ = ("appends", "recorded")

    def __init__(self) -> None:
        self.appends: list[_Append] = []
        # Whether any append needs a record in the request log.
        self.recorded = False


class _File:
    """One journal file and the appends waiting for its next commit."""

    __slots__ = ("batch", "committing", "end", "fd", "identity", "mutex", "name", "queued", "requests", "times")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd: int | None = None
        # (device, inode) of the file open as ``fd``: what the name must still be to append.
        self.identity = (-1, -1)
        # The length this process last left the file at; -1 until it has looked.
        self.end = -1
        self.batch = _Batch()
        self.requests = RequestLog(name)
        self.times = TimeLog(name)
        # Waiting for the next round, or handed to the round under way; only the event loop
        # reads and sets them.
        self.queued = False
        self.committing = False
        # The batch is filled on the event loop and taken on a pool thread.
        self.mutex = threading.Lock()

    @property
    def busy(self) -> bool:
        return self.queued or self.committing

    @property
    def descriptors(self) -> int:
        """How many descriptors it holds: its data, its request log and its time index, those open."""
        return (self.fd is not None) + (self.requests.fd is not None) + (self.times.fd is not None)

    def take(self) -> _Batch:
        """Everything that waits for a commit, leaving a new, empty batch behind."""
        with self.mutex:
            batch, self.batch = self.batch, _Batch()
        return batch


class _Commit:
    """One file's part of a round: what it took, what it writes, and how it ended."""

    __slots__ = ("batch", "data", "error", "fd", "file", "records", "requests_dir", "results", "size")

    def __init__(self, f: _File, fd: int) -> None:
        self.file = f
        self.fd = fd
        self.batch = _Batch()
        # The file's length before, and what this commit adds to it.
        self.size = -1
        self.data = b""
        # What became of each append; None while all are stored.
        self.results: list[Appended] | None = None
        self.records: list[_Record] = []
        self.requests_dir: int | None = None
        self.error: JournalError | None = None

    def fail(self, action: str, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self.error = _journal_error(self.file.name, action, exc)
        else:
            log.exception("commit failed: file=%s", self.file.name)
            self.error = StorageUnavailable(str(exc))


class Journal:
    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        max_open_files: int = 16384,
        file_mode: int = 0o600,
        key_window: float = 86400.0,
        max_keys: int = 100_000,
        syncfs: bool = True,
        observer: Observer | None = None,
    ) -> None:
        """``syncfs``: whether a round of several files may be made durable with one ``syncfs``
        (where the filesystem allows it; see the module's docstring)."""
        self.directory = directory
        self.observer = observer or Observer()
        self.fsync = fsync
        self.file_mode = file_mode
        self.max_open_files = max_open_files
        # What the files' descriptors may add up to: three each, or what the process's limit leaves.
        self.max_descriptors = _allow_descriptors(max_open_files)
        # Set when the descriptor limit may keep fewer open than asked: said once, when it first counts.
        self._short_of = max_open_files if self.max_descriptors < _DESCRIPTORS_PER_FILE * max_open_files else 0
        # Descriptors the files hold, as of the end of their last round, and what the round under
        # way may open beyond that (three for each of its files, less what it holds already).
        self._descriptors = 0
        self._reserved = 0
        self.keys = KeyIndex(key_window, max_keys)
        self.syncfs = syncfs
        # Whether the quick calls of a round may keep the GIL (:mod:`leitstand.storage.quickcalls`).
        self._quick = False
        self._files: OrderedDict[str, _File] = OrderedDict()
        # Files with appends waiting for the next round, and whether a round is under way.
        self._queued: list[_File] = []
        self._committing = False
        # Descriptors of files let go to stay under max_open_files, closed once per round.
        self._unused: list[int] = []
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="journal")
        self._dir_fd = -1
        # .leitstand/requests, once it exists; only commit threads touch it, under a file's lock.
        self._requests_dir: int | None = None
        # .leitstand, once it exists: where each round looks for the requests dir until it exists.
        self._state_dir: int | None = None
        self._requests_dir_lock = threading.Lock()
        # .leitstand/times, opened (and made) by the first commit or at start.
        self._times_dir: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> int:
        """Open the directory and repair every torn tail in it; returns how many were repaired."""
        self._loop = asyncio.get_running_loop()
        repaired = await self._loop.run_in_executor(self._executor, self._open_directory)
        filesystem = filesystem_type(self.directory)
        self.syncfs = self.syncfs and self.fsync and syncfs_works(self.directory, filesystem)
        self._quick = quickcalls.usable(self._dir_fd, filesystem)
        return len(repaired)

    async def close(self) -> None:
        """Wait for every commit under way, then close all files."""
        while self._committing or self._queued:
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._mark_times)
        fds = [fd for f in self._files.values() for fd in self._release(f)] + self._unused
        self._files.clear()
        self._unused = []
        for attribute in ("_requests_dir", "_times_dir", "_state_dir"):
            state_dir = getattr(self, attribute)
            if state_dir is not None:
                fds.append(state_dir)
                setattr(self, attribute, None)
        if self._dir_fd >= 0:
            fds.append(self._dir_fd)
            self._dir_fd = -1
        await loop.run_in_executor(self._executor, _close_all, fds)
        self._executor.shutdown(wait=True)

    def _mark_times(self) -> None:
        """A clean stop: each time index this process wrote ends at its file's end (nothing lost)."""
        for f in self._files.values():
            if f.fd is None or f.times.fd is None or self._times_dir is None:
                continue
            try:
                fcntl.flock(f.fd, fcntl.LOCK_EX)
                try:
                    f.times.mark(self._times_dir, f.fd, os.fstat(f.fd).st_size, time.time())
                finally:
                    fcntl.flock(f.fd, fcntl.LOCK_UN)
            except OSError as exc:
                log.error("time index not closed: file=%s error=%s", f.times.name, exc.strerror)

    def _open_directory(self) -> dict[str, int]:
        """Open the directory and cut every file back to whole requests; returns the bytes set aside per file."""
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        repaired = {}
        with os.scandir(self._dir_fd) as entries:
            names = [e.name for e in entries if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False)]
        requests_dir = self._requests_dir_fd(create=False)
        times_dir = None
        try:
            times_dir = self._times_dir_fd() if names else None
        except OSError as exc:
            log.error("time index dir not usable, since= reads whole files: error=%s", exc.strerror)
        for name in sorted(names):
            f = _File(name)
            try:
                fd = os.open(name, _OPEN_FLAGS, dir_fd=self._dir_fd)
            except FileNotFoundError:
                continue  # sealed by another process since the listing, which cut it back to whole requests
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = self._held(fd, name)
                if held is None:
                    continue  # the same, between the open and the lock: a segment now, never written to
                size = held.st_size
                good = self._recover(f, fd, size, requests_dir)
                if size - good:
                    repaired[name] = size - good
                if times_dir is not None:
                    f.times.settle(times_dir, fd, good, time.time())
            finally:
                _close_all([fd, *f.requests.close(), *f.times.close()])
        return repaired

    @property
    def open_files(self) -> int:
        return sum(f.fd is not None for f in self._files.values())

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    # -- appending -------------------------------------------------------------------

    async def append(self, name: str, data: bytes, key: bytes | None = None, same: bytes | None = None) -> Appended:
        """Return once ``data`` is written (and synced, unless fsync is off) to ``name``.

        ``data`` is whole lines. Raises :class:`StorageFull` or :class:`StorageUnavailable`,
        in which case none of it is in the file. With a ``key`` that ``name`` stored within
        the window, nothing is written: the answer says whether it stood for the same lines,
        or for the same ``same`` if given (what a retry must repeat, e.g. the lines before
        the receive time was added).
        """
        f = self._files.get(name)
        if f is None:
            f = self._admit(name)
        else:
            self._files.move_to_end(name)
        assert self._loop is not None, "Journal.open() was not awaited"
        hashed = None
        if key is not None:
            hashed = key_hash(name, key), lines_hash(data if same is None else same)
            known = self.keys.find(hashed[0], time.time())
            if known is not None:
                return Appended.DUPLICATE if known == hashed[1] else Appended.CONFLICT
        recorded = hashed is not None or data.find(b"\n") + 1 < len(data)
        waiter: _Waiter = self._loop.create_future()
        with f.mutex:
            batch = f.batch
            batch.appends.append((data, waiter, hashed, recorded))
            batch.recorded = batch.recorded or recorded
        if not f.queued:
            f.queued = True
            self._queued.append(f)
            if not self._committing:
                self._start_round()
        return await waiter

    def _admit(self, name: str) -> _File:
        if "/" in name or not name.endswith(SUFFIX):
            raise ValueError(f"not a journal file name: {name!r}")
        f = self._files[name] = _File(name)
        return f

    def _make_room(self) -> None:
        """Close the least recently used idle files while there are more than :attr:`max_open_files`,
        or the round about to start could take the files' descriptors past :attr:`max_descriptors`.

        Counting what each file holds (two without a request log) rather than three for each
        keeps more files open under a low limit, which is what many domains with single events
        need; the reservation keeps a round that opens request logs within the limit too. Done
        as the round starts, when its own files are busy, so none of them is let go.
        """
        excess = self._descriptors + self._reserved - self.max_descriptors
        surplus = len(self._files) - self.max_open_files
        if excess <= 0 and surplus <= 0:
            return
        if excess > 0 and self._short_of:
            log.warning(
                "only %d open files allowed (ulimit -n): keeping fewer than %d journal files open, closing "
                "and reopening the others; raise the limit (LimitNOFILE= in systemd, ulimit -n) for many domains",
                resource.getrlimit(resource.RLIMIT_NOFILE)[0], self._short_of,
            )
            self._short_of = 0
        idle = []
        for f in self._files.values():
            if excess <= 0 and surplus <= 0:
                break
            if not f.busy:
                idle.append(f)
                excess -= f.descriptors
                surplus -= 1
        self._let_go(idle)

    def _let_go(self, files: list[_File]) -> None:
        """Forget idle ``files``; their descriptors are closed beside the next round."""
        for f in files:
            del self._files[f.name]
            fds = self._release(f)
            self._descriptors -= len(fds)
            self._unused += fds

    def _release(self, f: _File) -> list[int]:
        """The descriptors of a file no longer kept (its data, request log and time index), for the caller to close."""
        fds = f.requests.close() + f.times.close()
        if f.fd is not None:
            fds.append(f.fd)
            self.observer.opened(-1)
        return fds

    def _start_round(self) -> None:
        loop = self._loop
        assert loop is not None
        files, self._queued = self._queued, []
        for f in files:
            f.queued, f.committing = False, True
        self._committing = True
        held = sum(f.descriptors for f in files)
        self._reserved = _DESCRIPTORS_PER_FILE * len(files) - held
        self._make_room()
        if self._unused:
            # A task of its own, beside the round: none of its answers waits for a close.
            self._executor.submit(_close_all, self._unused)
            self._unused = []
        done = self._executor.submit(self._round, files)
        done.add_done_callback(lambda d: loop.call_soon_threadsafe(self._round_done, files, held, d))

    def _round_done(self, files: list[_File], held: int, done: Future[list[_Commit]]) -> None:
        self._descriptors += sum(f.descriptors for f in files) - held
        self._reserved = 0
        for commit in done.result():
            if commit.error is not None:
                self.observer.failed(commit.error)
            for n, (_, waiter, _, _) in enumerate(commit.batch.appends):
                if waiter.done():
                    continue
                if commit.error is not None:
                    waiter.set_exception(commit.error)
                else:
                    waiter.set_result(Appended.STORED if commit.results is None else commit.results[n])
        for f in files:
            f.committing = False
        if self._queued:
            self._start_round()
        else:
            self._committing = False

    # -- the commit round, on a pool thread --------------------------------------------

    def _round(self, files: list[_File]) -> list[_Commit]:
        """Write what waits for each of ``files``, then make it all durable together.

        Never raises: whatever goes wrong is handed to the waiters of the files it concerns,
        so none is left hanging, and the other files of the round go on.
        """
        commits = []
        created: list[_File] = []
        # One lock order for every process: two rounds never wait for each other in a circle.
        for f in sorted(files, key=lambda f: f.name):
            # Appends that arrived after this round began may have been taken by it already.
            if f.batch.appends:
                commits.append(self._lock(f, created))
        if created and self.fsync:
            # New names are durable only once the directory is synced: once for all, before any
            # answer, and before the lock of a new file is let go for another worker to use it.
            try:
                os.fsync(self._dir_fd)
            except OSError as exc:
                for commit in commits:
                    if commit.file in created:
                        commit.fail("sync", exc)
        requests_dir = self._requests_dir_for(commits)
        for commit in commits:
            if commit.error is None:
                self._prepare(commit, requests_dir)
        started = time.perf_counter()
        if self.fsync:
            # The records before any data is written: no data can reach the disk ahead of its record.
            self._make_durable([(c, c.file.requests.fd) for c in commits if c.error is None and c.records])
        for commit in commits:
            if commit.error is None:
                try:
                    write_whole(commit.fd, commit.data, self._quick_write(commit))
                except Exception as exc:
                    commit.fail("write", exc)
                else:
                    self._note_time(commit.file, commit.fd, commit.size)
        synced = None
        if self.fsync:
            self._make_durable([(c, c.fd) for c in commits if c.error is None])
            synced = time.perf_counter() - started
        for commit in commits:
            self._end(commit)
        stored = [c for c in commits if c.error is None]
        if stored:
            appends = sum(len(c.batch.appends) if c.results is None else c.results.count(Appended.STORED) for c in stored)
            self.observer.committed(appends, sum(len(c.data) for c in stored), synced)
        return commits

    def _quick_write(self, commit: _Commit) -> Callable[[int, bytes], int] | None:
        """:func:`quickcalls.write` for the common commit, small and without records; None for
        ``os.write``. A commit with records has let go of the GIL for their write and sync anyway."""
        if self._quick and not commit.records and len(commit.data) <= quickcalls.WRITE_MAX:
            return quickcalls.write
        return None

    def _lock(self, f: _File, created: list[_File]) -> _Commit:
        """Open and lock the file, and take its batch; a file that had to be created is added to ``created``."""
        try:
            fd, size = self._locked(f, created)
        except OSError as exc:
            commit = _Commit(f, -1)
            commit.batch = f.take()
            commit.fail("open", exc)
            return commit
        commit = _Commit(f, fd)
        commit.size = size
        # Taken only now that the lock is held: appends that came in while another worker
        # held it join this commit instead of waiting for the next one.
        commit.batch = f.take()
        return commit

    def _requests_dir_for(self, commits: list[_Commit]) -> int | None:
        """``.leitstand/requests``, looked for with every lock of the round held, so that no
        record another worker wrote for one of its files can be missed; made if a commit needs
        a record. If it cannot be made, those commits fail and the others go on."""
        recorded = [c for c in commits if c.error is None and c.batch.recorded]
        try:
            return self._requests_dir_fd(create=bool(recorded))
        except OSError as exc:
            for commit in recorded:
                commit.fail("write", exc)
        try:
            return self._requests_dir_fd(create=False)
        except OSError as exc:
            for commit in commits:
                if commit.error is None:
                    commit.fail("write", exc)
            return None

    def _prepare(self, commit: _Commit, requests_dir: int | None) -> None:
        """Make sure the file holds only whole requests, decide what to write, and write the
        records it needs (not yet synced)."""
        f, batch = commit.file, commit.batch
        try:
            if requests_dir is not None or commit.size != f.end:
                # Someone else appended (another worker), or this is the first look.
                commit.size = self._recover(f, commit.fd, commit.size, requests_dir)
            if batch.recorded:
                assert requests_dir is not None
                commit.data, commit.results, commit.records = self._decide(commit.size, batch.appends)
                if commit.records:
                    records = b"".join(RECORD.pack(*r) for r in commit.records)
                    f.requests.write(requests_dir, records, self.fsync)
                    commit.requests_dir = requests_dir
            else:
                commit.data = b"".join([append[0] for append in batch.appends])
        except Exception as exc:
            commit.fail("write", exc)

    def _make_durable(self, files: list[tuple[_Commit, int | None]]) -> None:
        """Sync each file written for a commit: one syncfs for many, else one fdatasync each.

        A failed syncfs cannot tell whose data it lost, so every commit it covered fails.
        """
        if self.syncfs and len(files) >= SYNCFS_FROM:
            try:
                _syncfs(self._dir_fd)
            except OSError as exc:
                for commit, _ in files:
                    commit.fail("sync", exc)
            return
        for commit, fd in files:
            try:
                assert fd is not None
                os.fdatasync(fd)
            except OSError as exc:
                commit.fail("sync", exc)

    def _end(self, commit: _Commit) -> None:
        """Keep what the commit wrote, or roll it back; then let go of the file's lock."""
        f = commit.file
        if commit.fd < 0:
            return
        if commit.error is not None:
            if commit.records:
                f.requests.roll_back()
            self._roll_back(f, commit.size)
            return
        f.end = commit.size + len(commit.data)
        if commit.records:
            assert commit.requests_dir is not None
            f.requests.committed(len(commit.records) * RECORD.size)
            records = commit.records
            self.keys.add(((when, key, lines) for when, key, lines, _, _ in records if key != NO_KEY), time.time())
            try:
                f.requests.compact(commit.requests_dir, self.keys, self.fsync)
            except OSError as exc:
                # The old request log stays; the next commit of this file tries again.
                log.error("request log compaction failed: file=%s error=%s", f.requests.name, exc.strerror)
        if self._quick:
            quickcalls.unlock(commit.fd)
        else:
            fcntl.flock(commit.fd, fcntl.LOCK_UN)

    def _decide(self, size: int, appends: list[_Append]) -> tuple[bytes, list[Appended], list[_Record]]:
        """What to write (appends without a key, and keys new within the window), what became of
        each append, and the records for those written that need one."""
        now = time.time()
        results = [Appended.STORED] * len(appends)
        kept: list[bytes] = []
        records: list[_Record] = []
        in_batch: dict[bytes, bytes] = {}
        end = size
        for n, (data, _, hashed, recorded) in enumerate(appends):
            key = lines = NO_KEY
            if hashed is not None:
                key, lines = hashed
                known = in_batch.get(key) or self.keys.find(key, now)
                if known is not None:
                    results[n] = Appended.DUPLICATE if known == lines else Appended.CONFLICT
                    continue
                in_batch[key] = lines
            start, end = end, end + len(data)
            if recorded:
                records.append((now, key, lines, start, end))
            kept.append(data)
        return b"".join(kept), results, records

    def _note_time(self, f: _File, fd: int, offset: int) -> None:
        """The time index learns of the first commit of a second; it is a hint, so a failure costs no
        commit (and is tried again the next second)."""
        now = time.time()
        if int(now) <= f.times.second:
            return
        try:
            f.times.note(self._times_dir_fd(), fd, offset, now, self._quick)
        except OSError as exc:
            f.times.second = int(now)
            log.error("time index not written: file=%s error=%s", f.times.name, exc.strerror)

    def _times_dir_fd(self) -> int:
        if self._times_dir is None:
            with self._requests_dir_lock:
                if self._times_dir is None:
                    times_dir = open_times_dir(self._dir_fd, create=True)
                    assert times_dir is not None
                    self._times_dir = times_dir
        return self._times_dir

    def _requests_dir_fd(self, create: bool) -> int | None:
        """``.leitstand/requests``, opened once it exists (made by the first record, here or in another
        worker). Until then each round looks for it: one ``open`` in ``.leitstand``, kept open for that."""
        if self._requests_dir is None:
            with self._requests_dir_lock:
                if self._requests_dir is None:
                    if self._state_dir is None:
                        self._state_dir = open_dir(self._dir_fd, STATE_DIR, create, self.fsync)
                    if self._state_dir is not None:
                        self._requests_dir = open_dir(self._state_dir, REQUESTS_DIR, create, self.fsync)
        return self._requests_dir

    def _locked(self, f: _File, created: list[_File]) -> tuple[int, int]:
        """Lock the file ``f`` for a commit, opening it if need be (a file that had to be created is
        added to ``created``); returns its descriptor, which is then the file under the name ``f.name``,
        and the file's length.

        A descriptor of a file sealed since it was opened (or renamed or removed from outside) is
        closed and the name opened anew, so nothing is ever appended to a segment: checked under
        the lock, as a seal renames under it, for the cost of one ``stat`` per commit. The request
        log is read anew too: what this process read of it may name the old file, and at the new
        file's length any such record is cut off (a seal has left none, see :meth:`seal`); so is
        its time index, whose header then names another file.
        """
        while True:
            if f.fd is None:
                f.fd, new, f.identity = self._open_file(f.name)
                f.end = -1
                self.observer.opened(1)
                if new:
                    created.append(f)
            fd = f.fd
            if not (self._quick and quickcalls.try_lock(fd)):
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = self._named_size(f, fd)
                if size is not None:
                    return fd, size
            except BaseException:
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise
            log.info("file replaced under its name, reopened: file=%s", f.name)
            _close_all(self._release(f))
            f.fd = None

    def _named_size(self, f: _File, fd: int) -> int | None:
        """The length of ``f``'s file, open as ``fd``, if its name still names it; else None.

        One ``stat`` of the name against the identity the descriptor was opened with gives both
        the check and the length the commit starts from (see :mod:`leitstand.storage.quickcalls`
        for why a round makes as few calls per file as it can). While ``fd`` is open, its inode
        number cannot go to another file.
        """
        if self._quick:
            found = quickcalls.stat(self._dir_fd, f.name)
            return found[1] if found is not None and found[0] == f.identity else None
        held = self._held(fd, f.name, f.identity)
        return None if held is None else held.st_size

    def _held(self, fd: int, name: str, identity: tuple[int, int] | None = None) -> os.stat_result | None:
        """The status of the file open as ``fd`` if ``name`` names it, else None; ``identity``, the
        one ``fd`` was opened with, spares an ``fstat``."""
        try:
            named = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return named if _identity(named) == (identity or _identity(os.fstat(fd))) else None

    # -- sealing -----------------------------------------------------------------------

    def seal(self, name: str, due: Callable[[int], bool] = lambda fd: True) -> str | None:
        """Rename the journal file ``name`` to a new segment if it holds any request and ``due`` (given
        its descriptor) says so; returns the segment's name, or None. Blocks while a commit runs.

        Under the file's exclusive lock, so atomic towards every writer in every process: the file
        is first cut back to whole requests (:meth:`_recover`), then its request log keeps only
        the keys, at offset 0 (:meth:`RequestLog.forget_offsets`), synced, and only then the file
        is renamed and the directory synced. A crash between the steps leaves either the old file
        with keys that fit any length, or the segment and no file: never a record that names the
        segment and could cut the next file. Writers see the new name under the lock
        (:meth:`_lock`) and open a new file; the next file is made by the next append.
        """
        f = _File(name)
        while True:
            try:
                fd = os.open(name, _OPEN_FLAGS, dir_fd=self._dir_fd)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = self._held(fd, name)
                regular = stat.S_ISREG((held or os.fstat(fd)).st_mode)
            except BaseException:
                os.close(fd)
                raise
            if held is not None and regular:
                break
            os.close(fd)
            if not regular:
                return None  # a FIFO or device planted under the name: no journal file to seal
            # Otherwise sealed by another process meanwhile: look again.
        try:
            requests_dir = self._requests_dir_fd(create=False)
            size = self._recover(f, fd, held.st_size, requests_dir)
            if not size or not due(fd):
                return None
            if requests_dir is not None:
                f.requests.forget_offsets(requests_dir, self.keys, self.fsync)
            segment = segments.new_name(name, segments.of(self._dir_fd, name), time.time())
            os.rename(name, segment, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self._seal_times(name, segment)
            if self.fsync:
                os.fsync(self._dir_fd)
        finally:
            # Closing the descriptor releases the lock.
            _close_all([fd, *f.requests.close()])
        log.info("sealed: file=%s segment=%s bytes=%d", name, segment, size)
        self.observer.sealed(size)
        return segment

    def _seal_times(self, name: str, segment: str) -> None:
        """The time index of ``name`` becomes the segment's (its header names the segment's inode).

        A hint, like every index write: if it fails, or a crash comes first, the segment is read
        by its seal time instead, and the next file under ``name`` starts an index of its own."""
        try:
            times_dir = self._times_dir if self._times_dir is not None else open_times_dir(self._dir_fd, create=False)
            if times_dir is None:
                return
            try:
                os.rename(index_name(name), index_name(segment), src_dir_fd=times_dir, dst_dir_fd=times_dir)
            finally:
                if times_dir != self._times_dir:
                    os.close(times_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("time index not kept for the segment: file=%s error=%s", name, exc.strerror)

    def _open_file(self, name: str) -> tuple[int, bool, tuple[int, int]]:
        """The file's descriptor, whether it was created (its name is durable only once the
        directory is synced, which the round does once for all it created), and its identity."""
        new = False
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=self._dir_fd)
        except FileNotFoundError:
            fd, new = os.open(name, _OPEN_FLAGS | os.O_CREAT, self.file_mode, dir_fd=self._dir_fd), True
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            # A FIFO or device planted under the name: never write into it.
            os.close(fd)
            raise OSError(errno.EISDIR, "not a regular file")
        return fd, new, _identity(status)

    def _roll_back(self, f: _File, good: int) -> None:
        """Cut the file back to ``good`` bytes while this commit still holds its lock.

        The cut goes through a fresh descriptor of the same inode (``/proc/self/fd``, so a
        renamed file is cut, not a new one made), because the old descriptor is not trusted
        after a failed sync; through the old one only if no fresh one can be had. Neither is
        kept: the next commit opens the file by name and looks at its tail first.
        """
        old, f.fd, f.end = f.fd, None, -1
        assert old is not None
        self.observer.opened(-1)
        fresh = -1
        try:
            fresh = os.open(f"/proc/self/fd/{old}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            pass
        try:
            if good >= 0:
                cut = fresh if fresh >= 0 else old
                os.ftruncate(cut, good)
                os.fsync(cut)
        except OSError as exc:
            log.error("rollback failed, the failed batch may stay in the file: file=%s error=%s", f.name, exc.strerror)
        finally:
            _close_all([fd for fd in (fresh, old) if fd >= 0])

    def _recover(self, f: _File, fd: int, size: int, requests_dir: int | None) -> int:
        """Make sure the file ``f`` has locked holds only whole requests; returns its good length.

        After a crash, the request log tells where a request that reached the disk only in part
        begins, and a fragment after the last ``\\n`` is a torn line. Whatever is cut off is
        copied to ``<name>.torn-<UTC time>`` first, never deleted, and the file is cut back and
        synced before the records that named it go and anything is appended.
        """
        good = size
        if requests_dir is not None:
            good = f.requests.catch_up(requests_dir, size, self.keys)
        if good == size != f.end and size and os.pread(fd, 1, size - 1) != b"\n":
            good = last_line_end(fd, size)
        if good < size:
            torn, whole_lines = self._set_aside(fd, f.name, good, size)
            os.ftruncate(fd, good)
            os.fsync(fd)
            self.observer.repaired()
            what = "partial request" if whole_lines else "torn tail"
            log.warning("%s set aside: file=%s bytes=%d kept_as=%s", what, f.name, size - good, torn)
        f.requests.trim()
        return good

    def _set_aside(self, fd: int, name: str, start: int, end: int) -> tuple[str, bool]:
        """Copy the bytes from ``start`` to ``end`` to a new ``<name>.torn-<UTC time>``; returns its
        name, and whether they hold a whole line."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1000):
            tail = f".torn-{stamp}" + (f"-{n}" if n else "")
            # A name at the filesystem's limit is cut down to make room (see datadir.kind_of).
            torn = name[: NAME_MAX - len(tail)] + tail
            try:
                out = os.open(torn, _NEW_FILE_FLAGS, 0o600, dir_fd=self._dir_fd)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free name for the torn tail")
        whole_lines = False
        try:
            for chunk in read_range(fd, start, end):
                whole_lines = whole_lines or b"\n" in chunk
                write_whole(out, chunk)
            os.fsync(out)
        finally:
            os.close(out)
        os.fsync(self._dir_fd)
        return torn, whole_lines


def repair(directory: Path) -> dict[str, int]:
    """Set torn lines and requests cut short aside exactly as the server does when it starts; returns
    the bytes set aside per file.

    Safe while a server runs: each file is locked the way a commit locks it.
    """
    with _beside_servers(Journal(directory)) as journal:
        return journal._open_directory()


def seal(directory: Path, names: Iterable[str], *, key_window: float, max_keys: int, fsync: bool = True
         ) -> dict[str, str | None]:
    """``leitstand rotate``: seal each journal file of ``names`` that holds a request, as the server
    does; returns each one's segment (None: it was empty or missing). Safe while servers run."""
    with _beside_servers(Journal(directory, fsync=fsync, key_window=key_window, max_keys=max_keys)) as journal:
        journal._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return {name: journal.seal(name) for name in names}


@contextmanager
def _beside_servers(journal: Journal) -> Iterator[Journal]:
    """A journal used for one operator command, without an event loop; its descriptors closed after."""
    try:
        yield journal
    finally:
        state = (journal._dir_fd, journal._requests_dir, journal._times_dir)
        _close_all([fd for fd in state if fd is not None and fd >= 0])
        journal._executor.shutdown()


def last_line_end(fd: int, size: int, count: int = 1) -> int:
    """The offset just after the ``count``-th ``\\n`` back from ``size``, or 0 if there are fewer."""
    pos = size
    while pos > 0:
        start = max(0, pos - CHUNK)
        chunk = os.pread(fd, pos - start, start)
        index = len(chunk)
        while (index := chunk.rfind(b"\n", 0, index)) >= 0:
            count -= 1
            if count == 0:
                return start + index + 1
        pos = start
    return 0


# Descriptors beyond the journal's own: sockets, the request logs' directory, the pool's, the runtime's.
_SPARE_DESCRIPTORS = 1024
# What one open journal file may hold: its data, its request log and its time index.
_DESCRIPTORS_PER_FILE = 3


def _allow_descriptors(files: int) -> int:
    """How many descriptors ``files`` journal files may hold together: three each (their data,
    request log and time index), with the process's descriptor limit raised to fit them, up to
    the hard limit.

    Below what is needed, what the limit leaves beside the spare descriptors: the least
    recently used files are then closed sooner (said once there are more), slower with very
    many domains, never wrong.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _DESCRIPTORS_PER_FILE * files
    need = wanted + _SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        return max(_DESCRIPTORS_PER_FILE, soft - _SPARE_DESCRIPTORS)
    return wanted


def syncfs_works(directory: Path, filesystem: str | None = None) -> bool:
    """Whether one ``syncfs`` makes every file of ``directory``'s filesystem (of type ``filesystem``
    if known) durable and reports a failure: Linux 5.8 or later (before, it hid write-back
    errors) on a filesystem known to."""
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    filesystem = filesystem or filesystem_type(directory)
    return (major, minor) >= (5, 8) and filesystem in _SYNCFS_FILESYSTEMS and _libc() is not None


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` is on, from /proc/self/mountinfo: the mount with the
    longest mount point that ``path`` lies under."""
    real = os.path.realpath(path)
    found, longest = None, -1
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
            for line in mounts:
                fields, _, rest = line.partition(" - ")
                # Blanks and backslashes in the mount point are escaped as octal.
                point = fields.split()[4].encode().decode("unicode_escape")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) > longest:
                    found, longest = rest.split()[0], len(point)
    except OSError:
        return None
    return found


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _LIBC.append(libc if hasattr(libc, "syncfs") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _syncfs(fd: int) -> None:
    libc = _libc()
    assert libc is not None
    if libc.syncfs(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _journal_error(name: str, action: str, exc: OSError) -> JournalError:
    if exc.errno in _REFUSED:
        log.error("%s refused: file=%s is not a regular file (a symlink?); move it out of the data dir", action, name)
        return StorageRefused(exc.strerror or str(exc))
    log.error("%s failed: file=%s error=%s", action, name, exc.strerror or exc)
    kind = StorageFull if exc.errno in _FULL else StorageUnavailable
    return kind(exc.strerror or str(exc))
