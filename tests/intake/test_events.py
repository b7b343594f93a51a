import orjson
import pytest

from leitstand.intake import events
from leitstand.intake.events import MAX_DEPTH, Limits, PayloadError, TooLarge, encode


def test_object_is_stored_compact_in_key_order_with_domain() -> None:
    lines, count = encode(' { "b" : 1, "a" : "\u00fc" } '.encode(), "s.x")
    assert count == 1
    assert lines == '{"b":1,"a":"\u00fc","domain":"s.x"}\n'.encode()


def test_array_gives_one_line_per_event() -> None:
    lines, count = encode(b'[{"n":1},{"n":2,"domain":" S.X "}]', "s.x")
    assert count == 2
    assert lines.splitlines() == [b'{"n":1,"domain":"s.x"}', b'{"n":2,"domain":"s.x"}']


def test_ndjson_skips_blank_lines() -> None:
    lines, count = encode(b'{"n":1}\n\n  \n{"n":2}', "s", ndjson=True)
    assert count == 2 and [orjson.loads(x)["n"] for x in lines.splitlines()] == [1, 2]


def test_empty_array_is_no_events() -> None:
    assert encode(b"[]", "s") == (b"", 0)


@pytest.mark.parametrize("body", [b"", b"\n", b" \n\t\r\n  "])
def test_ndjson_of_nothing_but_whitespace_is_an_empty_body(body: bytes) -> None:
    with pytest.raises(PayloadError, match="^empty body$"):
        encode(body, "s", ndjson=True)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "invalid json"),
        (b"", "empty body"),
        (b" \r\n\t ", "empty body"),
        (b"\xff\xfe{}", "invalid json"),
        (b'{"a":"\xc3"}', "invalid json"),
        (b'{"a":NaN}', "invalid json"),
        (b'{"a":1e999}', "number out of range"),
        (b'{"a":-1E+400}', "number out of range"),
        (b'{"a":123456789012345678901234567890}', "number out of range"),
        (b'{"a":99999999999999999999}', "number out of range"),
        (b'{"a":18446744073709551616}', "number out of range"),
        (b'{"a":-9223372036854775809}', "number out of range"),
        (b'[{"a":"1"},{"b":-99999999999999999999}]', "number out of range"),
        (b'{"a":Infinity}', "invalid json"),
        (b'{"a":-Infinity}', "invalid json"),
        (b'{"a":"\\ud800"}', "invalid json"),
        (b'{"a":"\\udc00x"}', "invalid json"),
        (b'{"a":"\xed\xa0\x80"}', "invalid json"),
        (b'\xef\xbb\xbf{"a":1}', "invalid json"),
        (b'{"a":1,"a":2}', "duplicate key"),
        (b'{"a":{"b":1,"b":1}}', "duplicate key"),
        (b'[{"a":1},{"a":2,"a":3}]', "duplicate key"),
        (b'{"domain":"x","domain":"s.x"}', "duplicate key"),
        (b'{"\\u0061":1,"a":2}', "duplicate key"),
        (b'{"x":"\\u003a","a":1,"a":2}', "duplicate key"),
        (b'{"x":"\\u003A","a":1e20,"a":2}', "duplicate key"),
        (b"[" * 5000 + b"]" * 5000, "json too deep"),
        (b'{"a":' * 255 + b"1" + b"}" * 255, "json too deep"),
        (b'[{"a":' * 254 + b"1" + b"}]" * 254, "json too deep"),
        (b"[" * 1025 + b"]" * 1025, "json too deep"),
        (b"[1],[2]", "invalid json"),
        (b"1", "invalid payload"),
        (b'"x"', "invalid payload"),
        (b"[{}, 2]", "invalid payload"),
        (b"[[]]", "invalid payload"),
        (b'{"domain":"other"}', "domain mismatch"),
        (b'[{}, {"domain":"s.y"}]', "domain mismatch"),
        (b'{"domain":7}', "domain mismatch"),
    ],
)
def test_bad_bodies_are_refused_with_their_reason(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        encode(body, "s.x")
    assert info.value.reason == reason


def test_bad_ndjson_line_refuses_the_whole_body() -> None:
    with pytest.raises(PayloadError, match="invalid json"):
        encode(b'{"n":1}\n{"n":\n', "s", ndjson=True)


def test_64_bit_integers_pass_unchanged() -> None:
    body = b'{"a":18446744073709551615,"b":-9223372036854775808,"ns":1764316800123456789,"s":"123456789012345678901"}'
    lines, _ = encode(body, "s")
    assert lines == body[:-1] + b',"domain":"s"}\n'


def test_escaped_colons_and_big_floats_are_not_taken_for_duplicates() -> None:
    body = b'{"k\\u003a":"a\\u003Ab:c","f":2.5e20,"g":-1e-400,"n":"e+"}'
    lines, _ = encode(body, "s")
    assert lines == b'{"k:":"a:b:c","f":2.5e+20,"g":-0.0,"n":"e+","domain":"s"}\n'


def nested(depth: int) -> bytes:
    """One event nesting ``depth`` levels, itself included."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


@pytest.mark.parametrize("limit", [1, 2, 10, 100, MAX_DEPTH])
@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: b" [" + x + b"]", lambda x: b'[{"n":1},' + x + b"]"])
def test_depth_limit_counts_the_levels_of_one_event(limit: int, wrap) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(depth=limit)
    assert encode(wrap(nested(limit)), "s", limits=limits)[1] >= 1
    with pytest.raises(PayloadError, match="json too deep"):
        encode(wrap(nested(limit + 1)), "s", limits=limits)
    brackets_in_strings = b'{"s":"' + b"[{" * 2000 + b'\\"]"}'
    assert encode(wrap(brackets_in_strings), "s", limits=limits)[1] >= 1


def test_depth_limit_applies_to_each_ndjson_line() -> None:
    body = b"\n".join([nested(3)] * 50 + [nested(4)])
    with pytest.raises(PayloadError, match="json too deep"):
        encode(body, "s", ndjson=True, limits=Limits(depth=3))
    assert encode(body, "s", ndjson=True, limits=Limits(depth=4))[1] == 51


def test_event_count_limit() -> None:
    limits = Limits(events=3)
    assert encode(b"[{},{},{}]", "s", limits=limits)[1] == 3
    for body, ndjson in ((b"[{},{},{},{}]", False), (b"{}\n{}\n{}\n{}", True)):
        with pytest.raises(TooLarge, match="too many events"):
            encode(body, "s", ndjson=ndjson, limits=limits)


def test_event_size_limit_counts_the_stored_line() -> None:
    line = b'{"p":"xxxx","domain":"s"}\n'
    limits = Limits(event_size=len(line))
    assert encode(b'[{"p":"x"},{"p":"xxxx"}]', "s", limits=limits)[0].endswith(line)
    with pytest.raises(TooLarge, match="event too large"):
        encode(b'[{"p":"x"},{"p":"xxxxx"}]', "s", limits=limits)


def test_received_stamp_is_added_to_every_event_and_refused_when_present() -> None:
    stamp = events.received("received_at", 1_796_309_275.2649)
    assert stamp == ("received_at", "2026-12-03T14:47:55.264Z")
    lines, count = events.encode(b'[{"a":"x:y"},{"b":2}]', "app", stamp=stamp)
    assert count == 2 and lines == (
        b'{"a":"x:y","domain":"app","received_at":"2026-12-03T14:47:55.264Z"}\n'
        b'{"b":2,"domain":"app","received_at":"2026-12-03T14:47:55.264Z"}\n'
    )
    with pytest.raises(events.PayloadError, match="reserved field"):
        events.encode(b'[{"a":1},{"received_at":"2020-01-01T00:00:00Z"}]', "app", stamp=stamp)
    # The duplicate-key check still counts right with the stamp's colons.
    with pytest.raises(events.PayloadError, match="duplicate key"):
        events.encode(b'{"a":1,"a":2}', "app", stamp=stamp)
