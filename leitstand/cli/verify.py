"""Verify: proof that a data dir holds only whole, parseable lines, each in the file of its domain.

Sealed segments are checked like live files, whole (a segment ends in ``\\n``, or it was
changed), and a compressed one against the checksum recorded when it was compressed.
What a crash leaves is a note, not a problem: the fragment of a request that was never
acknowledged, at the end of a file or set aside beside it. Only damage to what was
acknowledged (a line that does not parse, a line in the wrong file) and files that are not
leitstand's are problems.

It reads while the service runs: each file is checked up to its length between two
commits (see :mod:`leitstand.storage.datadir`), so a write under way is never taken for a torn tail.
Probe files (``.leitstand-probe-*``) are the server's own: it makes and removes one on
every start and ``/ready``; a crash in between can leave one behind, harmless. They are
listed as ignored, not as a problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from leitstand.intake import domains
from leitstand.storage import datadir, segments
from leitstand.storage.datadir import Kind

# Enough to show what is wrong with a file without flooding the terminal.
_MAX_SHOWN = 5
SET_ASIDE = "set aside after a crash (a torn line or a request cut short, never acknowledged)"


@dataclass
class FileReport:
    name: str
    kind: Kind
    lines: int = 0
    problems: list[str] = field(default_factory=list)
    hidden: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        if len(self.problems) < _MAX_SHOWN:
            self.problems.append(problem)
        else:
            self.hidden += 1


def verify(directory: Path) -> list[FileReport]:
    """One report per entry of ``directory``; problems are phrased for the operator."""
    reports = []
    for entry in datadir.scan(directory):
        report = FileReport(entry.name, entry.kind)
        if entry.kind is Kind.JOURNAL:
            try:
                _check_journal(directory / entry.name, report)
            except FileNotFoundError:
                continue  # sealed since the directory was read: its segment is checked next time
        elif entry.kind is Kind.SEGMENT:
            try:
                _check_segment(directory, entry.name, report)
            except FileNotFoundError:
                continue  # compressed or removed since the directory was read
        elif entry.kind is Kind.TORN:
            report.notes.append(f"{SET_ASIDE}: look at it, then delete it or move it away")
        elif entry.kind is Kind.STRAY:
            report.add("stray file, not a journal: move it out of the data dir")
        reports.append(report)
    return reports


def _check_journal(path: Path, report: FileReport) -> None:
    with datadir.opened(path) as fd:
        length = datadir.length(fd, path)
        _check_lines(datadir.lines(fd, length.whole), report, domains.file_name, report.name)
    if length.torn:
        report.notes.append(f"{length.size - length.whole} bytes at the end are not a whole request, "
                            "left by a crash and never acknowledged: verify --repair or the next start sets them aside")


def _check_segment(directory: Path, name: str, report: FileReport) -> None:
    """A segment is sealed whole: every line parses, the last one ends in ``\\n``, and a compressed
    one decompresses and has the checksum recorded when it was compressed."""
    segment = segments.parse(name)
    assert segment is not None
    path = directory / name
    if segment.codec:
        recorded = segments.recorded_checksum(directory, name)
        if recorded is None:
            report.notes.append("no checksum recorded (copied in by hand?): checked by decompressing it only")
        elif recorded != segments.file_sha256(path):
            report.add("checksum mismatch: the file changed since it was compressed; restore it from a backup")

    def segment_of(domain: str) -> str:
        return segments.base_of(domains.file_name(domain))

    try:
        rest = _check_lines(datadir.split_lines(segments.chunks(path, segment.codec)), report, segment_of, segment.base)
    except segments.CorruptSegment as exc:
        report.add(f"{exc}; restore it from a backup")
        return
    if rest:
        report.add(f"the last {len(rest)} bytes are no whole line: a segment is sealed whole, so it was changed")


def _check_lines(lines: Iterator[bytes], report: FileReport, owner: Callable[[str], str], name: str) -> bytes:
    """Check each line of ``lines`` against ``name``, the file ``owner`` names for its domain; returns
    what ``lines`` returns (of a segment: what follows its last ``\\n``)."""
    number = 0
    while True:
        try:
            line = next(lines)
        except StopIteration as end:
            return end.value or b""
        number += 1
        report.lines = number
        problem = _line_problem(line, name, owner)
        if problem:
            report.add(f"line {number}: {problem}")


def _line_problem(line: bytes, name: str, owner: Callable[[str], str]) -> str | None:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not JSON"
    if type(event) is not dict:
        return "not a JSON object"
    domain = event.get("domain")
    if type(domain) is not str or domains.normalize(domain) != domain:
        return "no valid domain"
    if owner(domain) != name:
        return f"domain {domain!r} belongs in {domains.file_name(domain)}"
    return None
