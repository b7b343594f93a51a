import os
import re
from http import HTTPStatus
from pathlib import Path

import pytest

from leitstand import config
from leitstand.config import Config, ConfigError


def test_token_is_required() -> None:
    for env in ({}, {"LEITSTAND_TOKEN": ""}, {"LEITSTAND_TOKEN": "   "}, {"LEITSTAND_TOKEN": " , "}):
        with pytest.raises(ConfigError, match="LEITSTAND_TOKEN is not set: export") as info:
            Config.from_env(env)
        assert "LEITSTAND_TOKEN_FILE" in str(info.value) and "\n" not in str(info.value)


def test_a_token_file_alone_is_enough(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("from-file domains=a-*\n")
    cfg = config.load({"LEITSTAND_TOKEN_FILE": str(tokens), "LEITSTAND_DATA_DIR": str(tmp_path / "d")})
    keyring = cfg.keyring()
    grant = keyring.find(b"from-file", None)
    assert grant is not None and grant.may_write("a-1") and not grant.may_write("b-1")


@pytest.mark.parametrize(
    ("content", "reason"), [(None, "cannot read it"), ("", "it holds no token"), ("t bogus=1\n", "line 1: unknown")]
)
def test_an_unusable_token_file_stops_the_start(tmp_path: Path, content: str | None, reason: str) -> None:
    tokens = tmp_path / "tokens"
    if content is not None:
        tokens.write_text(content)
    with pytest.raises(ConfigError, match=f"LEITSTAND_TOKEN_FILE is not usable: {reason}") as info:
        config.load({"LEITSTAND_TOKEN": "t", "LEITSTAND_TOKEN_FILE": str(tokens), "LEITSTAND_DATA_DIR": str(tmp_path)})
    assert str(tmp_path) not in str(info.value)


def test_defaults() -> None:
    cfg = Config.from_env({"LEITSTAND_TOKEN": "t"})
    assert cfg.data_dir == Path("data")
    assert cfg.max_body == 1 << 20
    assert cfg.fsync is True
    assert (cfg.host, cfg.port, cfg.workers) == ("0.0.0.0", 8788, 1)
    assert cfg.domains_allow == cfg.domains_deny == cfg.trusted_proxies == ()
    assert cfg.auth_fail_limit == (10, 60.0) and cfg.rate_limit is None and cfg.file_mode == 0o600
    assert Config.from_env({"LEITSTAND_TOKEN": "t", "LEITSTAND_AUTH_FAIL_LIMIT": "0"}).auth_fail_limit is None
    assert (cfg.limits.events, cfg.limits.event_size, cfg.limits.depth) == (10000, 256 << 10, 254)
    assert cfg.body_timeout == 30


def test_values_are_parsed() -> None:
    cfg = Config.from_env(
        {
            "LEITSTAND_TOKEN": "t",
            "LEITSTAND_MAX_BODY": "512KiB",
            "LEITSTAND_FSYNC": "never",
            "LEITSTAND_LOG_FORMAT": "JSON",
            "LEITSTAND_WORKERS": "2",
            "LEITSTAND_DOMAINS_ALLOW": "Sensor-*, *.example.com",
            "LEITSTAND_DOMAINS_DENY": "sensor-test",
            "LEITSTAND_AUTH_FAIL_LIMIT": "5/h",
            "LEITSTAND_RATE_LIMIT": "200/s",
            "LEITSTAND_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8",
            "LEITSTAND_FILE_MODE": "0640",
            "LEITSTAND_MAX_EVENTS": "5",
            "LEITSTAND_MAX_EVENT_SIZE": "1KiB",
            "LEITSTAND_MAX_DEPTH": "16",
            "LEITSTAND_BODY_TIMEOUT": "2",
        }
    )
    assert (cfg.max_body, cfg.fsync, cfg.log_format, cfg.workers) == (512 << 10, False, "json", 2)
    assert cfg.domains_allow == ("sensor-*", "*.example.com") and cfg.domains_deny == ("sensor-test",)
    assert cfg.auth_fail_limit == (5, 3600.0) and cfg.rate_limit == (200, 1.0)
    assert [str(n) for n in cfg.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert cfg.file_mode == 0o640
    assert (cfg.limits.events, cfg.limits.event_size, cfg.limits.depth, cfg.body_timeout) == (5, 1024, 16, 2)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEITSTAND_MAX_BODY", "lots"),
        ("LEITSTAND_MAX_BODY", "0"),
        ("LEITSTAND_FSYNC", "sometimes"),
        ("LEITSTAND_PORT", "70000"),
        ("LEITSTAND_WORKERS", "0"),
        ("LEITSTAND_LOG_FORMAT", "xml"),
        ("LEITSTAND_AUTH_FAIL_LIMIT", "ten"),
        ("LEITSTAND_RATE_LIMIT", "5/fortnight"),
        ("LEITSTAND_TRUSTED_PROXIES", "proxy.example.com"),
        ("LEITSTAND_FILE_MODE", "0400"),
        ("LEITSTAND_FILE_MODE", "rw"),
        ("LEITSTAND_SSL_CERTFILE", "cert.pem"),
        ("LEITSTAND_MAX_EVENTS", "0"),
        ("LEITSTAND_MAX_EVENT_SIZE", "big"),
        ("LEITSTAND_MAX_DEPTH", "400"),
        ("LEITSTAND_MAX_DEPTH", "0"),
        ("LEITSTAND_BODY_TIMEOUT", "0"),
        ("LEITSTAND_RECEIVED_FIELD", "received at"),
        ("LEITSTAND_RECEIVED_FIELD", "domain"),
        ("LEITSTAND_RECEIVED_FIELD", "a.b"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"LEITSTAND_TOKEN": "t", name: value})
    assert str(info.value).startswith(name) and "\n" not in str(info.value)


def test_token_never_in_repr_or_description() -> None:
    cfg = Config.from_env({"LEITSTAND_TOKEN": "s3cr3t-value,other-value"})
    assert "s3cr3t-value" not in repr(cfg) and "other-value" not in repr(cfg)
    assert "s3cr3t-value" not in str(cfg.describe())


def test_load_probes_and_creates_the_data_dir(tmp_path: Path) -> None:
    target = tmp_path / "new" / "data"
    cfg = config.load({"LEITSTAND_TOKEN": "t", "LEITSTAND_DATA_DIR": str(target)})
    assert cfg.data_dir == target and target.is_dir()
    assert os.listdir(target) == []  # the probe file is gone


def test_load_names_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="LEITSTAND_DATA_DIR is not usable: not a directory"):
        config.load({"LEITSTAND_TOKEN": "t", "LEITSTAND_DATA_DIR": str(tmp_path / "file")})


