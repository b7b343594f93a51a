"""POST /ingest/{domain} against the real server: every promise of the manual and the API."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import httpx
import orjson
import pytest

from conftest import TOKEN, Server, read_lines


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory``, leitstand's own state (.leitstand) included."""
    found = sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []
    return {str(p.relative_to(directory)): p.read_bytes() for p in found}


def test_event_is_stored_as_one_compact_line_with_domain(server: Server) -> None:
    response = server.post("Sensor.Example", '{ "b": 1, "a": "\u00fcml\u00e4ut" }')
    assert (response.status_code, response.text, response.headers["content-type"]) == (
        200,
        "ok\n",
        "text/plain; charset=utf-8",
    )
    line = '{"b":1,"a":"\u00fcml\u00e4ut","domain":"sensor.example"}\n'.encode()
    assert (server.data_dir / "sensor.example.jsonl").read_bytes() == line


def test_bearer_token_is_accepted(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/ingest/s", content=b"{}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Auth": "wrong"}, {"X-Auth": TOKEN[:-1]}, {"Authorization": f"Basic {TOKEN}"}, {"X-Auth": ""}],
)
def test_missing_or_wrong_token_is_401(server: Server, headers: dict[str, str]) -> None:
    response = httpx.post(f"{server.url}/ingest/s", content=b"{}", headers=headers, timeout=5)
    assert (response.status_code, response.text) == (401, "unauthorized\n")
    assert snapshot(server.data_dir) == {}


def test_auth_is_checked_before_the_body_is_read(server: Server) -> None:
    """The 401 comes back while the client still owes most of a 1 MB body."""
    request = b"POST /ingest/s HTTP/1.1\r\nHost: x\r\nX-Auth: wrong\r\nContent-Length: 1000000\r\n\r\n{"
    assert server.raw(request) == b"HTTP/1.1 401 Unauthorized"


def test_oversized_content_length_is_413_without_reading(server: Server) -> None:
    request = f"POST /ingest/s HTTP/1.1\r\nHost: x\r\nX-Auth: {TOKEN}\r\nContent-Length: 2000000\r\n\r\n"
    assert server.raw(request.encode()) == b"HTTP/1.1 413 Request Entity Too Large"
    assert snapshot(server.data_dir) == {}


@pytest.mark.parametrize(
    "domain",
    ["a..b", "-a", "UPPER_CASE", "a%2Fb", "..", "%2e%2e", "a%00b", "a" * 64, "x%E3%80%82y", "a/../../etc"],
)
def test_invalid_domain_is_400(server: Server, domain: str) -> None:
    assert server.raw_post("/ingest/" + domain) == b"HTTP/1.1 400 Bad Request"
    assert snapshot(server.data_dir) == {}
    assert not list(server.data_dir.parent.glob("*.jsonl"))


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        (b"{not json", 400, "invalid json"),
        (b"\xff\xfe{}", 400, "invalid json"),
        (b'[{"a":1}, 2]', 400, "invalid payload"),
        (b"42", 400, "invalid payload"),
        (b'[{"a":1},{"domain":"other"}]', 400, "domain mismatch"),
    ],
)
def test_bad_body_is_refused_and_writes_nothing(server: Server, body: bytes, status: int, phrase: str) -> None:
    assert server.post("s", '{"first":true}').status_code == 200
    before = snapshot(server.data_dir)
    response = server.post("s", body)
    assert (response.status_code, response.text) == (status, phrase + "\n")
    assert snapshot(server.data_dir) == before


EMPTY_BODIES = [
    (b"", {}),
    (b" \n\t\r\n", {}),
    (b"", {"Content-Type": "application/x-ndjson"}),
    (b"\n  \n", {"Content-Type": "application/x-ndjson"}),
    (gzip.compress(b""), {"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson"}),
    (gzip.compress(b" \n"), {"Content-Encoding": "gzip"}),
]


def test_an_empty_body_is_400_and_writes_nothing(server: Server) -> None:
    """What `curl --data-binary @missing-file` sends: an error, not a 200 for nothing. One server for all."""
    for body, headers in EMPTY_BODIES:
        response = server.post("s", body, headers)
        assert (response.status_code, response.text) == (400, "empty body\n"), (body, headers)
    assert snapshot(server.data_dir) == {}


def test_an_empty_array_is_200_with_no_events(server: Server) -> None:
    response = server.post("s", b"[]")
    assert (response.status_code, response.text) == (200, "ok\n")
    assert snapshot(server.data_dir) == {}
    assert "events=0" in server.logged("events=0")


def test_an_empty_gzip_body_is_invalid_gzip(server: Server) -> None:
    response = server.post("gz", b"", {"Content-Encoding": "gzip"})
    assert (response.status_code, response.text) == (400, "invalid gzip\n")
    assert snapshot(server.data_dir) == {}


def test_a_content_length_that_is_no_number_is_refused_by_uvicorn(server: Server) -> None:
    """As the README says: uvicorn's own 400 (no request id), before leitstand sees the request."""
    for length in ("abc", "+5", "0x10", "5 5"):
        request = f"POST /ingest/s HTTP/1.1\r\nHost: x\r\nX-Auth: {TOKEN}\r\nContent-Length: {length}\r\n\r\n{{}}"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(request.encode())
            answer = b"".join(iter(lambda: conn.recv(65536), b""))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and body == b"Invalid HTTP request received.", length
        assert b"x-request-id" not in head.lower()
    assert snapshot(server.data_dir) == {}


def test_array_is_stored_whole(server: Server) -> None:
    events = [{"n": i, "domain": "Batch"} for i in range(100)]
    assert server.post("batch", orjson.dumps(events)).status_code == 200
    lines = read_lines(server.data_dir / "batch.jsonl")
    assert [orjson.loads(x) for x in lines] == [{"n": i, "domain": "batch"} for i in range(100)]


