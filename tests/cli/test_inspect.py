"""leitstand stats, tail and check-config on real data dirs."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from conftest import ROOT, TOKEN, Server, run_cli


def test_stats_figures(data_dir: Path, server: Server) -> None:
    assert server.post("app", '[{"n":1},{"n":2},{"n":3}]').status_code == 200
    assert server.post("db.primary", '{"n":1}').status_code == 200
    result = run_cli("stats", "--json", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    rows = {row["domain"]: row for row in orjson.loads(result.stdout)}
    assert set(rows) == {"app", "db.primary"}
    for domain, events in (("app", 3), ("db.primary", 1)):
        path = data_dir / f"{domain}.jsonl"
        row = rows[domain]
        assert row["events"] == events == len(path.read_bytes().splitlines())
        assert row["bytes"] == path.stat().st_size
        assert row["last"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
        assert row["first"] is None or row["first"] <= row["last"]

    # In a pipe: tab-separated columns, whole timestamps, nothing cut.
    piped = run_cli("stats", "--data-dir", str(data_dir)).stdout.splitlines()
    assert piped[0].split("\t") == ["domain", "events", "bytes", "segments", "first", "last"]
    assert sorted(line.split("\t") for line in piped[1:]) == sorted(
        [row["domain"], str(row["events"]), str(row["bytes"]), str(row["segments"]), row["first"] or "-", row["last"]]
        for row in rows.values()
    )

    # On a terminal: a table.
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the command on the terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "leitstand", "stats", "--data-dir", str(data_dir)],
                   {**os.environ, "COLUMNS": "120"})
    screen = b""
    with contextlib.suppress(OSError):  # EIO once the child is gone
        while chunk := os.read(terminal, 65536):
            screen += chunk
    os.waitpid(pid, 0)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", screen.decode())
    assert "\t" not in shown and "┃ domain" in shown and rows["app"]["last"] in shown, shown


def test_every_command_says_what_it_does_and_shows_an_example() -> None:
    commands = ("serve", "verify", "backup", "restore", "stats", "tail", "check-config", "archive", "send")
    for command in commands:
        text = run_cli(command, "--help").stdout
        description = text.split("\n\n")[1]
        assert description[:1].isupper() and len(description) > 30, (command, description)
        example = text.split("\nexample:\n", 1)[1].strip()
        assert f"leitstand {command}" in example, (command, example)
    assert "LEITSTAND_NATS_URL" in run_cli("archive", "--help").stdout.split("\n\n")[1]
    assert "--json" in run_cli("stats", "--help").stdout.split("\n\n")[1]


def test_tail_last_lines(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = [orjson.dumps({"n": n, "pad": "x" * (n % 700), "domain": "app"}) + b"\n" for n in range(3000)]
    (data / "app.jsonl").write_bytes(b"".join(lines) + b'{"n":3000,"domain":"ap')
    env = {"LEITSTAND_DATA_DIR": str(data)}
    assert run_cli("tail", "app", env=env).stdout.encode() == b"".join(lines[-10:])
    assert run_cli("tail", "app", "-n", "2500", env=env).stdout.encode() == b"".join(lines[-2500:])
    assert run_cli("tail", "APP", "-n", "5000", env=env).stdout.encode() == b"".join(lines)
    assert run_cli("tail", "app", "-n", "0", env=env).stdout == ""

    for domain, message in (("no/such", "invalid domain"), ("other", "no events for other")):
        result = run_cli("tail", domain, env=env)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def read_until(proc: subprocess.Popen[bytes], expected: bytes, timeout: float = 15) -> bytes:
    assert proc.stdout is not None
    got = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while expected not in got and time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                got += chunk
    return got


def test_tail_follows_appends_and_stops_on_ctrl_c(data_dir: Path, server: Server) -> None:
    assert server.post("app", '[{"n":1},{"n":2},{"n":3}]').status_code == 200
    # SIGINT as a terminal sends it: a suite started in the background (`cmd &`) hands its children
    # SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(
        [sys.executable, "-m", "leitstand", "tail", "app", "-n", "1", "-f", "--data-dir", str(data_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert read_until(proc, b'{"n":3,') == b'{"n":3,"domain":"app"}\n'
        assert server.post("app", '[{"n":4},{"n":5}]').status_code == 200
        assert server.post("other", '{"n":6}').status_code == 200
        assert server.post("app", '{"n":7}').status_code == 200
        got = read_until(proc, b'{"n":7,')
        assert got == b'{"n":4,"domain":"app"}\n{"n":5,"domain":"app"}\n{"n":7,"domain":"app"}\n'
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        proc.kill()
        proc.wait()


def test_check_config_redacts_the_token(tmp_path: Path) -> None:
    secret = "s3cret-" + TOKEN
    env = {"LEITSTAND_TOKEN": secret, "LEITSTAND_DATA_DIR": str(tmp_path / "data"), "LEITSTAND_READY_MIN_FREE": "0"}
    result = run_cli("check-config", env=env)
    assert result.returncode == 0, result.stdout
    assert secret not in result.stdout + result.stderr
    assert re.search(r"^LEITSTAND_TOKEN +<redacted>  \(env\)$", result.stdout, re.M)
    assert re.search(r"^LEITSTAND_MAX_BODY +1MiB  \(default\)$", result.stdout, re.M)
    assert "check-config: 0 problems" in result.stdout
    assert not (tmp_path / "data").exists(), "check-config creates nothing"


def test_check_config_says_where_each_value_came_from(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("dev-token\n")
    env = {"LEITSTAND_TOKEN_FILE": str(tokens), "LEITSTAND_DATA_DIR": str(tmp_path / "from-env"),
           "LEITSTAND_MAX_BODY": "2MiB", "LEITSTAND_READY_MIN_FREE": "0"}
    result = run_cli("check-config", "--data-dir", str(tmp_path / "from-flag"), env=env)
    assert result.returncode == 0, result.stdout
    assert re.search(rf"^LEITSTAND_DATA_DIR +{tmp_path}/from-flag  \(flag --data-dir\)$", result.stdout, re.M)
    assert re.search(r"^LEITSTAND_MAX_BODY +2MiB  \(env\)$", result.stdout, re.M)
    assert re.search(r"^LEITSTAND_MAX_EVENTS +10000  \(default\)$", result.stdout, re.M)
    # The tokens of the file the service reads: no "LEITSTAND_TOKEN is not set".
    assert re.search(r"^LEITSTAND_TOKEN +<redacted>  \(file\)$", result.stdout, re.M)
    assert "dev-token" not in result.stdout
    both = run_cli("check-config", env={**env, "LEITSTAND_TOKEN": "t"})
    assert re.search(r"^LEITSTAND_TOKEN +<redacted>  \(env and file\)$", both.stdout, re.M)


def test_check_config_reports_problems(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "app.jsonl").write_bytes(b'{"domain":"app"}\n')
    (data / "app.jsonl").chmod(0o666)
    (data / "notes.txt").write_bytes(b"")
    env = {"LEITSTAND_DATA_DIR": str(data), "LEITSTAND_PORT": "http"}
    result = run_cli("check-config", env=env)
    assert result.returncode == 1
    assert re.search(r"^LEITSTAND_TOKEN +\(not set\)  \(default\)$", result.stdout, re.M)
    assert "PROBLEM  LEITSTAND_TOKEN is not set" in result.stdout
    assert "PROBLEM  LEITSTAND_PORT='http' is not a number" in result.stdout

    env = {"LEITSTAND_TOKEN": TOKEN, "LEITSTAND_DATA_DIR": str(data), "LEITSTAND_READY_MIN_FREE": "999999GiB"}
    result = run_cli("check-config", env=env)
    assert result.returncode == 1
    problems = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert problems == ["only", "app.jsonl", "stray"]
    assert "below LEITSTAND_READY_MIN_FREE" in result.stdout and "app.jsonl is writable by others" in result.stdout

    (tmp_path / "file").write_bytes(b"")
    env = {"LEITSTAND_TOKEN": TOKEN, "LEITSTAND_DATA_DIR": str(tmp_path / "file")}
    result = run_cli("check-config", env=env)
    assert result.returncode == 1
    assert "PROBLEM  LEITSTAND_DATA_DIR" in result.stdout and "not a directory" in result.stdout

    env = {"LEITSTAND_TOKEN_FILE": str(tmp_path / "no-tokens"), "LEITSTAND_DATA_DIR": str(data)}
    result = run_cli("check-config", env=env)
    assert result.returncode == 1
    assert "PROBLEM  LEITSTAND_TOKEN_FILE is not usable: cannot read it" in result.stdout
