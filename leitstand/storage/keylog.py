"""Where requests end, as the journal keeps it: a request log per journal file, and a bounded key index.

Why it is built this way:

* **A request log per journal file**, ``<data dir>/.leitstand/requests/<name>.log``:
  fixed-size binary records, one per request that needs one: every request with an
  idempotency key, and every request of more than one line. A record holds the commit time,
  a hash of file name and key, a hash of the stored lines (both zero without a key), and the
  offsets where the request's lines start and end in the journal file. The file name is in
  the key's hash, so the same key in two domains is two keys.
* **Records go in before the data**, in the same commit and under the journal file's lock:
  written and synced before the data is written, so no data reaches the disk without its
  record, not even by write-back before a power cut. A record counts only if the journal
  file is at least as long as its end. After a crash, the first record whose data is not
  all in the file marks a request cut short: the journal cuts the file back to that
  record's start (setting the cut part aside) and the record goes. So every request is on
  disk whole or not at all, and a retry finds its key exactly when its events are in the
  file. Requests of one line without a key need no record: a line is whole or torn.
* **Across a seal.** A request log describes the live file under its name. Before the file
  is sealed into a segment, its log is rewritten with only the keys, each at start = end = 0
  (:meth:`RequestLog.forget_offsets`), which every length of the next file holds whole: the
  keys stay known in every process and after a restart, and no offset into the segment is
  ever taken for one into the next file.
* **Bounded.** The index holds at most ``max_keys`` keys (the oldest go first: a retry of an
  evicted key stores again) and forgets keys older than the window. A request log is
  rewritten (tmp, fsync, rename, directory fsync) once it doubles, keeping only the keys
  the index may still need.

Nothing here knows HTTP; keys are bytes.
"""

from __future__ import annotations

import array
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

from leitstand.storage.durable import fitting, write_whole

log = logging.getLogger("leitstand.journal")

STATE_DIR = ".leitstand"
REQUESTS_DIR = "requests"
SUFFIX = ".log"
# time (float seconds), hash of name and key, hash of the stored lines, where the lines start and end.
RECORD = struct.Struct("<d16s16sQQ")
# What compaction looks at: the time and the key hash at the start of a record.
_WHEN_KEY = struct.Struct("<d16s")
# A record up to its offsets: what is kept of it when the offsets go.
_NO_OFFSETS = struct.calcsize("<d16s16s")
# The key and lines hash of a request without a key.
NO_KEY = bytes(16)
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
# A request log is compacted when it passes twice its size after the last compaction, or this.
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


