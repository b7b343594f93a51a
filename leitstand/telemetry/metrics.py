"""Metrics for Prometheus: what the service answered, stored and synced, across all workers.

Worker processes share their figures through prometheus-client's multiprocess mode: each
process keeps its values in mmap files in one directory, and a scrape, whichever worker
answers it, sums the files of all of them (also of workers that have died, so counters
never go back). Values are written before the answer is sent, so a scrape sees every
request that has been answered. A single process without a directory keeps them in memory.

Where the directory comes from:

* ``PROMETHEUS_MULTIPROC_DIR`` when set: ``leitstand serve --workers N`` sets it to a fresh
  directory (``LEITSTAND_METRICS_DIR`` emptied, or a private temp dir removed at exit);
* otherwise ``LEITSTAND_METRICS_DIR``, or for a worker of ``uvicorn --workers N`` a temp dir
  named after its supervisor; the first worker of a new supervisor empties it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import multiprocessing
import os
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from leitstand import __version__
from leitstand.config import Config, ConfigError
from leitstand.storage import datadir, journal, rotation

CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER = "_other"
_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWNER = ".owner"
# The domains with a label of their own, one per line, in the order workers first stored them.
_DOMAINS = "domains"
_TEMP_PREFIX = "leitstand-metrics-"
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_APPENDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The routes of the read API (their router paths).
_READ_ROUTES = ("/domains", "/events/")
_BYTES = (256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)


class Metrics(journal.Observer, rotation.Observer):
    """The figures of one process; the journal reports to it as its observer."""

    def __init__(self, config: Config) -> None:
        self.directory = _directory(config)
        self._labelled = _Labelled(config.metrics_max_domains, self.directory and self.directory / _DOMAINS)
        # prometheus-client picks its value store from the environment when it is imported,
        # which may be before the directory was known; pick it again, before any metric exists.
        # Its pid check on every write (a getpid call) guards against fork; workers are
        # spawned, never forked, so the pid is read once.
        pid = os.getpid()
        prometheus_values.ValueClass = (
            prometheus_values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]
            if self.directory
            else prometheus_values.MutexValue
        )
        # Only the in-memory store has _created series; without them both modes look alike.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        own = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "leitstand_requests",
            "Requests answered, by route, status and reason phrase.",
            ["route", "status", "reason"],
            registry=own,
        )
        self._latency = Histogram(
            "leitstand_request_duration_seconds",
            "Time from request to answer, by route.",
            ["route"],
            buckets=_SECONDS,
            registry=own,
        )
        self._events = Counter("leitstand_events_written", "Events stored, by domain.", ["domain"], registry=own)
        self._bytes = Counter("leitstand_bytes_written", "Bytes appended, by domain.", ["domain"], registry=own)
        self._fsync = Histogram(
            "leitstand_fsync_duration_seconds", "Time a commit round took to make its writes durable (fdatasync per file, or one syncfs).", buckets=_SECONDS, registry=own
        )
        self._appends = Histogram(
            "leitstand_commit_appends", "Appends (requests) one commit round wrote together, over all its files.", buckets=_APPENDS, registry=own
        )
        self._commit_bytes = Histogram(
            "leitstand_commit_bytes", "Bytes one commit round wrote, over all its files.", buckets=_BYTES, registry=own
        )
        self._open_files = Gauge(
            "leitstand_open_files", "Journal files held open.", multiprocess_mode="livesum", registry=own
        )
        self._streams = Gauge(
            "leitstand_open_streams", "Event streams open (GET /events/{domain}/stream).", multiprocess_mode="livesum",
            registry=own,
        )
        self._reads = Counter("leitstand_read_requests", "Read requests answered, by status.", ["status"], registry=own)
        self._torn = Counter("leitstand_torn_tails_repaired", "Torn last lines and requests cut short by a crash, set aside.", registry=own)
        errors = Counter(
            "leitstand_storage_errors", "Failed commits, by kind (full, unavailable, refused).", ["kind"], registry=own
        )
        self._unavailable = errors.labels("unavailable")
        self._failures = {journal.StorageFull: errors.labels("full"), journal.StorageRefused: errors.labels("refused")}
        self._sealed = Counter("leitstand_segments_sealed", "Live files sealed into segments.", registry=own)
        self._compressed = Counter(
            "leitstand_segments_compressed", "Segments compressed in the background.", registry=own
        )
        self._compressed_bytes = Counter(
            "leitstand_segments_compressed_bytes", "Bytes of segments before compression, by stage.", ["stage"],
            registry=own,
        )
        self._removed = Counter(
            "leitstand_segments_removed", "Segments removed (or moved to the archive dir) by retention, by reason.",
            ["reason"], registry=own,
        )
        self._removed_bytes = Counter(
            "leitstand_segments_removed_bytes", "Bytes of the segments removed by retention, by reason.", ["reason"],
            registry=own,
        )
        self._by_status: dict[tuple[str, int, str], tuple[_Add, _Add]] = {}
        self._by_domain: dict[str, tuple[_Add, _Add]] = {}
        self._other = (_count(self._events.labels(OTHER)), _count(self._bytes.labels(OTHER)))
        if self.directory is None:
            self._registry = own
        else:
            self._registry = CollectorRegistry()
            MultiProcessCollector(self._registry, str(self.directory))  # type: ignore[no-untyped-call]
        self._registry.register(_AtScrape(config.data_dir))

    # -- from the HTTP app, on the event loop, before the answer is sent ---------------

    def answered(self, route: str, status: int, reason: str, seconds: float) -> None:
        """``route`` is a fixed path, ``/ingest`` or ``other``: never the client's own text."""
        key = (route, status, reason)
        pair = self._by_status.get(key)
        if pair is None:
            try:
                pair = self._by_status[key] = (
                    _count(self._requests.labels(route, str(status), reason)),
                    _observe(self._latency.labels(route)),
                )
            except OSError:  # the metrics dir is full: no answer is refused for a metric
                return
        pair[0](1)
        pair[1](seconds)
        if route.startswith(_READ_ROUTES):
            self._reads.labels(str(status)).inc()

    def streams(self, delta: int) -> None:
        self._streams.inc(delta)

    def stored(self, domain: str, events: int, nbytes: int) -> None:
        pair = self._by_domain.get(domain)
        if pair is None:
            pair = self._domain(domain)
        pair[0](events)
        pair[1](nbytes)

    def _domain(self, domain: str) -> tuple[_Add, _Add]:
        """The counters of a domain seen for the first time here, or those of ``_other`` past the limit."""
        try:
            if not self._labelled.admits(domain):
                return self._other
            pair = self._by_domain[domain] = (_count(self._events.labels(domain)), _count(self._bytes.labels(domain)))
        except OSError:  # the metrics dir is full: no answer is refused for a metric
            return self._other
        return pair

    def render(self) -> bytes:
        """The text a scrape gets; reads files in multiprocess mode, so not on the event loop."""
        return generate_latest(self._registry)

    def close(self) -> None:
        """At the end of a worker: its live gauges (open files) stop counting."""
        if self.directory is not None:
            mark_process_dead(os.getpid(), str(self.directory))  # type: ignore[no-untyped-call]

    # -- from the journal, on its pool threads ------------------------------------------

    def committed(self, appends: int, nbytes: int, sync_seconds: float | None) -> None:
        self._appends.observe(appends)
        self._commit_bytes.observe(nbytes)
        if sync_seconds is not None:
            self._fsync.observe(sync_seconds)

    def failed(self, error: journal.JournalError) -> None:
        self._failures.get(type(error), self._unavailable).inc()

    def repaired(self) -> None:
        self._torn.inc()

    def opened(self, delta: int) -> None:
        self._open_files.inc(delta)

    def sealed(self, nbytes: int) -> None:
        self._sealed.inc()

    # -- from housekeeping, on its threads -----------------------------------------------

    def compressed(self, before: int, after: int) -> None:
        self._compressed.inc()
        self._compressed_bytes.labels("before").inc(before)
        self._compressed_bytes.labels("after").inc(after)

    def removed(self, why: str, nbytes: int) -> None:
        self._removed.labels(why).inc()
        self._removed_bytes.labels(why).inc(nbytes)


