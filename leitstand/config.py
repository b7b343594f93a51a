"""Configuration: every setting comes from a ``LEITSTAND_*`` environment variable.

Reading the environment happens once, here, so that a bad value is reported before the
server binds its port, as one line an operator can act on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from leitstand.access import auth, ratelimit
from leitstand.access.proxies import Network, parse_networks
from leitstand.intake import events
from leitstand.storage import journal
from leitstand.storage.rotation import CODECS, Policy, Retention


class ConfigError(Exception):
    """A setting that keeps the service from starting; the message is one actionable line."""


@dataclass(frozen=True)
class Setting:
    """One environment variable, as documented in the README's configuration table."""

    env: str
    default: str
    meaning: str

    @property
    def flag(self) -> str:
        """The command-line flag that sets it: LEITSTAND_DATA_DIR is ``--data-dir``."""
        return "--" + self.env.removeprefix("LEITSTAND_").lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "LEITSTAND_TOKEN",
        "(required)",
        "Token(s) clients send in X-Auth or Authorization: Bearer; comma-separated for rotation. "
        "Required unless LEITSTAND_TOKEN_FILE is set.",
    ),
    Setting(
        "LEITSTAND_TOKEN_FILE",
        "(none)",
        "File with one token per line, optionally scoped: <token> domains=<glob>,... access=read|write|read,write "
        "(default write). Reloaded on SIGHUP and when it changes.",
    ),
    Setting("LEITSTAND_DATA_DIR", "data", "Directory of the <domain>.jsonl files; created if missing."),
    Setting("LEITSTAND_MAX_BODY", "1MiB", "Largest request body, also after gzip decompression."),
    Setting("LEITSTAND_MAX_EVENTS", "10000", "Most events in one request; more is 413 too many events."),
    Setting("LEITSTAND_MAX_EVENT_SIZE", "256KiB", "Largest stored line of one event; larger is 413 event too large."),
    Setting(
        "LEITSTAND_MAX_DEPTH",
        str(events.MAX_DEPTH),
        f"Deepest nesting of one event (1 to {events.MAX_DEPTH}); deeper is 400 json too deep.",
    ),
    Setting("LEITSTAND_BODY_TIMEOUT", "30", "Seconds a client has to send its whole body; slower is 408."),
    Setting("LEITSTAND_FSYNC", "always", "always: 200 only after fdatasync. never: throwaway data only."),
    Setting(
        "LEITSTAND_SYNCFS",
        "auto",
        "auto: a commit round of 3 or more files is made durable with one syncfs where the filesystem "
        "reports its errors (Linux 5.8+, ext4/xfs/btrfs); it also flushes other programs' writes to that "
        "filesystem. off: one fdatasync per file.",
    ),
    Setting(
        "LEITSTAND_MAX_OPEN_FILES",
        "16384",
        "Journal files kept open at once (least recently used closed); the descriptor limit is raised to fit.",
    ),
    Setting("LEITSTAND_LOG_FORMAT", "text", "text or json, one line per request on stdout."),
    Setting("LEITSTAND_READY_MIN_FREE", "64MiB", "GET /ready answers 503 below this much free space."),
    Setting("LEITSTAND_DOMAINS_ALLOW", "(all)", "Comma-separated globs of the domains that may be written."),
    Setting("LEITSTAND_DOMAINS_DENY", "(none)", "Comma-separated globs of domains refused with 403; wins over allow."),
    Setting(
        "LEITSTAND_AUTH_FAIL_LIMIT",
        "10/min",
        "Failed token checks per client address before it gets 429 for the rest of the window; 0 = off.",
    ),
    Setting("LEITSTAND_RATE_LIMIT", "0", "Requests per token, e.g. 200/s or 5000/min (429 above); 0 = off."),
    Setting(
        "LEITSTAND_TRUSTED_PROXIES",
        "(none)",
        "Comma-separated addresses or networks of proxies whose X-Forwarded-For names the client.",
    ),
    Setting("LEITSTAND_FILE_MODE", "0600", "Permissions of new journal files (octal)."),
    Setting(
        "LEITSTAND_IDEMPOTENCY_WINDOW",
        "24h",
        "How long a request's Idempotency-Key is remembered per domain, e.g. 24h, 90m, 3600s.",
    ),
    Setting(
        "LEITSTAND_IDEMPOTENCY_MAX_KEYS",
        "100000",
        "Most idempotency keys remembered (all domains together); the oldest are forgotten first.",
    ),
    # Rotation, compression and retention of the journal files (leitstand.storage.rotation).
    Setting("LEITSTAND_ROTATE_BYTES", "off", "Seal <domain>.jsonl into a segment once it holds this much, e.g. 256MiB."),
    Setting("LEITSTAND_ROTATE_INTERVAL", "off", "Seal <domain>.jsonl once its first event is this old, e.g. 1h, 1d."),
    Setting("LEITSTAND_COMPRESS", "zstd", "Compress sealed segments in the background: zstd, gzip or off."),
    Setting(
        "LEITSTAND_RETENTION",
        "off",
        "Remove segments whose newest event is older, e.g. 30d; per-domain globs after it: 30d,audit.*=365d,debug-*=1d.",
    ),
    Setting("LEITSTAND_RETENTION_MAX_BYTES", "off", "Bound live and sealed bytes; beyond it the oldest segments go."),
    Setting("LEITSTAND_ARCHIVE_DIR", "(none)", "Move segments past retention here instead of removing them."),
    Setting("LEITSTAND_SSL_CERTFILE", "(none)", "PEM certificate: leitstand serve speaks HTTPS."),
    Setting("LEITSTAND_SSL_KEYFILE", "(none)", "PEM private key of LEITSTAND_SSL_CERTFILE."),
    Setting("LEITSTAND_HOST", "0.0.0.0", "Address leitstand serve binds."),
    Setting("LEITSTAND_PORT", "8788", "Port leitstand serve binds."),
    Setting("LEITSTAND_WORKERS", "1", "Worker processes of leitstand serve."),
    # Broker mode: /ingest publishes to NATS JetStream, leitstand archive writes the files.
    Setting("LEITSTAND_NATS_URL", "(none)", "nats:// URL(s), comma-separated, of NATS JetStream: broker mode."),
    Setting("LEITSTAND_NATS_STREAM", "LEITSTAND", "JetStream stream of broker mode, created if missing."),
    Setting("LEITSTAND_NATS_REPLICAS", "1", "Replicas of that stream (1, or 3 for a three-node cluster)."),
    Setting("LEITSTAND_NATS_TIMEOUT", "5", "Seconds a request may take in the broker, retries included; then 503."),
    Setting("LEITSTAND_ARCHIVE_LEASE", "10", "Seconds of leitstand archive's lease; a standby takes over after it."),
    Setting("LEITSTAND_METRICS_PUBLIC", "0", "1: GET /metrics answers without the token."),
    Setting("LEITSTAND_METRICS_MAX_DOMAINS", "500", "Domains with their own metrics label; the rest count as _other."),
    Setting("LEITSTAND_METRICS_DIR", "(temp dir)", "Where worker processes share their metrics; emptied at start."),
    Setting(
        "LEITSTAND_OTLP_DOMAIN_ATTRIBUTE",
        "service.name",
        "Resource attribute whose value (made a valid domain) names the domain of OTLP logs.",
    ),
    Setting(
        "LEITSTAND_RECEIVED_FIELD",
        "(none)",
        "Field that gets the server's receive time (RFC 3339, UTC, milliseconds) in every stored event, "
        "e.g. received_at; an event that has it already is 400 reserved field.",
    ),
)
DEFAULTS = {s.env: s.default for s in SETTINGS}


