"""Configuration: every setting comes from a ``LEITSTAND_*`` environment variable.

Reading the environment happens once, here, so that a bad value is reported before the
server binds its port, as one line an operator can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from leitstand import journal


class ConfigError(Exception):
    """A setting that keeps the service from starting; the message is one actionable line."""


@dataclass(frozen=True)
class Setting:
    """One environment variable, as documented in the README's configuration table."""

    env: str
    default: str
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    Setting("LEITSTAND_TOKEN", "(required)", "Token clients send in X-Auth or Authorization: Bearer."),
    Setting("LEITSTAND_DATA_DIR", "data", "Directory of the <domain>.jsonl files; created if missing."),
    Setting("LEITSTAND_MAX_BODY", "1MiB", "Largest request body, also after gzip decompression."),
    Setting("LEITSTAND_FSYNC", "always", "always: 200 only after fdatasync. never: throwaway data only."),
    Setting("LEITSTAND_MAX_OPEN_FILES", "256", "Journal files kept open at once (least recently used closed)."),
    Setting("LEITSTAND_LOG_FORMAT", "text", "text or json, one line per request on stdout."),
    Setting("LEITSTAND_READY_MIN_FREE", "64MiB", "GET /ready answers 503 below this much free space."),
    Setting("LEITSTAND_HOST", "0.0.0.0", "Address leitstand serve binds."),
    Setting("LEITSTAND_PORT", "8788", "Port leitstand serve binds."),
    Setting("LEITSTAND_WORKERS", "1", "Worker processes of leitstand serve."),
)
DEFAULTS = {s.env: s.default for s in SETTINGS}

_SIZE = re.compile(r"(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class Config:
    token: str = field(repr=False)
    data_dir: Path = Path("data")
    max_body: int = 1 << 20
    fsync: bool = True
    max_open_files: int = 256
    log_format: str = "text"
    ready_min_free: int = 64 << 20
    host: str = "0.0.0.0"
    port: int = 8788
    workers: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "").strip() or DEFAULTS[name]

        token = env.get("LEITSTAND_TOKEN", "").strip()
        if not token:
            raise ConfigError(
                "LEITSTAND_TOKEN is not set: export a token, e.g. "
                'export LEITSTAND_TOKEN="$(python3 -c \'import secrets; print(secrets.token_urlsafe(32))\')"'
            )
        return cls(
            token=token,
            data_dir=Path(get("LEITSTAND_DATA_DIR")),
            max_body=_size("LEITSTAND_MAX_BODY", get("LEITSTAND_MAX_BODY")),
            fsync=_choice("LEITSTAND_FSYNC", get("LEITSTAND_FSYNC"), ("always", "never")) == "always",
            max_open_files=_int("LEITSTAND_MAX_OPEN_FILES", get("LEITSTAND_MAX_OPEN_FILES"), 1),
            log_format=_choice("LEITSTAND_LOG_FORMAT", get("LEITSTAND_LOG_FORMAT"), ("text", "json")),
            ready_min_free=_size("LEITSTAND_READY_MIN_FREE", get("LEITSTAND_READY_MIN_FREE"), minimum=0),
            host=get("LEITSTAND_HOST"),
            port=_int("LEITSTAND_PORT", get("LEITSTAND_PORT"), 0, 65535),
            workers=_int("LEITSTAND_WORKERS", get("LEITSTAND_WORKERS"), 1),
        )

    def describe(self) -> dict[str, object]:
        """The effective settings for the startup line, with the token redacted and no path."""
        return {
            "token": "<redacted>",
            "max_body": self.max_body,
            "fsync": "always" if self.fsync else "never",
            "max_open_files": self.max_open_files,
            "log_format": self.log_format,
            "ready_min_free": self.ready_min_free,
        }


def load(environ: Mapping[str, str] | None = None) -> Config:
    """The settings, once the data directory has proved that it takes durable writes."""
    config = Config.from_env(environ)
    try:
        journal.probe(config.data_dir)
    except OSError as exc:
        raise ConfigError(
            f"LEITSTAND_DATA_DIR is not usable: {journal.reason(exc)}; "
            "point LEITSTAND_DATA_DIR at a writable directory with free space"
        ) from None
    return config


def _int(name: str, raw: str, minimum: int, maximum: int | None = None) -> int:
    bound = f"from {minimum}" + (f" to {maximum}" if maximum is not None else " up")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number: set it to a whole number {bound}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name}={raw!r} is out of range: set it to a whole number {bound}")
    return value


def _size(name: str, raw: str, minimum: int = 1) -> int:
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise ConfigError(f"{name}={raw!r} is not a size: use bytes or a unit, e.g. 1048576, 512KiB, 1MiB")
    value = int(match.group(1)) * _UNITS[match.group(2)[:1].lower()]
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} is too small: use at least {minimum} byte(s)")
    return value


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} is not valid: use one of {', '.join(choices)}")
    return value