class _Labelled:
    """Which domains have a label of their own: the first ``limit`` stored by the service as a whole.

    Workers agree on them through a file in the metrics dir, one domain a line, appended under
    ``flock``: whichever worker stores an event, a domain is labelled if it is in the file, or if
    the file has room for it. The file only grows, and once it is full it is final, so each worker
    reads it only for a domain new to it, and never again once it has read it full.
    """

    def __init__(self, limit: int, path: Path | None) -> None:
        self.limit = limit
        self.path = path
        self.known: set[str] = set()
        self.full = False
        self._read = 0

    def admits(self, domain: str) -> bool:
        if domain in self.known:
            return True
        if self.full:
            return False
        if self.path is None or self._shared(domain, self.path):
            self._add(domain)
        return domain in self.known

    def _add(self, domain: str) -> None:
        if len(self.known) < self.limit:
            self.known.add(domain)
        self.full = len(self.known) >= self.limit

    def _shared(self, domain: str, path: Path) -> bool:
        """Read what other workers added; add ``domain`` to the file if there is room (then True)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            new = os.pread(fd, os.fstat(fd).st_size - self._read, self._read)
            whole = new[: new.rfind(b"\n") + 1]
            self._read += len(whole)
            for line in whole.splitlines():
                self._add(line.decode())
            if domain in self.known or self.full:
                return False
            # After a line that a killed worker left unfinished, on a line of its own (the
            # fragment then takes a place, but no domain's).
            os.write(fd, (b"\n" if len(whole) < len(new) else b"") + domain.encode() + b"\n")
            return True
        finally:
            os.close(fd)


# Adds an amount to a labelled counter, or observes one in a labelled histogram.
_Add = Callable[[float], None]


def _count(counter: Any) -> _Add:
    """``counter.inc`` without prometheus-client's checks on every call (that the amount is not
    negative, that the metric has its labels), which cost more than the addition on the hot path:
    the value store's own ``inc``, taken once the labels are filled in."""
    add: _Add = counter._value.inc
    return add