def raw_value(environ: Mapping[str, str], name: str) -> str:
    """The raw text of setting ``name`` as the server reads it: the environment's, else the default."""
    return environ.get(name, "").strip() or DEFAULTS[name]

_SIZE = re.compile(r"(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_DURATION = re.compile(r"(\d+)\s*(s|m|h|d|)", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


_NO_TOKEN = (
    "LEITSTAND_TOKEN is not set: export a token, e.g. "
    "export LEITSTAND_TOKEN=\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\", "
    "or point LEITSTAND_TOKEN_FILE at a file of tokens"
)


@dataclass(frozen=True)
class Config:
    tokens: str = field(repr=False)
    token_file: Path | None = None
    data_dir: Path = Path("data")
    max_body: int = 1 << 20
    limits: events.Limits = field(default_factory=events.Limits)
    body_timeout: int = 30
    fsync: bool = True
    syncfs: bool = True
    max_open_files: int = 16384
    log_format: str = "text"
    ready_min_free: int = 64 << 20
    domains_allow: tuple[str, ...] = ()
    domains_deny: tuple[str, ...] = ()
    auth_fail_limit: tuple[int, float] | None = (10, 60.0)
    rate_limit: tuple[int, float] | None = None
    trusted_proxies: tuple[Network, ...] = ()
    file_mode: int = 0o600
    idempotency_window: int = 86400
    idempotency_max_keys: int = 100_000
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    host: str = "0.0.0.0"
    port: int = 8788
    workers: int = 1
    nats_urls: tuple[str, ...] = ()
    nats_stream: str = "LEITSTAND"
    nats_replicas: int = 1
    nats_timeout: int = 5
    archive_lease: int = 10
    metrics_public: bool = False
    metrics_max_domains: int = 500
    metrics_dir: Path | None = None
    otlp_domain_attribute: str = "service.name"
    rotation: Policy = field(default_factory=Policy)
    received_field: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, need_token: bool = True) -> Config:
        """``need_token``: False for leitstand archive, which answers no client."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return raw_value(env, name)

        def optional(name: str) -> str:
            value = get(name)
            return "" if value == DEFAULTS[name] and value.startswith("(") else value

        def path(name: str) -> Path | None:
            return Path(optional(name)) if optional(name) else None

        tokens = env.get("LEITSTAND_TOKEN", "")
        if need_token and not auth.from_list(tokens) and not optional("LEITSTAND_TOKEN_FILE"):
            raise ConfigError(_NO_TOKEN)
        archive_dir, data_dir = path("LEITSTAND_ARCHIVE_DIR"), Path(get("LEITSTAND_DATA_DIR"))
        if archive_dir is not None and archive_dir.resolve().is_relative_to(data_dir.resolve()):
            raise ConfigError("LEITSTAND_ARCHIVE_DIR is inside LEITSTAND_DATA_DIR: choose a directory outside it")
        certfile, keyfile = path("LEITSTAND_SSL_CERTFILE"), path("LEITSTAND_SSL_KEYFILE")
        if (certfile is None) != (keyfile is None):
            raise ConfigError(
                "LEITSTAND_SSL_CERTFILE and LEITSTAND_SSL_KEYFILE go together: set both for HTTPS, or neither"
            )
        return cls(
            tokens=tokens,
            token_file=path("LEITSTAND_TOKEN_FILE"),
            data_dir=data_dir,
            max_body=_size("LEITSTAND_MAX_BODY", get("LEITSTAND_MAX_BODY")),
            limits=events.Limits(
                events=_int("LEITSTAND_MAX_EVENTS", get("LEITSTAND_MAX_EVENTS"), 1),
                event_size=_size("LEITSTAND_MAX_EVENT_SIZE", get("LEITSTAND_MAX_EVENT_SIZE")),
                depth=_int("LEITSTAND_MAX_DEPTH", get("LEITSTAND_MAX_DEPTH"), 1, events.MAX_DEPTH),
            ),
            body_timeout=_int("LEITSTAND_BODY_TIMEOUT", get("LEITSTAND_BODY_TIMEOUT"), 1),
            fsync=_choice("LEITSTAND_FSYNC", get("LEITSTAND_FSYNC"), ("always", "never")) == "always",
            syncfs=_choice("LEITSTAND_SYNCFS", get("LEITSTAND_SYNCFS"), ("auto", "off")) == "auto",
            max_open_files=_int("LEITSTAND_MAX_OPEN_FILES", get("LEITSTAND_MAX_OPEN_FILES"), 1),
            log_format=_choice("LEITSTAND_LOG_FORMAT", get("LEITSTAND_LOG_FORMAT"), ("text", "json")),
            ready_min_free=_size("LEITSTAND_READY_MIN_FREE", get("LEITSTAND_READY_MIN_FREE"), minimum=0),
            domains_allow=_globs(optional("LEITSTAND_DOMAINS_ALLOW")),
            domains_deny=_globs(optional("LEITSTAND_DOMAINS_DENY")),
            auth_fail_limit=_rate("LEITSTAND_AUTH_FAIL_LIMIT", get("LEITSTAND_AUTH_FAIL_LIMIT")),
            rate_limit=_rate("LEITSTAND_RATE_LIMIT", get("LEITSTAND_RATE_LIMIT")),
            trusted_proxies=_networks("LEITSTAND_TRUSTED_PROXIES", optional("LEITSTAND_TRUSTED_PROXIES")),
            file_mode=_mode("LEITSTAND_FILE_MODE", get("LEITSTAND_FILE_MODE")),
            idempotency_window=_duration("LEITSTAND_IDEMPOTENCY_WINDOW", get("LEITSTAND_IDEMPOTENCY_WINDOW")),
            idempotency_max_keys=_int("LEITSTAND_IDEMPOTENCY_MAX_KEYS", get("LEITSTAND_IDEMPOTENCY_MAX_KEYS"), 1),
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            host=get("LEITSTAND_HOST"),
            port=_int("LEITSTAND_PORT", get("LEITSTAND_PORT"), 0, 65535),
            workers=_int("LEITSTAND_WORKERS", get("LEITSTAND_WORKERS"), 1),
            nats_urls=_nats_urls(optional("LEITSTAND_NATS_URL")),
            nats_stream=_stream(get("LEITSTAND_NATS_STREAM")),
            nats_replicas=_int("LEITSTAND_NATS_REPLICAS", get("LEITSTAND_NATS_REPLICAS"), 1, 5),
            nats_timeout=_int("LEITSTAND_NATS_TIMEOUT", get("LEITSTAND_NATS_TIMEOUT"), 1, 60),
            archive_lease=_int("LEITSTAND_ARCHIVE_LEASE", get("LEITSTAND_ARCHIVE_LEASE"), 1, 600),
            metrics_public=_choice("LEITSTAND_METRICS_PUBLIC", get("LEITSTAND_METRICS_PUBLIC"), ("0", "1")) == "1",
            metrics_max_domains=_int("LEITSTAND_METRICS_MAX_DOMAINS", get("LEITSTAND_METRICS_MAX_DOMAINS"), 1),
            metrics_dir=path("LEITSTAND_METRICS_DIR"),
            otlp_domain_attribute=get("LEITSTAND_OTLP_DOMAIN_ATTRIBUTE"),
            rotation=Policy(
                rotate_bytes=_off(_size, "LEITSTAND_ROTATE_BYTES", get("LEITSTAND_ROTATE_BYTES")),
                rotate_interval=_off(_duration, "LEITSTAND_ROTATE_INTERVAL", get("LEITSTAND_ROTATE_INTERVAL")),
                compress=CODECS[_choice("LEITSTAND_COMPRESS", get("LEITSTAND_COMPRESS"), tuple(CODECS))],
                retention=_retention(get("LEITSTAND_RETENTION")),
                max_bytes=_off(_size, "LEITSTAND_RETENTION_MAX_BYTES", get("LEITSTAND_RETENTION_MAX_BYTES")),
                archive_dir=archive_dir,
            ),
            received_field=_field("LEITSTAND_RECEIVED_FIELD", optional("LEITSTAND_RECEIVED_FIELD")),
        )

    def keyring(self) -> auth.Keyring:
        """The tokens in force; raises :class:`ConfigError` if the token file is not usable."""
        try:
            return auth.Keyring(auth.from_list(self.tokens), self.token_file)
        except auth.TokenFileError as exc:
            raise ConfigError(
                f"LEITSTAND_TOKEN_FILE is not usable: {exc}; "
                "write one token per line, optionally followed by domains=<glob>,... and access=read|write|read,write"
            ) from None

    def describe(self) -> dict[str, object]:
        """The effective settings for the startup line: no token and no path."""
        return {
            "token_file": self.token_file is not None,
            "max_body": self.max_body,
            "max_events": self.limits.events,
            "max_event_size": self.limits.event_size,
            "max_depth": self.limits.depth,
            "body_timeout": self.body_timeout,
            "fsync": "always" if self.fsync else "never",
            "syncfs": "auto" if self.syncfs else "off",
            "max_open_files": self.max_open_files,
            "log_format": self.log_format,
            "ready_min_free": self.ready_min_free,
            "domains_allow": ",".join(self.domains_allow) or "all",
            "domains_deny": ",".join(self.domains_deny) or "-",
            "auth_fail_limit": _rate_text(self.auth_fail_limit),
            "rate_limit": _rate_text(self.rate_limit),
            "trusted_proxies": ",".join(map(str, self.trusted_proxies)) or "-",
            "file_mode": f"{self.file_mode:04o}",
            "idempotency_window": self.idempotency_window,
            "idempotency_max_keys": self.idempotency_max_keys,
            "tls": self.ssl_certfile is not None,
            "broker": f"nats stream={self.nats_stream} replicas={self.nats_replicas}" if self.nats_urls else "-",
            "metrics_public": self.metrics_public,
            "metrics_max_domains": self.metrics_max_domains,
            "otlp_domain_attribute": self.otlp_domain_attribute,
            "rotate_bytes": self.rotation.rotate_bytes or "off",
            "rotate_interval": self.rotation.rotate_interval or "off",
            "compress": self.rotation.compress or "off",
            "retention": "on" if self.rotation.retention else "off",
            "retention_max_bytes": self.rotation.max_bytes or "off",
            "archive_dir": self.rotation.archive_dir is not None,
            "received_field": self.received_field or "-",
        }


def load(environ: Mapping[str, str] | None = None, *, need_token: bool = True) -> Config:
    """The settings, once the data directory has proved that it takes durable writes."""
    config = Config.from_env(environ, need_token=need_token)
    check_files(config)
    try:
        journal.probe(config.data_dir)
    except OSError as exc:
        raise ConfigError(
            f"LEITSTAND_DATA_DIR is not usable: {journal.reason(exc)}; "
            "point LEITSTAND_DATA_DIR at a writable directory with free space"
        ) from None
    return config


def check_files(config: Config) -> None:
    """Raise :class:`ConfigError` if the token file or a TLS file named in ``config`` is not usable."""
    config.keyring()
    for name, tls_file in (
        ("LEITSTAND_SSL_CERTFILE", config.ssl_certfile),
        ("LEITSTAND_SSL_KEYFILE", config.ssl_keyfile),
    ):
        if tls_file is not None and not os.access(tls_file, os.R_OK):
            raise ConfigError(f"{name} cannot be read: point it at a readable PEM file")


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


def _duration(name: str, raw: str) -> int:
    match = _DURATION.fullmatch(raw)
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(f"{name}={raw!r} is not a duration: use seconds or a unit, e.g. 3600s, 90m, 24h")
    return int(match.group(1)) * _SECONDS[match.group(2).lower()]


def _off(parse: Callable[[str, str], int], name: str, raw: str) -> int | None:
    """``parse``'s value of ``raw``, or None for ``off``."""
    return None if raw.lower() == "off" else parse(name, raw)


