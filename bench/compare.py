"""Benchmark this checkout of leitstand against another commit of it, in one run.

Why it is built this way:

* The other commit is taken out of git (``git archive``) into the session directory and
  served from there (``uvicorn --app-dir``) by the same uvicorn and venv, so only
  leitstand's own code differs between the two.
* Runs alternate (this checkout, the other commit, this checkout, ...) on fresh servers and
  data dirs, so a noisy neighbour hits both; the report gives each side's median and the
  range of its runs, so that a difference can be told from noise.

Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from harness import (
    BODIES,
    LEITSTAND,
    App,
    Run,
    add_run_flags,
    code_version,
    ensure_tools,
    machine,
    run_one,
    table,
    unpack,
)


def checkout(rev: str, session: Path) -> App:
    """``rev`` unpacked into the session directory, as an app that uvicorn loads from there."""
    directory = unpack(rev, session / "checkout")
    return App(rev.replace("/", "-"), ["--app-dir", str(directory), "app:app"], True)


def spread(runs: list[Run]) -> str:
    """The median events/s and the range of the runs, p99 and server CPU per request (medians)."""
    rates = [r.events_per_s for r in runs]
    return (
        f"{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}), "
        f"{statistics.median(r.load.p99_ms for r in runs):.2f} ms, "
        f"{statistics.median(r.cpu_us_per_request for r in runs):.0f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("against", metavar="REV", help="the commit to compare with, e.g. main or HEAD~3")
    parser.add_argument("--body", choices=BODIES, default="single", help="request body (default single)")
    parser.add_argument("--connections", type=int, nargs="+", default=[64], help="connection counts (default 64)")
    parser.add_argument("--domains", type=int, nargs="+", default=[1],
                        help="domains each run's requests are spread over at random (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for both servers, e.g. LEITSTAND_FSYNC=never to take the disk out of it")
    add_run_flags(parser, duration=8.0, warmup=2.0, repeat=5)
    args = parser.parse_args()
    env = dict(setting.split("=", 1) for setting in args.env)
    ensure_tools()
    cells = [(connections, domains) for connections in args.connections for domains in args.domains]
    runs: dict[tuple[str, int, int], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="leitstand-compare-") as tmp:
        other = checkout(args.against, Path(tmp))
        for connections, domains in cells:
            for rep in range(args.repeat):
                for app in (LEITSTAND, other):
                    run = run_one(app, args.body, connections, args.workers, args.warmup, args.duration, Path(tmp), env,
                                  domains=domains)
                    runs.setdefault((app.name, connections, domains), []).append(run)
                    print(f"c={connections:<2} domains={domains:<5} rep {rep + 1} {app.name:12} "
                          f"{run.events_per_s:9.0f} ev/s p99 {run.load.p99_ms:7.2f} ms{'' if run.valid else '  INVALID'}",
                          file=sys.stderr)
    head = ["connections, domains", "this checkout: ev/s (range), p99, CPU/req", f"{args.against}: same",
            "this/other", "valid"]
    rows = [head, ["---"] * len(head)]
    for connections, domains in cells:
        mine, theirs = runs[(LEITSTAND.name, connections, domains)], runs[(other.name, connections, domains)]
        ratio = statistics.median(r.events_per_s for r in mine) / statistics.median(r.events_per_s for r in theirs)
        valid = "yes" if all(r.valid for r in mine + theirs) else "**no**"
        rows.append([f"{connections}, {domains:,}", spread(mine), spread(theirs), f"{ratio:.3f}", valid])
    print(f"    {shlex.join(['.venv/bin/python', *sys.argv])}\n")
    settings = f" with {' '.join(args.env)}" if args.env else ""
    print(f"{args.body} events{settings}, {args.workers} worker(s), {args.repeat} runs per side alternating, "
          f"{args.duration:g} s each after {args.warmup:g} s warmup; this checkout: {code_version()}.\n")
    print(table(rows))
    print("\n" + machine(Path(tempfile.gettempdir())))


if __name__ == "__main__":
    main()
