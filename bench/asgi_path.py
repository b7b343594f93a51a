"""CPU per ingest request inside the ASGI app, this checkout against another commit, in one run.

Why it exists: on a machine shared with other work, wrk figures swing by half from run to run
(`compare.py`), which hides a change of a few microseconds in the hot path. This calls the
app itself, in-process, with no network and no fsync (``LEITSTAND_FSYNC=never``), and counts
the process's CPU time per request, which a noisy neighbour disturbs far less than wall time.
Each side runs in its own subprocess (two versions of the package cannot share one), the
sides alternate, and the report gives each side's median and range.

    .venv/bin/python bench/asgi_path.py main                     # --body batch100 --requests 20000
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import checkout
from harness import BODIES, ROOT

# Runs inside the subprocess, with the checkout to measure first on sys.path.
_MEASURE = r"""
import asyncio, os, sys, time
os.environ.update(LEITSTAND_TOKEN="t", LEITSTAND_DATA_DIR=sys.argv[1], LEITSTAND_FSYNC="never",
                  LEITSTAND_AUTH_FAIL_LIMIT="0")
from leitstand import config
from leitstand.server.app import Leitstand
body, requests = bytes.fromhex(sys.argv[2]), int(sys.argv[3])
headers = [(b"x-auth", b"t"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

async def main():
    app = Leitstand(config.load())
    started = []
    async def lifespan_receive():
        if not started:
            started.append(1)
            return {"type": "lifespan.startup"}
        await asyncio.Event().wait()
    async def lifespan_send(message):
        pass
    life = asyncio.create_task(app({"type": "lifespan"}, lifespan_receive, lifespan_send))
    await asyncio.sleep(0.1)
    scope = {"type": "http", "method": "POST", "path": "/ingest/bench", "headers": headers, "client": ("127.0.0.1", 1)}
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    statuses = []
    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
    for _ in range(500):
        await app(dict(scope), receive, send)
    # The fastest of many short rounds: a round that a neighbour slowed down does not count.
    best = float("inf")
    for _ in range(requests // 100):
        cpu = time.process_time()
        for _ in range(100):
            await app(dict(scope), receive, send)
        best = min(best, time.process_time() - cpu)
    assert set(statuses) == {200}, set(statuses)
    print(best / 100 * 1e6)
    life.cancel()

asyncio.run(main())
"""


def measure(app_dir: Path, body: bytes, requests: int, tmp: Path) -> float:
    data = tempfile.mkdtemp(dir=tmp)
    code = f"import sys; sys.path.insert(0, {str(app_dir)!r}); exec(sys.stdin.read())"
    out = subprocess.run([sys.executable, "-c", code, data, body.hex(), str(requests)], input=_MEASURE,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("against", metavar="REV", help="the commit to compare with, e.g. main")
    parser.add_argument("--body", choices=BODIES, default="single", help="request body (default single)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per side (default 7)")
    args = parser.parse_args()
    body = BODIES[args.body][1]
    results: dict[str, list[float]] = {"this checkout": [], args.against: []}
    with tempfile.TemporaryDirectory(prefix="leitstand-asgi-") as tmp:
        other = checkout(args.against, Path(tmp))
        other_dir = Path(tmp) / "checkout"
        assert other.name
        for rep in range(args.repeat):
            for name, directory in (("this checkout", ROOT), (args.against, other_dir)):
                cpu = measure(directory, body, args.requests, Path(tmp))
                results[name].append(cpu)
                print(f"rep {rep + 1} {name:14} {cpu:7.1f} µs CPU/request", file=sys.stderr)
    print(f"    .venv/bin/python {' '.join(sys.argv)}\n")
    print(f"{args.body} events, {args.requests} requests per run, {args.repeat} runs per side alternating, "
          "in-process, LEITSTAND_FSYNC=never.\n")
    print("| side | CPU µs per request in the fastest round: median of the runs (range) |\n| --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f}) |")


if __name__ == "__main__":
    main()
