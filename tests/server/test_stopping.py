"""SIGTERM with idle keep-alive connections open: a quick stop over HTTP and HTTPS, requests in flight answered."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLEAN_EXIT, TOKEN, Server, read_lines, tls_files

BODY = b'{"in":"flight"}'


def connect(server: Server) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if isinstance(server.verify, ssl.SSLContext):
        return server.verify.wrap_socket(conn, server_hostname="127.0.0.1")
    return conn


# TLS in every combination (it was TLS that hung); plain HTTP once per command and worker count.
@pytest.mark.parametrize(
    "tls,command,workers",
    [(True, "serve", 1), (True, "serve", 2), (True, "uvicorn", 1), (True, "uvicorn", 2),
     (False, "serve", 2), (False, "uvicorn", 1)],
)
def test_sigterm_with_idle_keep_alive_connections_stops_at_once(
    make_server: Any, tmp_path: Path, tls: bool, command: str, workers: int
) -> None:
    env, cafile = tls_files(tmp_path) if tls else ({}, None)
    server: Server = make_server(command=command, workers=workers, env=env, ca=cafile).start()
    # Clients that keep their connection in the pool, as every HTTP library does, and then sit idle.
    idle = [httpx.Client(verify=server.verify, headers={"X-Auth": TOKEN}) for _ in range(6)]
    for n, client in enumerate(idle):
        assert client.post(f"{server.url}/ingest/idle", content=b'{"n":%d}' % n).status_code == 200
    # A request in flight: its body is only half sent when the stop begins.
    flight = connect(server)
    head = f"POST /ingest/flight HTTP/1.1\r\nHost: x\r\nX-Auth: {TOKEN}\r\nContent-Length: {len(BODY)}\r\n\r\n"
    flight.sendall(head.encode() + BODY[:5])
    time.sleep(0.2)
    assert server.proc is not None
    stopped = time.monotonic()
    server.signal(15)
    time.sleep(0.3)
    flight.sendall(BODY[5:])
    answer = b"".join(iter(lambda: flight.recv(65536), b""))
    try:
        code = server.proc.wait(max(0.0, stopped + 2 - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 2 s after SIGTERM:\n{server.output()[-2000:]}")
    assert code in CLEAN_EXIT
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", answer
    assert b"\r\nconnection: close\r\n" in rest.lower()
    assert read_lines(server.data_dir / "flight.jsonl") == [b'{"in":"flight","domain":"flight"}']
    assert len(read_lines(server.data_dir / "idle.jsonl")) == 6
    for client in idle:
        client.close()
    flight.close()
