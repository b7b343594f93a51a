"""A FUSE filesystem that forgets what was not fsynced, in the spirit of Jepsen's LazyFS.

It mirrors a backing directory, which plays the disk: bytes that reach it count as durable.
Writes and truncates of a file are kept in memory, as a page cache keeps them, and reach
the backing file only when that file is fsynced (``fsync`` or ``fdatasync``, through any
descriptor). Closing a file persists nothing. Reads show the page cache's view: the backing
bytes with the pending writes and truncates applied.

A *power cut* drops everything not yet fsynced, in every file; a *torn* cut first lets a
random prefix of each file's pending writes reach the disk, cut at any byte, the way
write-back may have started before the lights went out.

A write can be held: the next write to a file whose name ends in a given suffix is taken
into the page cache and then not answered until released. A process killed meanwhile waits
for that answer (the kernel does not abandon a FUSE request already taken) and then dies,
leaving exactly that write not yet synced: a cut then tears a commit under way, every time.

Faults make ``fsync``/``fdatasync`` or ``write`` of files with a given name fail with EIO.
Both leave something behind for the caller to clean up, the stricter setting for a test
of rollback: a failing write puts the first half of its data into the page cache, as a
write that fails midway does, and a failed fsync leaves the pending writes pending, so
whatever is not truncated away reaches the disk with the next fsync that succeeds.

Metadata goes straight through to the backing directory: create, mkdir, unlink, rename,
chmod and the rest are durable at once, and fsync of a directory has nothing left to do.
The backing files are not fsynced on the host: its power is never cut.

The mount uses ``direct_io`` and zero entry, attribute and negative timeouts, so that the
kernel keeps no copy of data or sizes, and hands writes over in pieces of at most 32 KiB. ``flock`` and POSIX locks are not implemented
here, so the kernel keeps them itself, which works between processes.

Run it as ``python tests/lazyfs.py BACKING MOUNTPOINT --control NAME`` (it stays in the
foreground) and steer it over the abstract Unix socket ``NAME``, one line per request,
each answered once it has taken effect:

``cut``             drop all un-fsynced data; answers ``ok <bytes dropped>``
``cut SEED``        a torn cut: a random prefix (from ``SEED``) of each file survives
``fail sync NAME``  fsync and fdatasync of files named ``NAME`` fail with EIO
``fail write NAME`` writes to files named ``NAME`` fail with EIO, half done
``hold write SUFFIX`` answers once the next write to a file named ``*SUFFIX`` is in the
                    page cache and held, unanswered
``release``         answer the held write
``heal``            no more faults
``ping``            answers ``ok``: the control socket is up

Tests use :class:`LazyFS`, which starts the process, waits for the mount and unmounts it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mfusepy import FUSE, Operations  # type: ignore[import-untyped]

# One pending change to a file: ``(offset, data)`` is a write, ``(length, None)`` a truncate.
Change = tuple[int, bytes | None]

_STAT_KEYS = (
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)
_STATVFS_KEYS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_flag",
    "f_namemax",
)


class Pending:
    """What a file's page cache holds beyond its backing bytes: the changes since the last fsync."""

    __slots__ = ("changes", "size")

    def __init__(self) -> None:
        self.changes: list[Change] = []
        # The size the page cache shows; None while it is the backing file's size.
        self.size: int | None = None

    def length(self, durable: int) -> int:
        return durable if self.size is None else self.size

    def write(self, offset: int, data: bytes, durable: int) -> None:
        self.changes.append((offset, data))
        self.size = max(self.length(durable), offset + len(data))

    def truncate(self, length: int) -> None:
        self.changes.append((length, None))
        self.size = length

    def overlay(self, buf: bytearray, start: int) -> None:
        """Apply the changes, in order, to ``buf``, which holds the backing bytes from ``start``."""
        end = start + len(buf)
        for offset, data in self.changes:
            if data is None:
                # Bytes past a truncate read as zeros if the file grows again.
                if offset < end:
                    cut = max(offset - start, 0)
                    buf[cut:] = bytes(len(buf) - cut)
                continue
            lo, hi = max(offset, start), min(offset + len(data), end)
            if lo < hi:
                buf[lo - start : hi - start] = data[lo - offset : hi - offset]

    @property
    def written(self) -> int:
        return sum(len(data) for _, data in self.changes if data is not None)

    def persist(self, fd: int, budget: int | None = None) -> int:
        """Replay the changes onto the backing ``fd``, then forget them; returns the bytes not replayed.

        With a ``budget``, only the changes up to that many written bytes are replayed, the
        last write cut short: a torn prefix.
        """
        kept = 0
        for offset, data in self.changes:
            if data is None:
                os.ftruncate(fd, offset)
            elif budget is None or kept + len(data) <= budget:
                os.pwrite(fd, data, offset)
                kept += len(data)
            else:
                os.pwrite(fd, data[: budget - kept], offset)
                kept = budget
                break
        return self.clear() - kept

    def clear(self) -> int:
        """Forget the changes; returns how many written bytes they held."""
        dropped = self.written
        self.changes, self.size = [], None
        return dropped


