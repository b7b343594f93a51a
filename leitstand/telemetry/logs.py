"""Logs: one line per record on stdout, as ``key=value`` text or as JSON.

Both formats escape control characters, so a client cannot forge a log line through a
path or a header. The request line is written directly, without the ``logging``
machinery, because it runs once per request on the hot path.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import sys
import time
from typing import Any, NoReturn

import orjson

_PLAIN = re.compile(r"[A-Za-z0-9._/:@+\-<>]*")
# Escaped request paths kept for the next request to the same path: as many, and as long as an
# ingest path can be (so that clients cannot fill the memory with long ones).
_PATHS_REMEMBERED = 4096
_PATH_REMEMBERED_LENGTH = 300
# uvicorn adds color_message to its records: terminal colour codes, of no use in a log line.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(now: float) -> str:
    return f"{_second(int(now))}.{int(now % 1 * 1000):03d}Z"


def _text_value(value: object) -> str:
    if type(value) is int or type(value) is float:
        return str(value)
    text = value if isinstance(value, str) else str(value)
    # ensure_ascii escapes every control and non-ASCII character.
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class Renderer:
    """Turns a level, a message and fields into one line in the configured format."""

    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"

    def line(self, level: str, message: str, fields: dict[str, Any], now: float | None = None) -> str:
        stamp = _timestamp(time.time() if now is None else now)
        if self.json:
            record = {"time": stamp, "level": level.lower(), "msg": message, **fields}
            return orjson.dumps(record, default=str).decode()
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{stamp} {level} {_text_value(message)}" + (f" {pairs}" if pairs else "")


class LineFormatter(logging.Formatter):
    """A ``logging`` formatter for the records of leitstand, uvicorn and everyone else."""

    def __init__(self, renderer: Renderer) -> None:
        super().__init__()
        self.renderer = renderer

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
        fields["logger"] = record.name
        if record.exc_info:
            # A traceback is folded into one escaped field, never spread over lines.
            fields["exc"] = self.formatException(record.exc_info)
        return self.renderer.line(record.levelname, record.getMessage(), fields, record.created)


class RequestLog:
    """Writes the one line per request.

    It renders what :class:`Renderer` would for the same fields, but with the fields known
    in advance: only the path is the client's own text and checked for escaping; the
    method was parsed by httptools, the client address comes from the socket, the domain
    and request id were validated, and the rest are numbers.

    Lines are collected and written once per pass of the event loop: under load one
    ``write`` call carries many lines, and no line waits longer than the pass it was made in.
    It runs for every request, so what repeats is made once: the time stamp once per
    millisecond, the escaped path once per path (paths repeat: one per domain).
    """

    def __init__(self, renderer: Renderer) -> None:
        self.json = renderer.json
        self._pending: list[str] = []
        self._millisecond = -1
        self._stamp = ""
        self._paths: dict[str, str] = {}

    def write(
        self,
        method: str,
        path: str,
        status: int,
        domain: str,
        events: int,
        nbytes: int,
        seconds: float,
        request_id: str,
        client: str,
    ) -> None:
        now = time.time()
        millisecond = int(now * 1000)
        if millisecond != self._millisecond:
            self._millisecond, self._stamp = millisecond, _timestamp(now)
        stamp = self._stamp
        if self.json:
            line = orjson.dumps(
                {
                    "time": stamp,
                    "level": "info",
                    "msg": "request",
                    "method": method,
                    "path": path,
                    "status": status,
                    "domain": domain,
                    "events": events,
                    "bytes": nbytes,
                    "duration_ms": round(seconds * 1000, 3),
                    "request_id": request_id,
                    "client": client,
                }
            ).decode()
        else:
            escaped = self._paths.get(path)
            if escaped is None:
                escaped = _text_value(path)
                if len(path) <= _PATH_REMEMBERED_LENGTH:
                    if len(self._paths) >= _PATHS_REMEMBERED:
                        self._paths.clear()
                    self._paths[path] = escaped
            line = (
                f"{stamp} INFO request method={method} path={escaped} status={status} "
                f"domain={domain} events={events} bytes={nbytes} duration_ms={seconds * 1000:.3f} "
                f"request_id={request_id} client={client}"
            )
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            sys.stdout.write("\n".join(lines) + "\n")


def setup(fmt: str) -> RequestLog:
    """Send every log record to stdout in ``fmt``, replacing uvicorn's own handlers."""
    renderer = Renderer(fmt)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LineFormatter(renderer))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # leitstand writes its own request line; uvicorn's would repeat it without the details.
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    return RequestLog(renderer)


def fatal(message: str) -> NoReturn:
    """Stop a process that cannot start: one line on stderr, no traceback.

    Exit code 3 is uvicorn's STARTUP_FAILURE, so ``--workers`` stops instead of respawning.
    """
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(3)
