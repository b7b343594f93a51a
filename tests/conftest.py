"""Fixtures that run the real service: ``uvicorn app:app`` in a subprocess on a free loopback port."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"
# uvicorn drains, then re-raises SIGTERM so that the exit status tells how it ended;
# systemd and Kubernetes count both as a clean stop.
CLEAN_EXIT = {0, -signal.SIGTERM}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One running service, started the way an operator starts it.

    ``command`` is ``uvicorn`` (``uvicorn app:app`` from the checkout) or ``serve``
    (``leitstand serve``). It runs in its own process group, so that a kill reaches
    every worker.
    """

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        workers: int = 1,
        command: str = "uvicorn",
        port: int | None = None,
        preexec: Callable[[], None] | None = None,
        ca: Path | None = None,
    ) -> None:
        """``ca``: the service speaks HTTPS with a certificate signed by this CA file."""
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = {
            **os.environ,
            "LEITSTAND_TOKEN": TOKEN,
            "LEITSTAND_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.workers = workers
        self.command = command
        self.port = port or free_port()
        self.preexec = preexec
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.verify is not True else 'http'}://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        if self.command == "serve":
            return [sys.executable, "-m", "leitstand", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--workers", str(self.workers)]
        argv = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(self.port)]
        if "LEITSTAND_SSL_CERTFILE" in self.env:  # uvicorn takes its TLS files as flags, as an operator gives them
            argv += ["--ssl-certfile", self.env["LEITSTAND_SSL_CERTFILE"], "--ssl-keyfile", self.env["LEITSTAND_SSL_KEYFILE"]]
        return argv + (["--workers", str(self.workers)] if self.workers > 1 else [])

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to answer."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=self.preexec,
        )
        log.close()
        return self.proc

    def start(self, timeout: float = 20.0) -> Server:
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not answer in {timeout}s:\n{self.output()}")

    def post(self, domain: str, body: bytes | str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        data = body.encode() if isinstance(body, str) else body
        return httpx.post(
            f"{self.url}/ingest/{domain}",
            content=data,
            headers={"X-Auth": TOKEN, **(headers or {})},
            timeout=10,
            verify=self.verify,
            **kw,
        )

    def raw(self, request: bytes) -> bytes:
        """Send bytes exactly as given (no client-side path normalisation); the status line back."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(request)
            return conn.recv(65536).split(b"\r\n", 1)[0]

    def raw_post(self, target: str, body: bytes = b"{}") -> bytes:
        return self.raw_post_response(target, body).split(b"\r\n", 1)[0]

    def raw_post_response(self, target: str, body: bytes = b"{}") -> bytes:
        """The whole answer, headers and body, to a POST whose target is sent exactly as given."""
        head = f"POST {target} HTTP/1.1\r\nHost: x\r\nX-Auth: {TOKEN}\r\nContent-Length: {len(body)}\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
            return b"".join(iter(lambda: conn.recv(65536), b""))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as systemd or Kubernetes would send, and wait for the exit code."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to every process of the service: a crash, with no chance to clean up.

        Returns once every process of the group is gone: a worker killed inside an fsync dies only
        when the call returns, and holds the port until then."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        elif self.proc is not None:
            self.signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.proc is not None and _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, text: str, timeout: float = 10.0) -> str:
        """The output once it holds ``text``: the service writes its request log lines once per
        pass of its event loop, after the answers, so a line may follow its answer a little."""
        deadline = time.monotonic() + timeout
        while text not in (output := self.output()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return output


def _group_alive(group: int) -> bool:
    """Whether a thread of a process of the process group ``group`` is still running (zombies do not
    count). Threads, not processes: a killed worker's first thread is a zombie at once, while its
    journal thread finishes an fsync and holds every descriptor of the process, the port too."""
    for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == group and state not in ("Z", "X"):
            return True
    return False


def crash_repeatedly(server: Server, rng: random.Random, times: int, pause: tuple[float, float]) -> None:
    """kill -9 and restart ``server`` ``times`` times, each after a random pause."""
    for _ in range(times):
        time.sleep(rng.uniform(*pause))
        server.kill()
        server.start()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m leitstand ARGS`` as an operator runs it, with no LEITSTAND_* but those in ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LEITSTAND_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "leitstand", *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def tls_files(directory: Path) -> tuple[dict[str, str], Path]:
    """A certificate for 127.0.0.1 from a new CA: the settings that make the service speak HTTPS, and the CA file."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile, cafile = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    return {"LEITSTAND_SSL_CERTFILE": str(certfile), "LEITSTAND_SSL_KEYFILE": str(keyfile)}, cafile


def require_root(why: str) -> None:
    """Skip the test, with a one-line reason, unless it runs as root (as CI does)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


@contextmanager
def refusing_new_files(directory: Path) -> Iterator[Path]:
    """``directory``, in which no file can be created (permission denied) while in the block: the
    ext4 immutable flag as root, who ignores modes; a mode without write permission otherwise."""
    mode = directory.stat().st_mode
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    else:
        directory.chmod(0o500)
    try:
        yield directory
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(mode)


def without_venv_env() -> dict[str, str]:
    """The environment of a new user's shell: no LEITSTAND_*, and no virtualenv active or on the PATH."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/")
    return {k: v for k, v in os.environ.items() if not k.startswith("LEITSTAND_") and k != "VIRTUAL_ENV"} | {
        "PATH": path}


@pytest.fixture(scope="session")
def fresh_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout as a new user's clone has it: the files git knows, as they are in the
    work tree, without .venv, data or a dev token. Shared by the tests of the README and the scripts,
    so that the first ``./scripts/start`` in it pays for the install once."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    target = tmp_path_factory.mktemp("checkout")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # not a file deleted in the work tree
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    """A factory for servers on ``tmp_path``; every one is killed at the end of the test."""
    servers: list[Server] = []

    def make(data_dir: Path | None = None, **kw: Any) -> Server:
        server = Server(data_dir or tmp_path / "data", tmp_path / f"server-{len(servers)}.log", **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def server(make_server: Any) -> Server:
    return make_server().start()


def read_lines(path: Path) -> list[bytes]:
    """The lines of a journal file; each must end in a newline."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "journal file has a torn tail"
    return data.splitlines()


class Load:
    """Concurrent clients posting events with ids used once; remembers which were acknowledged.

    Each request carries one of ``batches`` events (an object for one, an array for more),
    to a domain drawn from ``domains``, padded with up to ``pad`` bytes. A client without a
    key never retries: a request that fails or dies with the server is simply not
    acknowledged, so every acknowledged id must be on disk exactly once. The first ``keyed``
    clients give each batch its own Idempotency-Key and send it again (same key, same body)
    after a connection error or a 5xx until it is answered: every batch they send is then
    acknowledged, and on disk once. Every batch sent, acknowledged or not, must be on disk
    whole or not at all (:func:`partial_batches`). ``pace``: each client sends at most one
    request per so many seconds (a steady rate instead of as fast as it can). ``prefix``
    starts every id, so that two loads at once never share one.
    """

    def __init__(
        self,
        url: str,
        domains: Sequence[str],
        clients: int = 32,
        batches: Sequence[int] = (1,),
        pad: int = 0,
        seed: int = 0,
        keyed: int = 0,
        pace: float = 0.0,
        prefix: str = "",
    ) -> None:
        self.url = url
        self.pace = pace
        self.prefix = prefix
        # The longest time one request took to be answered (or to fail), and how many failed unanswered.
        self.slowest = 0.0
        self.unanswered = 0
        self.keyed = keyed
        self.domains = domains
        self.batches = batches
        self.pad = pad
        self.seed = seed
        self.acked: set[str] = set()
        self.statuses: Counter[int] = Counter()
        self.request_ids: set[str] = set()
        # The ids of keyed batches sent more than once.
        self.retried: set[str] = set()
        # Every batch sent, as its ids.
        self.sent: list[list[str]] = []
        # Keyed batches answered as a replay (Idempotent-Replayed) on their first try: each one lost.
        self.replayed_first_tries = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def wait_acked(self, count: int, timeout: float = 30) -> None:
        """Until at least ``count`` events are acknowledged: a sign of load that no slow machine fakes."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.acked) >= count:
                    return
            assert time.monotonic() < deadline, f"fewer than {count} events acknowledged in {timeout} s"
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, n: int) -> None:
        rng = random.Random(f"{self.seed}-{n}")
        with httpx.Client(headers={"X-Auth": TOKEN}, timeout=30) as client:
            for seq in itertools.count():
                if self._stop.wait(self.pace * rng.uniform(0.5, 1.5)) if self.pace else self._stop.is_set():
                    return
                ids = [f"{self.prefix}{n}-{seq}-{i}" for i in range(rng.choice(self.batches))]
                events = [{"id": i, "pad": "x" * rng.randrange(self.pad)} if self.pad else {"id": i} for i in ids]
                body = orjson.dumps(events if len(events) > 1 else events[0])
                url = f"{self.url}/ingest/{rng.choice(self.domains)}"
                retry = n < self.keyed
                headers = {"Idempotency-Key": f"{self.seed}-{n}-{seq}"} if retry else {}
                with self._lock:
                    self.sent.append(ids)
                # A batch once sent is retried until answered, even after the test asked to stop.
                first = True
                while not self._post(client, url, body, headers, ids, first) and retry:
                    first = False
                    with self._lock:
                        self.retried.update(ids)
                    time.sleep(0.02)

    def _post(
        self, client: httpx.Client, url: str, body: bytes, headers: dict[str, str], ids: list[str], first: bool
    ) -> bool:
        """Whether the request was answered, other than with a 5xx."""
        started = time.monotonic()
        try:
            response = client.post(url, content=body, headers=headers)
        except httpx.HTTPError:
            with self._lock:
                self.unanswered += 1
            time.sleep(0.02)
            return False
        finally:
            with self._lock:
                self.slowest = max(self.slowest, time.monotonic() - started)
        with self._lock:
            self.statuses[response.status_code] += 1
            self.request_ids.add(response.headers.get("x-request-id", ""))
            if response.status_code == 200:
                self.acked.update(ids)
                if first and "idempotent-replayed" in response.headers:
                    self.replayed_first_tries += 1
        return response.status_code < 500


def journal_lines(data_dir: Path) -> dict[str, list[bytes]]:
    """Per journal file, the lines of its sealed segments (oldest first, decompressed), then of its live file;
    fails on a file that does not end in a newline."""
    from leitstand.storage import datadir, segments

    found: dict[str, list[bytes]] = {}
    for name in sorted({*datadir.journal_names(data_dir), *(s.base for s in segments.every(data_dir))}):
        data = b"".join(b"".join(segments.content(data_dir, s)) for s in segments.of(data_dir, name))
        assert data == b"" or data.endswith(b"\n"), f"a segment of {name} has a torn tail"
        found[name] = data.splitlines() + (read_lines(data_dir / name) if (data_dir / name).exists() else [])
    return found


def stored_ids(data_dir: Path) -> Counter[str]:
    """How often each event id is stored; fails on any line that is torn or does not parse."""
    found: Counter[str] = Counter()
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in read_lines(path):
            found[orjson.loads(line)["id"]] += 1
    return found


def partial_batches(found: Counter[str], sent: list[list[str]]) -> list[list[str]]:
    """The batches of which some events are stored and some are not: each breaks all-or-nothing."""
    return [ids for ids in sent if 0 < sum(i in found for i in ids) < len(ids)]


def assert_all_acked_stored_once(data_dir: Path, acked: set[str]) -> Counter[str]:
    found = stored_ids(data_dir)
    missing = acked - set(found)
    assert not missing, f"acked events lost: {len(missing)} of {len(acked)}"
    duplicated = [i for i, n in found.items() if n > 1]
    assert not duplicated, f"events stored twice: {duplicated[:5]}"
    return found
