"""Idempotency keys as the journal keeps them: a key log per journal file, and a bounded index.

Why it is built this way:

* **One key log per journal file**, ``<data dir>/.leitstand/keys/<name>.keys``: fixed-size
  binary records (commit time, hash of file name and key, hash of the stored lines, and the
  length the journal file has once those lines are in it). The file name is in the hash, so
  the same key in two domains is two keys.
* **Records go in before the data**, in the same commit and under the journal file's lock:
  written and synced before the data is written, so no data reaches the disk without its
  key, not even by write-back before a power cut. A record counts only if the journal file
  is at least as long as the record says; a record whose data never arrived (a crash
  between the two writes, a rolled-back commit) is cut off by the next commit, before
  anything is appended that could make it look true. So a crash at any moment neither loses
  an event nor lets a retry store it twice: the retry finds its key exactly when its events
  are in the file. (Syncing both files at once instead is about 10-25% faster with keys,
  measured, but a power cut can then keep events without their key.)
* **Bounded.** The index holds at most ``max_keys`` keys (the oldest go first: a retry of an
  evicted key stores again) and forgets keys older than the window. A key log is rewritten
  (tmp, fsync, rename, directory fsync) once it doubles, keeping only what the index may
  still need.

Nothing here knows HTTP; keys are bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from leitstand.storage.durable import write_whole

log = logging.getLogger("leitstand.journal")

STATE_DIR = ".leitstand"
KEYS_DIR = "keys"
SUFFIX = ".keys"
# time (float seconds), hash of name and key, hash of the stored lines, journal length after them.
RECORD = struct.Struct("<d16s16sQ")
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
# A key log is compacted when it passes twice its size after the last compaction, or this.
COMPACT_AT = 1 << 20
# How often an eviction of a key still inside the window is logged.
_EVICTION_WARNING_EVERY = 60.0


def key_hash(name: str, key: bytes) -> bytes:
    return hashlib.blake2b(name.encode() + b"\0" + key, digest_size=16).digest()


def lines_hash(lines: bytes) -> bytes:
    return hashlib.blake2b(lines, digest_size=16).digest()


class KeyIndex:
    """Keys seen within the window, across all journal files of a process: hash -> (time, lines hash).

    Only keys whose records are on disk and whose data is in the file are in here; it is
    shared by the event loop (a quick look before a commit) and the commit threads.
    """

    def __init__(self, window: float, max_keys: int) -> None:
        self.window = window
        self.max_keys = max_keys
        self._keys: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._warned = 0.0

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, key: bytes, now: float) -> bytes | None:
        """The lines hash stored under ``key`` within the window, or None."""
        with self._lock:
            found = self._keys.get(key)
        return found[1] if found is not None and found[0] > now - self.window else None

    def add(self, records: Iterable[tuple[float, bytes, bytes]], now: float) -> None:
        horizon = now - self.window
        with self._lock:
            keys = self._keys
            for when, key, lines in records:
                if when > horizon:
                    keys[key] = (when, lines)
                    keys.move_to_end(key)
            while keys and (len(keys) > self.max_keys or next(iter(keys.values()))[0] <= horizon):
                _, (when, _) = keys.popitem(last=False)
                if when > horizon and now - self._warned > _EVICTION_WARNING_EVERY:
                    self._warned = now
                    log.warning(
                        "idempotency key evicted inside the window: a retry of it stores again; "
                        "raise LEITSTAND_IDEMPOTENCY_MAX_KEYS (now %d)", self.max_keys
                    )


class KeyLog:
    """The key log of one journal file, as far as this process has read and checked it.

    Every method runs on a commit thread while the commit holds the journal file's lock.
    """

    __slots__ = ("compact_at", "end", "fd", "inode", "name")

    def __init__(self, journal_name: str) -> None:
        self.name = journal_name + SUFFIX
        self.fd: int | None = None
        self.inode = -1
        # How far this process has read and checked the key log.
        self.end = 0
        self.compact_at = COMPACT_AT

    def close(self) -> list[int]:
        """The descriptor to close, if any; the next commit opens the log afresh."""
        fd, self.fd, self.inode, self.end = self.fd, None, -1, 0
        return [] if fd is None else [fd]

    def _close(self) -> None:
        for fd in self.close():
            os.close(fd)

    def catch_up(self, keys_dir: int, data_length: int, index: KeyIndex) -> None:
        """Read what other processes appended since this one last looked, and cut off records whose data
        is not in the journal file (``data_length`` long, its torn tail already repaired)."""
        try:
            st = os.stat(self.name, dir_fd=keys_dir, follow_symlinks=False)
        except FileNotFoundError:
            self._close()
            return
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EISDIR, "key log is not a regular file")
        if st.st_ino != self.inode:
            self._close()
            self.fd = os.open(self.name, _OPEN_FLAGS, dir_fd=keys_dir)
            self.inode = os.fstat(self.fd).st_ino
        if st.st_size == self.end:
            return
        assert self.fd is not None
        size = os.fstat(self.fd).st_size
        whole = self.end + (size - self.end) // RECORD.size * RECORD.size
        data = os.pread(self.fd, whole - self.end, self.end)
        good = self.end
        records = []
        for when, key, lines, length in RECORD.iter_unpack(data):
            if length > data_length:
                break
            records.append((when, key, lines))
            good += RECORD.size
        if good != size:
            log.warning("key log cut back: file=%s records_without_data=%d", self.name, (size - good) // RECORD.size)
            os.ftruncate(self.fd, good)
            os.fsync(self.fd)
        index.add(records, time.time())
        self.end = good

    def write(self, keys_dir: int, records: bytes, fsync: bool) -> None:
        """Append ``records`` (one ``write``); they count only once the data they name is in the journal file."""
        if self.fd is None:
            self.fd = os.open(self.name, _OPEN_FLAGS | os.O_CREAT, 0o600, dir_fd=keys_dir)
            self.inode = os.fstat(self.fd).st_ino
            if fsync:
                os.fsync(keys_dir)
        write_whole(self.fd, records)

    def sync(self) -> None:
        assert self.fd is not None
        os.fdatasync(self.fd)

    def committed(self, nbytes: int) -> None:
        self.end += nbytes

    def roll_back(self) -> None:
        """Cut the log back to what was checked; if that fails, the next commit's :meth:`catch_up` does it."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, self.end)
            os.fsync(self.fd)
        except OSError as exc:
            log.error("key log rollback failed, the next commit cuts it: file=%s error=%s", self.name, exc.strerror)
        self._close()

    def compact(self, keys_dir: int, index: KeyIndex, fsync: bool) -> None:
        """Once the log has doubled, rewrite it with only the records the index may still need."""
        if self.end < self.compact_at or self.fd is None:
            return
        now = time.time()
        records = RECORD.iter_unpack(os.pread(self.fd, self.end, 0))
        kept = [r for r in records if r[0] > now - index.window][-index.max_keys:]
        packed = b"".join(RECORD.pack(*r) for r in kept)
        tmp = f".{self.name}.tmp"
        fd = os.open(tmp, _OPEN_FLAGS | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=keys_dir)
        try:
            write_whole(fd, packed)
            if fsync:
                os.fsync(fd)
            os.rename(tmp, self.name, src_dir_fd=keys_dir, dst_dir_fd=keys_dir)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=keys_dir)
            raise
        if fsync:
            os.fsync(keys_dir)
        self._close()
        self.fd, self.inode, self.end = fd, os.fstat(fd).st_ino, len(packed)
        self.compact_at = max(COMPACT_AT, 2 * len(packed))
        log.info("key log compacted: file=%s records=%d", self.name, len(kept))


def open_keys_dir(data_dir: int, create: bool, fsync: bool) -> int | None:
    """The descriptor of ``.leitstand/keys`` inside the data dir, never through a symbolic link;
    None if it does not exist and ``create`` is false."""
    state = _open_dir(data_dir, STATE_DIR, create, fsync)
    if state is None:
        return None
    try:
        return _open_dir(state, KEYS_DIR, create, fsync)
    finally:
        os.close(state)


def _open_dir(parent: int, name: str, create: bool, fsync: bool) -> int | None:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as exc:
        # Something else under the name (a symlink, a file): no key log can be behind it, so
        # appends without a key go on; one with a key is refused.
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if create:
            log.error("state dir refused: %s in the data dir is not a directory (a symlink?); move it out", name)
            raise OSError(errno.ELOOP, "the state dir is not a directory") from None
        return None
    with contextlib.suppress(FileExistsError):  # another worker was first
        os.mkdir(name, 0o700, dir_fd=parent)
        if fsync:
            os.fsync(parent)
    return os.open(name, _DIR_FLAGS, dir_fd=parent)
