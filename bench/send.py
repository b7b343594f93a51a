"""Benchmark ``leitstand send`` against the old push script's way: one ``curl`` per line.

Both run in one invocation against the same leitstand server (fsync always, as in
production), started as every benchmark starts it (``harness.serve``): ``leitstand send``
on the whole file (default 1M lines), the shell loop of ``curl`` on its first lines
(default 2000), since at its pace the whole file would take the better part of an hour. A run only counts if the
data file then holds every event once. curl comes from Debian (``apt-get install -y curl``)
if it is missing. Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import DOMAIN, LEITSTAND, ROOT, TOKEN, count_lines, event, serve

CURL_LOOP = 'while IFS= read -r line; do curl -s -o /dev/null -H "X-Auth: $T" -d "$line" "$URL"; done'


def write_events(path: Path, count: int) -> None:
    with open(path, "w") as out:
        out.writelines(json.dumps(event(n), separators=(",", ":")) + "\n" for n in range(count))


def timed(argv: list[str], env: dict[str, str], stdin: Path | None = None) -> tuple[float, float, str]:
    """Seconds, peak RSS of the child (MiB) and its output."""
    started = time.perf_counter()
    with open(stdin or os.devnull, "rb") as source:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=source, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[:4]} failed: {output}")
    return seconds, usage.ru_maxrss / 1024, output.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="events in the file for leitstand send")
    parser.add_argument("--sample", type=int, default=2000, help="of them, how many the curl loop sends")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        subprocess.run(["apt-get", "install", "-y", "curl"], check=True)
    with tempfile.TemporaryDirectory(prefix="bench-send-") as tmp:
        session = Path(tmp)
        source, sample = session / "events.jsonl", session / "sample.jsonl"
        print(f"writing {args.lines} events", file=sys.stderr)
        write_events(source, args.lines)
        write_events(sample, args.sample)
        with serve(LEITSTAND, 1, session) as server:
            base = server.url.removesuffix(f"/ingest/{DOMAIN}")
            env = {k: v for k, v in os.environ.items() if not k.startswith("LEITSTAND_")}
            env |= {"LEITSTAND_URL": base, "LEITSTAND_TOKEN": TOKEN, "T": TOKEN, "URL": server.url}
            print("leitstand send", file=sys.stderr)
            send_s, send_rss, summary = timed(
                [sys.executable, "-m", "leitstand", "send", DOMAIN, str(source)], env)
            print("curl loop", file=sys.stderr)
            curl_s, _, _ = timed(["bash", "-c", CURL_LOOP], env, stdin=sample)
            data_dir = server.data_dir
        # One event of the readiness probe, then both runs.
        lines = count_lines(data_dir)
        valid = lines == 1 + args.lines + args.sample
    size_mb = args.lines * len(json.dumps(event(0), separators=(",", ":"))) / 1e6
    print(f"""| method | events | seconds | events/s |
|---|---|---|---|
| `leitstand send {DOMAIN} events.jsonl` | {args.lines:,} (~{size_mb:.0f} MB) | {send_s:.1f} | {args.lines / send_s:,.0f} |
| `{CURL_LOOP} < sample.jsonl` | {args.sample:,} | {curl_s:.1f} | {args.sample / curl_s:,.0f} |

`leitstand send` is {args.lines / send_s / (args.sample / curl_s):,.0f}x faster; its peak RSS was {send_rss:.0f} MiB.
Its summary line: `{summary}`. Data file after both runs: {lines:,} lines ({'valid' if valid else 'INVALID'}:
{1 + args.lines + args.sample:,} expected, one being the start-up probe).""")
    if not valid:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