_GLOB = re.compile(r"[a-z0-9.*?\[\]!-]+")


def _retention(raw: str) -> Retention:
    """``30d,audit.*=365d,debug-*=1d``: a default (or none), then per-domain globs, the first match winning."""
    default: float | None = None
    rules: list[tuple[str, float | None]] = []
    problem = (f"LEITSTAND_RETENTION={raw!r} is not valid: use a duration or off, then pattern=duration "
               "for some domains, comma-separated, e.g. 30d,audit.*=365d,debug-*=1d")
    for number, part in enumerate(p.strip() for p in raw.split(",")):
        pattern, equals, value = part.rpartition("=")
        if equals and not _GLOB.fullmatch(pattern.lower()) or not equals and number > 0:
            raise ConfigError(problem)
        try:
            seconds = _off(_duration, "LEITSTAND_RETENTION", value)
        except ConfigError:
            raise ConfigError(problem) from None
        if equals:
            rules.append((pattern.lower(), seconds))
        else:
            default = seconds
    return Retention(default, tuple(rules))


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} is not valid: use one of {', '.join(choices)}")
    return value


def _globs(raw: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in raw.split(",") if part.strip())


def _rate(name: str, raw: str) -> tuple[int, float] | None:
    try:
        return ratelimit.parse_rate(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a rate: use a count per second, minute or hour, e.g. 10/min, or 0"
        ) from None


