"""scripts/start as a new user runs it, on a fresh copy of the checkout."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx

from conftest import CLEAN_EXIT, free_port, without_venv_env


def test_start_honours_host_and_port_and_prints_what_a_second_terminal_needs(fresh_checkout: Path) -> None:
    port = free_port()
    env = without_venv_env() | {"LEITSTAND_HOST": "127.0.0.1", "LEITSTAND_PORT": str(port)}
    log = fresh_checkout / f"start-{port}.log"
    with open(log, "wb") as out:
        start = subprocess.Popen(["./scripts/start"], cwd=fresh_checkout, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # the first start in the copy installs
        while True:
            assert start.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        printed = log.read_text()
        assert f"Uvicorn running on http://127.0.0.1:{port}" in printed
        token = fresh_checkout / ".leitstand-dev-token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert token.read_text().strip() not in printed.split("dev token", 1)[0], "the token before its own line"

        # The second terminal: exactly the lines the script printed, then the CLI and curl.
        lines = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
        assert lines[0] == f"cd {fresh_checkout} && source .venv/bin/activate"
        assert lines[1] == f"export LEITSTAND_URL=http://127.0.0.1:{port} LEITSTAND_TOKEN_FILE={token}"
        second = "\n".join([
            "set -euo pipefail", *lines[:2], "cd /",  # the CLI is on the PATH wherever one is
            "command -v leitstand", "leitstand check-config --data-dir $OLDPWD/data",
            "echo '{\"n\":1}' | leitstand send first.hour", f"cd {fresh_checkout}", lines[2], "",
        ])
        done = subprocess.run(["bash", "-c", second], env=without_venv_env(), capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[0] == f"{fresh_checkout}/.venv/bin/leitstand"
        assert "LEITSTAND_TOKEN                 <redacted>  (file)" in done.stdout
        assert "check-config: 0 problems" in done.stdout and "send: 1 stored" in done.stdout
        assert done.stdout.endswith("ok\n")  # curl's answer
        assert (fresh_checkout / "data" / "first.hour.jsonl").read_text() == '{"n":1,"domain":"first.hour"}\n'
        os.killpg(start.pid, signal.SIGTERM)
        assert start.wait(30) in CLEAN_EXIT
    finally:
        if start.poll() is None:
            os.killpg(start.pid, signal.SIGKILL)
            start.wait()
