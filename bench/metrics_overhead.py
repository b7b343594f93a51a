"""What the metrics add to one request: the calls the HTTP app makes per answered ingest.

An ingest answered 200 costs ``Metrics.answered`` (request counter and latency histogram)
plus ``Metrics.stored`` (events and bytes of its domain); any other answer only the first.
Both stores are measured: in memory (one process) and multiprocess (mmap files, workers).
Each store runs in a fresh interpreter, because prometheus-client keeps one per process.

    .venv/bin/python bench/metrics_overhead.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import timeit

N = 200_000


def measure() -> None:
    from leitstand.config import Config
    from leitstand.telemetry.metrics import Metrics

    with tempfile.TemporaryDirectory() as data:
        metrics = Metrics(Config.from_env({"LEITSTAND_TOKEN": "t", "LEITSTAND_DATA_DIR": data}))
        metrics.answered("/ingest", 200, "ok", 0.0004)
        metrics.stored("bench.example", 1, 210)
        best = {
            "answered": min(timeit.repeat(lambda: metrics.answered("/ingest", 200, "ok", 0.0004), number=N, repeat=5)),
            "stored": min(timeit.repeat(lambda: metrics.stored("bench.example", 1, 210), number=N, repeat=5)),
        }
    store = "multiprocess" if metrics.directory else "in memory"
    total = sum(best.values()) / N * 1e6
    parts = ", ".join(f"{name} {seconds / N * 1e6:.2f} µs" for name, seconds in best.items())
    print(f"{store:>12}: {total:.2f} µs per stored request ({parts})")


def main() -> None:
    if len(sys.argv) > 1:
        measure()
        return
    with tempfile.TemporaryDirectory() as shared:
        for extra in ({}, {"PROMETHEUS_MULTIPROC_DIR": shared}):
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | extra
            subprocess.run([sys.executable, __file__, "measure"], env=env, check=True)


if __name__ == "__main__":
    main()