def _rate_text(rate: tuple[int, float] | None) -> str:
    return "off" if rate is None else f"{rate[0]}/{rate[1]:g}s"


def _networks(name: str, raw: str) -> tuple[Network, ...]:
    try:
        return parse_networks(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a list of addresses: use e.g. 127.0.0.1,10.0.0.0/8") from None


def _nats_urls(raw: str) -> tuple[str, ...]:
    urls = tuple(part.strip() for part in raw.split(",") if part.strip())
    for url in urls:
        if not re.fullmatch(r"(nats|tls)://[^\s/]+", url):
            raise ConfigError(
                "LEITSTAND_NATS_URL has an entry that is not a NATS URL: use nats://host:4222, comma-separated"
            )
    return urls


def _stream(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", raw):
        raise ConfigError(f"LEITSTAND_NATS_STREAM={raw!r} is not a stream name: use letters, digits, '_' and '-'")
    return raw


def _field(name: str, raw: str) -> str | None:
    if not raw:
        return None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", raw) or raw == "domain":
        raise ConfigError(f"{name}={raw!r} is not a field name: use letters, digits and '_', e.g. received_at")
    return raw


def _mode(name: str, raw: str) -> int:
    try:
        mode = int(raw, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
        raise ConfigError(f"{name}={raw!r} is not a file mode: use octal digits with owner read and write, e.g. 0600")
    return mode