class Handle:
    """An open file, known by its backing descriptor (read-write, never O_APPEND): its page cache."""

    __slots__ = ("append", "name", "pending")

    def __init__(self, name: str, pending: Pending, append: bool) -> None:
        self.name = name
        self.pending = pending
        self.append = append


class PageCacheFS(Operations):  # type: ignore[misc]
    """The FUSE operations: a passthrough to ``root`` with a page cache that only fsync empties."""

    # Times in nanoseconds, as os.stat gives them.
    use_ns = True

    def __init__(self, root: str) -> None:
        self.root = root
        self.mutex = threading.Lock()
        # Page caches by path; an unlinked file's lives on in its handles until they close.
        self.files: dict[str, Pending] = {}
        self.handles: dict[int, Handle] = {}
        self.faults: set[tuple[str, str]] = set()
        # The name suffix of files whose next write is to be held, and the held write's events.
        self.hold: str | None = None
        self.held = threading.Event()
        self.released = threading.Event()

    def _backing(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _pending(self, path: str) -> Pending:
        return self.files.setdefault(path, Pending())

    # -- control ---------------------------------------------------------------------

    def cut(self, seed: int | None) -> int:
        """Power cut: every page cache is dropped, after a random prefix of each reached the disk if ``seed``."""
        rng = random.Random(seed)
        dropped = 0
        with self.mutex:
            for path, pending in sorted(self.files.items()):
                if seed is None or not pending.changes:
                    continue
                fd = os.open(self._backing(path), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    dropped += pending.persist(fd, rng.randint(0, pending.written))
                finally:
                    os.close(fd)
            for pending in {*self.files.values(), *(h.pending for h in self.handles.values())}:
                dropped += pending.clear()
        return dropped

    def command(self, line: str) -> str:
        words = line.split()
        match words:
            case ["ping"]:
                return "ok"
            case ["cut"]:
                return f"ok {self.cut(None)}"
            case ["cut", seed]:
                return f"ok {self.cut(int(seed))}"
            case ["fail", ("sync" | "write") as op, name]:
                with self.mutex:
                    self.faults.add((op, name))
                return "ok"
            case ["hold", "write", suffix]:
                self.released.clear()
                self.held.clear()
                with self.mutex:
                    self.hold = suffix
                return "ok" if self.held.wait(30) else "error: no write to hold"
            case ["release"]:
                self.released.set()
                return "ok"
            case ["heal"]:
                with self.mutex:
                    self.faults.clear()
                return "ok"
        return f"error: unknown command {line!r}"

    def init_with_config(self, conn: Any, config: Any) -> None:
        """A large write reaches the filesystem in pieces of at most 32 KiB, as the kernel's page
        cache takes it page by page: a writer killed between two pieces leaves it cut short."""
        if conn is not None:
            conn.max_write = 32768

    # -- files -----------------------------------------------------------------------

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        passed = flags & (os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
        fd = os.open(self._backing(path), os.O_RDWR | os.O_CLOEXEC | passed, mode)
        with self.mutex:
            pending = self._pending(path)
            if flags & os.O_TRUNC:
                pending.truncate(0)
            self.handles[fd] = Handle(os.path.basename(path), pending, bool(flags & os.O_APPEND))
        return fd

    def open(self, path: str, flags: int) -> int:
        return self._open(path, flags)

    def create(self, path: str, mode: int, flags: int) -> int:
        return self._open(path, flags | os.O_CREAT, mode)

    def release(self, path: str, fh: int) -> int:
        with self.mutex:
            del self.handles[fh]
        os.close(fh)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            h = self.handles[fh]
            end = min(offset + size, h.pending.length(os.fstat(fh).st_size))
            if end <= offset:
                return b""
            buf = bytearray(os.pread(fh, end - offset, offset))
            buf.extend(bytes(end - offset - len(buf)))
            h.pending.overlay(buf, offset)
            return bytes(buf)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            h = self.handles[fh]
            durable = os.fstat(fh).st_size
            # O_APPEND lands at the end of what the page cache shows, whatever the kernel thinks.
            at = h.pending.length(durable) if h.append else offset
            if ("write", h.name) in self.faults:
                # A write that fails midway: its first half is in the page cache all the same.
                h.pending.write(at, data[: len(data) // 2], durable)
                raise OSError(errno.EIO, "injected write fault")
            h.pending.write(at, data, durable)
            hold = self.hold is not None and h.name.endswith(self.hold)
            if hold:
                self.hold = None
        if hold:
            self.held.set()
            self.released.wait(30)
        return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.mutex:
            (self.handles[fh].pending if fh is not None else self._pending(path)).truncate(length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            h = self.handles[fh]
            if ("sync", h.name) in self.faults:
                raise OSError(errno.EIO, "injected fsync fault")
            h.pending.persist(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self.mutex:
            pending: Pending | None
            if fh is not None:
                st, pending = os.fstat(fh), self.handles[fh].pending
            else:
                st, pending = os.lstat(self._backing(path)), self.files.get(path)
            attrs = {key.removesuffix("_ns"): getattr(st, key) for key in _STAT_KEYS}
            if pending is not None:
                attrs["st_size"] = pending.length(st.st_size)
            return attrs

    # -- metadata, straight through ----------------------------------------------------

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._backing(path))]

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._backing(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._backing(path))
        return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            os.unlink(self._backing(path))
            self.files.pop(path, None)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            os.rename(self._backing(old), self._backing(new))
            for path in [p for p in self.files if p == new or p.startswith(new + "/")]:
                del self.files[path]
            for path in [p for p in self.files if p == old or p.startswith(old + "/")]:
                self.files[new + path[len(old) :]] = self.files.pop(path)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._backing(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._backing(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._backing(path))
        else:
            os.utime(self._backing(path), ns=times)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._backing(path))
        return {key: getattr(st, key) for key in _STATVFS_KEYS}


def serve_control(fs: PageCacheFS, listener: socket.socket) -> None:
    """Answer control requests one at a time, each after it has taken effect."""
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rwb") as stream:
            try:
                answer = fs.command(stream.readline().decode())
            except Exception as exc:  # noqa: BLE001 - the test gets the error, the filesystem keeps running
                answer = f"error: {exc!r}"
            stream.write(answer.encode() + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="A FUSE filesystem that forgets what was not fsynced.")
    parser.add_argument("backing", help="directory that plays the disk")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="abstract Unix socket name for control requests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="lazyfs %(levelname)s %(name)s: %(message)s")
    fs = PageCacheFS(os.path.realpath(args.backing))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + args.control)
    listener.listen()
    threading.Thread(target=serve_control, args=(fs, listener), daemon=True).start()
    FUSE(
        fs,
        args.mountpoint,
        foreground=True,
        fsname="lazyfs",
        subtype="lazyfs",
        direct_io=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )


# -- the test side ---------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at ``path`` (absolute, without symlinks)."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        # /proc/mounts escapes blanks and backslashes as octal, which unicode_escape undoes.
        return any(line.split()[1].encode().decode("unicode_escape") == str(path) for line in mounts)


class LazyFS:
    """A lazyfs process over ``backing``, mounted at ``mountpoint`` while in a ``with`` block.

    Needs /dev/fuse, libfuse3 and ``fusermount3`` (Debian: ``fuse3``, which brings
    ``libfuse3-3``). The mount is always removed at the end, lazily if something still
    holds it open.
    """

    def __init__(self, backing: Path, mountpoint: Path, log_path: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint.resolve()
        self.log_path = log_path
        self.control = f"lazyfs-{uuid.uuid4().hex}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        # mfusepy prefers libfuse2 when both are installed; this mount wants libfuse3's fusermount3.
        env = {"FUSE_LIBRARY_NAME": "fuse3", **os.environ}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mountpoint), "--control", self.control],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 15
            while not is_mounted(self.mountpoint):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lazyfs did not mount (needs fuse3 and /dev/fuse):\n{self.output()}")
                time.sleep(0.02)
            self.request("ping")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.proc is not None
        unmount = ["fusermount3", "-u", str(self.mountpoint)]
        if is_mounted(self.mountpoint) and subprocess.run(unmount, check=False, capture_output=True).returncode:
            # Busy (a process still has a file open there): detach it now, it goes when they do.
            subprocess.run([*unmount, "-z"], check=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, line: str) -> str:
        """Send one control request; returns what follows ``ok`` once it has taken effect."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect("\0" + self.control)
            conn.sendall(line.encode() + b"\n")
            answer = conn.makefile("rb").readline().decode().strip()
        if answer != "ok" and not answer.startswith("ok "):
            raise RuntimeError(f"lazyfs {line!r}: {answer or 'no answer'}\n{self.output()}")
        return answer[3:]

    def cut(self, seed: int | None = None) -> int:
        """Drop every un-fsynced byte (a torn cut keeps a random prefix); returns how many were dropped."""
        return int(self.request("cut" if seed is None else f"cut {seed}"))

    def fail(self, op: str, name: str) -> None:
        """Make ``op`` (``sync`` or ``write``) of files named ``name`` fail with EIO."""
        self.request(f"fail {op} {name}")

    def hold_write(self, suffix: str) -> None:
        """Return once the next write to a file named ``*suffix`` is in the page cache, held unanswered."""
        self.request(f"hold write {suffix}")

    def release(self) -> None:
        self.request("release")

    def heal(self) -> None:
        self.request("heal")


if __name__ == "__main__":
    main()
