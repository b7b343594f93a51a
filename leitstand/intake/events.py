"""Events: turning a request body into the exact lines the journal stores.

A body is one JSON object, an array of objects, or NDJSON. Each event is stored compact,
keys in the order sent, non-ASCII as UTF-8, with ``"domain"`` set to the canonical domain.
The whole body is checked before a line is produced, so a batch is all-or-nothing. A body
of nothing but whitespace is refused ("empty body": usually a file that was not there), while
an empty array is a request of no events.

Nothing a client sends may be changed silently. orjson itself refuses NaN, Infinity, lone
surrogates, a BOM and numbers that overflow to infinity; what it would change instead
(the last of duplicate keys kept, integers beyond 64 bits read as floats) is found by
cheap checks on the lines it wrote, and only a suspicious body pays for a strict parse.
Floats are IEEE doubles, as in every JSON reader: a literal is stored as the nearest one.
"""

from __future__ import annotations

import json
import math
import time
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import orjson

from leitstand.intake import domains

# orjson writes at most 254 levels, and reads at most 1024.
MAX_DEPTH = 254
_READ_DEPTH = 1024

_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1
_NEWLINE = orjson.OPT_APPEND_NEWLINE
# orjson writes a float of 1e16 or more as "1e+16"; every integer beyond 64 bits that it read
# as a float is one, so a line without "e+" holds none (looking for "+" first is faster).
_BIG_FLOAT = b"e+"
# "\u003a" is a colon once parsed but not in the body, which would upset the duplicate-key
# count (colons in == colons out); such bodies get the strict parse instead.
_ESCAPED_COLON = b"\\u003"
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))


@dataclass(frozen=True)
class Limits:
    """What one request may hold; ``depth`` counts the levels of one event, the event itself being 1."""

    events: int = 10000
    event_size: int = 256 << 10
    depth: int = MAX_DEPTH


class PayloadError(ValueError):
    """A body that is not stored; ``reason`` is the phrase the client is told."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLarge(PayloadError):
    """A body refused for its size, not its form."""


def received(field: str, now: float) -> tuple[str, str]:
    """The field and value that stamp an event with the time ``now``."""
    return field, rfc3339(now)


def rfc3339(when: float) -> str:
    """RFC 3339 in UTC with milliseconds, as leitstand writes every time."""
    millis = int(when * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) + f".{millis % 1000:03d}Z"


def encode(
    body: bytes,
    domain: str,
    *,
    ndjson: bool = False,
    limits: Limits = Limits(),
    stamp: tuple[str, str] | None = None,
) -> tuple[bytes, int]:
    """The journal lines for ``body`` and how many events they hold; ``stamp`` (a field and its
    value, see :func:`received`) is added to every event, which must not have it already."""
    if ndjson:
        texts = [line for line in body.split(b"\n") if line.strip()]
        if not texts:
            raise PayloadError("empty body")
        items = [_loads(text, limits.depth) for text in texts]
    else:
        texts = [body]
        value = _loads(body, limits.depth)
        items = value if type(value) is list else [value]
    if len(items) > limits.events:
        raise TooLarge("too many events")
    out = []
    added = 0
    try:
        for item in items:
            if type(item) is not dict:
                raise PayloadError("invalid payload")
            if "domain" not in item:
                added += 1
            elif (given := item["domain"]) != domain and (type(given) is not str or domains.normalize(given) != domain):
                raise PayloadError("domain mismatch")
            item["domain"] = domain
            if stamp is not None:
                if stamp[0] in item:
                    raise PayloadError("reserved field")
                item[stamp[0]] = stamp[1]
            out.append(orjson.dumps(item, option=_NEWLINE))
    except TypeError:
        raise PayloadError("json too deep") from None  # orjson's only complaint about what it parsed
    lines = b"".join(out)
    if (b"+" in lines and _BIG_FLOAT in lines) or (b"\\" in body and _ESCAPED_COLON in body):
        for text in texts:
            _check_strictly(text)
    # Every colon outside a string separates a key from its value, and orjson writes each kept
    # key once: fewer colons out than in (plus the added domains) means a key was dropped.
    elif lines.count(b":") != body.count(b":") + added + (len(out) * (1 + stamp[1].count(":")) if stamp else 0):
        raise PayloadError("duplicate key")
    if len(lines) > limits.event_size and max(map(len, out)) > limits.event_size:
        raise TooLarge("event too large")
    return lines, len(out)


def _loads(text: bytes, depth: int) -> Any:
    # An array body nests its events one level deeper; the dumps above refuse MAX_DEPTH + 1.
    try:
        if depth < MAX_DEPTH and text.count(b"{") + text.count(b"[") > depth:
            return _loads_shallow(text, _body_depth(text, depth))
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        if not text.strip():
            # Most likely a file that was not there: `curl --data-binary @missing` sends nothing.
            raise PayloadError("empty body") from None
        if _depth(text) > _body_depth(text, depth):
            raise PayloadError("json too deep") from None
        _check_strictly(text)  # a more precise reason, if there is one
        raise PayloadError("invalid json") from None


def _body_depth(text: bytes, depth: int) -> int:
    return depth + 1 if text.lstrip()[:1] == b"[" else depth


def _loads_shallow(text: bytes, limit: int) -> Any:
    """Parse ``text`` only if it nests at most ``limit`` levels, in C: wrapped in so many arrays
    that orjson's own limit falls exactly there."""
    pad = _READ_DEPTH - limit
    value = orjson.loads(b"[" * pad + text + b"]" * pad)
    for _ in range(pad):
        # One element per wrapper, or the text was not one value ("1],[2" fits between brackets too).
        if len(value) != 1:
            raise PayloadError("invalid json")
        value = value[0]
    return value


def _depth(text: bytes) -> int:
    """How deep ``text`` nests, brackets in strings not counted; only for bodies already refused."""
    if b"\\" in text:
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(text.translate(None, _NOT_STRUCTURE).split(b'"')[::2])
    return max(accumulate(array("b", brackets.translate(_SIGNS))), default=0)


def _check_strictly(text: bytes) -> None:
    """Refuse what orjson would change: duplicate keys, integers beyond 64 bits, and (for the reason
    given) floats beyond the doubles. Anything else is left to orjson, which decides what is JSON."""
    try:
        json.loads(text, parse_int=_int64, parse_float=_float64, object_pairs_hook=_unique_keys)
    except PayloadError:
        raise
    except (ValueError, RecursionError):
        pass


def _int64(digits: str) -> int:
    value = int(digits)
    if not _INT_MIN <= value <= _UINT_MAX:
        raise PayloadError("number out of range")
    return value


def _float64(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise PayloadError("number out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    if len({key for key, _ in pairs}) != len(pairs):
        raise PayloadError("duplicate key")
