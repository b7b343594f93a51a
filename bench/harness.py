"""The harness the benchmarks share: start a server, put wrk load on it, collect the figures.

Why it is built this way:

* Every app runs under the same uvicorn, uvloop and httptools (``serve``), so the figures of
  two apps compare the apps, not the servers.
* Every run gets a fresh server and data directory under the session directory, which
  outlives it: data is deleted only at the end, since blocks freed on a filesystem mounted
  with ``discard`` would stall the fsyncs of the next run.
* A run only counts if every answer was 2xx and, for an app that stores, the data files hold
  at least as many lines as were acknowledged (``Run.valid``).

The scenarios (``run.py``, ``compare.py``, ``idempotency.py``, ``broker.py``, ``send.py``)
import it; run them from the checkout with the venv python.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOKEN = "bench-token-0123456789"
DOMAIN = "bench.example"
CONNECTIONS = (1, 16, 64)


def event(n: int) -> dict[str, object]:
    return {
        "ts": "2026-11-28T07:17:39.123Z",
        "level": "info",
        "service": "checkout",
        "host": "web-07",
        "msg": "order placed",
        "order_id": f"A-{100000 + n}",
        "amount_cents": 4599,
        "currency": "EUR",
        "user": {"id": 81734, "country": "DE", "plan": "pro"},
    }


# name -> (events per request, body)
BODIES = {
    "single": (1, json.dumps(event(0), separators=(",", ":")).encode()),
    "batch100": (100, json.dumps([event(n) for n in range(100)], separators=(",", ":")).encode()),
}


@dataclass(frozen=True)
class App:
    name: str
    target: list[str]  # uvicorn's app arguments, relative to ROOT
    stores: bool  # writes one line per event, so the line count is checked


LEITSTAND = App("leitstand", ["app:app"], True)


@dataclass
class Load:
    """What wrk reports for one run."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx


@dataclass
class Run:
    app: str
    body: str
    connections: int
    workers: int
    load: Load
    events_per_s: float
    cpu_us_per_request: float
    acked: int  # events in 2xx answers, warmup included
    lines: int  # lines in the data files after the server stopped; -1 if the app stores nothing
    domains: int = 1  # requests spread over this many domains

    @property
    def valid(self) -> bool:
        return self.load.non2xx == 0 and self.load.socket_errors == 0 and (self.lines < 0 or self.lines >= self.acked)


# -- tools ---------------------------------------------------------------------------


def ensure_tools() -> None:
    """wrk comes from Debian, py-spy from PyPI (into this venv); both only when missing."""
    if shutil.which("wrk") is None:
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True)
    if not Path(sys.executable).with_name("py-spy").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "py-spy"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the server ----------------------------------------------------------------------


