"""Sealed segments: the names of a journal file's history, their listing, compression codecs and checksums.

Why it is built this way:

* **Names that sort by time.** A segment is ``<base>.<UTC time>`` with the time to the
  microsecond in fixed width (``app.jsonl.20260128T071739.123456Z``), then ``.zst`` or
  ``.gz`` once compressed. A new name is always later than every segment of its journal
  file (taken one microsecond past the last if the clock says otherwise), so plain byte
  order is seal order, also for several seals in one second. ``<base>`` is the journal
  file's name; one too long to leave room for the suffix within the filesystem's 255 bytes
  is cut to its first labels, ``_`` and 16 hex digits of its hash (which no domain can
  hold). A segment never ends in ``.jsonl`` and holds the upper-case ``T`` and ``Z``, so no
  domain's file can be taken for one, nor one for a domain's.
* **One listing.** :func:`of` lists the segments of one journal file oldest first, one per
  seal: where a crash during compression left both the plain and the compressed file, the
  plain one (the compressor removes it on its next pass). Every reader uses it.
* **Checksums beside the state, not the data.** A compressed segment's SHA-256 is kept in
  ``.leitstand/segments/<segment>.sha256`` (``sha256sum`` format), written before the
  compressed file gets its name, so a compressed segment without a checksum was not made by
  the compressor (copied in by hand, or restored without one).
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from leitstand.storage.durable import CHUNK, NAME_MAX, fitting, read_range, write_atomically
from leitstand.storage.keylog import STATE_DIR

STATE = "segments"
_STAMP = "%Y%m%dT%H%M%S"
_SEGMENT = re.compile(r"(?P<base>.+)\.(?P<stamp>\d{8}T\d{6}\.\d{6}Z)(?:\.(?P<codec>zst|gz))?")
# ".<stamp>" and the longest codec suffix.
_TAIL = len(".20260128T071739.123456Z") + len(".zst")
MAX_BASE = NAME_MAX - _TAIL
_SHORTENED_BASE = re.compile(rf"[a-z0-9.-]+_[0-9a-f]{{16}}\.jsonl")
_JOURNAL_SUFFIX = ".jsonl"
# The suffixes of a compressed segment.
COMPRESSED = (".zst", ".gz")


class CorruptSegment(ValueError):
    """A compressed segment that does not decompress (cut short, or changed)."""


@dataclass(frozen=True)
class Segment:
    name: str
    base: str
    stamp: str
    # "" (plain), "zst" or "gz".
    codec: str

    @property
    def stem(self) -> str:
        """The name it was sealed under, before compression."""
        return f"{self.base}.{self.stamp}"

    @property
    def sealed(self) -> float:
        """When it was sealed (UTC seconds): no event in it is newer."""
        return _seconds(self.stamp)


def parse(name: str) -> Segment | None:
    """The segment ``name`` names, if it has a segment's form; whether its base belongs to a domain is
    for :func:`leitstand.storage.datadir.kind_of` to say."""
    match = _SEGMENT.fullmatch(name)
    if match is None:
        return None
    return Segment(name, match["base"], match["stamp"], match["codec"] or "")


def base_of(journal_name: str) -> str:
    """The base of the segment names of ``journal_name``: the name itself, unless too long."""
    if len(journal_name) <= MAX_BASE:
        return journal_name
    digest = hashlib.sha256(journal_name.encode()).hexdigest()[:16]
    keep = MAX_BASE - len(_JOURNAL_SUFFIX) - len(digest) - 1
    return f"{journal_name[:keep]}_{digest}{_JOURNAL_SUFFIX}"


def is_shortened_base(base: str) -> bool:
    return len(base) == MAX_BASE and _SHORTENED_BASE.fullmatch(base) is not None


def of(directory: Path | int, journal_name: str) -> list[Segment]:
    """The segments of the journal file ``journal_name`` in ``directory`` (a path or a descriptor), oldest first."""
    base = base_of(journal_name)
    return [s for s in every(directory) if s.base == base]


def every(directory: Path | int) -> list[Segment]:
    """Every file in ``directory`` that has a segment's form, oldest first, one per seal."""
    found: dict[str, Segment] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            segment = parse(entry.name)
            if segment is None or not entry.is_file(follow_symlinks=False):
                continue
            known = found.get(segment.stem)
            # A crash during compression can leave both; the plain one is the original.
            if known is None or not segment.codec:
                found[segment.stem] = segment
    return sorted(found.values(), key=lambda s: (s.stamp, s.base))


