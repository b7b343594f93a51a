"""The shipped nginx config, run for real: Debian's nginx terminates TLS in front of a running leitstand.

Only the four template variables (listen address, certificate, key, upstream) are filled in,
with envsubst, as the deploy README tells operators to; the rest is the file as shipped.
"""

from __future__ import annotations

import contextlib
import gzip
import queue
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import ROOT, TOKEN, Server, free_port, read_lines

TEMPLATE = ROOT / "deploy" / "nginx" / "leitstand.conf.template"
VARIABLES = ("NGINX_LISTEN", "NGINX_TLS_CERT", "NGINX_TLS_KEY", "NGINX_UPSTREAM")


class Nginx:
    """nginx in the foreground with every path (pid, logs, temp files) under ``tmp``."""

    def __init__(self, tmp: Path, upstream: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cert = tmp / "cert.pem"
        key = tmp / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                key,
                "-out",
                self.cert,
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
            check=True,
            capture_output=True,
        )
        values = dict(zip(VARIABLES, (f"127.0.0.1:{self.port}", str(self.cert), str(key), upstream), strict=True))
        rendered = subprocess.run(
            ["envsubst", " ".join("$" + name for name in VARIABLES)],
            input=TEMPLATE.read_bytes(),
            env=values,
            check=True,
            capture_output=True,
        ).stdout
        (tmp / "leitstand.conf").write_bytes(rendered)
        temp_paths = "\n".join(
            f"    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # What Debian's /etc/nginx/nginx.conf is to conf.d/: the frame around the shipped file.
        (tmp / "nginx.conf").write_text(
            f"pid {tmp}/nginx.pid;\nworker_processes 1;\nerror_log {tmp}/error.log notice;\n"
            "events { worker_connections 64; }\n"
            f"http {{\n    access_log {tmp}/access.log;\n{temp_paths}\n    include {tmp}/leitstand.conf;\n}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Nginx:
        # As root, nginx would run its worker as nobody, which cannot enter the test's temp dir.
        argv = [
            "nginx",
            "-p",
            f"{self.tmp}/",
            "-e",
            f"{self.tmp}/error.log",
            "-c",
            f"{self.tmp}/nginx.conf",
            "-g",
            "daemon off; user root;",
        ]
        check = subprocess.run([*argv[:-2], "-t"], check=False, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.error_log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen in {timeout}s:\n{self.error_log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, **kw: Any) -> httpx.Client:
        """A client that trusts only the test's self-signed certificate."""
        context = ssl.create_default_context(cafile=self.cert)
        return httpx.Client(base_url=self.url, verify=context, timeout=10, **kw)


@pytest.fixture
def proxied(make_server: Any, tmp_path: Path) -> Iterator[tuple[Server, Nginx]]:
    # leitstand takes the client address from X-Forwarded-For only from a trusted proxy.
    server = make_server(
        command="serve", env={"LEITSTAND_LOG_FORMAT": "json", "LEITSTAND_TRUSTED_PROXIES": "127.0.0.1"}
    ).start()
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    nginx = Nginx(nginx_dir, f"127.0.0.1:{server.port}").start()
    yield server, nginx
    nginx.stop()


def test_events_reach_the_journal_over_tls(proxied: tuple[Server, Nginx]) -> None:
    server, nginx = proxied
    with nginx.client(headers={"X-Auth": TOKEN}) as client:
        # Several requests on one connection, each on to leitstand over the kept-alive upstream.
        for n in range(5):
            response = client.post("/ingest/deploy.tls", content=orjson.dumps({"n": n}))
            assert (response.status_code, response.text) == (200, "ok\n")
        # A chunked NDJSON body and a gzip one stream through without request buffering.
        chunks = (orjson.dumps({"n": n}) + b"\n" for n in range(5, 8))
        response = client.post("/ingest/deploy.tls", content=chunks, headers={"Content-Type": "application/x-ndjson"})
        assert (response.status_code, response.text) == (200, "ok\n")
        packed = gzip.compress(orjson.dumps([{"n": 8}, {"n": 9}]))
        response = client.post("/ingest/deploy.tls", content=packed, headers={"Content-Encoding": "gzip"})
        assert (response.status_code, response.text) == (200, "ok\n")
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200
    lines = read_lines(server.data_dir / "deploy.tls.jsonl")
    assert [orjson.loads(line)["n"] for line in lines] == list(range(10))


def test_leitstand_answers_401_and_413_itself(proxied: tuple[Server, Nginx]) -> None:
    server, nginx = proxied
    with nginx.client() as client:
        response = client.post("/ingest/deploy.refused", content=b'{"n":1}', headers={"X-Auth": "wrong"})
        assert (response.status_code, response.text) == (401, "unauthorized\n")
        # Just over LEITSTAND_MAX_BODY (1 MiB), under nginx's own limit: leitstand's answer, not nginx's page.
        big = b'{"pad":"' + b"x" * (1 << 20) + b'"}'
        response = client.post("/ingest/deploy.refused", content=big, headers={"X-Auth": TOKEN})
        assert (response.status_code, response.text) == (413, "payload too large\n")
    assert not (server.data_dir / "deploy.refused.jsonl").exists()


def test_log_shows_the_client_address_not_a_forged_one(proxied: tuple[Server, Nginx]) -> None:
    server, nginx = proxied
    # The client connects from 127.0.0.2, so its address differs from nginx's own 127.0.0.1.
    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=ssl.create_default_context(cafile=nginx.cert))
    with nginx.client(transport=transport) as client:
        response = client.post(
            "/ingest/deploy.xff",
            content=b'{"n":1}',
            headers={"X-Auth": TOKEN, "X-Request-ID": "deploy-xff-1", "X-Forwarded-For": "203.0.113.7"},
        )
    assert response.status_code == 200
    deadline = time.monotonic() + 5
    while not (
        entries := [e for e in map(orjson.loads, _json_lines(server.output())) if e.get("request_id") == "deploy-xff-1"]
    ):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    assert entries[0]["client"] == "127.0.0.2"


def _json_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("{")]


def test_event_streams_pass_through_unbuffered(proxied: tuple[Server, Nginx]) -> None:
    server, nginx = proxied
    assert server.post("deploy.stream", '{"n":0}').status_code == 200
    got: queue.Queue[bytes] = queue.Queue()

    def listen() -> None:
        with nginx.client(headers={"X-Auth": TOKEN}) as client, contextlib.suppress(httpx.HTTPError):
            with client.stream("GET", "/events/deploy.stream/stream", timeout=httpx.Timeout(10, read=None)) as response:
                # Deflated (httpx asks for it), and decoded as each event comes through.
                got.put(b"status %d %s" % (response.status_code, response.headers["content-encoding"].encode()))
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        got.put(line.encode())

    threading.Thread(target=listen, daemon=True).start()
    assert got.get(timeout=10) == b"status 200 deflate"
    time.sleep(0.5)
    for n in (1, 2):
        assert server.post("deploy.stream", b'{"n":%d}' % n).status_code == 200
        acknowledged = time.monotonic()
        assert got.get(timeout=5) == b'data: {"n":%d,"domain":"deploy.stream"}' % n
        assert time.monotonic() - acknowledged < 1.0, "nginx held the event back"
