"""Property tests: the domain validator against the rules as written, and body parsing against
a strict reference parser (the standard library's, refusing what RFC 8259 leaves open)."""

from __future__ import annotations

import json
import math
import string
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from leitstand.intake import domains
from leitstand.intake.events import PayloadError, encode

# -- domains --------------------------------------------------------------------------

LDH = string.ascii_lowercase + string.digits + "-"


def reference_domain(raw: str) -> str | None:
    """The README's rule, written out: stripped, only ASCII letters, digits, '-' and '.', then
    lowercased; dot-separated labels of 1-63 characters, not starting or ending with '-';
    at most 253 characters."""
    name = raw.strip()
    if not name or any(c not in string.ascii_letters + string.digits + "-." for c in name):
        return None
    name = name.lower()
    labels = name.split(".")
    if len(name) > 253 or any(not 1 <= len(x) <= 63 or x[0] == "-" or x[-1] == "-" for x in labels):
        return None
    return name


def label(max_size: int = 63) -> st.SearchStrategy[str]:
    inner = st.text(LDH, max_size=max(0, max_size - 2))
    end = st.sampled_from(string.ascii_lowercase + string.digits)
    return st.one_of(end, st.builds(lambda a, b, c: a + b + c, end, inner, end))


valid_domains = (
    st.lists(st.one_of(label(), label(8)), min_size=1, max_size=8).map(".".join).filter(lambda d: len(d) <= 253)
)
# Strings close to valid ones, so that both sides of every rule are reached.
near_domains = st.text(
    st.sampled_from([*"aZk09-._/ \t\\\x00%", "\u212a", "\u0430", "\u3002", "\uff0e", "\u0131", "\u00df"]), max_size=70
)


@given(st.one_of(st.text(), near_domains, valid_domains, valid_domains.map(lambda d: f" {d.upper()}\t")))
@example("\u212a")  # Kelvin sign: lowercases to an ASCII "k"
@example("xn--80ak6aa92e.com")
@example("xn--")
@example("a.")
def test_normalize_follows_the_written_rules(raw: str) -> None:
    assert domains.normalize(raw) == reference_domain(raw)


@given(valid_domains)
def test_canonical_domains_are_fixed_points_and_safe_names(domain: str) -> None:
    assert domains.normalize(domain) == domain
    assert domains.normalize(domain.upper()) == domain
    name = domains.file_name(domain)
    assert "/" not in name and "\x00" not in name and ".." not in name and not name.startswith(".")
    assert name.endswith(domains.SUFFIX) and len(name.encode()) <= 255
    # A shortened name carries "_", which no domain has, so it cannot be another domain's file.
    assert ("_" in name) == (len(domain) + len(domains.SUFFIX) > 255)


long_domains = st.lists(label(), min_size=4, max_size=4).map(".".join).filter(lambda d: len(d) <= 253)


@given(st.lists(st.one_of(valid_domains, long_domains), min_size=2, max_size=20, unique=True))
def test_file_names_are_unique(names: list[str]) -> None:
    files = [domains.file_name(d) for d in names]
    assert len(set(files)) == len(files)


def test_file_names_of_long_domains_sharing_a_prefix_differ() -> None:
    prefix = ".".join(["a" * 63] * 3) + "."
    files = {domains.file_name(prefix + "b" * 60 + c) for c in "0123456789"}
    assert len(files) == 10


# -- bodies ---------------------------------------------------------------------------

INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1


