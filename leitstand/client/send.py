"""``leitstand send``: events from files or stdin to the service, through :mod:`leitstand.client`.

It streams: events are read, batched and sent as they come, so memory stays bounded by a
batch (and, with ``tail``, by the last N events), not by the input.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from leitstand.client import client, jsonstream

# How much of a rejected event the report shows.
_SHOWN = 200


@dataclass
class Summary:
    read: int = 0
    stored: int = 0
    rejected: int = 0
    pending: int = 0
    batches: int = 0
    unavailable: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Options:
    url: str
    token: str
    outbox: Path | None = None
    tail: int | None = None
    dry_run: bool = False
    gzip: bool = False
    max_events: int = client.MAX_EVENTS
    max_bytes: int = client.MAX_BYTES
    timeout: float = 30.0
    deadline: float = 30.0


def run(
    domain: str,
    paths: Sequence[str],
    options: Options,
    problem: Callable[[str], None],
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Send every event of ``paths`` (stdin for none or ``-``); ``problem`` gets one line per refusal."""
    summary = Summary()
    started = time.perf_counter()

    def refused(rejection: client.Rejected) -> None:
        summary.rejected += len(rejection.events)
        for event in rejection.events[:3]:
            shown = event.decode(errors="replace")
            problem(f"rejected ({rejection}): {shown[:_SHOWN]}{'...' if len(shown) > _SHOWN else ''}")
        if len(rejection.events) > 3:
            problem(f"rejected ({rejection}): and {len(rejection.events) - 3} more events of the same request")

    events = _events(_read(paths), options.tail, summary, problem, progress)
    if options.dry_run:
        for batch in client.batches(domain, events, refused, options.max_events, options.max_bytes):
            summary.batches += 1
    else:
        with client.Client(options.url, options.token, gzip=options.gzip, max_events=options.max_events,
                           max_bytes=options.max_bytes, timeout=options.timeout, deadline=options.deadline,
                           outbox=options.outbox) as sender:
            result = sender.send(domain, events, on_rejected=refused)
        summary.stored, summary.pending, summary.unavailable = result.stored, result.pending, result.unavailable
    summary.seconds = time.perf_counter() - started
    return summary


def _read(paths: Sequence[str]) -> Iterator[bytes | jsonstream.Invalid]:
    for path in paths or ["-"]:
        with contextlib.nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb") as lines:
            yield from jsonstream.values(lines, "stdin" if path == "-" else path)


def _events(
    items: Iterable[bytes | jsonstream.Invalid],
    tail: int | None,
    summary: Summary,
    problem: Callable[[str], None],
    progress: Callable[[int], None] | None,
) -> Iterator[bytes]:
    """The events to send; what is no event is reported and counted as rejected on the way."""
    if tail is not None:
        items = deque(items, maxlen=tail)
    for item in items:
        summary.read += 1
        if progress is not None and summary.read % 1000 == 0:
            progress(1000)
        if isinstance(item, jsonstream.Invalid):
            summary.rejected += 1
            problem(f"rejected ({item.reason}): {item.where}")
        else:
            yield item
