"""The outbox: batches kept on the producer's disk until the service has acknowledged them.

One file per batch, ``<sequence>.jsonl``: a header line with the domain and the idempotency
key, then the events. It is written under a temporary name, fsynced, renamed, and the
directory fsynced, so a spool file that exists is whole; it is deleted after the service's
200. A crash at any point leaves either no file (nothing of that batch was sent yet) or a
whole one, which the next run sends again, in order and with the same key, so the service
stores it once. A lock file keeps two producers from sharing one outbox.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from leitstand.storage import durable


class OutboxError(Exception):
    """The outbox cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Batch:
    """Events that travel in one request, under one idempotency key."""

    domain: str
    key: str
    lines: list[bytes]

    @property
    def body(self) -> bytes:
        return b"\n".join(self.lines) + b"\n"

    def halves(self) -> tuple[Batch, Batch]:
        """The two halves, with keys derived from this one: a resent half is recognised too."""
        middle = len(self.lines) // 2
        return (
            Batch(self.domain, self.key + ".0", self.lines[:middle]),
            Batch(self.domain, self.key + ".1", self.lines[middle:]),
        )


class Outbox:
    """The spool directory of one producer; holds its lock until :meth:`close`."""

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OutboxError(f"outbox {directory} is not usable: {(exc.strerror or str(exc)).lower()}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise OutboxError(f"outbox {directory} is in use by another process: wait for it, or use another") from None
        self.directory = directory
        # A temporary file is a batch that was never sent: its producer had not got past writing it.
        for stale in directory.glob(".*.tmp"):
            stale.unlink()
        self._next = max((int(path.stem) for path in self._spooled()), default=0) + 1
        self._paths: dict[str, Path] = {}

    def _spooled(self) -> list[Path]:
        return sorted(path for path in self.directory.glob("*.jsonl") if path.stem.isdigit())

    def add(self, batch: Batch) -> None:
        """Keep ``batch`` durably, after every batch added before it."""
        path = self.directory / f"{self._next:016d}.jsonl"
        self._next += 1
        header = orjson.dumps({"domain": batch.domain, "key": batch.key}, option=orjson.OPT_APPEND_NEWLINE)
        durable.write_atomically(path, header + batch.body, exclusive=True)
        self._paths[batch.key] = path

    def pending(self) -> Iterator[Batch]:
        """The batches left by earlier runs, oldest first, read one at a time."""
        for path in self._spooled():
            header, _, body = path.read_bytes().partition(b"\n")
            try:
                fields = orjson.loads(header)
                batch = Batch(fields["domain"], fields["key"], body.splitlines())
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise OutboxError(f"outbox file {path} is damaged: move it out of the outbox and look at it") from None
            self._paths[batch.key] = path
            yield batch

    def remove(self, batch: Batch) -> None:
        """Forget an acknowledged batch. Not synced: if the deletion is lost, the resend is a no-op."""
        self._paths.pop(batch.key).unlink()

    def close(self) -> None:
        os.close(self._lock)
