"""The attack corpus against the real server: every hostile request gets a clear 4xx, writes
nothing, creates no file inside the data dir or outside it, and leaks neither the token nor
the data dir's path, in the answer or in the server's output."""

from __future__ import annotations

import gzip
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import TOKEN, Server, read_lines

# Punycode needs no special case: leitstand never decodes a name, so "xn--80ak6aa92e.com" is
# an ordinary valid name (stored as such), and "xn--" or "xn--.com" fail the plain rule that
# a label does not end with "-". Unicode is refused outright, never mapped to ASCII.
PATH_ATTACKS = [
    "/ingest/..",
    "/ingest/.",
    "/ingest/../victim",
    "/ingest/a/../../victim",
    "/ingest/%2e%2e",
    "/ingest/%2E%2E%2Fetc%2Fpasswd",
    "/ingest/..%2f..%2fvictim",
    "/ingest/a%2fb",
    "/ingest/%2fetc%2fpasswd",
    "/ingest/a%5cb",
    "/ingest/..%5c..%5cvictim",
    "/ingest/%252e%252e%252fvictim",
    "/ingest/a%00b",
    "/ingest/victim%00.txt",
    "/ingest/%c0%ae%c0%ae",
    "/ingest/%c0%ae%c0%ae%c0%afvictim",
    "/ingest/%e0%80%ae%e0%80%ae",
    "/ingest/x%E3%80%82y",  # U+3002 ideographic full stop
    "/ingest/x%EF%BC%8Ey",  # U+FF0E fullwidth full stop
    "/ingest/x%EF%BD%A1y",  # U+FF61 halfwidth ideographic full stop
    "/ingest/ex%D0%B0mple.com",  # Cyrillic a
    "/ingest/%E2%84%AA",  # Kelvin sign, lowercases to ASCII "k"
    "/ingest/%C4%B0",  # capital I with dot, lowercases to "i" + combining dot
    "/ingest/\u0430.com",  # raw UTF-8 in the request line
    "/ingest/victim.",
    "/ingest/victim..",
    "/ingest/.victim",
    "/ingest/xn--",
    "/ingest/xn--.com",
    "/ingest/-victim",
    "/ingest/victim-",
    "/ingest/",
    "/ingest/%20",
    "/ingest/a%0d%0aX-Injected:%201",
    "/ingest/a%09b",
    "/ingest/" + "a" * 64,
    "/ingest/" + ".".join(["a" * 63] * 4),
    "/ingest%2f..%2fvictim",
    "/ingest/a;b",
    "/ingest/a_b",
]

# uvicorn refuses a request line with raw non-ASCII bytes itself, before leitstand sees it.
KNOWN_PHRASES = {b"invalid domain\n", b"not found\n", b"Invalid HTTP request received."}


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size, the servers' own logs left out."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not (p.parent == root and p.suffix == ".log")
    }


def outside() -> set[Path]:
    """Journal-like files where a traversal would land: the roots of /tmp and /."""
    return {p for top in (Path("/tmp"), Path("/")) for p in top.glob("*.jsonl")}


def assert_no_leaks(server: Server, answers: list[bytes]) -> None:
    secrets = (TOKEN.encode(), str(server.data_dir).encode(), str(server.data_dir.parent).encode())
    for answer in answers:
        assert not any(s in answer for s in secrets), answer[:200]
    server.stop()
    output = server.output().encode()
    assert output and not any(s in output for s in secrets)


@pytest.fixture
def hostile(make_server: Any) -> Server:
    # 2 MiB, so that the gzip bomb below (1 MiB compressed) is read and must be cut while inflating.
    server = make_server(env={"LEITSTAND_MAX_BODY": "2MiB"}).start()
    assert server.post("victim", '{"seed":1}').status_code == 200
    return server


def test_path_attacks_are_refused_and_touch_nothing(hostile: Server, tmp_path: Path) -> None:
    before, before_outside = snapshot(tmp_path), outside()
    answers, problems = [], []
    for target in PATH_ATTACKS:
        answer = hostile.raw_post_response(target, b'{"x":1}')
        answers.append(answer)
        status = answer.split(b" ", 2)[1]
        body = answer.split(b"\r\n\r\n", 1)[-1]
        if not status.startswith(b"4") or (status in (b"400", b"404") and body not in KNOWN_PHRASES):
            problems.append(f"{target!r}: {answer[:120]!r}")
        if snapshot(tmp_path) != before:
            problems.append(f"{target!r} changed the files: {snapshot(tmp_path)}")
    assert not problems, "\n".join(problems)
    assert outside() == before_outside
    assert_no_leaks(hostile, answers)


