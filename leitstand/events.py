"""Events: turning a request body into the exact lines the journal stores.

A body is one JSON object, an array of objects, or NDJSON. Each event is stored compact,
keys in the order sent, non-ASCII as UTF-8, with ``"domain"`` set to the canonical domain.
The whole body is checked before a line is produced, so a batch is all-or-nothing.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from leitstand import domains

# orjson reads integers beyond 64 bits as floats, which would silently change the event.
# Up to 19 digits always fit; only a body with a run of 20 digits is read a second time,
# strictly. Mapping every digit to "0" and searching for 20 of them is C-fast, where a
# regular expression costs more than the whole parse.
_ALL_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_TWENTY_DIGITS = b"0" * 20
_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1
_NEWLINE = orjson.OPT_APPEND_NEWLINE


class PayloadError(ValueError):
    """A body that is not stored; ``reason`` is the phrase the client is told."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(body: bytes, domain: str, *, ndjson: bool = False) -> tuple[bytes, int]:
    """The journal lines for ``body`` and how many events they hold."""
    items = _ndjson_items(body) if ndjson else _json_items(body)
    out = []
    for item in items:
        if type(item) is not dict:
            raise PayloadError("invalid payload")
        given = item.get("domain", domain)
        if given != domain and (type(given) is not str or domains.normalize(given) != domain):
            raise PayloadError("domain mismatch")
        item["domain"] = domain
        out.append(orjson.dumps(item, option=_NEWLINE))
    return b"".join(out), len(out)


def _json_items(body: bytes) -> list[Any]:
    value = _loads(body)
    return value if type(value) is list else [value]


def _ndjson_items(body: bytes) -> list[Any]:
    return [_loads(line) for line in body.split(b"\n") if line.strip()]


def _loads(text: bytes) -> Any:
    try:
        value = orjson.loads(text)
        if _TWENTY_DIGITS in text.translate(_ALL_DIGITS_TO_ZERO):
            json.loads(text, parse_int=_int64)
    except (ValueError, RecursionError):
        raise PayloadError("invalid json") from None
    return value


def _int64(digits: str) -> int:
    value = int(digits)
    if not _INT_MIN <= value <= _UINT_MAX:
        raise ValueError("integer out of range")
    return value