def test_every_setting_is_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for setting in config.SETTINGS:
        assert f"`{setting.env}`" in readme, setting.env


def test_every_answer_is_in_the_troubleshooting_table_and_the_readme() -> None:
    """Each status and phrase the service can answer has a row that says what to do."""
    root = Path(__file__).parent.parent
    code = "".join((root / "leitstand" / "server" / name).read_text() for name in ("app.py", "routes.py", "reading.py"))
    answers = set(re.findall(r'(?:_text|HTTPException)\((\d{3}), "([^"]+)"', code))
    # What the reader refuses is a 400 of the read API.
    reading = (root / "leitstand" / "storage" / "reader.py").read_text()
    answers |= {("400", phrase) for phrase in re.findall(r'raise ReadError\("([^"]+)"\)', reading)}
    # The router's own refusals, in leitstand's lower case.
    answers |= {(str(status), HTTPStatus(status).phrase.lower()) for status in (404, 405)}
    intake = "".join(path.read_text() for path in sorted((root / "leitstand" / "intake").glob("*.py")))
    answers |= {("413" if kind == "TooLarge" else "400", phrase)
                for kind, phrase in re.findall(r'raise (PayloadError|TooLarge)\("([^"]+)"\)', intake)}
    assert len(answers) >= 25
    manual = (root / "docs" / "betriebshandbuch.md").read_text().split("## Fehlerbehebung", 1)[1]
    readme = (root / "README.md").read_text()
    for status, phrase in sorted(answers):
        if phrase.startswith("not ready"):
            assert f"`{status} not ready: ...`" in manual
            continue
        assert f"`{status} {phrase}`" in manual, (status, phrase)
        assert re.search(rf"\| {status} \| `{re.escape(phrase)}` \|", readme), (status, phrase)


def test_rotation_settings() -> None:
    cfg = Config.from_env({"LEITSTAND_TOKEN": "t", "LEITSTAND_ROTATE_BYTES": "256MiB", "LEITSTAND_ROTATE_INTERVAL": "1d",
                           "LEITSTAND_COMPRESS": "gzip", "LEITSTAND_RETENTION": "30d,audit.*=365d,debug-*=90s,keep.*=off",
                           "LEITSTAND_RETENTION_MAX_BYTES": "50GiB", "LEITSTAND_ARCHIVE_DIR": "/srv/archive"})
    policy = cfg.rotation
    assert (policy.rotate_bytes, policy.rotate_interval, policy.compress) == (256 << 20, 86400, "gz")
    assert [policy.retention.of(d) for d in ("app", "audit.login", "debug-x", "keep.me")] == [
        30 * 86400, 365 * 86400, 90, None]
    assert (policy.max_bytes, policy.archive_dir) == (50 << 30, Path("/srv/archive"))
    default = Config.from_env({"LEITSTAND_TOKEN": "t"}).rotation
    assert (default.rotates, default.compress, bool(default.retention), default.max_bytes) == (False, "zst", False, None)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LEITSTAND_ROTATE_BYTES", "lots", "is not a size"),
        ("LEITSTAND_ROTATE_INTERVAL", "0s", "is not a duration"),
        ("LEITSTAND_COMPRESS", "lz4", "use one of zstd, gzip, off"),
        ("LEITSTAND_RETENTION", "audit.*=365d,30d", "then pattern=duration"),
        ("LEITSTAND_RETENTION", "Audit Logs=1d", "then pattern=duration"),
        ("LEITSTAND_ARCHIVE_DIR", "data/archive", "is inside LEITSTAND_DATA_DIR"),
    ],
)
def test_bad_rotation_settings_are_one_line(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_env({"LEITSTAND_TOKEN": "t", name: value})


def test_received_field() -> None:
    assert Config.from_env({"LEITSTAND_TOKEN": "t"}).received_field is None
    assert Config.from_env({"LEITSTAND_TOKEN": "t", "LEITSTAND_RECEIVED_FIELD": "received_at"}).received_field == (
        "received_at"
    )
