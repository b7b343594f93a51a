"""Prometheus for real: promtool checks the shipped alert rules, and a Prometheus started here
scrapes a running leitstand with the scrape config of the operations manual.

Debian's ``prometheus`` package brings both binaries; its system service is not used: the
test runs its own Prometheus in the foreground, with its config and TSDB under tmp.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ROOT, TOKEN, Server, free_port

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
MANUAL = ROOT / "docs" / "betriebshandbuch.md"


def test_promtool_accepts_the_alert_rules() -> None:
    checked = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"SUCCESS: \d+ rules found", checked.stdout)


def manual_config(token_file: Path, target: str) -> dict[str, Any]:
    """The prometheus.yml of the manual's section *Prometheus-Konfiguration*, pointed at this test's files."""
    section = MANUAL.read_text().split("### Prometheus-Konfiguration", 1)[1]
    config = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    assert job["authorization"]["credentials_file"].startswith("/etc/prometheus/")
    job["authorization"]["credentials_file"] = str(token_file)
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = "1s"
    return config


@pytest.fixture
def prometheus(tmp_path: Path, server: Server) -> Iterator[str]:
    token = tmp_path / "leitstand.token"
    token.write_text(TOKEN + "\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(manual_config(token, f"127.0.0.1:{server.port}")))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: httpx.get(f"{url}/-/ready", timeout=1).status_code == 200, proc, tmp_path)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def wait(condition: Any, proc: subprocess.Popen[bytes], tmp_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
        time.sleep(0.2)


def query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_leitstand_and_answers_for_its_metrics(prometheus: str, server: Server) -> None:
    for n in range(7):
        assert server.post("scraped", f'{{"n":{n}}}').status_code == 200

    def stored() -> bool:
        found = query(prometheus, 'leitstand_events_written_total{job="leitstand",domain="scraped"}')
        return len(found) == 1 and found[0]["value"][1] == "7"

    deadline = time.monotonic() + 30
    while not stored():
        assert time.monotonic() < deadline, query(prometheus, "up")
        time.sleep(0.2)
    assert query(prometheus, 'up{job="leitstand"}')[0]["value"][1] == "1"
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    loaded = {rule["name"]: rule["health"] for group in rules for rule in group["rules"]}
    assert {"LeitstandDown", "LeitstandServerErrors", "LeitstandSlowFsync"} <= loaded.keys()
    assert set(loaded.values()) <= {"ok", "unknown"}, loaded