def new_name(journal_name: str, existing: list[Segment], now: float) -> str:
    """A segment name for ``journal_name`` sealed at ``now``, later than every one in ``existing``."""
    micros = int(now * 1_000_000)
    if existing:
        micros = max(micros, _micros(existing[-1].stamp) + 1)
    seconds, fraction = divmod(micros, 1_000_000)
    return f"{base_of(journal_name)}.{time.strftime(_STAMP, time.gmtime(seconds))}.{fraction:06d}Z"


def _micros(stamp: str) -> int:
    whole, fraction = stamp[:-1].split(".")
    return calendar.timegm(time.strptime(whole, _STAMP)) * 1_000_000 + int(fraction)


def _seconds(stamp: str) -> float:
    return _micros(stamp) / 1_000_000


# -- codecs --------------------------------------------------------------------------


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


def compressor(codec: str) -> Compressor:
    """A streaming compressor: zstd frames carry a checksum of their content, gzip a CRC. zstd at level 1:
    on event lines it compresses as well as level 3 (``bench/rotation.py``), in half the time."""
    if codec == "zst":
        return zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
    if codec == "gz":
        return zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    raise ValueError(f"unknown codec {codec!r}")


def chunks(path: Path, codec: str, size: int = CHUNK) -> Iterator[bytes]:
    """The content of the segment at ``path``, decompressed, in chunks of ``size``; raises :class:`CorruptSegment`."""
    with open(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), "rb") as raw:
        if not codec:
            yield from read_range(raw.fileno(), 0, os.fstat(raw.fileno()).st_size, size)
            return
        reader = _reader(raw, codec)
        try:
            while chunk := reader.read(size):
                yield chunk
        except (zstandard.ZstdError, OSError, EOFError, zlib.error) as exc:
            raise CorruptSegment(f"not a whole {codec} file ({exc})") from None


def content(directory: Path, segment: Segment) -> Iterator[bytes]:
    """The content of ``segment`` in ``directory``, decompressed, in chunks: also when it was compressed
    since it was listed (then its compressed file is read)."""
    for name in (segment.name, *(segment.stem + suffix for suffix in COMPRESSED)):
        found = parse(name)
        assert found is not None
        try:
            # Nothing is yielded before the file is open: a file that is gone is looked for under the next name.
            yield from chunks(directory / name, found.codec)
            return
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"segment {segment.stem} is gone")


def _reader(raw: BinaryIO, codec: str) -> BinaryIO:
    if codec == "zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]


# -- checksums -----------------------------------------------------------------------


def checksum_path(data_dir: Path, name: str) -> Path:
    return data_dir / STATE_DIR / STATE / fitting(name, ".sha256")


def record_checksum(data_dir: Path, name: str, digest: str) -> None:
    """Keep ``digest`` as the SHA-256 of the segment ``name``, durably (in ``sha256sum``'s format)."""
    path = checksum_path(data_dir, name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, f"{digest}  {name}\n".encode())


def recorded_checksum(data_dir: Path, name: str) -> str | None:
    try:
        text = checksum_path(data_dir, name).read_text()
    except FileNotFoundError:
        return None
    digest, _, recorded_name = text.rstrip("\n").partition("  ")
    return digest if recorded_name == name else None


def forget_checksum(data_dir: Path, name: str) -> None:
    try:
        os.unlink(checksum_path(data_dir, name))
    except FileNotFoundError:
        pass


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        for chunk in read_range(fd, 0, os.fstat(fd).st_size):
            hasher.update(chunk)
    finally:
        os.close(fd)
    return hasher.hexdigest()
