"""Rotation, compression and retention: live files sealed on schedule, segments compressed, old ones gone.

Why it is built this way:

* **Sealing** is the journal's (:meth:`Journal.seal`, under the file's lock); here is only
  when. Every process checks its data dir once a second and seals a live file that holds
  ``rotate_bytes`` or whose first event is ``rotate_interval`` old (its birth time, where
  the file system keeps one; else when this process first saw it hold anything). Two
  processes may find the same file due: the seal looks again under the lock.
* **Compression and retention** run in one process at a time: the one that holds
  ``.leitstand/housekeeping.lock`` for a pass (``flock``, not waited for). A segment is
  compressed into ``.leitstand/tmp/``, synced, read back and compared with the original
  byte for byte, its checksum recorded (:mod:`leitstand.storage.segments`), then
  renamed beside the original and the directory synced; only then is the original removed.
  A crash at any moment leaves the original whole, and the compressed file either whole
  under its name or not there at all (what is left in ``.leitstand/tmp/`` is removed by the
  next pass). A full disk leaves the original in place and logs one line.
* **Retention** never touches a live file. A segment is expired when its newest event is
  older than the retention of its domain (its seal time, or its last change if earlier);
  ``max_bytes`` bounds live and sealed bytes together, removing the oldest segments of any
  domain first. Removed means deleted, or moved into ``archive_dir``.
* Everything runs on threads of its own, off the event loop and off the journal's pool;
  the thread that compresses runs at the lowest CPU priority (``nice`` 19, which Linux keeps
  per thread), so that ingest comes first on a busy machine. It reads 1 MiB at a time:
  zstd and sha256 release the GIL for that long.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from leitstand.intake import domains
from leitstand.storage import datadir, durable, keylog, segments, timeindex
from leitstand.storage.journal import Journal, reason

log = logging.getLogger("leitstand.rotation")

CODECS = {"zstd": "zst", "gzip": "gz", "off": ""}
LOCK = "housekeeping.lock"
TMP_DIR = "tmp"
# How often each process looks for files to seal, and for segments to compress or remove.
EVERY = 1.0
# What the compressor reads at a time.
_READ = 1 << 20
# How long a segment whose compression failed is left alone before the next try.
_RETRY_FAILED = 60.0
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@dataclass(frozen=True)
class Retention:
    """How long segments are kept: ``default`` seconds, or the first matching ``rules``' (glob, seconds); None: forever."""

    default: float | None = None
    rules: tuple[tuple[str, float | None], ...] = ()

    def __bool__(self) -> bool:
        return self.default is not None or any(seconds is not None for _, seconds in self.rules)

    def of(self, domain: str) -> float | None:
        for pattern, seconds in self.rules:
            if fnmatchcase(domain, pattern):
                return seconds
        return self.default


@dataclass(frozen=True)
class Policy:
    """``LEITSTAND_ROTATE_*``, ``_COMPRESS``, ``_RETENTION*`` and ``_ARCHIVE_DIR``; None: off."""

    rotate_bytes: int | None = None
    rotate_interval: float | None = None
    # A segment's suffix: "zst", "gz", or "" for none.
    compress: str = "zst"
    retention: Retention = field(default_factory=Retention)
    max_bytes: int | None = None
    archive_dir: Path | None = None

    @property
    def rotates(self) -> bool:
        return self.rotate_bytes is not None or self.rotate_interval is not None


class Observer:
    """Told what housekeeping does (the metrics); this one ignores it."""

    def compressed(self, before: int, after: int) -> None:
        """A segment of ``before`` bytes was compressed to ``after``."""

    def removed(self, why: str, nbytes: int) -> None:
        """A segment of ``nbytes`` was removed (or moved to the archive dir) by retention, ``why``: age or size."""


class _Stopped(Exception):
    """Housekeeping was asked to stop in the middle of a compression."""


