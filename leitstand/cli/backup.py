"""Backup and restore of the journal files, online and incremental.

Each file is copied up to its last complete line between two commits (see
:mod:`leitstand.storage.datadir`), so a copy never holds a partial line, while the service keeps
writing. A manifest in the backup records each file's copied size and the SHA-256 of that
prefix. The next run hashes the same prefix of the source again: if it matches, only the
bytes appended since are copied; if the source is shorter or differs (truncated,
rewritten), the file is copied whole. That costs one read of every source file per run,
but writes only what is new. The manifest is replaced atomically after every copied file
is synced, so a run cut short leaves the previous backup intact.

Sealed segments never change, so each is copied once, whole, and never again: a segment
whose seal (its name without ``.zst`` or ``.gz``) the manifest already holds, in either
form, is skipped without being read, also once it has been compressed in the data dir. A
segment that retention has removed from the data dir stays in the backup. A restore copies
live files and segments alike, and records the checksum of each compressed segment that
matches the manifest, as the compressor did.

Only journal files and segments are copied: torn tails set aside, probe and stray files are
not events (``leitstand verify`` reports them in the source).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from leitstand.storage import datadir, durable, segments
from leitstand.storage.datadir import Kind

MANIFEST = "leitstand-backup.json"
_FORMAT = 1
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
# The mode the journal gives its files.
_FILE_MODE = 0o644

Progress = Callable[[int], None]


class BackupError(Exception):
    """A backup or restore that cannot start; the message is one actionable line."""


def _no_progress(nbytes: int) -> None:
    pass


@dataclass
class Summary:
    files: int = 0
    copied: int = 0
    skipped: int = 0
    rewritten: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Backup:
    """A backup about to run: what is in the source now, and what the manifest says was copied."""

    source: Path
    dest: Path
    lengths: dict[str, int]
    manifest: dict[str, Any]
    # Segments not in the backup yet, with their sizes; and the bytes of those that are.
    segments: dict[str, int] = field(default_factory=dict)
    sealed_before: int = 0

    @property
    def total(self) -> int:
        """Bytes the run reads from the source: every live file up to its last complete line, new segments whole."""
        return sum(self.lengths.values()) + sum(self.segments.values())

    def run(self, progress: Progress = _no_progress) -> Summary:
        started = time.monotonic()
        summary = Summary(files=len(self.lengths) + len(self.segments), skipped=self.sealed_before)
        files: dict[str, Any] = self.manifest["files"]
        for name, length in self.lengths.items():
            files[name] = self._copy_file(name, length, files.get(name), summary, progress)
        for name in self.segments:
            try:
                with datadir.opened(self.source / name) as src:
                    files[name] = self._copy_whole(src, name, os.fstat(src).st_size, progress)
            except FileNotFoundError:
                summary.files -= 1  # compressed since the directory was read: the next run copies that
                continue
            summary.copied += files[name]["size"]
        durable.sync_dir(self.dest)
        durable.write_atomically(self.dest / MANIFEST, orjson.dumps(self.manifest, option=orjson.OPT_INDENT_2))
        summary.seconds = time.monotonic() - started
        return summary

    def _copy_file(self, name: str, length: int, recorded: Any, summary: Summary, progress: Progress) -> dict[str, Any]:
        target = self.dest / name
        hasher = hashlib.sha256()
        with datadir.opened(self.source / name) as src:
            kept = _kept_prefix(src, target, length, recorded, hasher, progress)
            if kept is not None:
                out = os.open(target, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    # A run cut short may have appended past the manifest; that part is copied again.
                    os.ftruncate(out, kept)
                    os.lseek(out, kept, os.SEEK_SET)
                    _copy(src, out, kept, length, hasher, progress)
                finally:
                    os.close(out)
                summary.skipped += kept
                summary.copied += length - kept
            else:
                summary.copied += length
                if recorded is not None:
                    summary.rewritten.append(name)
                return self._copy_whole(src, name, length, progress)
        return {"size": length, "sha256": hasher.hexdigest()}

    def _copy_whole(self, src: int, name: str, length: int, progress: Progress) -> dict[str, Any]:
        """Copy the first ``length`` bytes of ``src`` to a new file ``name`` in the backup; its manifest entry."""
        hasher = hashlib.sha256()
        partial = self.dest / f".{name}.partial"
        _copy_new(src, partial, length, hasher, progress)
        os.replace(partial, self.dest / name)
        return {"size": length, "sha256": hasher.hexdigest()}


def prepare(source: Path, dest: Path) -> Backup:
    """Look at the source and the backup so far; copy nothing yet."""
    if not source.is_dir():
        raise BackupError(f"data dir {source} is not a directory: pass --data-dir or set LEITSTAND_DATA_DIR")
    if dest.resolve().is_relative_to(source.resolve()):
        raise BackupError(f"backup dir {dest} is inside the data dir: choose a directory outside it")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    lengths = {}
    for name in datadir.journal_names(source):
        try:
            with datadir.opened(source / name) as fd:
                lengths[name] = datadir.length(fd, source / name).whole
        except FileNotFoundError:
            continue  # sealed since the directory was read: the next run copies the segment
    manifest = _read_manifest(dest)
    copied = {segment.stem for name in manifest["files"] if (segment := segments.parse(name)) is not None}
    backup = Backup(source, dest, lengths, manifest)
    for segment in datadir.sealed(source):
        try:
            size = os.stat(source / segment.name, follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
        if segment.stem in copied:
            backup.sealed_before += size
        else:
            backup.segments[segment.name] = size
    return backup


def _read_manifest(dest: Path) -> dict[str, Any]:
    try:
        manifest = orjson.loads((dest / MANIFEST).read_bytes())
    except FileNotFoundError:
        return {"format": _FORMAT, "files": {}}
    except orjson.JSONDecodeError:
        manifest = None
    if type(manifest) is not dict or manifest.get("format") != _FORMAT or type(manifest.get("files")) is not dict:
        raise BackupError(f"{dest / MANIFEST} is not a leitstand backup manifest: remove it to copy everything anew")
    return manifest


def _kept_prefix(
    src: int, target: Path, length: int, recorded: Any, hasher: Any, progress: Progress
) -> int | None:
    """How much of the backup copy is still the source's prefix, or None if the file must be copied whole."""
    if type(recorded) is not dict:
        return None
    size, digest = recorded.get("size"), recorded.get("sha256")
    if type(size) is not int or not 0 <= size <= length:
        return None
    try:
        if os.lstat(target).st_size < size:
            return None
    except FileNotFoundError:
        return None
    for chunk in durable.read_range(src, 0, size):
        hasher.update(chunk)
        progress(len(chunk))
    return size if hasher.hexdigest() == digest else None


