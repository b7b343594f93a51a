import asyncio
import logging
import sys

import orjson
import pytest

from leitstand.logs import LineFormatter, Renderer, RequestLog

FIELDS = {
    "method": "POST",
    "path": "/ingest/x\n2026-01-01T00:00:00.000Z INFO forged",
    "status": 200,
    "domain": "x",
    "events": 2,
    "bytes": 17,
    "duration_ms": 0.25,
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
        expected = Renderer(fmt).line("INFO", "request", FIELDS)
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
