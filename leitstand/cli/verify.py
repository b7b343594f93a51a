"""Verify: proof that a data dir holds only whole, parseable lines, each in the file of its domain.

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

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from leitstand.intake import domains
from leitstand.storage import datadir
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
            _check_journal(directory / entry.name, report)
        elif entry.kind is Kind.TORN:
            report.notes.append(f"{SET_ASIDE}: look at it, then delete it or move it away")
        elif entry.kind is Kind.STRAY:
            report.add("stray file, not a journal: move it out of the data dir")
        reports.append(report)
    return reports


def _check_journal(path: Path, report: FileReport) -> None:
    with datadir.opened(path) as fd:
        length = datadir.length(fd, path)
        for number, line in enumerate(datadir.lines(fd, length.whole), 1):
            report.lines = number
            problem = _line_problem(line, report.name)
            if problem:
                report.add(f"line {number}: {problem}")
    if length.torn:
        report.notes.append(f"{length.size - length.whole} bytes at the end are not a whole request, "
                            "left by a crash and never acknowledged: verify --repair or the next start sets them aside")


def _line_problem(line: bytes, name: str) -> str | None:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not JSON"
    if type(event) is not dict:
        return "not a JSON object"
    domain = event.get("domain")
    if type(domain) is not str or domains.normalize(domain) != domain:
        return "no valid domain"
    if domains.file_name(domain) != name:
        return f"domain {domain!r} belongs in {domains.file_name(domain)}"
    return None
