"""leitstand.client against the real server: batching, keys, retries, rejections, the outbox.

Only the Retry-After tests use a stub (the real server sends Retry-After only on limits
and storage errors, which cannot be timed to the second).
"""

from __future__ import annotations

import asyncio
import email.utils
import http.server
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import TOKEN, Server, read_lines
from leitstand.client import AsyncClient, Client, Rejected, retry_after
from leitstand.client.outbox import OutboxError


def ids(path: Path) -> list[int]:
    return [orjson.loads(line)["id"] for line in read_lines(path)]


def test_batches_stay_under_the_servers_limits_and_a_too_large_event_is_refused_here(make_server: Any) -> None:
    server = make_server(env={"LEITSTAND_MAX_EVENTS": "7", "LEITSTAND_MAX_BODY": "2KiB"}).start()
    events: list[dict[str, object]] = [{"id": n, "pad": "x" * (n % 200)} for n in range(100)]
    events.insert(50, {"id": -1, "pad": "y" * 3000})
    with Client(server.url, TOKEN, max_events=7, max_bytes=2048) as client:
        result = client.send("limits", events)
    assert (result.stored, result.rejected, result.pending) == (100, 1, 0)
    (refused,) = result.rejections
    assert refused.status is None and refused.reason.startswith("event too large")
    assert ids(server.data_dir / "limits.jsonl") == list(range(100))
    # Every request was taken whole: no 413 and no halving needed.
    assert "status=413" not in server.output() and "status=400" not in server.output()


def test_a_bad_event_is_found_by_halving_and_the_rest_is_delivered_in_order(server: Server) -> None:
    events: list[Any] = [{"id": n} for n in range(20)]
    events[13] = b'{"id":13,"id":14}'
    with Client(server.url, TOKEN) as client:
        result = client.send("halving", events)
    assert (result.stored, result.rejected) == (19, 1)
    (refused,) = result.rejections
    assert (refused.status, refused.reason, refused.events) == (400, "duplicate key", [b'{"id":13,"id":14}'])
    assert ids(server.data_dir / "halving.jsonl") == [n for n in range(20) if n != 13]


def test_a_wrong_token_raises_with_the_servers_reason_and_is_not_retried(server: Server) -> None:
    with Client(server.url, "not-the-token", deadline=30) as client, pytest.raises(Rejected) as raised:
        started = time.monotonic()
        client.send("orders", [{"id": 1}])
    assert (raised.value.status, raised.value.reason) == (401, "unauthorized")
    assert time.monotonic() - started < 5, "retried"


def test_the_async_client_sends_gzip_over_one_pool(server: Server) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncClient(server.url, TOKEN, gzip=True, max_events=10) as client:
            first = await client.send("async", [{"id": n} for n in range(25)])
            second = await client.send("async", [{"id": n} for n in range(25, 30)])
        return first.stored, second.stored

    assert asyncio.run(main()) == (25, 5)
    assert ids(server.data_dir / "async.jsonl") == list(range(30))