def _copy(src: int, out: int, start: int, end: int, hasher: Any, progress: Progress) -> None:
    """Copy bytes ``start`` to ``end`` of ``src`` to where ``out`` stands, hash them, and sync ``out``."""
    for chunk in durable.read_range(src, start, end):
        hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]
        progress(len(chunk))
    os.fsync(out)


def _copy_new(src: int, target: Path, length: int, hasher: Any, progress: Progress) -> None:
    out = os.open(target, _NEW_FILE, _FILE_MODE)
    try:
        _copy(src, out, 0, length, hasher, progress)
    finally:
        os.close(out)


@dataclass
class Restored:
    files: int = 0
    bytes: int = 0
    mismatched: list[str] = field(default_factory=list)


def restore(source: Path, target: Path) -> Restored:
    """Copy the journal files of a backup into an empty data dir, checked against the manifest if there is one."""
    if not source.is_dir():
        raise BackupError(f"backup dir {source} is not a directory: pass the directory leitstand backup wrote")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"data dir {target} is not empty: restore only into an empty or new directory")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    recorded = _read_manifest(source)["files"]
    done = Restored()
    for entry in datadir.scan(source):
        if entry.kind not in (Kind.JOURNAL, Kind.SEGMENT):
            continue
        name = entry.name
        hasher = hashlib.sha256()
        with datadir.opened(source / name) as src:
            size = os.fstat(src).st_size
            _copy_new(src, target / name, size, hasher, _no_progress)
        expected = recorded.get(name)
        if type(expected) is dict and (expected.get("size"), expected.get("sha256")) != (size, hasher.hexdigest()):
            done.mismatched.append(name)
        elif type(expected) is dict and entry.kind is Kind.SEGMENT and name.endswith(segments.COMPRESSED):
            # The checksum the compressor recorded, as the manifest vouches for it.
            segments.record_checksum(target, name, hasher.hexdigest())
        done.files += 1
        done.bytes += size
    durable.sync_dir(target)
    return done