def test_punycode_and_case_are_plain_ascii_names(server: Server) -> None:
    assert server.raw_post("/ingest/xn--80ak6aa92e.COM") == b"HTTP/1.1 200 OK"
    assert server.raw_post("/ingest/%20Victim.Example%20") == b"HTTP/1.1 200 OK"
    stored = sorted(p.name for p in server.data_dir.glob("*.jsonl"))
    assert stored == ["victim.example.jsonl", "xn--80ak6aa92e.com.jsonl"]


def gzip_bomb(mib: int) -> bytes:
    """A valid gzip stream of ``mib`` MiB of zeros, about 1 KiB per MiB, built without compressing it all:
    after a full flush every MiB of zeros deflates to the same bytes."""
    zeros = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + block * mib + deflate.flush() + struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)


def test_gzip_bomb_is_a_real_one() -> None:
    bomb = gzip_bomb(4)
    assert gzip.decompress(bomb) == bytes(4 << 20)
    assert len(gzip_bomb(1024)) < 1100 << 10


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def ten_mb_chunks() -> Any:
    yield b'{"s":"'
    for _ in range(100):
        yield b"x" * 100_000
    yield b'"}'


BODY_ATTACKS: list[tuple[str, bytes | Any, dict[str, str], int, str]] = [
    ("10k-deep arrays", b"[" * 10_000 + b"]" * 10_000, {}, 400, "json too deep"),
    ("10k-deep objects", nested_objects(10_000), {}, 400, "json too deep"),
    ("255-deep event", nested_objects(255), {}, 400, "json too deep"),
    ("10k-deep NDJSON line", b'{"a":1}\n' + nested_objects(10_000), {"Content-Type": "application/x-ndjson"}, 400,
     "json too deep"),
    ("duplicate key", b'{"a":1,"a":2}', {}, 400, "duplicate key"),
    ("duplicate domain", b'{"domain":"elsewhere","domain":"victim"}', {}, 400, "duplicate key"),
    ("duplicate by escape", b'{"a":1,"\\u0061":2}', {}, 400, "duplicate key"),
    ("duplicate behind an escaped colon", b'{"k":"\\u003a","a":1,"a":2}', {}, 400, "duplicate key"),
    ("10 MB string", b'{"s":"' + b"x" * 10_000_000 + b'"}', {}, 413, "payload too large"),
    ("10 MB string, chunked", ten_mb_chunks, {}, 413, "payload too large"),
    ("1e400", b'{"n":1e400}', {}, 400, "number out of range"),
    ("-1e400", b'{"n":-1e400}', {}, 400, "number out of range"),
    ("400-digit integer", b'{"n":1' + b"0" * 400 + b"}", {}, 400, "number out of range"),
    ("2^64", b'{"n":18446744073709551616}', {}, 400, "number out of range"),
    ("-2^63-1", b'{"n":-9223372036854775809}', {}, 400, "number out of range"),
    ("NaN", b'{"n":NaN}', {}, 400, "invalid json"),
    ("Infinity", b'{"n":Infinity}', {}, 400, "invalid json"),
    ("-Infinity", b'{"n":-Infinity}', {}, 400, "invalid json"),
    ("lone high surrogate", b'{"s":"\\ud800"}', {}, 400, "invalid json"),
    ("lone low surrogate", b'{"s":"\\udfff"}', {}, 400, "invalid json"),
    ("surrogate as UTF-8 bytes", b'{"s":"\xed\xa0\x80"}', {}, 400, "invalid json"),
    ("overlong UTF-8", b'{"s":"\xc0\xae"}', {}, 400, "invalid json"),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"a":1}', {}, 400, "invalid json"),
    ("UTF-16 BOM", '\ufeff{"a":1}'.encode("utf-16-le"), {}, 400, "invalid json"),
    ("two values", b'{"a":1}{"b":2}', {}, 400, "invalid json"),
    ("domain traversal in the event", b'{"domain":"../../etc/passwd"}', {}, 400, "domain mismatch"),
    ("gzip bomb, 1 GiB of zeros", gzip_bomb(1024), {"Content-Encoding": "gzip"}, 413, "payload too large"),
]


