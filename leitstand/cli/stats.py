"""Stats: how many events each domain holds, how many bytes, and when it got its first and last one.

Events carry no time of their own (they are stored as sent), so the times come from the
files: the last event is the mtime of the domain's live file (of its newest segment, if it
has none), the first is the birth time (``statx``) of its oldest file: the oldest segment, or
the live file, which the server created for the domain's first event after the last seal.
A compressed segment was born when it was compressed; its mtime is that of its newest
event, the earlier of the two counts. A file restored from a backup was born at the
restore; where the file system keeps no birth time, the mtime stands in (and for a live
file the first time is unknown, ``None``). Segments count their events and bytes on disk
(compressed, where they are).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from leitstand.intake import domains
from leitstand.storage import datadir, durable, segments


@dataclass(frozen=True)
class DomainStats:
    file: str
    domain: str
    events: int
    bytes: int
    first: float | None
    last: float
    segments: int = 0


def stats(directory: Path) -> list[DomainStats]:
    journals = datadir.journal_names(directory)
    by_base = {segments.base_of(name): name for name in journals}
    sealed: dict[str, list[segments.Segment]] = {}
    for segment in datadir.sealed(directory):
        sealed.setdefault(by_base.get(segment.base, segment.base), []).append(segment)
    found = []
    for name in sorted({*journals, *sealed}):
        events = size = count = 0
        first: float | None = None
        last = 0.0
        for segment in sealed.get(name, []):
            path = directory / segment.name
            try:
                with datadir.opened(path) as fd:
                    st = os.fstat(fd)
                    born = datadir.birth_time(fd) or st.st_mtime
                events += sum(chunk.count(b"\n") for chunk in segments.chunks(path, segment.codec))
            except (FileNotFoundError, segments.CorruptSegment):
                continue  # compressed or removed meanwhile, or damaged (verify says which)
            size, count, last = size + st.st_size, count + 1, st.st_mtime
            first = min(born, st.st_mtime) if first is None else first
        if name in journals:
            path = directory / name
            try:
                with datadir.opened(path) as fd:
                    length = datadir.length(fd, path)
                    events += sum(chunk.count(b"\n") for chunk in durable.read_range(fd, 0, length.whole))
                    last = os.fstat(fd).st_mtime
                    first = datadir.birth_time(fd) if first is None else first
                size += length.size
            except FileNotFoundError:
                pass  # sealed since the directory was read
        found.append(DomainStats(name, name.removesuffix(domains.SUFFIX), events, size, first, last, count))
    return found