class Housekeeper:
    """Sealing on schedule, compression and retention for the journal files of one data dir."""

    def __init__(self, journal: Journal, policy: Policy, observer: Observer | None = None) -> None:
        self.journal = journal
        self.directory = journal.directory
        self.policy = policy
        self.observer = observer or Observer()
        self._state = self.directory / keylog.STATE_DIR
        # Where the file system keeps no birth time: when this process first saw a file hold anything.
        self._first_seen: dict[tuple[int, int], float] = {}
        self._failed: dict[str, float] = {}
        self._stop = threading.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- running -----------------------------------------------------------------------

    def start(self, *, rotate: bool = True) -> None:
        """Start the background loops; ``rotate=False`` for a caller that seals between its own writes."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._every(self.tidy, _background))]
        if rotate and self.policy.rotates:
            self._tasks.append(loop.create_task(self._every(self.rotate)))

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _every(self, work: Callable[[], None], setup: Callable[[], None] | None = None) -> None:
        """Run ``work`` every second on a thread of its own, set up by ``setup``."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="housekeeping", initializer=setup)
        try:
            while True:
                try:
                    await loop.run_in_executor(executor, work)
                except OSError as exc:
                    log.error("housekeeping failed, trying again: %s", reason(exc))
                await asyncio.sleep(EVERY)
        finally:
            # Lets a seal or a compression under way finish (a compression stops at its next chunk).
            await loop.run_in_executor(None, executor.shutdown)

    # -- sealing -----------------------------------------------------------------------

    def rotate(self, names: list[str] | None = None) -> None:
        """Seal every live file of ``names`` (default: :meth:`due`) that is due."""
        for name in self.due() if names is None else names:
            self.journal.seal(name, self._due)

    def due(self) -> list[str]:
        """The live files that hold ``rotate_bytes`` or are ``rotate_interval`` old."""
        found = []
        for name in datadir.journal_names(self.directory):
            try:
                fd = os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                if self._due(fd):
                    found.append(name)
            finally:
                os.close(fd)
        return found

    def _due(self, fd: int) -> bool:
        st = os.fstat(fd)
        if not st.st_size:
            return False
        if self.policy.rotate_bytes is not None and st.st_size >= self.policy.rotate_bytes:
            return True
        if self.policy.rotate_interval is None:
            return False
        born = datadir.birth_time(fd) or self._first_seen.setdefault((st.st_dev, st.st_ino), time.time())
        return time.time() - born >= self.policy.rotate_interval

    # -- compression and retention ---------------------------------------------------------

    def tidy(self) -> None:
        """One pass of compression and retention, unless another process is making one; a data dir with
        nothing to compress and no retention is left as it is."""
        retains = bool(self.policy.retention) or self.policy.max_bytes is not None
        if not retains and not (self.policy.compress and self._uncompressed()):
            return
        self._state.mkdir(mode=0o700, exist_ok=True)
        lock = os.open(self._state / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            # Whatever is in the tmp dir was left by a pass that did not finish: only the lock holder writes there.
            shutil.rmtree(self._state / TMP_DIR, ignore_errors=True)
            if self.policy.compress:
                for segment in self._uncompressed():
                    self.compress(segment)
            if retains:
                self.retain(time.time())
        finally:
            os.close(lock)

    def _uncompressed(self) -> list[segments.Segment]:
        """The plain segments, but those whose compression failed a moment ago."""
        now = time.time()
        return [s for s in datadir.sealed(self.directory) if not s.codec and self._failed.get(s.name, 0.0) < now]

    def compress(self, segment: segments.Segment) -> None:
        """Compress the plain ``segment``, keeping it unless the compressed one is whole; see the module docstring."""
        codec = self.policy.compress
        target = f"{segment.stem}.{codec}"
        source = self.directory / segment.name
        if (self.directory / target).exists():
            self._finish(source, target, codec)
            return
        tmp_dir = self._state / TMP_DIR
        self._state.mkdir(mode=0o700, exist_ok=True)
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = tmp_dir / durable.fitting(target, ".tmp")
        try:
            before, after, digest = self._write_compressed(source, tmp, codec)
            segments.record_checksum(self.directory, target, digest)
            st = os.stat(source, follow_symlinks=False)
            # The segment's last change stays its newest event's time, for retention and stats.
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.rename(tmp, self.directory / target)
            durable.sync_dir(self.directory)
        except _Stopped:
            tmp.unlink(missing_ok=True)
            return
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            segments.forget_checksum(self.directory, target)
            self._failed[segment.name] = time.time() + _RETRY_FAILED
            what = "no space left" if exc.errno in _FULL else reason(exc)
            log.error("compression failed, the segment stays uncompressed: file=%s error=%s", segment.name, what)
            return
        self._retire(source, segment.stem)
        durable.sync_dir(self.directory)
        self.observer.compressed(before, after)
        log.info("compressed: file=%s bytes=%d compressed=%d", target, before, after)

    def _write_compressed(self, source: Path, tmp: Path, codec: str) -> tuple[int, int, str]:
        """Write ``source`` compressed to ``tmp``, sync it, and read it back; returns the size before and
        after, and the SHA-256 of the compressed file."""
        written = hashlib.sha256()
        before = after = 0
        compressor = segments.compressor(codec)
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, self.journal.file_mode)
        try:
            for chunk in segments.chunks(source, "", _READ):
                if self._stop.is_set():
                    raise _Stopped
                before += len(chunk)
                piece = compressor.compress(chunk)
                written.update(piece)
                after += len(piece)
                durable.write_whole(out, piece)
            piece = compressor.flush()
            written.update(piece)
            after += len(piece)
            durable.write_whole(out, piece)
            os.fsync(out)
        finally:
            os.close(out)
        if not _same_content(source, tmp, codec):
            raise OSError(errno.EIO, "the compressed segment did not read back equal")
        return before, after, written.hexdigest()

    def _finish(self, source: Path, target: str, codec: str) -> None:
        """Both the original and the compressed file are there (a crash came between the rename and the
        removal): the original goes if the compressed one is the one recorded and holds the same."""
        compressed = self.directory / target
        recorded = segments.recorded_checksum(self.directory, target)
        try:
            same = recorded == segments.file_sha256(compressed) and _same_content(source, compressed, codec)
        except segments.CorruptSegment:
            same = False
        if not same:
            self._failed[source.name] = time.time() + _RETRY_FAILED
            log.error("compressed segment does not match its original, both kept: file=%s; "
                      "run leitstand verify, then remove the one that is wrong", target)
            return
        self._retire(source, source.name)
        durable.sync_dir(self.directory)

    def _retire(self, source: Path, stem: str) -> None:
        """Take the plain original away once the compressed segment stands in for it, but keep its inode,
        emptied, as ``.leitstand/segments/<stem>.inode``: read cursors name a file by its inode, and the
        compressed segment answers for the original's (its time index names it); while the anchor
        lives, no new live file can get that inode and be taken for the segment."""
        anchor = _anchor(self.directory, stem)
        anchor.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(source, anchor)
        os.truncate(anchor, 0)

    def retain(self, now: float) -> None:
        """Remove the segments past their domain's retention, then the oldest beyond ``max_bytes``."""
        kept = []
        for segment in datadir.sealed(self.directory):
            keep = self.policy.retention.of(segment.base.removesuffix(domains.SUFFIX))
            if keep is not None and now - self._newest(segment) > keep:
                self._remove(segment, "age")
            else:
                kept.append(segment)
        limit = self.policy.max_bytes
        if limit is None:
            return
        used = datadir.usage(self.directory)
        total = used.live + used.sealed
        for segment in kept:
            if total <= limit:
                break
            total -= self._remove(segment, "size")

    def _newest(self, segment: segments.Segment) -> float:
        try:
            changed = os.stat(self.directory / segment.name, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return segment.sealed
        return min(segment.sealed, changed)

    def _remove(self, segment: segments.Segment, why: str) -> int:
        """Remove every file of ``segment`` (or move it to the archive dir); returns the bytes freed."""
        freed = 0
        for suffix in ("", *segments.COMPRESSED):
            name = segment.stem + suffix
            path = self.directory / name
            try:
                size = os.stat(path, follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            if self.policy.archive_dir is not None:
                _move(path, self.policy.archive_dir / name)
            else:
                path.unlink()
            segments.forget_checksum(self.directory, name)
            freed += size
            self.observer.removed(why, size)
            where = "moved to the archive dir" if self.policy.archive_dir is not None else "removed"
            log.info("segment %s by retention: file=%s reason=%s bytes=%d", where, name, why, size)
        timeindex.forget(self.directory, segment.stem)
        _anchor(self.directory, segment.stem).unlink(missing_ok=True)
        durable.sync_dir(self.directory)
        return freed


def _anchor(data_dir: Path, stem: str) -> Path:
    return data_dir / keylog.STATE_DIR / segments.STATE / durable.fitting(stem, ".inode")


def _background() -> None:
    """Give the calling thread the lowest CPU priority (Linux keeps ``nice`` per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


def _same_content(plain: Path, compressed: Path, codec: str) -> bool:
    """Whether ``compressed`` decompresses to exactly the bytes of ``plain``, compared as they are read."""
    fd = os.open(plain, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        offset = 0
        for chunk in segments.chunks(compressed, codec, _READ):
            if os.pread(fd, len(chunk), offset) != chunk:
                return False
            offset += len(chunk)
        return offset == os.fstat(fd).st_size
    finally:
        os.close(fd)


def _move(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` durably, also across file systems (copy, sync, rename, then remove)."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.partial")
        shutil.copy2(source, partial)
        with open(partial, "rb") as copied:
            os.fsync(copied.fileno())
        os.rename(partial, target)
        durable.sync_dir(target.parent)
        source.unlink()
        return
    durable.sync_dir(target.parent)
