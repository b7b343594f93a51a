"""GET /metrics on the real server: the token, exact figures after known requests, and
figures summed over worker processes, whichever worker answers the scrape."""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import CLEAN_EXIT, ROOT, TOKEN, Server, free_port
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from server.test_startup import assert_one_line_refusal, run
from storage.test_faults import batch, fill, small_tmpfs  # noqa: F401 (small_tmpfs is a fixture)

from leitstand import __version__

Sample = tuple[str, frozenset[tuple[str, str]]]


def scrape(server: Server, **headers: str) -> dict[Sample, float]:
    """Every sample of one scrape, over a fresh connection, keyed by name and labels."""
    response = httpx.get(server.url + "/metrics", headers=headers or {"X-Auth": TOKEN}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def send_mix(server: Server) -> Counter[tuple[int, str]]:
    """Requests with known answers; returns how many of each status and reason were sent."""
    sent: Counter[tuple[int, str]] = Counter()
    for body, domain, headers, expected in [
        ('{"n":1}', "alpha", {}, (200, "ok")),
        ('[{"n":1},{"n":2},{"n":3}]', "alpha", {}, (200, "ok")),
        ('{"n":"zwei"}', "beta.x", {}, (200, "ok")),
        ("{not json", "alpha", {}, (400, "invalid json")),
        ('{"n":1}', "Bad_Domain", {}, (400, "invalid domain")),
        ('{"n":1}', "alpha", {"X-Auth": "wrong"}, (401, "unauthorized")),
    ]:
        for _ in range(2):
            response = server.post(domain, body, headers)
            assert (response.status_code, response.text.strip()) == expected
            sent[expected] += 1
    return sent


def test_metrics_need_the_token(server: Server) -> None:
    url = server.url + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-Auth": "wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, headers={"X-Auth": TOKEN}).status_code == 405
    assert "/metrics" in httpx.get(server.url + "/openapi.json").json()["paths"]
    assert value(scrape(server, **{"X-Auth": TOKEN}), "leitstand_build_info", version=__version__) == 1
    samples = scrape(server, Authorization=f"Bearer {TOKEN}")
    assert value(samples, "leitstand_requests_total", route="/metrics", status="401", reason="unauthorized") == 3
    assert value(samples, "leitstand_requests_total", route="/metrics", status="405", reason="method not allowed") == 1


