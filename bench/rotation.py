"""What rotation and background compression cost the ingest, and what compression gains, in one run.

* Throughput: leitstand with a seal every ``--interval`` (``LEITSTAND_ROTATE_INTERVAL``) and
  zstd compression in the background, beside rotation off, alternating on fresh servers
  (``harness.py``); each run counts only if every acknowledged event is in the live files
  or the segments afterwards.
* Compression: ratio and speed (one thread) of zstd (level 1) and gzip, as the housekeeper runs them,
  on a realistic event mix (log lines of several services, levels and messages, with ids,
  timestamps and numbers that vary).

Markdown to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import zstandard
from harness import LEITSTAND, Run, add_run_flags, code_version, ensure_tools, machine, run_one, table

from leitstand.storage import rotation, segments
from leitstand.storage.journal import Journal

SERVICES = ("checkout", "search", "auth", "inventory", "payments", "gateway")
LEVELS = ("info",) * 12 + ("debug",) * 5 + ("warn",) * 2 + ("error",)
MESSAGES = (
    "request served", "order placed", "cache miss", "token refreshed", "upstream slow", "retrying request",
    "payment authorized", "item reserved", "user signed in", "rate limited",
)


def event_mix(count: int, seed: int = 16) -> bytes:
    """``count`` journal lines as a busy service writes them."""
    rng = random.Random(seed)
    started = 1_800_000_000.0
    lines = []
    for n in range(count):
        when = started + n * 0.0037
        level = rng.choice(LEVELS)
        event: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z",
            "level": level,
            "service": rng.choice(SERVICES),
            "host": f"web-{rng.randrange(1, 24):02d}",
            "msg": rng.choice(MESSAGES),
            "trace_id": f"{rng.getrandbits(128):032x}",
            "duration_ms": round(rng.lognormvariate(3, 1), 2),
            "status": rng.choice((200, 200, 200, 201, 204, 304, 400, 404, 429, 500)),
            "user": {"id": rng.randrange(1, 200_000), "country": rng.choice(("DE", "AT", "CH", "FR", "NL"))},
        }
        if level == "error":
            event["error"] = {"type": "TimeoutError", "detail": f"upstream {rng.choice(SERVICES)} after 30000 ms"}
        lines.append(orjson.dumps({**event, "domain": "bench.example"}) + b"\n")
    return b"".join(lines)


def compression(data: bytes, directory: Path) -> list[list[str]]:
    """Ratio and single-thread speed of each codec on ``data``, written and read as the housekeeper does."""
    head = ["codec", "ratio", "compressed", "compress MB/s", "whole pass MB/s", "decompress MB/s"]
    rows = [head, ["---"] * len(head)]
    stem = "bench.example.jsonl.20260128T071739.123456Z"
    for codec in ("zst", "gz"):
        work = directory / codec
        work.mkdir()
        (work / stem).write_bytes(data)
        housekeeper = rotation.Housekeeper(Journal(work), rotation.Policy(compress=codec))
        segment = segments.parse(stem)
        assert segment is not None
        started = time.perf_counter()
        compressor = segments.compressor(codec)
        for offset in range(0, len(data), 1 << 16):
            compressor.compress(data[offset:offset + (1 << 16)])
        compressor.flush()
        alone = time.perf_counter() - started
        started = time.perf_counter()
        housekeeper.compress(segment)  # read, compress, write, sync, read back, compare, checksum, rename
        packed = time.perf_counter() - started
        path = work / f"{stem}.{codec}"
        started = time.perf_counter()
        assert b"".join(segments.chunks(path, codec)) == data
        unpacked = time.perf_counter() - started
        size = path.stat().st_size
        mb = len(data) / 1e6
        rows.append([codec, f"{len(data) / size:.1f}x", f"{size / 1e6:.1f} MB of {mb:.1f} MB",
                     f"{mb / alone:.0f}", f"{mb / packed:.0f}", f"{mb / unpacked:.0f}"])
    # The level the housekeeper does not use, for comparison: codec alone, in memory.
    started = time.perf_counter()
    level3 = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    alone = time.perf_counter() - started
    rows.append(["zst level 3 (not used)", f"{len(data) / len(level3):.1f}x",
                 f"{len(level3) / 1e6:.1f} MB of {len(data) / 1e6:.1f} MB", f"{len(data) / 1e6 / alone:.0f}", "-", "-"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", default="2s", help="LEITSTAND_ROTATE_INTERVAL of the rotating server")
    parser.add_argument("--bodies", nargs="+", default=["single", "batch100"], help="request bodies")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--events", type=int, default=400_000, help="events in the compression sample")
    add_run_flags(parser, duration=10.0, warmup=2.0, repeat=3)
    args = parser.parse_args()
    ensure_tools()
    variants = {"off": {"LEITSTAND_ROTATE_INTERVAL": "off"},
                "rotating": {"LEITSTAND_ROTATE_INTERVAL": args.interval, "LEITSTAND_COMPRESS": "zstd"}}
    runs: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="leitstand-rotation-") as tmp:
        for body in args.bodies:
            for rep in range(args.repeat):
                for name, env in variants.items():
                    run = run_one(LEITSTAND, body, args.connections, args.workers, args.warmup, args.duration,
                                  Path(tmp), env)
                    runs.setdefault((body, name), []).append(run)
                    print(f"{body:9} rep {rep + 1} {name:9} {run.events_per_s:9.0f} ev/s p99 {run.load.p99_ms:7.2f} ms "
                          f"{run.cpu_us_per_request:6.0f} µs/req{'' if run.valid else '  INVALID'}", file=sys.stderr)
        mix = event_mix(args.events)
        codecs = compression(mix, Path(tmp))
    head = ["body", "rotation off: ev/s (range), p99, server CPU/req", f"seal every {args.interval} + zstd: same",
            "rotating/off ev/s", "rotating/off CPU/req", "valid"]
    rows = [head, ["---"] * len(head)]
    for body in args.bodies:
        off, on = runs[(body, "off")], runs[(body, "rotating")]
        ratio = statistics.median(r.events_per_s for r in on) / statistics.median(r.events_per_s for r in off)
        cpu = statistics.median(r.cpu_us_per_request for r in on) / statistics.median(
            r.cpu_us_per_request for r in off)
        rows.append([body, _spread(off), _spread(on), f"{ratio:.3f}", f"{cpu:.3f}",
                     "yes" if all(r.valid for r in off + on) else "**no**"])
    print(f"    {shlex.join(['.venv/bin/python', *sys.argv])}\n")
    print(f"{args.workers} worker(s), {args.connections} connections, {args.repeat} runs per variant alternating, "
          f"{args.duration:g} s each after {args.warmup:g} s warmup; {code_version()}.\n")
    print(table(rows))
    print(f"\nCompression of {args.events:,} events of a realistic mix ({len(mix) / len(mix.splitlines()):.0f} bytes "
          "per line on average), one thread:\n")
    print(table(codecs))
    print("\n" + machine(Path(tempfile.gettempdir())))


def _spread(runs: list[Run]) -> str:
    rates = [r.events_per_s for r in runs]
    return (f"{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}), "
            f"{statistics.median(r.load.p99_ms for r in runs):.2f} ms, "
            f"{statistics.median(r.cpu_us_per_request for r in runs):.0f} µs")


if __name__ == "__main__":
    main()
