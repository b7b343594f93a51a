"""Benchmark leitstand against the old manual's design (baseline), a no-op ASGI app (ceiling) and
the least a durable ingest can do (the floor app).

Why it is built this way:

* All four apps run under the same uvicorn, uvloop and httptools (``harness.serve``), so the
  ratios measure the apps, not the servers.
* Every run gets a fresh server and data directory, and runs alternate leitstand, baseline,
  noop, floor, leitstand, ... within a cell, so a noisy neighbour on a shared machine hits all.
* Each goal is measured for the floor app too (``bench/floor_app.py``: parse, one compact line
  per event, a grouped ``fdatasync`` before the 200, nothing else), so that each verdict can be
  read against what is left when everything but the durable write is left out.
* Between runs the page cache is flushed (``sync``) and no data is deleted until the end: the
  baseline's unsynced writes, or blocks freed on a filesystem mounted with ``discard``, would
  otherwise stall the fsyncs of the next leitstand run.
* A run only counts if every answer was 2xx and, for the apps that store, the data files
  hold at least as many lines as were acknowledged.

Run it from the checkout with the venv python; it installs wrk (apt) and py-spy (pip) if
they are missing. Markdown goes to stdout, progress to stderr, raw records to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import (
    BODIES,
    CONNECTIONS,
    LEITSTAND,
    RESULTS,
    ROOT,
    App,
    Load,
    Run,
    add_run_flags,
    code_version,
    count_lines,
    cpu_seconds,
    ensure_tools,
    machine,
    parse_wrk,
    rss_mib,
    run_one,
    serve,
    table,
    wrk_argv,
    wrk_script,
)

WORKERS = (1, 2)
SOAK_WORKERS = 2
RSS_EVERY = 5.0
# The many-domains scenario: single events, 64 connections, 1 worker, each to one of N domains.
DOMAIN_COUNTS = (1, 100, 10_000)


# The least a durable ingest can do on this stack (bench/floor_app.py): the same goal, measured
# for it, tells what this machine allows.
FLOOR = App("floor", ["--app-dir", "bench", "floor_app:app"], True)
BASELINE = App("baseline", ["--app-dir", "bench", "baseline_app:app"], True)
APPS = (LEITSTAND, BASELINE, App("noop", ["--app-dir", "bench", "noop_app:app"], False), FLOOR)


# -- the matrix ----------------------------------------------------------------------


def matrix(args: argparse.Namespace, tmp: Path) -> list[Run]:
    runs = []
    cells = [(w, b, c) for w in WORKERS for b in BODIES for c in CONNECTIONS]
    for i, (workers, body, connections) in enumerate(cells, 1):
        for rep in range(args.repeat):
            for app in APPS:
                run = run_one(app, body, connections, workers, args.warmup, args.duration, tmp)
                print(
                    f"[{i}/{len(cells)} rep {rep + 1}] {app.name:9} w={workers} {body:8} c={connections:<2} "
                    f"{run.events_per_s:9.0f} ev/s p99 {run.load.p99_ms:7.2f} ms"
                    f"{'' if run.valid else '  INVALID'}",
                    file=sys.stderr,
                )
                runs.append(run)
    return runs


@dataclass
class Cell:
    """The median over the repeats of one app in one cell."""

    events_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    valid: bool


def summarize(runs: list[Run]) -> dict[tuple[int, str, int], dict[str, Cell]]:
    cells: dict[tuple[int, str, int], dict[str, Cell]] = {}
    for key in dict.fromkeys((r.workers, r.body, r.connections) for r in runs):
        cells[key] = {
            app.name: _cell([r for r in runs if (r.workers, r.body, r.connections) == key and r.app == app.name])
            for app in APPS
        }
    return cells


def _cell(runs: list[Run]) -> Cell:
    return Cell(
        statistics.median(r.events_per_s for r in runs),
        statistics.median(r.load.p50_ms for r in runs),
        statistics.median(r.load.p99_ms for r in runs),
        statistics.median(r.cpu_us_per_request for r in runs),
        all(r.valid for r in runs),
    )


def matrix_markdown(cells: dict[tuple[int, str, int], dict[str, Cell]]) -> str:
    head = ["cell (workers, body, conns)"]
    for app in APPS:
        head += [f"{app.name} ev/s", "p50 ms", "p99 ms"]
    head += ["leitstand/baseline", "leitstand/noop"]
    rows = [head, ["---"] * len(head)]
    cpu = [["cell", *(f"{app.name} CPU µs/req" for app in APPS), "all runs valid"], ["---"] * (len(APPS) + 2)]
    for (workers, body, connections), apps in cells.items():
        name = f"w={workers} {body} c={connections}"
        row = [name]
        for app in APPS:
            c = apps[app.name]
            row += [f"{c.events_per_s:,.0f}", f"{c.p50_ms:.2f}", f"{c.p99_ms:.2f}"]
        mine = apps["leitstand"].events_per_s
        row += [f"{mine / apps['baseline'].events_per_s:.2f}×", f"{mine / apps['noop'].events_per_s:.0%}"]
        rows.append(row)
        valid = "yes" if all(c.valid for c in apps.values()) else "**no**"
        cpu.append([name, *(f"{apps[app.name].cpu_us:.0f}" for app in APPS), valid])
    return table(rows) + "\n\nServer CPU time (user + system, all processes) per request, median:\n\n" + table(cpu)


def goals_markdown(
    cells: dict[tuple[int, str, int], dict[str, Cell]], spread: dict[int, dict[str, Cell]], soak: Soak | None
) -> str:
    lines = [
        "| goal | cell | measured | met | the floor app, measured alike | met by it |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def add(goal: str, cell: str, measured: str, met: bool, floor: str = "—", floor_met: bool | None = None) -> None:
        verdict = "—" if floor_met is None else "yes" if floor_met else "**no**"
        lines.append(f"| {goal} | {cell} | {measured} | {'yes' if met else '**no**'} | {floor} | {verdict} |")

    def each(values: dict[str, float], text: str, goal: Callable[[float], bool]) -> tuple[str, bool, str, bool]:
        """The goal's columns for leitstand and for the floor app, from each one's measured value."""
        mine, floor = values["leitstand"], values[FLOOR.name]
        return text.format(mine), goal(mine), text.format(floor), goal(floor)

    both = ("leitstand", FLOOR.name)
    for (workers, body, connections), apps in cells.items():
        name = f"w={workers} {body} c={connections}"
        rate = {app: apps[app].events_per_s for app in both}
        p99 = {app: apps[app].p99_ms for app in both}
        if body == "single" and connections == 64:
            if workers == 1:
                of_noop = {app: rate[app] / apps["noop"].events_per_s for app in both}
                add("single events ≥ 70% of noop, 1 worker", name, *each(of_noop, "{:.0%}", lambda r: r >= 0.7))
            else:
                one = cells[(1, body, connections)]
                of_one = {app: rate[app] / one[app].events_per_s for app in both}
                add("2 workers at least as fast as 1", name, *each(of_one, "{:.2f}× of 1 worker", lambda r: r >= 1))
            add("single events: p99 ≤ 20 ms at 64 connections", name, *each(p99, "{:.2f} ms", lambda ms: ms <= 20))
        if body == "batch100" and workers == 1:
            of_base = {app: rate[app] / apps["baseline"].events_per_s for app in both}
            add("100-event batches ≥ 4× baseline events/s", name, *each(of_base, "{:.2f}×", lambda r: r >= 4))
    if spread:
        for count, apps in spread.items():
            if count == 1:
                continue
            name = f"w=1 single c=64, {count:,} domains"
            of_one = {app: apps[app].events_per_s / spread[1][app].events_per_s for app in both}
            add("many domains ≥ 80% of one domain's throughput", name, *each(of_one, "{:.0%}", lambda r: r >= 0.8))
            p99 = {app: apps[app].p99_ms for app in both}
            add("many domains: p99 ≤ 20 ms", name, *each(p99, "{:.2f} ms", lambda ms: ms <= 20))
    if soak is not None:
        add("memory flat under load, idempotency keys on", f"soak {soak.seconds:g} s",
            f"floor {soak.growth_mib:+.1f} MiB", soak.flat)
    return "\n".join(lines)


# -- many domains --------------------------------------------------------------------


SPREAD_APPS = (LEITSTAND, BASELINE, FLOOR)


def many_domains(args: argparse.Namespace, tmp: Path) -> list[Run]:
    """Single events at 64 connections, 1 worker, each to a random one of N domains; leitstand, the
    old design and the floor app alternating."""
    runs = []
    for rep in range(args.repeat):
        for count in DOMAIN_COUNTS:
            for app in SPREAD_APPS:
                run = run_one(app, "single", 64, 1, args.warmup, args.duration, tmp, domains=count)
                print(
                    f"[domains rep {rep + 1}] {app.name:9} {count:>6} domains {run.events_per_s:9.0f} ev/s "
                    f"p99 {run.load.p99_ms:7.2f} ms{'' if run.valid else '  INVALID'}",
                    file=sys.stderr,
                )
                runs.append(run)
    return runs


def spread_summary(runs: list[Run]) -> dict[int, dict[str, Cell]]:
    return {
        count: {app.name: _cell([r for r in runs if r.domains == count and r.app == app.name]) for app in SPREAD_APPS}
        for count in DOMAIN_COUNTS
        if any(r.domains == count for r in runs)
    }


def spread_markdown(spread: dict[int, dict[str, Cell]]) -> str:
    rows = [["domains", "leitstand ev/s", "p50 ms", "p99 ms", "CPU µs/req", "baseline ev/s", "p99 ms",
             "leitstand/baseline", "of one domain", "floor ev/s", "p99 ms", "floor: of one domain", "valid"],
            ["---"] * 13]
    one = spread[1]
    for count, apps in spread.items():
        mine, base, floor = apps["leitstand"], apps["baseline"], apps[FLOOR.name]
        rows.append([
            f"{count:,}", f"{mine.events_per_s:,.0f}", f"{mine.p50_ms:.2f}", f"{mine.p99_ms:.2f}", f"{mine.cpu_us:.0f}",
            f"{base.events_per_s:,.0f}", f"{base.p99_ms:.2f}", f"{mine.events_per_s / base.events_per_s:.2f}×",
            f"{mine.events_per_s / one['leitstand'].events_per_s:.0%}", f"{floor.events_per_s:,.0f}",
            f"{floor.p99_ms:.2f}", f"{floor.events_per_s / one[FLOOR.name].events_per_s:.0%}",
            "yes" if all(c.valid for c in apps.values()) else "**no**",
        ])
    return table(rows)


# -- the soak ------------------------------------------------------------------------


@dataclass
class Soak:
    seconds: float
    load: Load
    samples: list[tuple[float, float]]  # (seconds since start, RSS MiB)
    acked: int  # events in 2xx answers
    lines: int

    @property
    def growth_mib(self) -> float:
        """How far the RSS's floor rose after warm-up (the first fifth): the lowest sample of the
        last third against the lowest of the first.

        The RSS saws between a few levels as the allocator takes memory and gives it back, so a
        line fitted through the samples rises or falls with where the last of them happen to fall
        (+5.3 MiB in a soak whose floor stayed at 218.2 MiB from its first minute to its last).
        What is kept for good raises the floor, and a steady leak raises it by about two thirds of
        its growth after warm-up. The floor is only seen where each third holds one of the lows,
        so the soak must last a few of the saw's periods (about 6 minutes in 600 s soaks here).
        """
        tail = [m for _, m in self.samples[len(self.samples) // 5 :]]
        third = len(tail) // 3
        return min(tail[-third:]) - min(tail[:third]) if third else 0.0

    @property
    def fitted_mib(self) -> float:
        """Least-squares growth after warm-up, for the report beside the floor's."""
        tail = self.samples[len(self.samples) // 5 :]
        if len(tail) < 2:
            return 0.0
        slope = statistics.linear_regression([t for t, _ in tail], [m for _, m in tail]).slope
        return slope * (tail[-1][0] - tail[0][0])

    @property
    def flat(self) -> bool:
        """Flat: the floor after warm-up rises by less than 2% of the RSS it started from."""
        return self.growth_mib < 0.02 * self.samples[len(self.samples) // 5][1]


def soak(args: argparse.Namespace, tmp: Path) -> Soak:
    """Single events at 64 connections for a long time, each with an Idempotency-Key of its own (the
    keys are what could grow), with the RSS sampled every few seconds."""
    app = APPS[0]
    script = wrk_script(BODIES["single"][1], tmp, keyed=True)
    with serve(app, SOAK_WORKERS, tmp) as server:
        started = time.monotonic()
        argv = wrk_argv(server.url, script, 64, args.soak)
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
            samples: list[tuple[float, float]] = []
            while True:
                time.sleep(RSS_EVERY)
                if proc.poll() is not None:
                    break
                samples.append((time.monotonic() - started, rss_mib(server.pid)))
                print(f"soak {samples[-1][0]:5.0f} s  RSS {samples[-1][1]:7.1f} MiB", file=sys.stderr)
            output = proc.communicate()[0]
        server.stop()
        load = parse_wrk(output)
        return Soak(args.soak, load, samples, load.ok + 1, count_lines(server.data_dir))


def soak_markdown(s: Soak) -> str:
    rss = [m for _, m in s.samples]
    minutes = "  ".join(f"{t:.0f}s:{m:.1f}" for t, m in s.samples[:: max(1, round(60 / RSS_EVERY))])
    return (
        f"leitstand, {SOAK_WORKERS} workers, single events each with an Idempotency-Key of its own, "
        f"64 connections, {s.seconds:g} s: "
        f"{s.load.rps:,.0f} events/s, p50 {s.load.p50_ms:.2f} ms, p99 {s.load.p99_ms:.2f} ms, "
        f"non-2xx {s.load.non2xx}, socket errors {s.load.socket_errors}; "
        f"lines on disk {s.lines:,} ≥ acknowledged {s.acked:,}: {'yes' if s.lines >= s.acked else '**no**'}.\n\n"
        f"RSS of supervisor + workers, sampled every {RSS_EVERY:g} s: start {rss[0]:.1f} MiB, "
        f"end {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB. After the first fifth (warm-up), the lowest "
        f"sample of the last third against the lowest of the first (the floor, which what is kept "
        f"for good raises): {s.growth_mib:+.1f} MiB: **{'flat' if s.flat else 'growing'}** (flat: under 2% "
        f"of the RSS after warm-up). A line fitted through the same samples: {s.fitted_mib:+.1f} MiB "
        f"(it moves with where the last samples fall between the levels the RSS saws between).\n\n"
        f"Once a minute (s:MiB): {minutes}"
    )


# -- the profile ---------------------------------------------------------------------


NATIVE = "(no Python frame: uvloop, httptools)"


@dataclass
class Profile:
    body: str
    seconds: float
    load: Load
    loop_cpu: float  # share of one core used by the event-loop thread
    pool_cpu: float  # ... and by the journal's pool threads
    stacks: Counter[tuple[str, ...]]  # event-loop stacks, root first, with their sample counts
    lines: Counter[str]  # leitstand's own lines at the top of an event-loop stack


def profile(body: str, args: argparse.Namespace, tmp: Path) -> Profile:
    """py-spy on the single leitstand worker (1 worker: the uvicorn process is the worker) at 64 connections."""
    script = wrk_script(BODIES[body][1], tmp)
    raw = tmp / f"profile-{body}.txt"
    spy = Path(sys.executable).with_name("py-spy")
    with serve(APPS[0], 1, tmp) as server:
        argv = wrk_argv(server.url, script, 64, args.profile + 2 * args.warmup)
        loop_stat = Path(f"/proc/{server.pid}/task/{server.pid}/stat")
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
            time.sleep(args.warmup)
            started, total, loop = time.monotonic(), cpu_seconds(server.pid), _cpu(loop_stat)
            # Blocking mode: --nonblocking costs less but tears coroutine stacks apart.
            spy_argv = [str(spy), "record", "--pid", str(server.pid), "--duration", f"{args.profile:g}"]
            spy_argv += ["--rate", "100", "--format", "raw", "--threads", "--output", str(raw)]
            subprocess.run(spy_argv, check=True, capture_output=True)
            elapsed = time.monotonic() - started
            total, loop = cpu_seconds(server.pid) - total, _cpu(loop_stat) - loop
            output = proc.communicate()[0]
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(raw, RESULTS / raw.name)
    stacks: Counter[tuple[str, ...]] = Counter()
    lines: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # With --threads the root frame names the thread; the event loop runs on MainThread.
        if "MainThread" in frames[0]:
            stacks[tuple(_function(f) for f in frames[1:]) or (NATIVE,)] += int(count)
            if "(leitstand/" in frames[-1]:
                lines[frames[-1]] += int(count)
    return Profile(body, args.profile, parse_wrk(output), loop / elapsed, (total - loop) / elapsed, stacks, lines)


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _function(frame: str) -> str:
    """``ingest (leitstand/server/app.py:212)`` -> ``ingest (leitstand/server/app.py)``: lines of one function merge."""
    return re.sub(r":\d+\)$", ")", frame)


def profile_markdown(p: Profile, top: int = 12) -> str:
    total = sum(p.stacks.values())
    own: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    for stack, n in p.stacks.items():
        own[stack[-1]] += n
        for function in set(stack):
            inside[function] += n

    def share(function: str, module: str) -> str:
        return f"{inside[f'{function} (leitstand/{module}.py)'] / total:.0%}"

    own_code = sum(p.lines.values()) / total
    hottest = ", ".join(f"`{line}` {n / total:.0%}" for line, n in p.lines.most_common(5))
    rows = [["function", "self %", "total %"], ["---", "---", "---"]]
    for function, n in own.most_common(top):
        rows.append([f"`{function}`", f"{n / total:.1%}", f"{inside[function] / total:.1%}"])
    return (
        f"### {p.body}, 64 connections, 1 worker\n\n"
        f"{p.load.rps * BODIES[p.body][0]:,.0f} events/s ({p.load.rps:,.0f} requests/s) while profiled. "
        f"CPU: event-loop thread {p.loop_cpu:.0%} of a core, journal pool threads {p.pool_cpu:.0%}. "
        f"{total:,} samples of the event-loop thread, idle ones excluded.\n\n"
        f"Where the time goes: {own_code:.0%} of the busy event-loop samples are in leitstand's own code "
        f"(innermost frame in leitstand/), among them the request log line {share('Leitstand._log', 'server/app')}, "
        f"parsing and encoding the events {share('encode', 'intake/events')}, handing them to the journal "
        f"{share('Journal.append', 'storage/journal')}. The other {1 - own_code:.0%} are in uvicorn, httptools, the "
        f"event loop and the socket writes: code the noop app runs too, though leitstand's wait for the journal "
        f"adds a task switch and a burst of writes per commit. "
        f"Hottest lines of leitstand itself: {hottest}.\n\n" + table(rows)
    )


# -- the plot ------------------------------------------------------------------------


_LABELS = {"baseline": "old design", FLOOR.name: "floor app"}


def plot(cells: dict[tuple[int, str, int], dict[str, Cell]], path: Path) -> None:
    """Events/s against connections, per body, for 1 and 2 workers: leitstand, the old design, the no-op app and
    the floor app."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bodies = list(dict.fromkeys(body for _, body, _ in cells))
    figure, axes = plt.subplots(1, len(bodies), figsize=(4.2 * len(bodies), 3.4), squeeze=False)
    for ax, body in zip(axes[0], bodies, strict=True):
        for workers in WORKERS:
            points = sorted((c, apps) for (w, b, c), apps in cells.items() if (w, b) == (workers, body))
            if not points:
                continue
            x = [c for c, _ in points]
            style = "-" if workers == 1 else "--"
            for app, color in (("leitstand", "tab:blue"), ("baseline", "tab:red"), ("noop", "tab:gray"),
                               (FLOOR.name, "tab:green")):
                label = f"{_LABELS.get(app, app)}, {workers} worker{'s' if workers > 1 else ''}"
                ax.plot(x, [apps[app].events_per_s for _, apps in points], style, color=color, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(CONNECTIONS, [str(c) for c in CONNECTIONS])
        ax.set_xlabel("connections")
        ax.set_ylabel("events/s")
        ax.set_title(f"{body} ({BODIES[body][0]} event{'s' if BODIES[body][0] > 1 else ''} per request)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- the report ----------------------------------------------------------------------


READING = """### Reading the numbers

- Ratios are taken between the medians; the single runs go to bench/results/ (not committed).
- At 1 connection there is nothing to group: each leitstand request waits for its own fdatasync
  (a batch for two: its record, then its lines), while the baseline never syncs.
- The floor app (`bench/floor_app.py`) does only what no durable ingest can leave out: parse
  the body, write one compact line per event to the domain's file, kept open, and answer once a
  grouped `fdatasync` (from three files on, one `syncfs`) has made it durable. No token, no checks,
  no log, no metrics, no record of a batch's extent, and no more care for many files than one
  `os.write` each. Its columns in the goals table are the same goal measured for it: what is left
  of each goal on this machine when everything but the durable write is left out.
- wrk corrects its latencies for coordinated omission, so one stall (a slow fdatasync on a shared
  disk, a descheduled worker) adds samples up to its length: p99 reacts to rare stalls.
- wrk runs on the same CPUs as the server; with 2 workers the server's threads and wrk's share them,
  which shows in the noop app's p99 as well."""


def report(
    args: argparse.Namespace,
    version: str,
    runs: list[Run],
    spread_runs: list[Run],
    soaked: Soak | None,
    profiled: list[Profile],
    picture: Path | None,
) -> str:
    cells = summarize(runs) if runs else {}
    spread = spread_summary(spread_runs) if spread_runs else {}
    executable = os.path.relpath(sys.executable) if sys.executable.startswith(str(ROOT)) else "python"
    parts = [
        "# Benchmarks",
        f"Generated by `bench/run.py` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC:\n\n"
        f"    {shlex.join([executable, *sys.argv])}\n\nleitstand code: {version}"
        + ("" if code_version() == version else f"; **it changed during the run, now {code_version()}**"),
        "leitstand (`uvicorn app:app`, default settings: fdatasync before every 200) against the old manual's "
        "design (`bench/baseline_app.py`: FastAPI, stdlib json, a FileLock and `open(..., 'a')` per request, "
        "no fsync), a no-op ASGI app (`bench/noop_app.py`) and the floor app (`bench/floor_app.py`: the least a "
        "durable ingest can do, see below), all under the same uvicorn with "
        "`--loop uvloop --http httptools --no-access-log`. Bodies: `single` is one JSON object of "
        f"{len(BODIES['single'][1])} bytes, `batch100` an array of 100 of them ({len(BODIES['batch100'][1]):,} bytes). "
        f"Each run: fresh server and data dir, {args.warmup:g} s warmup, {args.duration:g} s measured, then "
        "`sync`; data is deleted only at the end. "
        f"{args.repeat} run(s) per app and cell, alternating leitstand, baseline, noop, floor; figures are medians. "
        "A run is valid when wrk saw no non-2xx answer and no socket error, and the data files hold at least "
        "as many lines as events were acknowledged (checked after the server stopped).",
        "## Machine\n\n" + machine(args.data_root),
    ]
    if cells or spread or soaked:
        parts.append("## Goals\n\n" + goals_markdown(cells, spread, soaked))
    if cells:
        parts.append("## Throughput and latency\n\n" + matrix_markdown(cells))
        if picture is not None:
            parts.append(f"![events/s against connections]({picture.name})")
        parts.append(READING)
    if spread:
        parts.append(
            "## Many domains\n\nSingle events, 1 worker, 64 connections, each request to one of N domains drawn at "
            "random, every one of which got an event before the warmup (so that the figures are those of active "
            "domains, not of their files being made); leitstand, the old design and the floor app alternating, "
            f"{args.repeat} run(s) each, medians.\n\n"
            + spread_markdown(spread)
        )
    if soaked is not None:
        parts.append("## Memory under load\n\n" + soak_markdown(soaked))
    if profiled:
        parts.append(
            f"## Profile\n\npy-spy ({args.profile:g} s at 100 Hz, blocking mode) on leitstand's single worker; the "
            f"raw stacks are in bench/results/. Time in C (orjson, regex, syscalls) counts for the Python line "
            f"that called it.\n\n" + "\n\n".join(profile_markdown(p) for p in profiled)
        )
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_flags(parser, duration=8.0, warmup=2.0, repeat=2)
    parser.add_argument("--soak", type=float, default=300.0, help="soak seconds, 0 to skip (default 300)")
    parser.add_argument("--profile", type=float, default=10.0, help="py-spy seconds, 0 to skip (default 10)")
    parser.add_argument("--no-matrix", action="store_true", help="skip the matrix (soak and profile only)")
    parser.add_argument("--no-domains", action="store_true", help="skip the many-domains scenario")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 s runs, 1 repeat, 20 s soak, 3 s profile")
    parser.add_argument(
        "--data-root", type=Path, default=Path(tempfile.gettempdir()), help="where data dirs go (several GB)"
    )
    parser.add_argument("--write", type=Path, metavar="FILE", help="also write the report to FILE")
    args = parser.parse_args()
    if 0 < args.soak < 3 * RSS_EVERY:
        parser.error(f"--soak needs at least {3 * RSS_EVERY:g} seconds for three RSS samples")
    if args.quick:
        args.duration, args.warmup, args.repeat = 2.0, 1.0, 1
        args.soak, args.profile = min(args.soak, 20.0), min(args.profile, 3.0)
    ensure_tools()
    version = code_version()
    with tempfile.TemporaryDirectory(prefix="leitstand-bench-", dir=args.data_root) as tmp:
        runs = [] if args.no_matrix else matrix(args, Path(tmp))
        spread_runs = [] if args.no_domains else many_domains(args, Path(tmp))
        soaked = soak(args, Path(tmp)) if args.soak > 0 else None
        profiled = [profile(body, args, Path(tmp)) for body in BODIES] if args.profile > 0 else []
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"runs-{stamp}.json").write_text(json.dumps([asdict(r) for r in runs + spread_runs], indent=1))
    if soaked is not None:
        (RESULTS / f"soak-{stamp}.json").write_text(json.dumps(soaked.samples))
    picture = args.write.with_suffix(".png") if args.write and runs else None
    if picture is not None:
        plot(summarize(runs), picture)
    text = report(args, version, runs, spread_runs, soaked, profiled, picture)
    print(text)
    if args.write:
        args.write.write_text(text + _others(args.write))


# The heading under which the report keeps what other scripts of bench/ measured: their own
# sections, each replaced by hand when its script is run again, so the file stays one current report.
OTHERS = "## Other benchmarks"


def _others(path: Path) -> str:
    """The part of an earlier report from :data:`OTHERS` on, which this run does not measure."""
    try:
        earlier = path.read_text()
    except FileNotFoundError:
        return ""
    at = earlier.find("\n" + OTHERS + "\n")
    return "" if at < 0 else "\n" + earlier[at + 1 :]


if __name__ == "__main__":
    main()
