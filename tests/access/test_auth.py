import hmac
import logging
import os
from pathlib import Path

import pytest

from leitstand.access import auth
from leitstand.access.auth import Keyring, TokenFileError, from_list, read_token_file


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
    assert (Keyring(from_list("s3cr3t")).find(x_auth, authorization) is not None) is allowed


def test_several_tokens_each_one_works() -> None:
    keyring = Keyring(from_list(" old-token , new-token ,,"))
    assert len(keyring.grants) == 2
    assert keyring.find(b"old-token", None) is keyring.grants[0]
    assert keyring.find(b"new-token", None) is keyring.grants[1]
    assert keyring.find(b"old-token,new-token", None) is None


def test_every_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    keyring = Keyring(from_list("first,second,third"))
    assert keyring.find(b"first", None) is keyring.grants[0]
    # No early exit on a match, and digests of equal length, never the raw tokens.
    assert len(calls) == 3
    assert all(len(a) == len(b) == 32 and b"first" not in a for a, b in calls)


def test_token_file_with_scopes_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# producers\nall-domains\n\nsensors   domains=sensor-*,deploy.example.com  # scoped\n")
    grants = read_token_file(path)
    assert len(grants) == 2
    assert grants[0].may_write("anything.at.all")
    assert grants[1].may_write("sensor-7") and grants[1].may_write("deploy.example.com")
    assert not grants[1].may_write("deploy.example.org") and not grants[1].may_write("xsensor-7")


def test_token_file_access_defaults_to_write(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("writer\nreader access=read\nboth access=read,write domains=app-*\nalso access=write,read\n")
    writer, reader, both, also = read_token_file(path)
    assert writer.may_write("x") and not writer.may_read("x") and not writer.reads
    assert reader.may_read("x") and not reader.may_write("x") and reader.all_domains
    assert both.may_read("app-1") and both.may_write("app-1") and not both.may_read("db")
    assert also.may_read("x") and also.may_write("x")
    # LEITSTAND_TOKEN reads and writes everywhere.
    (env,) = from_list("from-env")
    assert env.may_read("x") and env.may_write("x") and env.all_domains


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("tok access=admin\n", "line 1: unknown access"),
        ("tok access=read,delete\n", "line 1: unknown access"),
        ("tok access=\n", "line 1: unknown option"),
        ("", "holds no token"),
        ("# only a comment\n\n", "holds no token"),
        ("tok read=x\n", "line 1: unknown option"),
        ("ok\ntok domains=\n", "line 2: unknown option"),
        ("tok domains\n", "line 1: unknown option"),
    ],
)
def test_token_file_errors_say_which_line_and_never_the_token(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(TokenFileError, match=reason) as info:
        read_token_file(path)
    assert "tok" not in str(info.value).replace("token", "")


def test_unreadable_token_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read it"):
        read_token_file(tmp_path / "missing")


def test_reload_swaps_tokens_and_keeps_them_when_the_file_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text("first\n")
    keyring = Keyring(from_list("from-env"), path)
    assert keyring.find(b"first", None) and keyring.find(b"from-env", None)
    assert not keyring.changed()

    path.write_text("second domains=a-*\n")
    os.utime(path, ns=(1, 1))
    assert keyring.changed() and keyring.reload()
    assert keyring.find(b"first", None) is None
    assert keyring.find(b"second", None) is not None and keyring.find(b"from-env", None) is not None
    assert not keyring.changed()

    with caplog.at_level(logging.ERROR, logger="leitstand.auth"):
        path.write_text("")
        assert keyring.changed() and not keyring.reload()
        assert keyring.find(b"second", None) is not None
        path.unlink()
        assert keyring.changed() and not keyring.reload()
        assert keyring.find(b"second", None) is not None
        assert not keyring.changed()  # one error per change, not one per poll
    assert [r.getMessage() for r in caplog.records] == [
        "token file not reloaded: it holds no token; the 2 tokens in force stay",
        "token file not reloaded: cannot read it (No such file or directory); the 2 tokens in force stay",
    ]


def test_the_client_sends_with_a_token_of_the_file_that_may_write(tmp_path: Path) -> None:
    """leitstand send finds its token in LEITSTAND_TOKEN_FILE; a line that may only read is no use to it."""
    from leitstand.client import token_from_env

    path = tmp_path / "tokens"
    path.write_text("dashboard access=read\nsensors domains=sensor-* access=read,write\nproducer\n")
    env = {"LEITSTAND_TOKEN_FILE": str(path)}
    assert token_from_env("sensor-1", env) == "sensors"
    assert token_from_env("billing", env) == "producer"
    assert token_from_env(None, env) == "sensors"
