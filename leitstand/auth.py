"""Authentication: who may write.

Headers are compared as bytes with :func:`hmac.compare_digest`, so the time an answer
takes says nothing about how much of a guessed token was right.
"""

from __future__ import annotations

import hmac

_BEARER = b"bearer "


class TokenAuth:
    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    def allows(self, x_auth: bytes | None, authorization: bytes | None) -> bool:
        presented = _presented(x_auth, authorization)
        return presented is not None and hmac.compare_digest(presented, self._token)


def _presented(x_auth: bytes | None, authorization: bytes | None) -> bytes | None:
    """The token a request carries: ``X-Auth`` wins; otherwise ``Authorization: Bearer``."""
    if x_auth is not None:
        return x_auth.strip()
    if authorization is not None and authorization[:7].lower() == _BEARER:
        return authorization[7:].strip()
    return None