def _observe(histogram: Any) -> _Add:
    """``histogram.observe`` likewise: the sum, and the one bucket the amount falls in (found by
    bisection; prometheus-client keeps buckets per bound and adds them up when scraped)."""
    total: _Add = histogram._sum.inc
    buckets = [bucket.inc for bucket in histogram._buckets]
    bounds = histogram._upper_bounds

    def observe(amount: float) -> None:
        total(amount)
        buckets[bisect_left(bounds, amount)](1)

    return observe


class _AtScrape(Collector):
    """Figures computed when they are asked for, by the worker that answers the scrape."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("leitstand_build_info", "The running version; always 1.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            return
        yield GaugeMetricFamily("leitstand_data_dir_free_bytes", "Free bytes in the data dir.", value=free)
        try:
            used = datadir.usage(self.data_dir)
        except OSError:
            return
        held = GaugeMetricFamily("leitstand_data_dir_bytes", "Bytes in the data dir: live files, sealed segments.",
                                 labels=["kind"])
        held.add_metric(["live"], used.live)
        held.add_metric(["sealed"], used.sealed)
        yield held


def share_between_workers(config: Config) -> None:
    """For ``leitstand serve``, before it starts its workers: give them one fresh directory.

    One worker runs in this process and needs none. Otherwise ``LEITSTAND_METRICS_DIR`` is
    emptied, or a private temp dir is made and removed when the supervisor exits.
    """
    if config.workers == 1:
        return
    try:
        if config.metrics_dir is None:
            _sweep()
            directory = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
        else:
            directory = config.metrics_dir
        _claim(directory, _identity(os.getpid()))
    except OSError as exc:
        raise _unusable(exc) from None
    os.environ[_ENV] = str(directory)


def _directory(config: Config) -> Path | None:
    """Where this process shares its figures, emptied if it is new to the current supervisor."""
    if os.environ.get(_ENV):
        return Path(os.environ[_ENV])
    parent = multiprocessing.parent_process()
    if config.metrics_dir is None and parent is None:
        return None
    supervisor = os.getpid() if parent is None or parent.pid is None else parent.pid
    directory = config.metrics_dir or Path(tempfile.gettempdir()) / f"{_TEMP_PREFIX}{os.getuid()}-{supervisor}"
    try:
        if config.metrics_dir is None:
            _sweep()
        _claim(directory, _identity(supervisor))
    except OSError as exc:
        raise _unusable(exc) from None
    os.environ[_ENV] = str(directory)
    return directory


def _claim(directory: Path, owner: str) -> None:
    """Make ``directory`` the metrics dir of ``owner``: emptied of metrics files unless it already is."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise PermissionError(errno.EACCES, "owned by another user")
        fcntl.flock(fd, fcntl.LOCK_EX)
        marker = directory / _OWNER
        if not marker.exists() or marker.read_text() != owner:
            for stale in directory.glob("*.db"):
                stale.unlink()
            (directory / _DOMAINS).unlink(missing_ok=True)
            marker.write_text(owner)
    finally:
        os.close(fd)


def _sweep() -> None:
    """Remove the temp dirs of supervisors that are gone without cleaning up (killed, or uvicorn's own)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*"):
        try:
            owner = (directory / _OWNER).read_text()
            if directory.lstat().st_uid != os.geteuid() or _alive(owner):
                continue
        except (OSError, ValueError):
            continue  # not set up yet, or not ours
        shutil.rmtree(directory, ignore_errors=True)


def _alive(owner: str) -> bool:
    try:
        return _identity(int(owner.split()[1])) == owner
    except (OSError, IndexError):
        return False


def _unusable(exc: OSError) -> ConfigError:
    return ConfigError(
        f"LEITSTAND_METRICS_DIR is not usable: {journal.reason(exc)}; point it at a writable directory "
        "of this user, on a local disk or tmpfs (for several workers, also when the temp dir is read-only)"
    )


def _identity(pid: int) -> str:
    """A process, told apart from any later one with the same pid: boot id and start time."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    started = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    return f"{boot} {pid} {started}"
