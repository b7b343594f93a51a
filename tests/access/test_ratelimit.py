import pytest

from leitstand.access import ratelimit
from leitstand.access.ratelimit import FailureLimit, TokenBucket, parse_rate, retry_after


@pytest.mark.parametrize(
    ("raw", "rate"),
    [("10/min", (10, 60.0)), ("5 / s", (5, 1.0)), ("3/hour", (3, 3600.0)), ("0", None), ("off", None), ("0/s", None)],
)
def test_parse_rate(raw: str, rate: tuple[int, float] | None) -> None:
    assert parse_rate(raw) == rate


@pytest.mark.parametrize("raw", ["ten/min", "5/fortnight", "5", "-1/s", ""])
def test_parse_rate_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(raw)


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert [retry_after(s) for s in (0.01, 1.0, 1.2, 59.5)] == [b"1", b"1", b"2", b"60"]


def test_failures_block_a_key_for_the_rest_of_its_window() -> None:
    limit = FailureLimit(3, 60.0)
    for t in (0.0, 1.0, 2.0):
        assert limit.blocked("a", t) == 0.0
        limit.failed("a", t)
    assert limit.blocked("a", 10.0) == pytest.approx(50.0)
    assert limit.blocked("b", 10.0) == 0.0
    assert limit.blocked("a", 60.0) == 0.0  # the window is over: a fresh start
    limit.failed("a", 61.0)
    assert limit.blocked("a", 61.0) == 0.0


def test_failure_table_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_KEYS", 100)
    limit = FailureLimit(1, 60.0)
    for n in range(1000):
        limit.failed(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(limit._windows) <= 100
    assert limit.blocked("10.0.3.231", 1.0) > 0  # the newest keys are kept


def test_token_bucket_allows_bursts_then_paces() -> None:
    bucket = TokenBucket(5, 60.0)  # 5 per minute: one every 12 s
    assert [bucket.take("t", 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take("t", 0.0) == pytest.approx(12.0)
    assert bucket.take("other", 0.0) == 0.0
    assert bucket.take("t", 6.0) == pytest.approx(6.0)
    assert bucket.take("t", 12.0) == 0.0
    assert bucket.take("t", 12.0) > 0.0
