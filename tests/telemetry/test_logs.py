import asyncio
import logging
import re
import sys
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest

from conftest import CLEAN_EXIT, TOKEN
from leitstand.telemetry.logs import LineFormatter, Renderer, RequestLog

FIELDS = {
    "method": "POST",
    "path": "/ingest/x\n2026-01-01T00:00:00.000Z INFO forged",
    "status": 200,
    "domain": "x",
    "events": 2,
    "bytes": 17,
    "duration_ms": 0.00025,  # given in seconds, written in milliseconds
    "request_id": "rid-1",
    "client": "127.0.0.1",
}


def request_lines(fmt: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    async def main() -> None:
        log = RequestLog(Renderer(fmt))
        log.write(*FIELDS.values())  # type: ignore[arg-type]
        log.write(*FIELDS.values())  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the lines go out once per pass of the loop

    asyncio.run(main())
    return capsys.readouterr().out.splitlines()


def test_request_line_matches_the_general_renderer(capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("text", "json"):
        lines = request_lines(fmt, capsys)
        assert len(lines) == 2
        fields = {**FIELDS, "duration_ms": "0.250" if fmt == "text" else 0.25}
        expected = Renderer(fmt).line("INFO", "request", fields)
        stamp_length = len("2026-01-01T00:00:00.000Z")
        if fmt == "json":
            got, want = orjson.loads(lines[0]), orjson.loads(expected)
            assert {k: v for k, v in got.items() if k != "time"} == {k: v for k, v in want.items() if k != "time"}
        else:
            assert lines[0][stamp_length:] == expected[stamp_length:]


def test_control_characters_are_escaped() -> None:
    line = Renderer("text").line("INFO", "m", {"path": "a\nb\x1b[31m"})
    assert "\n" not in line and "\x1b" not in line and '"a\\nb\\u001b[31m"' in line


def test_records_of_other_loggers_are_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info())
    line = LineFormatter(Renderer("text")).format(record)
    assert "\n" not in line and "Traceback" in line and "logger=x" in line


HOSTILE_TARGETS = [
    "/ingest/ok",
    "/ingest/x%1b%5b31mred%1b%5b0m",  # terminal escape codes
    "/ingest/x%0a2026-01-01T00:00:00.000Z%20INFO%20request%20status=200",  # a forged line
    "/ingest/x%0d%0a%7b%22level%22:%22info%22%7d",  # a forged JSON record
    '/ingest/q"uote%5c',
    "/ingest/%e2%80%ae%ff",  # right-to-left override, an invalid byte
    "/ingest/x%00nul",
]


def hostile_traffic(server: Any) -> None:
    for target in HOSTILE_TARGETS:
        server.raw_post(target)
    server.post("ok", "{}", {"X-Auth": TOKEN + "-wrong"})
    server.post("ok", "{}", {"X-Auth": "", "Authorization": f"Bearer {TOKEN}x"})
    server.post("ok", "{}", {"X-Request-ID": "bad id\"} forged"})


def test_json_logs_are_ready_for_loki_and_elasticsearch(make_server: Any) -> None:
    server = make_server(env={"LEITSTAND_LOG_FORMAT": "json"}).start()
    hostile_traffic(server)
    assert server.stop() in CLEAN_EXIT
    raw = server.output()
    assert TOKEN not in raw and str(server.data_dir) not in raw
    # No control character from a client reaches the output raw: each line is one record.
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", raw)
    records = [orjson.loads(line) for line in raw.splitlines()]
    assert all(type(r) is dict for r in records)
    types: dict[str, set[str]] = {}
    for record in records:
        # Both read the time as RFC 3339 in UTC and the level as a lowercase word.
        assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0)
        assert record["level"] in {"debug", "info", "warning", "error", "critical"}
        assert type(record["msg"]) is str
        for key, value in record.items():
            types.setdefault(key, set()).add(type(value).__name__)
    # Elasticsearch maps a field by its first value: one key, one type, in every record.
    assert {k: t for k, t in types.items() if len(t) > 1} == {}
    requests = [r for r in records if r["msg"] == "request" and r["path"] != "/health"]
    assert len(requests) == len(HOSTILE_TARGETS) + 3
    assert "\x1b[31mred" in requests[1]["path"] and "\n2026-01-01" in requests[2]["path"]


def test_text_logs_escape_what_clients_send(make_server: Any) -> None:
    server = make_server().start()
    hostile_traffic(server)
    assert server.stop() in CLEAN_EXIT
    raw = server.output()
    assert TOKEN not in raw and str(server.data_dir) not in raw
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", raw)
    lines = raw.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) ", x) for x in lines)
    assert len([x for x in lines if " INFO request method=POST " in x]) == len(HOSTILE_TARGETS) + 3
    assert r'path="/ingest/x\u001b[31mred\u001b[0m"' in raw