def test_a_retry_after_a_server_side_timeout_stores_once(server: Server) -> None:
    """The server is stopped while the request is in flight: the client times out and retries
    with the same key; the server then answers the first request and the retries alike."""
    server.signal(signal.SIGSTOP)
    outcome: list[Any] = []
    client = Client(server.url, TOKEN, timeout=0.3, deadline=30)
    sender = threading.Thread(target=lambda: outcome.append(client.send("slow", [{"id": n} for n in range(50)])))
    try:
        sender.start()
        time.sleep(1.5)  # several attempts time out meanwhile
    finally:
        server.signal(signal.SIGCONT)
    sender.join(30)
    client.close()
    (result,) = outcome
    assert (result.stored, result.pending) == (50, 0)
    assert ids(server.data_dir / "slow.jsonl") == list(range(50))
    deadline = time.monotonic() + 5  # the request log is written just after the answers
    while server.output().count("path=/ingest/slow status=200") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.output().count("path=/ingest/slow status=200") >= 2, "the request was not retried"


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers the first POSTs with a status, Retry-After and a reason phrase, every later one with 200."""

    answers: list[tuple[int, str]]
    keys: list[str | None]
    # The body of the first answers, one each; then none.
    reasons: list[str]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.keys.append(self.headers["Idempotency-Key"])
        status, wait = self.answers.pop(0) if self.answers else (200, "")
        body = (self.reasons.pop(0) + "\n").encode() if self.reasons else b""
        self.send_response(status)
        if wait:
            self.send_header("Retry-After", wait)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    handler = type("Handler", (_Stub,), {"answers": [], "keys": [], "reasons": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("status, header", [(429, "seconds"), (503, "date")])
def test_retry_after_is_honoured(stub: tuple[str, type[_Stub]], status: int, header: str) -> None:
    url, handler = stub
    # An HTTP date has whole seconds: three seconds ahead is more than one second of waiting.
    wait = "1" if header == "seconds" else email.utils.formatdate(time.time() + 3, usegmt=True)
    handler.answers.append((status, wait))
    with Client(url, TOKEN, deadline=30) as client:
        started = time.monotonic()
        result = client.send("stub", [{"id": 1}])
        waited = time.monotonic() - started
    assert result.stored == 1
    assert waited >= 1.0, f"retried after {waited:.2f} s"
    assert len(handler.keys) == 2 and handler.keys[0] == handler.keys[1] and handler.keys[0]


def test_a_retry_after_beyond_the_deadline_gives_up_at_once(stub: tuple[str, type[_Stub]]) -> None:
    url, handler = stub
    handler.answers.append((503, "3600"))
    with Client(url, TOKEN, deadline=5) as client:
        result = client.send("stub", [{"id": 1}, {"id": 2}])
    assert (result.stored, result.pending, result.unavailable) == (0, 2, "503")
    assert len(handler.keys) == 1


def test_retry_after_parses_seconds_and_dates() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert retry_after("soon") is None and retry_after(None) is None


def test_the_outbox_keeps_what_the_service_did_not_take_and_the_next_run_delivers_it(make_server: Any,
                                                                                      tmp_path: Path) -> None:
    server = make_server()  # not started: the service is down
    outbox = tmp_path / "outbox"
    with Client(server.url, TOKEN, max_events=10, deadline=0.5, outbox=outbox) as client:
        down = client.send("spool", [{"id": n} for n in range(35)])
        with pytest.raises(OutboxError, match="in use by another process"):
            Client(server.url, TOKEN, outbox=outbox)
    assert (down.stored, down.pending) == (0, 35)
    spooled = sorted(outbox.glob("*.jsonl"))
    assert len(spooled) == 4
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in spooled} == {0o600}
    keys = [orjson.loads(path.read_bytes().split(b"\n", 1)[0])["key"] for path in spooled]

    server.start()
    with Client(server.url, TOKEN, outbox=outbox) as client:
        flushed = client.flush()
    assert (flushed.stored, flushed.pending) == (35, 0)

    async def later() -> int:
        async with AsyncClient(server.url, TOKEN, outbox=outbox) as client:
            return (await client.send("spool", [{"id": 35}])).stored

    assert asyncio.run(later()) == 1
    assert ids(server.data_dir / "spool.jsonl") == list(range(36))
    assert not list(outbox.glob("*.jsonl"))
    # Sent again with the same keys: the service recognises every batch and stores nothing.
    for key, n in zip(keys, range(0, 35, 10)):
        body = b"".join(orjson.dumps({"id": i}) + b"\n" for i in range(n, min(n + 10, 35)))
        again = server.post("spool", body, {"Idempotency-Key": key, "Content-Type": "application/x-ndjson"})
        assert (again.status_code, again.headers.get("idempotent-replayed")) == (200, "true")
    assert len(read_lines(server.data_dir / "spool.jsonl")) == 36


def test_nan_and_infinity_are_refused_here_and_never_sent_as_null(server: Server) -> None:
    events: list[Any] = [
        {"id": 0, "none": None},
        {"id": 1, "x": float("nan")},
        {"id": 2, "deep": [{"y": float("-inf")}]},
        {"id": 3, "big": 1e308},
    ]
    with Client(server.url, TOKEN) as client:
        result = client.send("floats", events)
    assert (result.stored, result.rejected) == (2, 2)
    assert [r.status for r in result.rejections] == [None, None]
    assert all("NaN and Infinity are not JSON" in r.reason for r in result.rejections)
    shown = [r.events for r in result.rejections]
    assert shown == [[b'{"id": 1, "x": NaN}'], [b'{"id": 2, "deep": [{"y": -Infinity}]}']]
    assert read_lines(server.data_dir / "floats.jsonl") == [
        b'{"id":0,"none":null,"domain":"floats"}', b'{"id":3,"big":1e+308,"domain":"floats"}']


@pytest.mark.parametrize(
    ("env", "token", "domain", "answer"),
    [
        ({}, TOKEN, "bad_domain", (400, "invalid domain")),
        ({}, "wrong-token", "orders", (401, "unauthorized")),
        ({"LEITSTAND_DOMAINS_DENY": "orders"}, TOKEN, "orders", (403, "domain not allowed")),
        ({"LEITSTAND_TOKEN_FILE": "scoped"}, "scoped-token", "orders", (403, "forbidden")),
    ],
    ids=["bad-domain", "401", "domain-not-allowed", "forbidden"],
)
def test_an_error_about_the_whole_request_is_raised_after_one_request(
    make_server: Any, tmp_path: Path, env: dict[str, str], token: str, domain: str, answer: tuple[int, str]
) -> None:
    """Halving cannot cure these: one request, then the error, not one refusal per event."""
    if "LEITSTAND_TOKEN_FILE" in env:
        (tmp_path / "scoped").write_text("scoped-token domains=sensor-*\n")
        env = {"LEITSTAND_TOKEN_FILE": str(tmp_path / "scoped")}
    server = make_server(env=env).start()
    with Client(server.url, token) as client, pytest.raises(Rejected) as raised:
        client.send(domain, [{"id": n} for n in range(1000)])
    assert (raised.value.status, raised.value.reason) == answer
    assert len(raised.value.events) == 1000
    assert server.logged("path=/ingest/").count("path=/ingest/") == 1


@pytest.mark.parametrize("answer", [(415, "unsupported content-encoding"), (400, "invalid gzip")])
def test_an_encoding_the_service_refuses_is_raised_after_one_request(
    stub: tuple[str, type[_Stub]], answer: tuple[int, str]
) -> None:
    """A proxy in between may refuse gzip, or break it: the real service never refuses the client's own."""
    url, handler = stub
    handler.answers.append((answer[0], ""))
    handler.reasons = [answer[1]]
    with Client(url, TOKEN, gzip=True) as client, pytest.raises(Rejected) as raised:
        client.send("stub", [{"id": n} for n in range(100)])
    assert (raised.value.status, raised.value.reason) == answer
    assert len(handler.keys) == 1