class Server:
    """A running uvicorn; ``stop`` is SIGTERM and a wait, as in production, so it drains."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, data_dir: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.url = f"http://127.0.0.1:{port}/ingest/{DOMAIN}"
        self.data_dir = data_dir

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def serve(app: App, workers: int, session: Path, extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """One server on a free port with a fresh data dir under ``session``, which outlives it."""
    tmp = tempfile.mkdtemp(prefix=f"{app.name}-", dir=session)
    port = free_port()
    flags = f"--host 127.0.0.1 --port {port} --workers {workers} --no-access-log --loop uvloop --http httptools"
    argv = [sys.executable, "-m", "uvicorn", *app.target, *flags.split()]
    env = {**os.environ, "LEITSTAND_TOKEN": TOKEN, "LEITSTAND_DATA_DIR": str(Path(tmp) / "data"), **(extra_env or {})}
    stderr = Path(tmp) / "stderr.log"
    # leitstand writes a request line per request to stdout; /dev/null is its cheapest sink.
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    server = Server(proc, port, Path(tmp) / "data")
    try:
        _wait_ready(proc, server.url, stderr)
        yield server
    finally:
        server.stop()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, stderr: Path, timeout: float = 30.0) -> None:
    request = urllib.request.Request(url, data=BODIES["single"][1], headers={"X-Auth": TOKEN}, method="POST")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{stderr.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer within {timeout}s")


def count_lines(data_dir: Path) -> int:
    """Lines in the live files and in the sealed segments (decompressed)."""
    from leitstand.storage import segments

    count = 0
    for path in data_dir.glob("*.jsonl"):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                count += chunk.count(b"\n")
    if data_dir.is_dir():
        for segment in segments.every(data_dir):
            count += sum(chunk.count(b"\n") for chunk in segments.content(data_dir, segment))
    return count


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from the ppid field of /proc/*/stat."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree = [pid]
    for p in tree:
        tree.extend(child for child, parent in parents.items() if parent == p)
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree, so that workers count too."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """VmRSS summed over the process tree: the supervisor and every worker."""
    kib = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        kib += int(match.group(1)) if match else 0
    return kib / 1024


# -- the load ------------------------------------------------------------------------


# A single event like ``event(0)`` whose values differ from request to request (wrk's Lua fills
# them in), for what depends on how alike the events are: how well a stream compresses.
VARIED_EVENT = (
    "string.format('{\"ts\":\"2026-11-28T07:%02d:%02d.%03dZ\",\"level\":\"%s\",\"service\":\"checkout\","
    "\"host\":\"web-%02d\",\"msg\":\"%s\",\"order_id\":\"A-%d\",\"amount_cents\":%d,\"currency\":\"EUR\","
    "\"user\":{\"id\":%d,\"country\":\"DE\",\"plan\":\"pro\"}}', math.random(0, 59), math.random(0, 59), "
    "math.random(0, 999), levels[math.random(#levels)], math.random(1, 40), messages[math.random(#messages)], "
    "math.random(100000, 999999), math.random(100, 99999), math.random(1, 999999))"
)


def wrk_script(body: bytes, directory: Path, domains: int = 1, keyed: bool = False, varied: bool = False) -> Path:
    """wrk's Lua script: POST ``body``; with several ``domains``, each request to one drawn at random;
    ``keyed``: each request with an Idempotency-Key of its own; ``varied``: instead of ``body``, a
    single event with values drawn for each request (:data:`VARIED_EVENT`)."""
    path = directory / "post.lua"
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = [==[{body.decode()}]==]",
        'wrk.headers["Content-Type"] = "application/json"',
        f'wrk.headers["X-Auth"] = "{TOKEN}"',
    ]
    if varied or domains > 1 or keyed:
        # Each wrk thread runs its own copy of the script: seeded apart, their draws (events, keys) differ.
        lines.append("math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))")
    if varied:
        lines += [
            'local levels = {"info", "info", "info", "warn", "error", "debug"}',
            (
                'local messages = {"order placed", "payment captured", "cart updated", "login", "search", '
                '"timeout calling inventory"}'
            ),
            f"request = function() return wrk.format(nil, nil, nil, {VARIED_EVENT}) end",
        ]
    elif domains > 1 or keyed:
        # A random prefix per thread keeps their keys apart.
        spread = f'"/ingest/d" .. math.random({domains}) .. ".{DOMAIN}"' if domains > 1 else "nil"
        lines += [
            'local prefix = string.format("%08x", math.random(0, 0x7fffffff))',
            "local n = 0",
            "request = function()",
            "  n = n + 1",
            # Headers given to wrk.format replace wrk.headers instead of adding to them.
            '  if KEYED then wrk.headers["Idempotency-Key"] = prefix .. "-" .. n end'.replace("KEYED", str(keyed).lower()),
            f"  return wrk.format(nil, {spread})",
            "end",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def create_domains(url: str, count: int, connections: int = 16) -> int:
    """One event to each domain that ``wrk_script(domains=count)`` draws from, before the load: the
    many-domains figures are then those of active domains, not of their files being created (which
    a domain's first event does once: a file, a directory sync). Returns the events acknowledged."""
    address = urllib.parse.urlsplit(url)

    def post(first: int) -> None:
        conn = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=30)
        try:
            for n in range(first, count + 1, connections):
                conn.request("POST", f"/ingest/d{n}.{DOMAIN}", BODIES["single"][1], {"X-Auth": TOKEN})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"creating domain d{n}: {response.status}")
        finally:
            conn.close()

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(post, range(1, connections + 1)))
    return count