class Refused(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise Refused("duplicate key")
    return dict(pairs)


def _refuse_what_doubles_and_utf8_cannot_hold(value: Any) -> None:
    """Lone surrogates (not UTF-8), integers beyond 64 bits, NaN and infinities (read from NaN,
    Infinity or an overflowing literal such as 1e400)."""
    if isinstance(value, str):
        if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise Refused("lone surrogate")
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not INT64_MIN <= value <= UINT64_MAX:
            raise Refused("integer beyond 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Refused("not a finite double")
    else:
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in pairs:
            _refuse_what_doubles_and_utf8_cannot_hold(k)
            _refuse_what_doubles_and_utf8_cannot_hold(v)


def reference_events(body: bytes, domain: str, ndjson: bool) -> list[dict[str, Any]] | None:
    """The events of ``body`` as an independent, strict reader sees them, or None if it refuses."""
    try:
        text = body.decode("utf-8")  # strict: no invalid UTF-8, no encoded surrogates
        docs = [line for line in text.split("\n") if line.strip(" \t\r\n")] if ndjson else [text]
        values = []
        for doc in docs:
            value = json.loads(doc, object_pairs_hook=_pairs)  # refuses a BOM itself
            _refuse_what_doubles_and_utf8_cannot_hold(value)
            values.append(value)
    except (Refused, ValueError):
        return None
    if not values:
        return None  # NDJSON of blank lines: nothing was sent ("empty body")
    items = values[0] if not ndjson and isinstance(values[0], list) else values
    events = []
    for item in items:
        if not isinstance(item, dict):
            return None
        given = item.get("domain", domain)
        if given != domain and (not isinstance(given, str) or domains.normalize(given) != domain):
            return None
        item["domain"] = domain
        events.append(item)
    return events


def _json_string(parts: list[str]) -> str:
    return '"' + "".join(parts) + '"'


# Valid escapes weigh more than broken ones, so that accepted bodies are not rare.
ESCAPES = [r"\"", r"\\", r"\/", r"\n", r"\t", r"\u003a", r"\u003A", r"\u0061", r"\u0000", r"\u00e4",
           r"\ud83d\ude00"] * 3 + [r"\ud800", r"\udc00", r"\x"]
strings = st.lists(
    st.one_of(st.characters(codec="utf-8", exclude_characters='"\\\n'), st.sampled_from(ESCAPES)), max_size=6
).map(_json_string)
keys = st.one_of(st.sampled_from(['"a"', '"b"', r'"\u0061"', '"domain"', '"a:b"']), strings)
numbers = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.sampled_from([str(INT64_MIN), str(INT64_MIN - 1), str(UINT64_MAX), str(UINT64_MAX + 1)]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.from_regex(r"-?(0|[1-9][0-9]{0,20})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
)
bad_numbers = st.sampled_from(["NaN", "Infinity", "-Infinity", "01", "1.", ".5", "+1", "0x10"])
domain_values = st.sampled_from(['"s.x"', '" S.X "', '"other"', "1", "null"])
scalars = st.one_of(st.sampled_from(["null", "true", "false"]), numbers, strings, numbers, strings, bad_numbers)
SEPARATORS = st.sampled_from([",", ", ", " ,\t", "\r\n,"])


def _object(members: list[tuple[str, str]], sep: str) -> str:
    return "{" + sep.join(f"{k}:{v}" for k, v in members) + "}"


def _array(items: list[str], sep: str) -> str:
    return "[" + sep.join(items) + "]"


values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.builds(_array, st.lists(children, max_size=4), SEPARATORS),
        st.builds(_object, st.lists(st.tuples(keys, st.one_of(children, domain_values)), max_size=4), SEPARATORS),
    ),
    max_leaves=20,
)
events_text = st.builds(_object, st.lists(st.tuples(keys, st.one_of(values, domain_values)), max_size=5), SEPARATORS)
json_bodies = st.one_of(
    events_text,
    st.builds(_array, st.lists(st.one_of(events_text, values), max_size=4), SEPARATORS),
    values,
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(json_bodies, st.sampled_from(["", "", "", " \n", "\ufeff"]), st.sampled_from(["", "", "", " ", " x", ","]))
@example('{"a":1,"a":1}', "", "")
@example('{"a":"\\u003a","a":1e20}', "", "")
@example('{"a":-9223372036854775809}', "", "")
def test_json_body_is_read_as_the_reference_reads_it(text: str, before: str, after: str) -> None:
    body = (before + text + after).encode("utf-8", "surrogatepass")
    check_against_reference(body, ndjson=False)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(events_text, st.just(""), st.just("  ")), max_size=6))
def test_ndjson_body_is_read_as_the_reference_reads_it(lines: list[str]) -> None:
    check_against_reference("\n".join(lines).encode(), ndjson=True)


def check_against_reference(body: bytes, *, ndjson: bool) -> None:
    expected = reference_events(body, "s.x", ndjson)
    try:
        lines, count = encode(body, "s.x", ndjson=ndjson)
    except PayloadError as exc:
        event(f"refused: {exc.reason}")
        assert expected is None, f"refused ({exc.reason}) what the reference reads as {expected!r}"
        return
    assert expected is not None, "accepted what the reference refuses"
    event("accepted")
    stored = [orjson.loads(line) for line in lines.splitlines()]
    assert count == len(stored)
    # Same events, same keys in the same order, same values (as the doubles they are).
    assert [list(e.items()) for e in stored] == [list(e.items()) for e in expected]
    assert all(line == orjson.dumps(orjson.loads(line)) for line in lines.splitlines())


@pytest.mark.parametrize("literal", ["1e400", "-1E+400", "18446744073709551616", "-9223372036854775809"])
def test_reference_itself_refuses_what_it_should(literal: str) -> None:
    """The reference must be able to say no, or the comparison above proves nothing."""
    assert reference_events(b'{"a":%s}' % literal.encode(), "s.x", False) is None
    assert reference_events(b'{"a":1,"a":2}', "s.x", False) is None
    assert reference_events(b'{"a":"\\ud800"}', "s.x", False) is None
    assert reference_events(b'\xef\xbb\xbf{"a":1}', "s.x", False) is None
