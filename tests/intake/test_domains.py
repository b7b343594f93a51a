import pytest

from leitstand.intake import domains


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sensor", "sensor"),
        (" Sensor.Example.COM ", "sensor.example.com"),
        ("a-b.c-d", "a-b.c-d"),
        ("1.2.3", "1.2.3"),
        ("a" * 63, "a" * 63),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ],
)
def test_valid_domains_are_normalized(raw: str, expected: str) -> None:
    assert domains.normalize(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        ".",
        "..",
        "a..b",
        ".a",
        "a.",
        "-a",
        "a-",
        "a.-b",
        "a_b",
        "a/b",
        "../etc",
        "a\x00b",
        "a" * 64,
        ".".join(["a" * 63] * 4),  # 255 characters
        "\u212a",  # KELVIN SIGN lowercases to an ASCII "k"
        "sensor\u3002com",
        "ex\u0430mple",  # Cyrillic a
        "a b",
    ],
)
def test_invalid_domains_are_refused(raw: str) -> None:
    assert domains.normalize(raw) is None


def test_file_name_is_domain_plus_suffix() -> None:
    assert domains.file_name("sensor.example") == "sensor.example.jsonl"


def test_long_names_are_shortened_deterministically_and_distinctly() -> None:
    first = ".".join(["a" * 63] * 3) + "." + "b" * 61
    second = ".".join(["a" * 63] * 3) + "." + "c" * 61
    assert len(first) == 253
    name = domains.file_name(first)
    assert len(name.encode()) == 255
    assert name == domains.file_name(first)
    assert name != domains.file_name(second)
    assert name.endswith(".jsonl") and "_" in name and "/" not in name
    # A name that fits is never shortened, so the shortened form cannot be another domain's.
    assert domains.normalize(name.removesuffix(".jsonl")) is None


def test_policy_allow_deny_globs() -> None:
    policy = domains.Policy(["Sensor-*", "*.example.com"], ["sensor-test", "*.internal.example.com"])
    assert policy.allows("sensor-1") and policy.allows("api.example.com")
    assert not policy.allows("sensor-test")  # deny wins
    assert not policy.allows("db.internal.example.com")
    assert not policy.allows("example.com") and not policy.allows("billing")
    assert domains.Policy().allows("anything")
    assert not domains.Policy(deny=["*"]).allows("anything")