def wrk_argv(url: str, script: Path, connections: int, seconds: float) -> list[str]:
    threads = 1 if connections == 1 else 2
    flags = f"-t {threads} -c {connections} -d {seconds:g}s --timeout 10s --latency"
    return ["wrk", *flags.split(), "-s", str(script), url]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Load:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{output}")
        return match

    done = find(r"^\s*(\d+) requests in ([\d.]+)(\w+),")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Load(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1e3,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def wrk(url: str, script: Path, connections: int, seconds: float, nice: int = 0) -> Load:
    """wrk's figures; ``nice``: its niceness (below 0 needs the privilege to raise priority)."""
    argv = (["nice", "-n", str(nice)] if nice else []) + wrk_argv(url, script, connections, seconds)
    return parse_wrk(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


# -- one run -------------------------------------------------------------------------


def add_run_flags(parser: argparse.ArgumentParser, duration: float, warmup: float, repeat: int) -> None:
    """``--duration``, ``--warmup`` and ``--repeat``: how long each run is, and how many a cell gets."""
    parser.add_argument(
        "--duration", type=float, default=duration, help=f"measured seconds per run (default {duration:g})"
    )
    parser.add_argument("--warmup", type=float, default=warmup, help=f"warmup seconds per run (default {warmup:g})")
    parser.add_argument("--repeat", type=int, default=repeat, help=f"runs per app and cell (default {repeat})")


def run_one(
    app: App,
    body: str,
    connections: int,
    workers: int,
    warmup: float,
    duration: float,
    tmp: Path,
    extra_env: dict[str, str] | None = None,
    domains: int = 1,
) -> Run:
    """One measured run on a fresh server: a warmup, then ``duration`` seconds of load, then the lines counted.

    With several ``domains``, every request goes to one of them drawn at random, and each has had an
    event before (:func:`create_domains`).
    """
    per_request, payload = BODIES[body]
    script = wrk_script(payload, tmp, domains)
    with serve(app, workers, tmp, extra_env) as server:
        created = create_domains(server.url, domains) if domains > 1 else 0
        warm = wrk(server.url, script, connections, warmup)
        cpu = cpu_seconds(server.pid)
        load = wrk(server.url, script, connections, duration)
        cpu = cpu_seconds(server.pid) - cpu
        # Once the server has stopped (SIGTERM drains), every acknowledged line must be there.
        server.stop()
        lines = count_lines(server.data_dir) if app.stores else -1
    os.sync()
    events_per_s, cpu_us = load.rps * per_request, cpu / max(load.requests, 1) * 1e6
    # +1: the single event that found the server ready.
    acked = (warm.ok + load.ok) * per_request + 1 + created
    return Run(app.name, body, connections, workers, load, events_per_s, cpu_us, acked, lines, domains)


# -- the report ----------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def unpack(rev: str, directory: Path) -> Path:
    """The tree of commit ``rev``, taken out of git into ``directory`` (created), so that another
    commit's code runs beside this checkout's with the same interpreter and packages."""
    directory.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def code_version() -> str:
    """The commit leitstand runs from, and a hash of its code: the checkout may change under a long run."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    files = sorted((ROOT / "leitstand").rglob("*.py")) + [ROOT / "app.py"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    return f"commit {head.stdout.strip() or 'unknown'}, code sha256 {digest}"


def machine(data_root: Path) -> str:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    fs = subprocess.run(["df", "-T", str(data_root)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    options = subprocess.run(["findmnt", "-no", "OPTIONS", "-T", str(data_root)], capture_output=True, text=True)
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("uvicorn", "uvloop", "httptools", "fastapi"))
    return (
        f"- CPUs (nproc): {os.cpu_count()}, {cpu.group(1) if cpu else 'unknown CPU'}\n"
        f"- kernel: {os.uname().release}\n"
        f"- data dir: {data_root} on {fs[1]} ({fs[0]}, mounted {options.stdout.strip()})\n"
        f"- Python {sys.version.split()[0]}, {versions}; {wrk_version}\n"
        f"- wrk and the server share the machine; wrk runs 1 thread for 1 connection, 2 otherwise"
    )
