"""Bodies exactly as the log shippers send them, with their labels and compression, to a real server.

Fluent Bit, Vector and rsyslog's omhttp are not packaged for Debian 12, so their requests are
written here from their sources (and, for Fluent Bit, from the bodies its own runtime test
``tests/runtime/out_http.c`` expects): Fluent Bit ``plugins/out_http/http.c`` and
``src/flb_pack.c``; Vector ``src/sinks/http/config.rs`` and ``encoder.rs``; rsyslog 8.2302
``contrib/omhttp/omhttp.c`` and the ``StdJSONFmt`` template in ``runtime/rsconf.c``.
syslog-ng's body is the one it was seen to send (``tests/deploy/test_syslog_ng.py`` runs it).
"""

from __future__ import annotations

import gzip
import itertools
from typing import Any

import orjson
import zstandard
from conftest import Server, read_lines

RSYSLOG_LINE = (
    '{"message":" Accepted publickey for deploy","fromhost":"web-1","facility":"auth","priority":"info",'
    '"timereported":"2026-12-03T15:04:23.123456+00:00","timegenerated":"2026-12-03T15:04:23.130000+00:00"}'
)
VECTOR_EVENT = (
    '{"file":"/var/log/app.log","host":"web-1","message":"GET / 200","source_type":"file",'
    '"timestamp":"2026-12-03T15:04:23.123456789Z"}'
)
# (sender, body, headers, events stored)
BODIES: list[tuple[str, bytes, dict[str, str], int]] = [
    ("fluent-bit-json", b'[{"date":1.0,"msg":"hello world"},{"date":2.0,"msg":"hello world"}]',
     {"Content-Type": "application/json"}, 2),
    ("fluent-bit-json-iso8601",
     b'[{"date":"2026-12-03T15:04:23.123456Z","log":"GET / 200","stream":"stdout"}]',
     {"Content-Type": "application/json"}, 1),
    ("fluent-bit-json-lines", b'{"date":1.0,"msg":"hello world"}\n{"date":2.0,"msg":"hello world"}\n',
     {"Content-Type": "application/x-ndjson"}, 2),
    ("vector-json", f"[{VECTOR_EVENT},{VECTOR_EVENT}]".encode(), {"Content-Type": "application/json"}, 2),
    ("vector-ndjson", f"{VECTOR_EVENT}\n{VECTOR_EVENT}".encode(), {"Content-Type": "application/x-ndjson"}, 2),
    ("rsyslog-newline", f"{RSYSLOG_LINE}\n{RSYSLOG_LINE}\n{RSYSLOG_LINE}".encode(), {"Content-Type": "text/plain"}, 3),
    ("rsyslog-jsonarray", f"[{RSYSLOG_LINE},{RSYSLOG_LINE}]".encode(),
     {"Content-Type": "application/json; charset=utf-8"}, 2),
    ("rsyslog-single", RSYSLOG_LINE.encode(), {"Content-Type": "application/json; charset=utf-8"}, 1),
    ("syslog-ng", b'{"PRIORITY":"notice","MESSAGE":"hello one","HOST":"localhost"}\n'
                  b'{"PRIORITY":"notice","MESSAGE":"hello \\"two\\" \xc3\xa4","HOST":"localhost"}',
     {"Content-Type": "application/x-www-form-urlencoded"}, 2),
    ("syslog-ng-one", b'{"PRIORITY":"notice","MESSAGE":"alone"}',
     {"Content-Type": "application/x-www-form-urlencoded"}, 1),
    ("unlabelled-lines", b'{"n":1}\r\n{"n":2}', {}, 2),
]


def test_every_sender_body_is_stored_event_by_event(server: Server) -> None:
    compressors = {"identity": bytes, "gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}
    for (sender, body, headers, count), (encoding, compress) in itertools.product(BODIES, compressors.items()):
        domain = f"{sender}.{encoding}"
        sent = {**headers, "Content-Encoding": encoding}
        response = server.post(domain, compress(body), sent)
        assert (response.status_code, response.text) == (200, "ok\n"), sender
        lines = read_lines(server.data_dir / f"{domain}.jsonl")
        assert len(lines) == count, sender
        assert all(orjson.loads(line)["domain"] == domain for line in lines)


def test_generic_labels_still_take_one_json_value(server: Server) -> None:
    """curl -d labels its body form-urlencoded: an array, or an object over several lines, stays one value."""
    pretty = b'{\n  "n": 1,\n  "list": [\n    1,\n    2\n  ]\n}'
    for body, count in ((b'[{"n":1},{"n":2}]', 2), (pretty, 1)):
        response = server.post("curl", body, {"Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 200
    assert len(read_lines(server.data_dir / "curl.jsonl")) == 3
    # What is neither one value nor one object a line is refused as before, and nothing is written.
    for body in (b'{"n":1}\n{"n":', b'{"n":1}\n[1]', b"hello world\nsecond line"):
        response = server.post("curl", body, {"Content-Type": "text/plain"})
        assert response.status_code == 400, body
    assert len(read_lines(server.data_dir / "curl.jsonl")) == 3


def test_a_date_key_twice_is_refused(server: Server) -> None:
    """Fluent Bit adds its date key without looking: a record with its own ``date`` has it twice."""
    response = server.post("fb", b'[{"date":1.0,"date":"2026-12-03","msg":"x"}]', {"Content-Type": "application/json"})
    assert (response.status_code, response.text) == (400, "duplicate key\n")


def zstd_frames(*parts: bytes, **options: Any) -> bytes:
    return b"".join(zstandard.ZstdCompressor(**options).compress(part) for part in parts)


def test_zstd_has_the_limits_of_gzip(make_server: Any) -> None:
    server: Server = make_server(env={"LEITSTAND_MAX_BODY": "64KiB"}).start()
    zstd = {"Content-Encoding": "zstd", "Content-Type": "application/x-ndjson"}
    # Several frames, as a streaming compressor may write them, are one body.
    assert server.post("z", zstd_frames(b'{"n":1}\n', b'{"n":2}'), zstd).status_code == 200
    # Bombs: 256 MiB of zeros in a few KiB, with the size in the frame header, and without it.
    cobj = zstandard.ZstdCompressor().compressobj()
    streamed = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(256)) + cobj.flush()
    sized = zstandard.ZstdCompressor().compress(bytes(256 << 20))
    for bomb in (streamed, sized):
        response = server.post("z", bomb, zstd)
        assert (response.status_code, response.text) == (413, "payload too large\n")
    # Just over the limit after decompression, as with gzip.
    big = orjson.dumps([{"pad": "x" * 1000}] * 70)
    assert server.post("z", zstd_frames(big), {**zstd, "Content-Type": "application/json"}).status_code == 413
    assert server.post("z", gzip.compress(big), {"Content-Encoding": "gzip"}).status_code == 413
    for garbled in (zstd_frames(b'{"n":3}')[:-3], b"not zstd", zstd_frames(b'{"n":3}') + b"tail"):
        response = server.post("z", garbled, zstd)
        assert (response.status_code, response.text) == (400, "invalid zstd\n")
    assert server.post("z", b'{"n":4}', {"Content-Encoding": "br"}).status_code == 415
    assert read_lines(server.data_dir / "z.jsonl") == [b'{"n":1,"domain":"z"}', b'{"n":2,"domain":"z"}']
