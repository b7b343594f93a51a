"""The read side: a tail on a 1 GiB file, what a stream's page costs, and what open streams cost ingest.

Three scenarios on the shared harness (``harness.py``), Markdown to stdout, progress to stderr:

* ``tail``: a server whose data dir holds one 1 GiB journal file (and a 1 MiB one beside it,
  so that the cost can be seen not to grow with the file); ``GET /events/{domain}?tail=N``
  for N = 1, 100 and 1000, many times over one kept-alive connection, median and p99. The
  tail is found by seeking from the end, so both files should answer alike.
* ``pages``: what a stream's page costs the read pool per event (read, cursor texts, SSE framing,
  deflate), in this process, without a server.
* ``fanout``: what open streams cost the event loop itself, in a process of their own without
  a server: 100 deflated streams follow a file that a thread appends 13,000 events a second
  to, and the loop's thread CPU time is what they cost it. They send nowhere, and with
  ``--sockets`` also into loopback sockets that a process of its own drains. A steadier
  figure than ``streams`` (no wrk), for one part of it; with ``--against REV`` the same for
  another commit's code, in alternating runs.
* ``streams``: single-event ingest at 64 connections (wrk), one worker (``--workers``), fresh server per run,
  with no stream open, with 100 streams following the very domain wrk writes (every event
  goes out 100 times), as they are and deflated (``Accept-Encoding: deflate``, as browsers
  ask), and with 100 streams open on 100 other, quiet domains (``--variants`` chooses; ``busy``,
  no stream but a busy loop at nice 19 beside the server, shows what CPU time taken by
  another process alone costs ingest on the host). Each round runs the variants
  once, in turning order, and the cost of streams is each round's rate against its own run
  without them (the host's load drifts between rounds). The readers run in a process of their
  own and count what they get: a run only counts if every stream got every event acknowledged
  while it was open. With ``--pin`` the server runs on the first CPU and wrk and the readers
  on the others, so that what the readers spend is not taken from the server. With
  ``--elsewhere`` wrk gets a CPU before anyone else and the readers only idle time, as if
  both ran on other machines, as senders and browsers do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import httpx
import harness

GIB = 1 << 30


# -- tail ------------------------------------------------------------------------------


def fill(path: Path, size: int) -> int:
    """A journal file of ``size`` bytes (at least) of bench events; returns the lines written."""
    line = json.dumps({**json.loads(harness.BODIES["single"][1]), "domain": path.name.removesuffix(".jsonl")},
                      separators=(",", ":")).encode() + b"\n"
    block = line * ((4 << 20) // len(line))
    lines = 0
    with open(path, "wb") as f:
        while f.tell() < size:
            f.write(block)
            lines += block.count(b"\n")
    return lines


def time_tails(url: str, domain: str, count: int, repeat: int) -> list[float]:
    """Milliseconds of each ``GET ?tail=count``, over one kept-alive connection."""
    took = []
    with httpx.Client(headers={"X-Auth": harness.TOKEN}, timeout=30) as client:
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.get(f"{url}/events/{domain}", params={"tail": count})
            took.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200 and len(response.json()["events"]) == count, response.text
    return took


def tail_scenario(args: argparse.Namespace, session: Path) -> str:
    rows = [["file", "tail=N", "median ms", "p99 ms", "max ms"], ["---"] * 5]
    with harness.serve(harness.LEITSTAND, 1, session) as server:
        base = server.url.rsplit("/ingest/", 1)[0]
        sizes = {"big.example": GIB, "small.example": 1 << 20}
        for domain, size in sizes.items():
            lines = fill(server.data_dir / f"{domain}.jsonl", size)
            print(f"{domain}: {size >> 20} MiB, {lines} lines", file=sys.stderr)
        os.sync()
        for domain in sizes:
            for count in (1, 100, 1000):
                time_tails(base, domain, count, 20)  # warm
                took = sorted(time_tails(base, domain, count, args.requests))
                p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
                rows.append([f"{sizes[domain] >> 20} MiB", str(count), f"{statistics.median(took):.2f}",
                             f"{p99:.2f}", f"{took[-1]:.2f}"])
                print(f"{domain} tail={count}: median {statistics.median(took):.2f} ms", file=sys.stderr)
    return (f"`GET /events/{{domain}}?tail=N` over HTTP (one kept-alive connection, {args.requests} requests "
            f"per row after 20 to warm up), files in the page cache.\n\n" + harness.table(rows))


# -- pages -------------------------------------------------------------------------------


def varied_line(rng: random.Random, n: int) -> bytes:
    """An event like wrk's ``harness.VARIED_EVENT``, as stored."""
    return json.dumps({
        "ts": f"2026-11-28T07:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(1000):03d}Z",
        "level": rng.choice(["info", "warn", "error"]), "service": "checkout",
        "host": f"web-{rng.randrange(1, 41):02d}",
        "msg": rng.choice(["order placed", "payment declined", "cart updated"]), "order_id": f"A-{n}",
        "amount_cents": rng.randrange(100, 99999), "currency": "EUR",
        "user": {"id": rng.randrange(1, 999999), "country": "DE", "plan": "pro"}, "domain": "bench.example",
    }, separators=(",", ":")).encode()


