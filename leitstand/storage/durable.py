"""Small files made durable whole: written under a temporary name, synced, renamed, and the rename synced.

Whoever looks after a crash finds the old file or the new one, never a part of the new.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 1 << 16
# The longest file name most filesystems take.
NAME_MAX = 255

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


def write_atomically(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Put ``data`` at ``path`` through ``.<name>.tmp`` beside it (mode 0600).

    ``exclusive``: the temporary file must not exist, for a caller that removes stale ones
    under its own lock; otherwise one left by a run cut short is overwritten.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    out = os.open(tmp, _NEW_FILE | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
    try:
        write_whole(out, data)
        os.fsync(out)
    finally:
        os.close(out)
    os.replace(tmp, path)
    sync_dir(path.parent)


def fitting(name: str, suffix: str) -> str:
    """``<name><suffix>``, the name of a file of leitstand's own about ``name``; a digest of ``name``
    instead where that, or the ``.<that>.tmp`` it is written through, would be too long for the filesystem."""
    if len(f".{name}{suffix}.tmp") <= NAME_MAX:
        return name + suffix
    return hashlib.sha256(name.encode()).hexdigest() + suffix


def sync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable: a new or renamed file is not, until its directory is synced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(fd: int, data: bytes, write: Callable[[int, bytes], int] | None = None) -> None:
    """One ``write`` call (``os.write`` unless another is given) for all of ``data``; a short write
    is an error, not retried."""
    write = write or os.write
    written = write(fd, data)
    if written != len(data):
        # The rest tells why (ENOSPC, EFBIG, ...); it is never kept either way.
        write(fd, data[written:])
        raise OSError(errno.EIO, "short write")


def read_range(fd: int, start: int, end: int, size: int = CHUNK) -> Iterator[bytes]:
    """The bytes from ``start`` to ``end`` in chunks of ``size``, so that no file is read into memory whole."""
    for offset in range(start, end, size):
        chunk = os.pread(fd, min(size, end - offset), offset)
        if not chunk:
            raise OSError(f"file shrank while being read, at byte {offset}")
        yield chunk
