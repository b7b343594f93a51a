"""leitstand stats, tail and check-config on real data dirs."""

from __future__ import annotations

import os
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

    table = run_cli("stats", "--data-dir", str(data_dir)).stdout
    assert "db.primary" in table and "events" in table
    assert any("app" in line and " 3 " in line for line in table.splitlines())


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