def test_body_attacks_are_refused_and_write_nothing(hostile: Server, tmp_path: Path) -> None:
    before, before_outside = snapshot(tmp_path), outside()
    answers, problems = [], []
    for name, body, headers, status, phrase in BODY_ATTACKS:
        response = hostile.post("victim", body() if callable(body) else body, headers)
        answers.append(response.content)
        if (response.status_code, response.text) != (status, phrase + "\n"):
            problems.append(f"{name}: {response.status_code} {response.text!r}")
        if snapshot(tmp_path) != before:
            problems.append(f"{name} changed the files: {snapshot(tmp_path)}")
    assert not problems, "\n".join(problems)
    assert outside() == before_outside
    assert [orjson.loads(x) for x in read_lines(hostile.data_dir / "victim.jsonl")] == [
        {"seed": 1, "domain": "victim"}
    ]
    assert_no_leaks(hostile, answers)


def test_limits_are_enforced_over_http(make_server: Any) -> None:
    server = make_server(
        env={"LEITSTAND_MAX_EVENTS": "3", "LEITSTAND_MAX_EVENT_SIZE": "64", "LEITSTAND_MAX_DEPTH": "4"}
    ).start()
    cases = [
        (b"[{},{},{},{}]", {}, 413, "too many events"),
        (b"{}\n{}\n{}\n{}", {"Content-Type": "application/x-ndjson"}, 413, "too many events"),
        (b'{"s":"' + b"x" * 60 + b'"}', {}, 413, "event too large"),
        (b'[{"a":{"b":{"c":{"d":{}}}}}]', {}, 400, "json too deep"),
    ]
    for body, headers, status, phrase in cases:
        response = server.post("limited", body, headers)
        assert (response.status_code, response.text) == (status, phrase + "\n"), body
    assert not server.data_dir.joinpath("limited.jsonl").exists()
    assert server.post("limited", b'[{"a":{"b":{"c":{"d":1}}}},{},{"s":"' + b"x" * 30 + b'"}]').status_code == 200
    assert len(read_lines(server.data_dir / "limited.jsonl")) == 3


# -- slow clients -------------------------------------------------------------------------


class Trickler(threading.Thread):
    """A client that sends its headers, then its body one byte at a time, until the server answers."""

    def __init__(self, port: int, *, chunked: bool = False, pause: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.chunked = chunked
        self.pause = pause
        self.answer = b""
        self.closed = False
        self.answered = threading.Event()
        self.started_sending = threading.Event()

    def run(self) -> None:
        body = b'{"slow":"' + b"x" * 10_000 + b'"}'
        length = "Transfer-Encoding: chunked" if self.chunked else f"Content-Length: {len(body)}"
        head = f"POST /ingest/slow HTTP/1.1\r\nHost: x\r\nX-Auth: {TOKEN}\r\n{length}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
            conn.sendall(head.encode())
            conn.settimeout(self.pause)
            for byte in body:
                try:
                    conn.sendall(b"1\r\n%c\r\n" % byte if self.chunked else bytes([byte]))
                except OSError:
                    break
                self.started_sending.set()
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                self.answer = data
                break
            conn.settimeout(10)
            try:
                while data := conn.recv(65536):
                    self.answer += data
                self.closed = True
            except OSError:
                pass
        self.answered.set()


@pytest.mark.parametrize("chunked", [False, True])
def test_trickling_client_is_cut_off_while_others_are_served(make_server: Any, chunked: bool) -> None:
    server = make_server(env={"LEITSTAND_BODY_TIMEOUT": "1"}).start()
    trickler = Trickler(server.port, chunked=chunked)
    trickler.start()
    assert trickler.started_sending.wait(10)
    served = 0
    give_up = time.monotonic() + 20  # only so that a missing timeout fails instead of hanging
    with httpx.Client(headers={"X-Auth": TOKEN}, timeout=10) as client:
        while not trickler.answered.is_set() and time.monotonic() < give_up:
            response = client.post(f"{server.url}/ingest/fast", content=b'{"n":1}')
            assert response.status_code == 200
            served += 1
    trickler.join(10)
    assert trickler.answer.startswith(b"HTTP/1.1 408 "), trickler.answer[:100]
    assert trickler.answer.endswith(b"\r\n\r\nrequest timeout\n") and trickler.closed
    assert served >= 5  # others were answered all the while, one after another
    assert len(read_lines(server.data_dir / "fast.jsonl")) == served
    assert not (server.data_dir / "slow.jsonl").exists()


def test_client_that_never_sends_its_body_is_cut_off(make_server: Any) -> None:
    server = make_server(env={"LEITSTAND_BODY_TIMEOUT": "1"}).start()
    head = f"POST /ingest/slow HTTP/1.1\r\nHost: x\r\nX-Auth: {TOKEN}\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(head.encode())
        answer = b"".join(iter(lambda: conn.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 408 ") and answer.endswith(b"request timeout\n")
    assert server.post("fast", "{}").status_code == 200
    assert not (server.data_dir / "slow.jsonl").exists()
