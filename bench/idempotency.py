"""What an Idempotency-Key costs: leitstand with and without the header, in one run.

Single events at 1, 16 and 64 connections, one worker, the variants alternating within each
cell on fresh servers (the harness of ``run.py``): ``none`` sends no key, ``unique`` a new key
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
from pathlib import Path

from run import APPS, BODIES, CONNECTIONS, TOKEN, count_lines, ensure_tools, serve, wrk

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


def measure(variant: str, connections: int, args: argparse.Namespace, tmp: Path) -> tuple[float, float, bool]:
    """Requests/s and p99 ms of one run, and whether it was valid (all 2xx, every acked event on disk)."""
    with serve(APPS[0], 1, tmp) as server:
        warm = wrk(server.url, lua(variant, tmp, "warm"), connections, args.warmup)
        load = wrk(server.url, lua(variant, tmp, "load"), connections, args.duration)
        server.stop()
        lines = count_lines(server.data_dir)
    acked = warm.ok + load.ok + 1
    stored_enough = lines >= acked if variant != "replayed" else lines <= 2
    valid = load.non2xx == 0 and load.socket_errors == 0 and stored_enough
    return load.rps, load.p99_ms, valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup seconds per run (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant and cell (default 3)")
    args = parser.parse_args()
    ensure_tools()
    results: dict[tuple[str, int], list[tuple[float, float, bool]]] = {}
    with tempfile.TemporaryDirectory(prefix="leitstand-idem-") as tmp:
        for connections in CONNECTIONS:
            for rep in range(args.repeat):
                for variant in VARIANTS:
                    run = measure(variant, connections, args, Path(tmp))
                    results.setdefault((variant, connections), []).append(run)
                    print(f"c={connections:<2} rep {rep + 1} {variant:8} {run[0]:8.0f} req/s p99 {run[1]:6.2f} ms"
                          f"{'' if run[2] else '  INVALID'}", file=sys.stderr)
    rows = ["| conns | no key req/s (p99 ms) | unique keys req/s (p99 ms) | unique/no key "
            "| replayed key req/s (p99 ms) | all runs valid |", "| --- | --- | --- | --- | --- | --- |"]
    for connections in CONNECTIONS:
        cell = {v: results[(v, connections)] for v in VARIANTS}
        rps = {v: statistics.median(r[0] for r in cell[v]) for v in VARIANTS}
        p99 = {v: statistics.median(r[1] for r in cell[v]) for v in VARIANTS}
        valid = all(r[2] for runs in cell.values() for r in runs)
        rows.append(
            f"| {connections} | {rps['none']:,.0f} ({p99['none']:.2f}) | {rps['unique']:,.0f} ({p99['unique']:.2f}) "
            f"| {rps['unique'] / rps['none']:.0%} | {rps['replayed']:,.0f} ({p99['replayed']:.2f}) "
            f"| {'yes' if valid else '**no**'} |"
        )
    print(f"    {shlex.join(['.venv/bin/python', *sys.argv])}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