def test_ndjson_body(server: Server) -> None:
    body = b'{"n":1}\n{"n":2}\n\n{"n":3}\n'
    assert server.post("nd", body, {"Content-Type": "application/x-ndjson"}).status_code == 200
    assert [orjson.loads(x)["n"] for x in read_lines(server.data_dir / "nd.jsonl")] == [1, 2, 3]


def test_gzip_body(server: Server) -> None:
    body = gzip.compress(b'[{"n":1},{"n":2}]')
    assert server.post("gz", body, {"Content-Encoding": "gzip"}).status_code == 200
    assert len(read_lines(server.data_dir / "gz.jsonl")) == 2


def test_gzip_bomb_is_cut_at_the_limit(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(env={"LEITSTAND_MAX_BODY": "64KiB"}).start()
    bomb = gzip.compress(b'{"a":"' + b"x" * (10 << 20) + b'"}')
    assert len(bomb) < 64 << 10
    response = server.post("gz", bomb, {"Content-Encoding": "gzip"})
    assert (response.status_code, response.text) == (413, "payload too large\n")
    assert snapshot(server.data_dir) == {}


def test_broken_gzip_and_unknown_encoding(server: Server) -> None:
    assert server.post("gz", b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"}).status_code == 400
    assert server.post("gz", b"{}", {"Content-Encoding": "br"}).status_code == 415
    assert snapshot(server.data_dir) == {}


def test_chunked_body_is_accepted_and_cut_at_the_limit(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(env={"LEITSTAND_MAX_BODY": "1000"}).start()

    def chunks(total: int):  # type: ignore[no-untyped-def]
        yield b'{"pad":"'
        for _ in range(total // 100):
            yield b"x" * 100
        yield b'"}'

    ok = server.post("chunked", chunks(500))
    assert ok.status_code == 200 and "content-length" not in ok.request.headers
    too_big = server.post("chunked", chunks(5000))
    assert (too_big.status_code, too_big.text) == (413, "payload too large\n")
    assert len(read_lines(server.data_dir / "chunked.jsonl")) == 1


def test_long_domain_gets_a_shortened_file_inside_the_data_dir(server: Server) -> None:
    domain = ".".join(["a" * 63] * 3) + "." + "b" * 61
    assert server.post(domain, "{}").status_code == 200
    (stored,) = server.data_dir.glob("*.jsonl")
    assert len(stored.name) == 255 and stored.name.endswith(".jsonl")
    assert orjson.loads(stored.read_bytes())["domain"] == domain


def test_other_endpoints(server: Server) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert server.post("demo", '{"n":1}').status_code == 200
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready"
    assert ready["bytes"]["live"] == (server.data_dir / "demo.jsonl").stat().st_size
    assert ready["bytes"]["sealed"] == 0 and ready["bytes"]["free"] > 0
    assert httpx.get(server.url + "/version").json() == {"version": "0.1.0"}
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/ingest/{domain}" in spec["paths"]
    assert "swagger-ui" in httpx.get(server.url + "/docs").text
    assert httpx.get(server.url + "/nope").status_code == 404
    wrong_method = httpx.get(server.url + "/ingest/s")
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")


def test_ready_reports_low_disk_space(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(env={"LEITSTAND_READY_MIN_FREE": "1000000GiB"}).start()
    response = httpx.get(server.url + "/ready")
    assert (response.status_code, response.text) == (503, "not ready: low disk space\n")


def test_manual_health_probe_by_test_post(server: Server) -> None:
    """The manual's probe: a test request to /ingest/<test-domain> answers 200."""
    assert server.post("test-domain", '{"probe":true}').status_code == 200


def test_request_id_is_echoed_or_generated(server: Server) -> None:
    echoed = server.post("s", "{}", {"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = {server.post("s", "{}").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3
    hostile = server.post("s", "{}", {"X-Request-ID": "a\tb"})
    assert hostile.headers["x-request-id"] != "a\tb"


def test_one_log_line_per_request_on_stdout(server: Server) -> None:
    server.post("logged", '[{"a":1},{"a":2}]', {"X-Request-ID": "rid-77"})
    server.post("logged", "{}", {"X-Auth": "wrong"})
    server.stop()
    lines = [x for x in server.output().splitlines() if " request " in x and "path=/ingest/" in x]
    assert len(lines) == 2
    assert all(
        f in lines[0]
        for f in ("method=POST", "path=/ingest/logged", "status=200", "domain=logged", "events=2", "bytes=17",
                  "duration_ms=", "request_id=rid-77")
    )
    assert "status=401" in lines[1]
    startup = next(x for x in server.output().splitlines() if " started " in x)
    assert "version=0.1.0" in startup and "tokens=1 " in startup and TOKEN not in server.output()
    assert TOKEN not in server.output()
    assert str(server.data_dir) not in server.output()


def test_json_log_format(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(env={"LEITSTAND_LOG_FORMAT": "json"}).start()
    server.post("s", "{}", {"X-Request-ID": "rid-json"})
    server.stop()
    records = [orjson.loads(x) for x in server.output().splitlines() if x.startswith("{")]
    request = next(r for r in records if r["msg"] == "request" and r["path"] == "/ingest/s")
    assert request["status"] == 200 and request["request_id"] == "rid-json" and request["level"] == "info"
    assert all(x.startswith("{") for x in server.output().splitlines())


def test_control_characters_cannot_forge_log_lines(server: Server) -> None:
    server.post("s%0Afake%20status=200", "{}")
    server.stop()
    assert not any(x.startswith("fake") for x in server.output().splitlines())
