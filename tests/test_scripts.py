"""scripts/start as a new user runs it, on a fresh copy of the checkout; scripts/apt-install as scripts/test runs it."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import CLEAN_EXIT, ROOT, free_port, without_venv_env


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


# What a package like nginx does as it installs (debhelper's postinst), with the real tools:
# enable its unit and its SysV links at boot, then try to start it.
_FAKE_APT_GET = """#!/bin/sh
[ "$1" = -o ] && shift 2
[ "$1" = update ] && exit 0
/usr/sbin/policy-rc.d; echo "policy-rc.d: $?" >> "$TRACE"
export DPKG_MAINTSCRIPT_PACKAGE=nginx DPKG_MAINTSCRIPT_NAME=postinst
deb-systemd-helper unmask nginx.service
# was-enabled is true for a new installation, false once an administrator disabled the unit.
if deb-systemd-helper --quiet was-enabled nginx.service; then
    deb-systemd-helper enable nginx.service
else
    deb-systemd-helper update-state nginx.service
fi
update-rc.d nginx defaults
"""

# The test's own world: /etc, /usr/sbin and /var/lib/systemd are overlays whose changes vanish with
# the mount namespace; there nginx is as if never installed, or enabled already.
_SANDBOX = """set -euo pipefail
mount -t tmpfs tmpfs "$SANDBOX"
for dir in /etc /usr/sbin /var/lib/systemd; do
    name=$(echo "$dir" | tr / _)
    mkdir -p "$SANDBOX/up$name" "$SANDBOX/work$name"
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$SANDBOX/up$name,workdir=$SANDBOX/work$name" "$dir"
done
rm -f /usr/sbin/policy-rc.d
if [ "$BEFORE" = enabled ]; then
    systemctl enable --quiet nginx.service
else  # as if the package had never been installed
    systemctl disable --quiet nginx.service
    rm -f /etc/rc[0-6S].d/[SK][0-9][0-9]nginx
    find /var/lib/systemd/deb-systemd-helper-enabled -name 'nginx.service*' -delete
fi
enabled() { find /etc/systemd/system /etc/rc[0-6S].d -type l \\( -path '*.wants/*' -o -name 'S*' \\) | sort; }
enabled > "$SANDBOX/before"
PATH="$FAKE:$PATH" "$ROOT/scripts/apt-install" nginx
echo "after install: $(systemctl is-enabled nginx.service)"
enabled | diff "$SANDBOX/before" - && echo "links as before"
[ -e /usr/sbin/policy-rc.d ] && echo "policy-rc.d left behind" || true
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts overlays over /etc in a mount namespace")
@pytest.mark.skipif(not (Path("/lib/systemd/system/nginx.service").exists() and shutil.which("deb-systemd-helper")),
                    reason="needs Debian's nginx (its unit and init script) and init-system-helpers")
@pytest.mark.parametrize("before", ["disabled", "enabled"])
def test_apt_install_leaves_no_service_started_or_newly_enabled(tmp_path: Path, before: str) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text(_FAKE_APT_GET)
    (fake / "apt-get").chmod(0o755)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    env = {**os.environ, "FAKE": str(fake), "SANDBOX": str(sandbox), "ROOT": str(ROOT), "BEFORE": before,
           "TRACE": str(tmp_path / "trace")}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", _SANDBOX], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # The package tried to start nginx and was told no (101); its boot links are as they were.
    assert (tmp_path / "trace").read_text() == "policy-rc.d: 101\n"
    assert f"after install: {before}\n" in done.stdout, done.stdout + done.stderr
    assert "links as before" in done.stdout and "left behind" not in done.stdout, done.stdout
    assert subprocess.run(["systemctl", "is-enabled", "nginx.service"], capture_output=True, text=True,
                          check=False).stdout.strip() in ("enabled", "disabled"), "the machine's own state is untouched"