def test_wrong_tokens_on_metrics_count_against_the_address(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(env={"LEITSTAND_AUTH_FAIL_LIMIT": "2/min"}).start()
    for _ in range(2):
        assert httpx.get(server.url + "/metrics", headers={"X-Auth": "guess"}).status_code == 401
    refused = httpx.get(server.url + "/metrics", headers={"X-Auth": TOKEN})
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert server.post("alpha", "{}").status_code == 429


def test_a_scoped_token_may_not_read_the_metrics(make_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\nsensor-only domains=sensor-*\n")
    server: Server = make_server(env={"LEITSTAND_TOKEN": "", "LEITSTAND_TOKEN_FILE": str(tokens)}).start()
    assert server.post("sensor-1", "{}", {"X-Auth": "sensor-only"}).status_code == 200
    refused = httpx.get(server.url + "/metrics", headers={"X-Auth": "sensor-only"})
    assert (refused.status_code, refused.text) == (403, "forbidden\n")
    assert httpx.get(server.url + "/metrics", headers={"X-Auth": TOKEN}).status_code == 200


def test_public_metrics_need_no_token(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(env={"LEITSTAND_METRICS_PUBLIC": "1"}).start()
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert server.post("alpha", "{}", {"X-Auth": "wrong"}).status_code == 401


def test_figures_match_the_requests_sent(server: Server) -> None:
    sent = send_mix(server)
    assert httpx.get(server.url + "/nowhere").status_code == 404
    sent[(404, "not found")] += 1

    samples = scrape(server)
    requests = {
        (dict(labels)["status"], dict(labels)["reason"]): v
        for (name, labels), v in samples.items()
        if name == "leitstand_requests_total" and dict(labels)["route"] in ("/ingest", "other") and v
    }
    assert requests == {(str(status), reason): n for (status, reason), n in sent.items()}
    assert value(samples, "leitstand_request_duration_seconds_count", route="/ingest") == sum(sent.values()) - 1
    assert value(samples, "leitstand_request_duration_seconds_count", route="other") == 1
    for domain, events in (("alpha", 8), ("beta.x", 2)):
        assert value(samples, "leitstand_events_written_total", domain=domain) == events
        size = (server.data_dir / f"{domain}.jsonl").stat().st_size
        assert value(samples, "leitstand_bytes_written_total", domain=domain) == size
    # One append per stored request; each commit synced once.
    assert value(samples, "leitstand_commit_appends_sum") == sent[(200, "ok")]
    commits = value(samples, "leitstand_commit_appends_count")
    assert 1 <= commits <= sent[(200, "ok")]
    assert value(samples, "leitstand_fsync_duration_seconds_count") == commits
    assert value(samples, "leitstand_fsync_duration_seconds_bucket", le="+Inf") == commits
    assert value(samples, "leitstand_commit_bytes_sum") == sum(
        p.stat().st_size for p in server.data_dir.glob("*.jsonl")
    )
    assert value(samples, "leitstand_open_files") == 2
    assert value(samples, "leitstand_data_dir_free_bytes") > 0
    assert value(samples, "leitstand_torn_tails_repaired_total") == 0
    assert value(samples, "leitstand_storage_errors_total", kind="full") == 0
    assert ("leitstand_storage_errors_total", frozenset({("kind", "unavailable")})) in samples

    # The scrape itself was answered, and counted, before the next one.
    again = scrape(server)
    assert value(again, "leitstand_requests_total", route="/metrics", status="200", reason="ok") == 1
    assert value(again, "leitstand_request_duration_seconds_count", route="/metrics") == 1


def test_domains_past_the_limit_fold_into_other(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(env={"LEITSTAND_METRICS_MAX_DOMAINS": "2"}).start()
    for domain in ("one", "two", "three", "four", "one", "four"):
        assert server.post(domain, '{"n":1}').status_code == 200
    samples = scrape(server)
    events = {dict(k[1])["domain"]: v for k, v in samples.items() if k[0] == "leitstand_events_written_total"}
    assert events == {"one": 2, "two": 1, "_other": 3}
    folded = sum((server.data_dir / f"{d}.jsonl").stat().st_size for d in ("three", "four"))
    assert value(samples, "leitstand_bytes_written_total", domain="_other") == folded


def test_torn_tail_repaired_at_start_is_counted(make_server, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data_dir.mkdir()
    (data_dir / "torn.jsonl").write_bytes(b'{"n":1}\n{"n":')
    (data_dir / "whole.jsonl").write_bytes(b'{"n":1}\n')
    server: Server = make_server().start()
    assert value(scrape(server), "leitstand_torn_tails_repaired_total") == 1


def test_disk_full_is_counted_as_storage_error(make_server, small_tmpfs: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    server: Server = make_server(data_dir=small_tmpfs / "data").start()
    assert server.post("full", batch(1)).status_code == 200
    fill(small_tmpfs / "filler", leave=16 << 10)
    assert server.post("full", batch(600)).status_code == 507
    samples = scrape(server)
    assert value(samples, "leitstand_storage_errors_total", kind="full") == 1
    assert value(samples, "leitstand_storage_errors_total", kind="unavailable") == 0
    assert value(samples, "leitstand_storage_errors_total", kind="refused") == 0
    assert value(samples, "leitstand_requests_total", route="/ingest", status="507", reason="insufficient storage") == 1


def requests_per_process(metrics_dir: Path, route: str) -> dict[str, float]:
    """Requests to ``route`` each worker counted, read from its own file in the metrics dir."""
    counts: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        keys = [(json.loads(key), v) for key, v, _, _ in MmapedDict.read_all_values_from_file(str(path))]
        counts[path.stem] = sum(
            v for key, v in keys if key[1] == "leitstand_requests_total" and key[2]["route"] == route
        )
    return counts


@pytest.mark.parametrize(("command", "explicit_dir"), [("serve", True), ("uvicorn", True), ("uvicorn", False)])
def test_workers_add_up_whichever_answers_the_scrape(
    make_server, tmp_path: Path, command: str, explicit_dir: bool
) -> None:  # type: ignore[no-untyped-def]
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"LEITSTAND_METRICS_DIR": str(tmp_path / "metrics")} if explicit_dir else {"TMPDIR": str(temp)}
    server: Server = make_server(command=command, workers=2, env=env).start()
    # uvicorn's own workers, left alone, share a directory named after their supervisor.
    (metrics_dir,) = [tmp_path / "metrics"] if explicit_dir else list(temp.iterdir())
    sent: Counter[tuple[int, str]] = Counter()
    lock = threading.Lock()

    def client(n: int) -> None:
        # A fresh connection per request, so that the kernel spreads them over both workers.
        for i in range(25):
            ok = (n + i) % 5 != 0
            response = server.post(f"d{n % 3}", '{"n":1}' if ok else "{", {"Connection": "close"})
            with lock:
                sent[(response.status_code, response.text.strip())] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sent == {(200, "ok"): 240, (400, "invalid json"): 60}
    ingests = requests_per_process(metrics_dir, "/ingest")
    assert len(ingests) == 2 and all(ingests.values()) and sum(ingests.values()) == 300, ingests

    # Scrape until each worker has answered some scrapes; every answer must be exact.
    for scrapes in range(60):
        samples = scrape(server)
        assert value(samples, "leitstand_requests_total", route="/ingest", status="200", reason="ok") == 240
        assert value(samples, "leitstand_requests_total", route="/ingest", status="400", reason="invalid json") == 60
        assert value(samples, "leitstand_requests_total", route="/metrics", status="200", reason="ok") == scrapes
        for d in range(3):
            assert value(samples, "leitstand_events_written_total", domain=f"d{d}") == len(
                (server.data_dir / f"d{d}.jsonl").read_bytes().splitlines()
            )
        assert value(samples, "leitstand_commit_appends_sum") == 240
        assert value(samples, "leitstand_open_files") == 6  # three files in each worker
        answered = requests_per_process(metrics_dir, "/metrics")
        if scrapes >= 7 and all(answered.values()):
            break
    assert len(answered) == 2 and all(answered.values()), answered


@pytest.mark.parametrize("command", ["serve", "uvicorn"])
def test_restart_with_the_same_metrics_dir_starts_from_zero(make_server, tmp_path: Path, command: str) -> None:  # type: ignore[no-untyped-def]
    metrics_dir = tmp_path / "metrics"
    env = {"LEITSTAND_METRICS_DIR": str(metrics_dir)}
    first: Server = make_server(command=command, workers=2, env=env).start()
    for _ in range(5):
        assert first.post("alpha", "{}").status_code == 200
    assert value(scrape(first), "leitstand_events_written_total", domain="alpha") == 5
    assert first.stop() in CLEAN_EXIT
    assert list(metrics_dir.glob("counter_*.db"))
    (metrics_dir / "notes.txt").write_text("not ours")

    second: Server = make_server(command=command, workers=2, env=env).start()
    samples = scrape(second)
    assert value(samples, "leitstand_events_written_total", domain="alpha") == 0
    assert value(samples, "leitstand_requests_total", route="/ingest", status="200", reason="ok") == 0
    assert value(samples, "leitstand_requests_total", route="/metrics", status="200", reason="ok") == 0
    assert (metrics_dir / "notes.txt").read_text() == "not ours"


@pytest.mark.parametrize(("kind", "workers"), [("uvicorn", 1), ("serve", 1), ("serve", 2)])
def test_unusable_metrics_dir_refuses_to_start(tmp_path: Path, kind: str, workers: int) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    env = {
        "LEITSTAND_TOKEN": TOKEN,
        "LEITSTAND_DATA_DIR": str(tmp_path / "data"),
        "LEITSTAND_METRICS_DIR": str(not_a_dir),
    }
    result = run(kind, env, free_port(), workers)
    assert_one_line_refusal(result, "LEITSTAND_METRICS_DIR", "not a directory")
    assert not_a_dir.read_text() == "x"


def test_serve_removes_its_private_metrics_dir_and_those_left_behind(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    temp = tmp_path / "tmp"
    temp.mkdir()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    started = Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19]
    planted = {"gone": f"{boot} 1 1", "alive": f"{boot} {os.getpid()} {started}", "unowned": None}
    for name, owner in planted.items():
        (temp / f"leitstand-metrics-{name}").mkdir()
        (temp / f"leitstand-metrics-{name}" / "counter_1.db").write_bytes(b"")
        if owner is not None:
            (temp / f"leitstand-metrics-{name}" / ".owner").write_text(owner)
    kept = {temp / "leitstand-metrics-alive", temp / "leitstand-metrics-unowned"}

    server: Server = make_server(command="serve", workers=2, env={"TMPDIR": str(temp)}).start()
    for _ in range(3):
        assert server.post("alpha", "{}").status_code == 200
    assert value(scrape(server), "leitstand_events_written_total", domain="alpha") == 3
    (private,) = set(temp.iterdir()) - kept
    assert list(private.glob("counter_*.db"))
    assert server.stop() in CLEAN_EXIT
    assert set(temp.iterdir()) == kept


def test_alert_rules_use_metrics_that_exist(server: Server) -> None:
    """promtool is not on PyPI: check the structure, and that each expression names real series."""
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert server.post("alpha", "{}").status_code == 200
    exposed = {name for name, _ in scrape(server)}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in alerts} >= {
        "LeitstandNoEvents",
        "LeitstandServerErrors",
        "LeitstandDiskNearlyFull",
        "LeitstandSlowFsync",
    }
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        expr: str = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), expr
        names = set(re.findall(r"\bleitstand_[a-z_]+", expr))
        assert names <= exposed, (rule["alert"], names - exposed)
        assert names or expr.startswith("up{"), rule["alert"]


def test_the_hot_path_counts_exactly_as_prometheus_client_would(tmp_path: Path) -> None:
    """The ingest path adds to the value stores directly, without prometheus-client's checks per
    call: the scraped text must be what its public inc() and observe() give, bounds included."""
    from prometheus_client import CollectorRegistry
    from prometheus_client import Counter as PromCounter
    from prometheus_client import Histogram, generate_latest

    from leitstand.config import Config
    from leitstand.telemetry.metrics import _SECONDS, Metrics

    metrics = Metrics(Config(tokens=TOKEN, data_dir=tmp_path))
    reference = CollectorRegistry()
    requests = PromCounter("leitstand_requests", "", ["route", "status", "reason"], registry=reference)
    latency = Histogram("leitstand_request_duration_seconds", "", ["route"], buckets=_SECONDS, registry=reference)
    events = PromCounter("leitstand_events_written", "", ["domain"], registry=reference)
    events.labels("_other")  # made in advance, for the domains past the limit
    durations = [0.0, *_SECONDS, *(b * 1.5 for b in _SECONDS), 0.0004999, 1e9]
    for n, seconds in enumerate(durations):
        metrics.answered("/ingest", 200, "ok", seconds)
        requests.labels("/ingest", "200", "ok").inc()
        latency.labels("/ingest").observe(seconds)
        metrics.stored("a", n, 10 * n)
        events.labels("a").inc(n)

    def samples(text: bytes, *names: str) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
        return {(s.name, frozenset(s.labels.items()), s.value)
                for family in text_string_to_metric_families(text.decode()) for s in family.samples
                if s.name.startswith(names)}

    names = ("leitstand_requests", "leitstand_request_duration", "leitstand_events_written")
    assert samples(metrics.render(), *names) == samples(generate_latest(reference), *names)
