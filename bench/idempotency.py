"""What an Idempotency-Key costs: leitstand with and without the header, in one run.

Single events at 1, 16 and 64 connections, one worker, the variants alternating within each
cell on fresh servers (``harness.py``): ``none`` sends no key, ``unique`` a new key
per request (each one stored: a key record written and synced with the data), ``replayed``
the same key every time (after the first, answered from memory without writing). wrk builds
every request in Lua for all three, so the client's cost is the same. Markdown to stdout.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import (
    BODIES,
    CONNECTIONS,
    LEITSTAND,
    TOKEN,
    add_run_flags,
    count_lines,
    cpu_seconds,
    ensure_tools,
    serve,
    wrk,
)

VARIANTS = ("none", "unique", "replayed")
_KEY = {
    "none": "nil",
    "unique": 'tag .. id .. "-" .. n',
    "replayed": '"the-same-key"',
}


def lua(variant: str, directory: Path, tag: str) -> Path:
    """A wrk script that numbers its threads, so that keys are unique across them; ``tag`` makes
    them unique across the runs of wrk against one server (warmup, measured)."""
    path = directory / f"{variant}-{tag}.lua"
    key = _KEY[variant]
    path.write_text(
        f"local tag, threads, n = '{tag}-', 0, 0\n"
        "function setup(thread) threads = threads + 1; thread:set('id', threads) end\n"
        f"local body = [==[{BODIES['single'][1].decode()}]==]\n"
        "function request()\n"
        "  n = n + 1\n"
        f"  local headers = {{['Content-Type'] = 'application/json', ['X-Auth'] = '{TOKEN}'}}\n"
        f"  local key = {key}\n"
        "  if key then headers['Idempotency-Key'] = key end\n"
        "  return wrk.format('POST', nil, headers, body)\n"
        "end\n"
    )
    return path


@dataclass(frozen=True)
class Run:
    rps: float
    p99_ms: float
    cpu_us: float  # server CPU (user + system) per request: steadier than req/s on a shared machine
    valid: bool  # all 2xx, and every acknowledged event on disk


def measure(variant: str, connections: int, args: argparse.Namespace, tmp: Path) -> Run:
    with serve(LEITSTAND, 1, tmp) as server:
        warm = wrk(server.url, lua(variant, tmp, "warm"), connections, args.warmup)
        cpu = cpu_seconds(server.pid)
        load = wrk(server.url, lua(variant, tmp, "load"), connections, args.duration)
        cpu = cpu_seconds(server.pid) - cpu
        server.stop()
        lines = count_lines(server.data_dir)
    acked = warm.ok + load.ok + 1
    stored_enough = lines >= acked if variant != "replayed" else lines <= 2
    valid = load.non2xx == 0 and load.socket_errors == 0 and stored_enough
    return Run(load.rps, load.p99_ms, cpu / max(load.requests, 1) * 1e6, valid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_flags(parser, duration=5.0, warmup=1.0, repeat=3)
    args = parser.parse_args()
    ensure_tools()
    results: dict[tuple[str, int], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="leitstand-idem-") as tmp:
        for connections in CONNECTIONS:
            for rep in range(args.repeat):
                for variant in VARIANTS:
                    run = measure(variant, connections, args, Path(tmp))
                    results.setdefault((variant, connections), []).append(run)
                    print(f"c={connections:<2} rep {rep + 1} {variant:8} {run.rps:8.0f} req/s p99 {run.p99_ms:6.2f} ms "
                          f"{run.cpu_us:5.0f} µs CPU/req{'' if run.valid else '  INVALID'}", file=sys.stderr)
    header = "| conns | no key: req/s, p99 ms, CPU µs/req | unique keys | unique/no key req/s | replayed key | all valid |"
    rows = [header, "| --- | --- | --- | --- | --- | --- |"]
    for connections in CONNECTIONS:
        cell = {v: results[(v, connections)] for v in VARIANTS}
        rps = {v: statistics.median(r.rps for r in cell[v]) for v in VARIANTS}
        shown = {
            v: (
                f"{rps[v]:,.0f}, {statistics.median(r.p99_ms for r in cell[v]):.2f}, "
                f"{statistics.median(r.cpu_us for r in cell[v]):.0f}"
            )
            for v in VARIANTS
        }
        valid = all(r.valid for runs in cell.values() for r in runs)
        rows.append(
            f"| {connections} | {shown['none']} | {shown['unique']} | {rps['unique'] / rps['none']:.0%} "
            f"| {shown['replayed']} | {'yes' if valid else '**no**'} |"
        )
    print(f"    {shlex.join(['.venv/bin/python', *sys.argv])}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
