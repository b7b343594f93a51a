import hmac

import pytest

from leitstand import auth
from leitstand.auth import TokenAuth


@pytest.mark.parametrize(
    ("x_auth", "authorization", "allowed"),
    [
        (b"s3cr3t", None, True),
        (b" s3cr3t ", None, True),
        (None, b"Bearer s3cr3t", True),
        (None, b"bearer s3cr3t", True),
        (None, b"Basic s3cr3t", False),
        (None, b"s3cr3t", False),
        (b"wrong", b"Bearer s3cr3t", False),  # X-Auth, when present, is the one that counts
        (b"", None, False),
        (None, None, False),
        (b"s3cr3", None, False),
        (b"s3cr3tt", None, False),
    ],
)
def test_token_sources(x_auth: bytes | None, authorization: bytes | None, allowed: bool) -> None:
    assert TokenAuth("s3cr3t").allows(x_auth, authorization) is allowed


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    assert not TokenAuth("s3cr3t").allows(b"guess", None)
    assert calls == [(b"guess", b"s3cr3t")]
