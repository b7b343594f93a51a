"""Domain names: the one place that decides which names are valid and which file each one owns.

Only dot-separated labels of ``[a-z0-9-]`` pass, so a name can never hold ``/``, ``..``,
NUL or anything else that could lead outside the data directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from functools import lru_cache

MAX_DOMAIN = 253
SUFFIX = ".jsonl"
# Most filesystems cap a file name at 255 bytes; 253 + ".jsonl" does not fit.
MAX_FILE_NAME = 255
_REMEMBERED = 4096

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
PATTERN = rf"{_LABEL}(?:\.{_LABEL})*"
_DOMAIN = re.compile(PATTERN)


@lru_cache(maxsize=_REMEMBERED)
def normalize(raw: str) -> str | None:
    """The canonical form of ``raw`` (stripped, lowercased), or None if it is not a valid domain.

    Answers are remembered: every request asks, and the same few names come back all day.
    """
    name = raw.strip()
    # ASCII is checked before lowercasing: "\u212a".lower() is an ASCII "k".
    if len(name) > MAX_DOMAIN or not name.isascii():
        return None
    name = name.lower()
    return name if _DOMAIN.fullmatch(name) else None


@lru_cache(maxsize=_REMEMBERED)
def file_name(domain: str) -> str:
    """The journal file of a valid domain: ``<domain>.jsonl``, shortened with a hash when too long.

    The shortened form contains ``_``, which no valid domain has, so it never collides
    with the file of another domain.
    """
    name = domain + SUFFIX
    if len(name) <= MAX_FILE_NAME:
        return name
    digest = hashlib.sha256(domain.encode("ascii")).hexdigest()[:16]
    keep = MAX_FILE_NAME - len(SUFFIX) - len(digest) - 1
    return f"{domain[:keep]}_{digest}{SUFFIX}"


class Patterns:
    """Glob patterns over domain names (``sensor-*``, ``*.example.com``).

    Answers are remembered, as the same few domains come back all day.
    """

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self.patterns = tuple(pattern.strip().lower() for pattern in patterns if pattern.strip())
        self.match: Callable[[str], bool] = lru_cache(maxsize=_REMEMBERED)(self._match)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"Patterns({', '.join(self.patterns)})"

    def _match(self, domain: str) -> bool:
        return any(fnmatchcase(domain, pattern) for pattern in self.patterns)


class Policy:
    """Which valid domains may be written at all: ``LEITSTAND_DOMAINS_ALLOW`` and ``_DENY``.

    Deny wins over allow; an empty allow list allows every domain.
    """

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> None:
        self.allow = Patterns(allow)
        self.deny = Patterns(deny)

    def allows(self, domain: str) -> bool:
        return (not self.allow or self.allow.match(domain)) and not self.deny.match(domain)