def pages_scenario(args: argparse.Namespace, session: Path) -> str:
    """What a stream's page of 1,000 events costs the read pool, per event, step by step; the cursor
    texts both ways, all at once (``Page.ids``) and one ``str(Cursor)`` per event (as before it)."""
    from leitstand.server.deflate import piece
    from leitstand.server.reading import frame
    from leitstand.storage import reader

    rng = random.Random(1)
    name = "bench.example.jsonl"
    (session / name).write_bytes(b"".join(varied_line(rng, n) + b"\n" for n in range(100_000)))
    start = reader.Cursor(os.stat(session / name).st_ino, 0)
    first = reader.page(session, name, start, reader.MAX_LIMIT)
    framed = frame(first)

    def read_all() -> None:
        cursor = start
        while (page := reader.page(session, name, cursor, reader.MAX_LIMIT)).lines:
            cursor = page.next

    steps = {
        "read 100 pages (`reader.page`)": (read_all, 100_000),
        "cursor texts, all at once (`Page.ids`)": (first.ids, 1000),
        "cursor texts, one `str(Cursor)` each": (lambda: [str(first.cursor(n)).encode() for n in range(1000)], 1000),
        "frame as SSE, cursor texts included (`reading.frame`)": (lambda: frame(first), 1000),
        "deflate the framed page (`deflate.piece`)": (lambda: piece(framed, True), 1000),
    }
    rows = [["step", "µs per event (best of 5)"], ["---"] * 2]
    for step, (call, events) in steps.items():
        best = min(timeit.repeat(call, number=max(1, 20_000 // events), repeat=5)) / max(1, 20_000 // events)
        rows.append([step, f"{best / events * 1e6:.3f}"])
        print(f"{step}: {best / events * 1e6:.3f} µs per event", file=sys.stderr)
    return (f"A stream's page, step by step, in this process (no server): 100,000 events like "
            f"`harness.VARIED_EVENT` in the page cache, pages of {reader.MAX_LIMIT:,}; the framed page "
            f"deflates from {len(framed):,} to {len(piece(framed, True).data):,} bytes.\n\n" + harness.table(rows))


# -- fanout ------------------------------------------------------------------------------

FANOUT = '''
import asyncio, json, os, random, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path
tree, count, seconds, sockets = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "sockets"
sys.path[:0] = [tree, os.path.join(tree, "bench")]
import read, uvloop
from leitstand.config import Config
from leitstand.server import reading
from leitstand.storage.reader import Cursor
from leitstand.telemetry.metrics import Metrics
data = Path(tempfile.mkdtemp())
name = "bench.example.jsonl"
rng = random.Random(1)
lines = [read.varied_line(rng, n) + b"\\n" for n in range(13_000)]
(data / name).write_bytes(lines[0])
writing = threading.Event()
def write():
    # 13 events a millisecond, each write one change: the file of a busy domain.
    with open(data / name, "ab", buffering=0) as f:
        n = 0
        while not writing.is_set():
            f.write(b"".join(lines[n : n + 13]))
            n = (n + 13) % 12_987
            time.sleep(0.001)
async def main():
    stopping = asyncio.Event()
    routes = reading.ReadRoutes(data, Metrics(Config(tokens="t" * 20, data_dir=data)), lambda r: None, stopping)
    async def receive():
        await asyncio.Event().wait()
    sent = [0]
    def sender(writer):
        async def send(message):
            body = message.get("body", b"")
            sent[0] += len(body)
            if writer is not None and body:
                # As uvicorn sends a chunk: framed in one copy, written at once.
                writer.write(b"".join([b"%x\\r\\n" % len(body), body, b"\\r\\n"]))
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
        return send
    writers = [None] * count
    if sockets:
        # A process of its own that takes and drops what the streams send, as 100 browsers would.
        drain = subprocess.Popen([sys.executable, "-c", DRAIN], stdout=subprocess.PIPE, text=True)
        port = int(drain.stdout.readline())
        writers = [(await asyncio.open_connection("127.0.0.1", port))[1] for _ in range(count)]
    start = Cursor((data / name).stat().st_ino, 0)
    streams = [reading._EventStream(routes, reading._Key(name, None, True), start) for _ in range(count)]
    tasks = [asyncio.ensure_future(s({"type": "http"}, receive, sender(w))) for s, w in zip(streams, writers)]
    await asyncio.sleep(2)
    began, cpu = time.perf_counter(), time.thread_time()
    await asyncio.sleep(seconds)
    loop = (time.thread_time() - cpu) / (time.perf_counter() - began)
    stopping.set()
    await asyncio.gather(*tasks)
    routes.close()
    if sockets:
        drain.kill()
    print(json.dumps({"loop": loop, "sent": sent[0]}))
DRAIN = """
import asyncio, uvloop
class Drop(asyncio.Protocol):
    def data_received(self, data):
        pass
async def main():
    server = await asyncio.get_running_loop().create_server(Drop, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""
writer = threading.Thread(target=write)
writer.start()
try:
    uvloop.run(main())
finally:
    writing.set()
    writer.join()
    shutil.rmtree(data)
'''


def fanout_scenario(args: argparse.Namespace, session: Path) -> str:
    """The loop's CPU for ``--streams`` in-process streams, this checkout and ``--against`` alternating,
    sending nowhere and, with ``--sockets``, also into loopback sockets."""
    trees = {"this checkout": harness.ROOT}
    if args.against:
        trees[args.against] = harness.unpack(args.against, session / "against")
    modes = ("nowhere", "sockets") if args.sockets else ("nowhere",)
    loops: dict[tuple[str, str], list[float]] = {(name, mode): [] for name in trees for mode in modes}
    for rep in range(args.repeat):
        for (name, mode), shares in loops.items():
            argv = [sys.executable, "-c", FANOUT, str(trees[name]), str(args.streams), str(args.duration), mode]
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            shares.append(json.loads(out.splitlines()[-1])["loop"])
            print(f"rep {rep + 1} {name}, {mode}: the loop {shares[-1]:.2%} of a core", file=sys.stderr)
    rows = [["code", "sent", "event loop, share of a core: median (range)"], ["---"] * 3]
    for (name, mode), shares in loops.items():
        rows.append([name, {"nowhere": "nowhere", "sockets": "into loopback sockets"}[mode],
                     f"{statistics.median(shares):.2%} ({min(shares):.2%}–{max(shares):.2%})"])
    return (f"{args.streams} deflated streams in one process, following a file written 13,000 events a second "
            f"in writes of 13; the event loop's thread CPU time over {args.duration:g} s after 2 s, {args.repeat} "
            "runs each, alternating. Into sockets: each stream's chunks framed and written as uvicorn does, to a "
            "process of its own that drops them.\n\n" + harness.table(rows))


# -- streams -----------------------------------------------------------------------------

READERS = '''
import asyncio, json, signal, sys, zlib, httptools, uvloop
host, port, token, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
domains, encoding = sys.argv[5].split(","), sys.argv[6]
MARK = b"\\ndata: "
class Reader(asyncio.Protocol):
    # The readers share two cores with the server and wrk, and stand for browsers that would run
    # elsewhere: while the load runs, each does the least that still lets it check every event.
    # A stream as it is gets its events counted as they arrive: one pass in C over what the
    # kernel copied (keeping them, 28 KB per event over 100 streams, costs more in page faults:
    # 68% of a core against 21%, measured). A deflated one is only kept (4 KB per event over 100
    # streams), and after the load finish() takes it apart (httptools) and inflates it, as a
    # browser would.
    def __init__(self, domain):
        self.domain, self.got, self.tail, self.encoding, self.wire = domain, 0, b"", None, 0
        self.kept = bytearray() if encoding == "deflate" else None
        self.inflate = None
    def connection_made(self, transport):
        transport.write(f"GET /events/{self.domain}/stream HTTP/1.1\\r\\nHost: x\\r\\nX-Auth: {token}\\r\\n"
                        f"Accept-Encoding: {encoding}\\r\\n\\r\\n".encode())
    def data_received(self, data):
        self.wire += len(data)
        if self.kept is not None:
            self.kept += data
            return
        if self.encoding is None:  # the head: sent as it is, unless it says otherwise
            self.encoding = "other" if b"\\r\\ncontent-encoding:" in data.lower() else "identity"
        self.count(data)
    def finish(self):
        if self.kept is not None:
            httptools.HttpResponseParser(self).feed_data(bytes(self.kept))
            self.kept = None
    def on_header(self, name, value):
        if name.lower() == b"content-encoding":
            self.encoding, self.inflate = value.decode(), zlib.decompressobj()
    def on_body(self, data):
        self.count(self.inflate.decompress(data) if self.inflate is not None else data)
    def count(self, data):
        # A mark cut in two by the chunks lies whole in the joint of the last bytes and the first.
        self.got += data.count(MARK) + (self.tail + data[: len(MARK) - 1]).count(MARK)
        self.tail = (self.tail + data[-(len(MARK) - 1) :])[-(len(MARK) - 1) :]
async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    readers = [(await loop.create_connection(lambda n=n: Reader(domains[n % len(domains)]), host, port))[1]
               for n in range(count)]
    print("open", flush=True)
    await stop.wait()
    for reader in readers:
        reader.finish()
    print(json.dumps({"got": [r.got for r in readers], "wire": sum(r.wire for r in readers),
                      "encodings": sorted({r.encoding for r in readers})}), flush=True)
uvloop.run(main())
'''


def streams_run(variant: str, args: argparse.Namespace, session: Path) -> dict[str, float]:
    script = harness.wrk_script(harness.BODIES["single"][1], session, varied=True)
    with harness.serve(harness.LEITSTAND, args.workers, session) as server:
        if args.pin:
            _pin(server.pid, SERVER_CPUS)
        base = server.url.rsplit("/ingest/", 1)[0]
        port = int(base.rsplit(":", 1)[1])
        quiet = [f"quiet-{n}.example" for n in range(args.streams)]
        # What runs beside the server: the readers, or the busy loop.
        beside: subprocess.Popen[Any] | None = None
        if variant == "busy":
            beside = subprocess.Popen(["nice", "-n", str(BUSY_NICE), sys.executable, "-c", "while True: pass"])
        elif variant != "none":
            following = variant != "quiet"
            domains = [harness.DOMAIN] if following else quiet
            if variant == "quiet":
                with httpx.Client(headers={"X-Auth": harness.TOKEN}) as client:
                    for domain in quiet:
                        assert client.post(f"{base}/ingest/{domain}", content=b"{}").status_code == 200
            beside = subprocess.Popen(
                [*(["nice", "-n", str(READERS_NICE)] if args.elsewhere else []),
                 sys.executable, "-c", READERS, "127.0.0.1", str(port), harness.TOKEN, str(args.streams),
                 ",".join(domains), "deflate" if variant == "deflated" else "identity"],
                stdout=subprocess.PIPE, text=True,
            )
            assert beside.stdout is not None and beside.stdout.readline().strip() == "open"
            time.sleep(1.0)
        lines_before = harness.count_lines(server.data_dir)
        nice = WRK_NICE if args.elsewhere else 0
        harness.wrk(server.url, script, 64, args.warmup, nice)
        cpu, beside_cpu = harness.cpu_seconds(server.pid), _cpu_of(beside)
        load = harness.wrk(server.url, script, 64, args.duration, nice)
        cpu, beside_cpu = harness.cpu_seconds(server.pid) - cpu, _cpu_of(beside) - beside_cpu
        time.sleep(2.0)  # the streams catch up
        written = harness.count_lines(server.data_dir) - lines_before
        delivered, wire = None, 0.0
        if beside is not None and variant == "busy":
            beside.kill()
            beside.wait()
        elif beside is not None:
            beside.send_signal(signal.SIGTERM)
            out, _ = beside.communicate(600)  # a deflated stream is inflated only now
            report = json.loads(out.strip().splitlines()[-1])
            encoded = report["encodings"] == (["deflate"] if variant == "deflated" else ["identity"])
            delivered = min(report["got"]) if following and encoded else 0
            wire = report["wire"] / max(sum(report["got"]), 1)
        server.stop()
    valid = load.non2xx == 0 and load.socket_errors == 0 and (delivered is None or variant in ("quiet", "busy")
                                                               or delivered >= written)
    return {"rps": load.rps, "p99": load.p99_ms, "cpu": cpu / max(load.requests, 1) * 1e6,
            "beside": beside_cpu / args.duration, "wire": wire,
            "valid": float(valid), "delivered": float(delivered or 0), "written": float(written)}


# With --elsewhere: wrk and the readers stand for machines elsewhere, as senders and browsers are:
# wrk gets a CPU before anyone else, the readers only time that nobody else wants.
WRK_NICE, READERS_NICE = -10, 19
# The busy variant's loop asks only for CPU time nobody else wants: what that costs ingest on this host.
BUSY_NICE = 19
# With --pin: the server (every thread of its process tree) on the first CPU; this script, and so
# wrk and the readers it starts, on the others.
SERVER_CPUS = {0}


def _pin(pid: int, cpus: set[int]) -> None:
    for process in harness.process_tree(pid):
        for task in os.listdir(f"/proc/{process}/task"):
            os.sched_setaffinity(int(task), cpus)


def _cpu_of(beside: subprocess.Popen[Any] | None) -> float:
    return 0.0 if beside is None else harness.cpu_seconds(beside.pid)


STREAM_VARIANTS = ("following", "deflated", "quiet")


def streams_scenario(args: argparse.Namespace, session: Path) -> str:
    variants = ("none", *args.variants.split(","))
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(args.repeat):
        # The order turns with each round, so that none of them always runs first, or after another.
        for variant in variants[rep % len(variants) :] + variants[: rep % len(variants)]:
            run = streams_run(variant, args, session)
            runs[variant].append(run)
            print(f"rep {rep + 1} {variant:9} {run['rps']:8.0f} req/s p99 {run['p99']:6.2f} ms "
                  f"delivered {run['delivered']:.0f}/{run['written']:.0f}{'' if run['valid'] else ' INVALID'}",
                  file=sys.stderr)
    rows = [["streams", "single events/s (range)", "p99 ms", "server CPU µs/req", "readers' (busy loop's) CPU",
             "bytes per event and stream", "vs none (range)", "valid"], ["---"] * 8]
    names = {"none": "none", "following": f"{args.streams} following the written domain",
             "deflated": f"{args.streams} following it, deflated", "quiet": f"{args.streams} on quiet domains",
             "busy": f"none, a busy loop at nice {BUSY_NICE} beside"}
    for variant in variants:
        rates = [r["rps"] for r in runs[variant]]
        # Against the run without streams of the same round: the host's load drifts between rounds.
        costs = [run["rps"] / none["rps"] - 1 for run, none in zip(runs[variant], runs["none"], strict=True)]
        rows.append([
            names[variant],
            f"{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f})",
            f"{statistics.median(r['p99'] for r in runs[variant]):.2f}",
            f"{statistics.median(r['cpu'] for r in runs[variant]):.0f}",
            f"{statistics.median(r['beside'] for r in runs[variant]):.0%} of a core",
            f"{statistics.median(r['wire'] for r in runs[variant]):.0f}" if variant in ("following", "deflated") else "—",
            f"{statistics.median(costs):+.1%} ({min(costs):+.1%} to {max(costs):+.1%})" if variant != "none" else "—",
            "yes" if all(r["valid"] for r in runs[variant]) else "**no**",
        ])
    where = ("the server pinned to the first CPU, wrk and the readers to the second (`--pin`)" if args.pin
             else "on the same two cores")
    if args.elsewhere:
        where += (f", wrk at nice {WRK_NICE} and the readers at nice {READERS_NICE} (`--elsewhere`: as if both "
                  "ran on other machines)")
    return (f"Single events, 64 connections, {args.workers} worker{'s' if args.workers > 1 else ''}, "
            f"{args.repeat} rounds of one run per variant, in turning order, "
            f"{args.duration:g} s each after {args.warmup:g} s warmup; events with values drawn per request "
            "(`harness.VARIED_EVENT`, about 250 bytes as an SSE frame); the readers (uvloop and httptools, "
            f"counting events as they arrive, inflating the deflated streams) run in their own process, {where}. "
            "Bytes per event and stream: what the readers received, framing included. "
            "Vs none: the median of each round's rate against the same round's run without streams.\n\n"
            + harness.table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("tail", "pages", "fanout", "streams", "all"))
    parser.add_argument("--requests", type=int, default=200, help="tail requests per row (default 200)")
    parser.add_argument("--streams", type=int, default=100, help="open streams (default 100)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes for streams (default 1)")
    parser.add_argument("--variants", default=",".join(STREAM_VARIANTS),
                        help="streams: what runs against none, of " + ", ".join((*STREAM_VARIANTS, "busy"))
                        + f" (busy: no stream, a busy loop at nice {BUSY_NICE} beside the server)")
    parser.add_argument("--against", metavar="REV", help="fanout: also measure this commit's code")
    parser.add_argument("--sockets", action="store_true", help="fanout: also send into loopback sockets")
    parser.add_argument("--elsewhere", action="store_true",
                        help=f"streams: wrk at nice {WRK_NICE}, the readers at nice {READERS_NICE}, as if "
                        "both ran on other machines (needs the privilege to raise priority)")
    parser.add_argument("--pin", action="store_true",
                        help="streams: the server on the first CPU, wrk and the readers on the others")
    harness.add_run_flags(parser, duration=8.0, warmup=2.0, repeat=3)
    args = parser.parse_args()
    harness.ensure_tools()
    if args.pin:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 2)) - SERVER_CPUS)
    parts = []
    with tempfile.TemporaryDirectory(prefix="leitstand-read-") as tmp:
        if args.scenario in ("tail", "all"):
            parts.append(tail_scenario(args, Path(tmp)))
        if args.scenario in ("pages", "all"):
            parts.append(pages_scenario(args, Path(tmp)))
        if args.scenario in ("fanout", "all"):
            parts.append(fanout_scenario(args, Path(tmp)))
        if args.scenario in ("streams", "all"):
            parts.append(streams_scenario(args, Path(tmp)))
    print(f"    {shlex.join(['.venv/bin/python', *sys.argv])}\n")
    print(f"This checkout: {harness.code_version()}.\n")
    print("\n\n".join(parts))
    print("\n" + harness.machine(Path(tempfile.gettempdir())))


if __name__ == "__main__":
    main()
