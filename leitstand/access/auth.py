"""Authentication and authorization: which token may write to, or read, which domain.

Tokens come from ``LEITSTAND_TOKEN`` (comma-separated; each may read and write everywhere)
and from ``LEITSTAND_TOKEN_FILE`` (one per line, optionally with a scope of domains and an
access: ``write`` unless the line says otherwise, so that files written before the read API
keep their meaning). Several tokens are what makes rotation possible without downtime: add
the new one, move the clients, remove the old one.

A presented token is hashed once and its digest compared with :func:`hmac.compare_digest`
against the digest of every configured token, without stopping at a match, so the time an
answer takes says nothing about which token, or how much of one, was right.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from leitstand.intake.domains import Patterns, normalize

log = logging.getLogger("leitstand.auth")

_BEARER = b"bearer "
_ALL: tuple[str, ...] = ("*",)
# Options a token line may carry: the scope of domains, what the token may do there, and the
# one domain its OpenTelemetry logs go to.
_OPTIONS = frozenset({"domains", "access", "otlp-domain"})
_ACCESS = frozenset({"read", "write"})
_WRITE: frozenset[str] = frozenset({"write"})
_READ_WRITE = _ACCESS


class TokenFileError(Exception):
    """A token file that cannot be used; the message says why, without a token in it."""


@dataclass(frozen=True, eq=False)
class Grant:
    """What one token may do (``access``: read, write) in the domains matching ``domains``;
    ``otlp_domain``: where its OTLP logs go."""

    digest: bytes = field(repr=False)
    domains: Patterns
    access: frozenset[str] = _WRITE
    otlp_domain: str | None = None

    def may_write(self, domain: str) -> bool:
        return self.writes and self.domains.match(domain)

    def may_read(self, domain: str) -> bool:
        return self.reads and self.domains.match(domain)

    @property
    def writes(self) -> bool:
        return "write" in self.access

    @property
    def reads(self) -> bool:
        return "read" in self.access

    @property
    def all_domains(self) -> bool:
        """Whether the token is unscoped (it may also read the figures of every domain)."""
        return self.domains.patterns == _ALL


def grant(
    token: str, domains: Iterable[str] = _ALL, access: frozenset[str] = _WRITE, otlp_domain: str | None = None
) -> Grant:
    return Grant(_digest(token.encode("utf-8")), Patterns(tuple(domains)), access, otlp_domain)


def from_list(tokens: str) -> list[Grant]:
    """The grants of a comma-separated ``LEITSTAND_TOKEN``; each may read and write everywhere."""
    return [grant(token, access=_READ_WRITE) for token in split_list(tokens)]


def read_token_file(path: Path) -> list[Grant]:
    """The grants of a token file: ``<token> [domains=<pattern>,...] [access=read|write|read,write]
    [otlp-domain=<domain>]`` per line (default: all domains, write), ``#`` comments.

    Raises :class:`TokenFileError` for a file that cannot be read, holds no token, or has a
    line that does not parse: a half-understood file must not silently widen or narrow access.
    """
    return [grant for _, grant in read_tokens(path)]


def read_tokens(path: Path) -> list[tuple[str, Grant]]:
    """The tokens of a token file, each with its grant, as :func:`read_token_file` reads them;
    for a client that sends with the same file the service checks against."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read it ({getattr(exc, 'strerror', None) or 'not UTF-8'})") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        token, options = words[0], words[1:]
        scope, access, otlp_domain = _ALL, _WRITE, None
        for option in options:
            key, sep, value = option.partition("=")
            values = split_list(value)
            if not sep or key not in _OPTIONS or not values:
                raise TokenFileError(
                    f"line {number}: unknown option (use domains=<pattern>,..., access=read|write|read,write"
                    " and otlp-domain=<domain>)"
                )
            if key == "domains":
                scope = tuple(values)
            elif key == "otlp-domain":
                if (otlp_domain := normalize(value)) is None:
                    raise TokenFileError(f"line {number}: otlp-domain is not a valid domain")
            elif not _ACCESS.issuperset(values):
                raise TokenFileError(f"line {number}: unknown access (use access=read, write or read,write)")
            else:
                access = frozenset(values)
        tokens.append((token, grant(token, scope, access, otlp_domain)))
    if not tokens:
        raise TokenFileError("it holds no token")
    return tokens


class Keyring:
    """The tokens in force: those of ``LEITSTAND_TOKEN`` and those of the token file.

    :meth:`reload` swaps the file's tokens in at once; a request already past the check
    keeps the grant it got. A file that became unreadable, empty or malformed leaves the
    tokens in force as they are, so a botched edit cannot lock every producer out.
    """

    def __init__(self, fixed: Iterable[Grant] = (), path: Path | None = None) -> None:
        self.fixed = tuple(fixed)
        self.path = path
        self._seen = self._stamp()
        self.grants = self.fixed + tuple(read_token_file(path) if path else ())

    def _stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def changed(self) -> bool:
        """Whether the token file looks different since it was last read (cheap: one stat)."""
        return self.path is not None and self._stamp() != self._seen

    def reload(self) -> bool:
        """Read the token file again; True if its tokens are now in force."""
        if self.path is None:
            log.info("nothing to reload: tokens come from LEITSTAND_TOKEN, which takes a restart to change")
            return False
        self._seen = self._stamp()
        try:
            grants = read_token_file(self.path)
        except TokenFileError as exc:
            log.error("token file not reloaded: %s; the %d tokens in force stay", exc, len(self.grants))
            return False
        self.grants = self.fixed + tuple(grants)
        log.info("token file reloaded", extra={"tokens": len(self.grants)})
        return True

    def find(self, x_auth: bytes | None, authorization: bytes | None) -> Grant | None:
        """The grant of the token a request carries, or None."""
        presented = _presented(x_auth, authorization)
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for candidate in self.grants:
            if hmac.compare_digest(digest, candidate.digest) and found is None:
                found = candidate
        return found


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def split_list(value: str) -> list[str]:
    """The parts of a comma-separated setting, stripped, empty ones dropped."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _presented(x_auth: bytes | None, authorization: bytes | None) -> bytes | None:
    """The token a request carries: ``X-Auth`` wins; otherwise ``Authorization: Bearer``."""
    if x_auth is not None:
        return x_auth.strip()
    if authorization is not None and authorization[:7].lower() == _BEARER:
        return authorization[7:].strip()
    return None
