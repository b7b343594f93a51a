"""The system calls of a commit round that take microseconds, made without letting go of the GIL.

Why: ``os`` and ``fcntl`` let go of the GIL around every call. A pool thread that does so for
each file of a commit round has to take it back after each call from the event loop, which
keeps it while it parses requests, until its next system call or the switch interval
(``sys.getswitchinterval()``, 5 ms). With a hundred domains a round serves dozens of files, four
such calls each. Called through :class:`ctypes.PyDLL` they keep the GIL, and the loop waits
the few microseconds a call takes instead: single events to 100 domains +13%, to one domain
+10% (``bench/compare.py --domains 1 100 10000``, docs/benchmarks.md). Keeping it for all but
the write gained nothing: every call of a file's turn has to keep it.

Only where such a call is known to be quick, which :func:`usable` and the callers see to:

* on a local filesystem: a ``stat`` on NFS or FUSE may wait for a network or another process;
* a lock nobody holds (:func:`try_lock` does not wait; one held by another process is waited
  for the usual way, with the GIL let go);
* a write of at most :data:`WRITE_MAX` bytes into the page cache.

The time index's note (:meth:`leitstand.storage.timeindex.TimeLog.note`), one per file and
second, takes its index's length and writes its record through them as well: together with
the note's last record kept in memory, single events to 10,000 domains +21%, to 100 and one
unchanged (``bench/compare.py --domains 10000 100 1``, docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

# The most a write keeps the GIL for; larger ones let it go (they may take milliseconds).
WRITE_MAX = 1 << 16
# Filesystems on which stat, flock and a small write take microseconds.
_LOCAL = frozenset({"ext4", "ext3", "xfs", "btrfs", "tmpfs", "overlay"})
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_STATX_SIZE = 0x200
_STATX_INO_AND_SIZE = 0x100 | _STATX_SIZE


class _Statx(ctypes.Structure):
    """``struct statx``: the same on every architecture, unlike ``struct stat``."""

    _fields_ = [
        ("mask", ctypes.c_uint32),
        ("blksize", ctypes.c_uint32),
        ("attributes", ctypes.c_uint64),
        ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("mode", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("ino", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64),
        ("attributes_mask", ctypes.c_uint64),
        ("_times", ctypes.c_uint8 * 64),
        ("rdev_major", ctypes.c_uint32),
        ("rdev_minor", ctypes.c_uint32),
        ("dev_major", ctypes.c_uint32),
        ("dev_minor", ctypes.c_uint32),
        ("_spare", ctypes.c_uint8 * 112),
    ]


def _held_libc() -> ctypes.PyDLL | None:
    """The C library, called with the GIL held; None where it lacks ``statx`` (glibc < 2.28)."""
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "statx"):
        return None
    libc.write.restype = ctypes.c_ssize_t
    libc.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    libc.flock.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]
    return libc


_LIBC = _held_libc()


def _error() -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def usable(dir_fd: int, filesystem: str | None) -> bool:
    """Whether a journal whose directory is open as ``dir_fd``, on a filesystem of type
    ``filesystem``, may use these calls: a local filesystem, and a ``statx`` that tells the
    directory's identity as ``os.stat`` does (an identity taken with one is checked with the other)."""
    if _LIBC is None or filesystem not in _LOCAL:
        return False
    try:
        found = stat(dir_fd, ".")
    except OSError:
        return False
    status = os.stat(".", dir_fd=dir_fd)
    return found is not None and found[0] == (status.st_dev, status.st_ino)


def try_lock(fd: int) -> bool:
    """Take the exclusive ``flock`` of ``fd`` if nobody holds it; False if somebody does."""
    assert _LIBC is not None
    if _LIBC.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) == 0:
        return True
    if ctypes.get_errno() in (errno.EWOULDBLOCK, errno.EAGAIN):
        return False
    raise _error()


def unlock(fd: int) -> None:
    assert _LIBC is not None
    if _LIBC.flock(fd, fcntl.LOCK_UN) != 0:
        raise _error()


def stat(dir_fd: int, name: str) -> tuple[tuple[int, int], int] | None:
    """The identity (device, inode, as ``os.stat`` gives them) and length of the file ``name``
    in ``dir_fd``, not following a symlink; None if there is no such name."""
    assert _LIBC is not None
    found = _Statx()
    if _LIBC.statx(dir_fd, os.fsencode(name), _AT_SYMLINK_NOFOLLOW, _STATX_INO_AND_SIZE, ctypes.byref(found)) != 0:
        if ctypes.get_errno() == errno.ENOENT:
            return None
        raise _error()
    return (os.makedev(found.dev_major, found.dev_minor), found.ino), found.size


def length(fd: int) -> int:
    """The length of the file open as ``fd``, as ``os.fstat`` gives it."""
    assert _LIBC is not None
    found = _Statx()
    if _LIBC.statx(fd, b"", _AT_EMPTY_PATH, _STATX_SIZE, ctypes.byref(found)) != 0:
        raise _error()
    return int(found.size)


def write(fd: int, data: bytes) -> int:
    """``os.write``, keeping the GIL; for at most :data:`WRITE_MAX` bytes."""
    assert _LIBC is not None and len(data) <= WRITE_MAX
    written: int = _LIBC.write(fd, data, len(data))
    if written < 0:
        raise _error()
    return written