class RequestLog:
    """The request log of one journal file, as far as this process has read and checked it.

    Every method runs on a commit thread while the commit holds the journal file's lock.
    """

    __slots__ = ("compact_at", "end", "fd", "inode", "name", "size")

    def __init__(self, journal_name: str) -> None:
        self.name = log_name(journal_name)
        self.fd: int | None = None
        self.inode = -1
        # How far this process has read and checked the log, and how long it found it.
        self.end = 0
        self.size = 0
        self.compact_at = COMPACT_AT

    def close(self) -> list[int]:
        """The descriptor to close, if any; the next commit opens the log afresh."""
        fd, self.fd, self.inode, self.end, self.size = self.fd, None, -1, 0, 0
        return [] if fd is None else [fd]

    def _close(self) -> None:
        for fd in self.close():
            os.close(fd)

    def catch_up(self, requests_dir: int, data_length: int, index: KeyIndex) -> int:
        """Read what other processes appended since this one last looked; returns how much of the
        journal file (``data_length`` long) holds whole requests.

        That is all of it, unless a crash cut a commit short: then it is the start of the first
        request whose lines are not all in the file. The records from that one on are left for
        :meth:`trim`, which the caller runs once the journal file is cut back to match.
        """
        try:
            st = os.stat(self.name, dir_fd=requests_dir, follow_symlinks=False)
        except FileNotFoundError:
            self._close()
            return data_length
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EISDIR, "request log is not a regular file")
        if st.st_ino != self.inode or st.st_size < self.end:
            # Compacted by another process (a new file), or cut below what this one read.
            self._close()
            self.fd = os.open(self.name, _OPEN_FLAGS, dir_fd=requests_dir)
            self.inode = os.fstat(self.fd).st_ino
        assert self.fd is not None
        self.size = st.st_size
        if self.size == self.end:
            return data_length
        whole = self.end + (self.size - self.end) // RECORD.size * RECORD.size
        records = os.pread(self.fd, whole - self.end, self.end)
        taken, whole_requests = _take(records, data_length)
        index.add(((when, key, lines) for when, key, lines, _, _ in RECORD.iter_unpack(records[:taken])
                   if key != NO_KEY), time.time())
        self.end += taken
        return whole_requests

    def trim(self) -> None:
        """Cut off what :meth:`catch_up` did not take: records whose data is not in the journal file, and
        a torn record. Synced before anything is appended, so that no stale record can come back and
        seem to vouch for data appended after it."""
        if self.fd is None or self.size == self.end:
            return
        dropped = (self.size - self.end) // RECORD.size
        os.ftruncate(self.fd, self.end)
        os.fsync(self.fd)
        self.size = self.end
        if dropped:
            log.info("request log cut back: file=%s records_without_data=%d", self.name, dropped)

    def write(self, requests_dir: int, records: bytes, fsync: bool) -> None:
        """Append ``records`` (one ``write``); they count only once the data they name is in the journal file."""
        if self.fd is None:
            self.fd = os.open(self.name, _OPEN_FLAGS | os.O_CREAT, 0o600, dir_fd=requests_dir)
            self.inode = os.fstat(self.fd).st_ino
            if fsync:
                os.fsync(requests_dir)
        write_whole(self.fd, records)

    def sync(self) -> None:
        assert self.fd is not None
        os.fdatasync(self.fd)

    def committed(self, nbytes: int) -> None:
        self.end += nbytes
        self.size = self.end

    def roll_back(self) -> None:
        """Cut the log back to what was checked; if that fails, the next commit's :meth:`catch_up` does it."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, self.end)
            os.fsync(self.fd)
        except OSError as exc:
            log.error("request log rollback failed, the next commit cuts it: file=%s error=%s", self.name, exc.strerror)
        self._close()

    def compact(self, requests_dir: int, index: KeyIndex, fsync: bool) -> None:
        """Once the log has doubled, rewrite it with only the keys the index may still need.

        Records of requests without a key matter only while their commit is under way; this
        runs after it."""
        if self.end < self.compact_at or self.fd is None:
            return
        kept = self._kept(index, RECORD.size)
        self._rewrite(requests_dir, kept, fsync)
        log.info("request log compacted: file=%s keys=%d", self.name, len(kept) // RECORD.size)

    def forget_offsets(self, requests_dir: int, index: KeyIndex, fsync: bool) -> None:
        """Before the journal file is sealed: keep only the keys the index may still need, each at
        start = end = 0, which every length of the next journal file holds whole.

        The offsets name the file about to become a segment; kept, they would be taken for offsets
        into the next file under the name, and cut it. The keys stay known, in every process and
        after a restart, for the rest of their window. Runs under the lock of a journal file that
        holds only whole requests, so no offset is needed any more."""
        if self.fd is None:
            return
        self._rewrite(requests_dir, self._kept(index, _NO_OFFSETS), fsync)

    def _kept(self, index: KeyIndex, keep: int) -> bytes:
        """The records the index may still need (with a key, inside the window, the newest
        ``max_keys``), in order, each cut to its first ``keep`` bytes and padded with zeros.

        Read from the newest back, without a tuple per record: a log about to be compacted
        holds twice the keys the index keeps, and a tuple for each of them cost tens of MiB
        and held the GIL, which the event loop needs, for up to 190 ms."""
        assert self.fd is not None
        records = os.pread(self.fd, self.end, 0)
        horizon = time.time() - index.window
        starts = array.array("Q")
        for start in range((len(records) // RECORD.size - 1) * RECORD.size, -1, -RECORD.size):
            if len(starts) == index.max_keys:
                break
            when, key = _WHEN_KEY.unpack_from(records, start)
            if key != NO_KEY and when > horizon:
                starts.append(start)
        padding = bytes(RECORD.size - keep)
        kept = bytearray()
        for start in reversed(starts):
            kept += records[start : start + keep]
            kept += padding
        return bytes(kept)

    def _rewrite(self, requests_dir: int, packed: bytes, fsync: bool) -> None:
        """Replace the log by the records ``packed``, atomically: tmp, fsync, rename, directory fsync."""
        tmp = f".{self.name}.tmp"
        fd = os.open(tmp, _OPEN_FLAGS | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=requests_dir)
        try:
            write_whole(fd, packed)
            if fsync:
                os.fsync(fd)
            os.rename(tmp, self.name, src_dir_fd=requests_dir, dst_dir_fd=requests_dir)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=requests_dir)
            raise
        if fsync:
            os.fsync(requests_dir)
        self._close()
        self.fd, self.inode, self.end = fd, os.fstat(fd).st_ino, len(packed)
        self.size = self.end
        self.compact_at = max(COMPACT_AT, 2 * len(packed))


def _take(records: bytes, data_length: int) -> tuple[int, int]:
    """How many bytes of ``records`` (whole records) name data that is all in a journal file of
    ``data_length`` bytes, and how much of that file holds whole requests."""
    taken = 0
    for _, _, _, start, end in RECORD.iter_unpack(records):
        if end > data_length:
            return taken, min(start, data_length)
        taken += RECORD.size
    return taken, data_length


def whole_requests(requests_dir: int, journal_name: str, data_length: int) -> int:
    """How much of a journal file ``data_length`` long holds whole requests, by its request log,
    read without changing it: all of it, unless a crash cut a request short and no commit has
    cut that request off yet. The caller holds the journal file's lock, shared."""
    try:
        fd = os.open(log_name(journal_name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=requests_dir)
    except FileNotFoundError:
        return data_length
    try:
        size = os.fstat(fd).st_size
        records = os.pread(fd, size // RECORD.size * RECORD.size, 0)
    finally:
        os.close(fd)
    return _take(records, data_length)[1]


def log_name(journal_name: str, suffix: str = SUFFIX) -> str:
    """``<journal name>.log`` (or another side file's ``suffix``); a digest of the journal name
    instead where that name, or the ``.<name>.tmp`` that compaction writes, would be too long
    for the filesystem."""
    return fitting(journal_name, suffix)


def open_requests_dir(data_dir: int, create: bool, fsync: bool) -> int | None:
    """The descriptor of ``.leitstand/requests`` inside the data dir, never through a symbolic link;
    None if it does not exist and ``create`` is false."""
    return open_state_dir(data_dir, REQUESTS_DIR, create, fsync)


def open_state_dir(data_dir: int, name: str, create: bool, fsync: bool) -> int | None:
    """The descriptor of ``.leitstand/<name>`` inside the data dir, never through a symbolic link;
    None if it does not exist and ``create`` is false."""
    state = open_dir(data_dir, STATE_DIR, create, fsync)
    if state is None:
        return None
    try:
        return open_dir(state, name, create, fsync)
    finally:
        os.close(state)


def open_dir(parent: int, name: str, create: bool, fsync: bool) -> int | None:
    """The descriptor of the directory ``name`` in ``parent``, never through a symbolic link; made
    if ``create``, else None if it does not exist."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as exc:
        # Something else under the name (a symlink, a file): no request log can be behind it, so
        # appends that need no record go on; one that needs a record is refused.
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
