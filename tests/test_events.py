import orjson
import pytest

from leitstand.events import PayloadError, encode


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


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "invalid json"),
        (b"", "invalid json"),
        (b"\xff\xfe{}", "invalid json"),
        (b'{"a":"\xc3"}', "invalid json"),
        (b'{"a":NaN}', "invalid json"),
        (b'{"a":1e999}', "invalid json"),
        (b'{"a":123456789012345678901234567890}', "invalid json"),
        (b'{"a":99999999999999999999}', "invalid json"),
        (b'[{"a":"1"},{"b":-99999999999999999999}]', "invalid json"),
        (b"[" * 5000 + b"]" * 5000, "invalid json"),
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
