"""The shipped configs of the log shippers that cannot run here (Fluent Bit, Vector, rsyslog), checked on paper.

Each must send what leitstand takes (the bodies are tested in tests/server/test_senders.py),
keep its requests within leitstand's default limits (or say which limits to raise), and keep
what a 429 or 5xx refused instead of dropping it. syslog-ng's config runs for real in
test_syslog_ng.py.
"""

from __future__ import annotations

import re

import yaml
from conftest import ROOT

SENDERS = ROOT / "deploy" / "senders"
MAX_EVENTS, MAX_BODY = 10000, 1 << 20


def test_fluent_bit_sends_ndjson_with_the_token_and_never_gives_up() -> None:
    config = yaml.safe_load((SENDERS / "fluent-bit.yaml").read_text())
    (output,) = config["pipeline"]["outputs"]
    assert output["name"] == "http" and output["uri"].startswith("/ingest/")
    assert output["format"] in ("json", "json_lines")
    assert output["header"] == "X-Auth ${LEITSTAND_TOKEN}"
    assert output["compress"] in ("gzip", "zstd")
    assert output["retry_limit"] == "no_limits"  # the default, 1, drops a chunk after one more 503
    assert output["json_date_key"] not in ("date", "log", "message")
    # A chunk can be larger than the default limits: the file says which ones to raise.
    text = (SENDERS / "fluent-bit.yaml").read_text()
    assert "LEITSTAND_MAX_BODY=8MiB" in text and "LEITSTAND_MAX_EVENTS=100000" in text


def test_vector_sends_ndjson_batches_within_the_default_limits() -> None:
    config = yaml.safe_load((SENDERS / "vector.yaml").read_text())
    sink = config["sinks"]["leitstand"]
    assert sink["type"] == "http" and "/ingest/" in sink["uri"]
    assert sink["encoding"] == {"codec": "json"} and sink["framing"] == {"method": "newline_delimited"}
    assert sink["compression"] in ("gzip", "zstd")
    assert sink["auth"] == {"strategy": "bearer", "token": "${LEITSTAND_TOKEN}"}
    assert sink["batch"]["max_events"] <= MAX_EVENTS and sink["batch"]["max_bytes"] < MAX_BODY
    assert set(sink["inputs"]) <= set(config["sources"])


def test_rsyslog_batches_within_the_limits_and_sends_a_failed_batch_again() -> None:
    text = (SENDERS / "rsyslog.conf").read_text()
    actions = re.findall(r'action\(\s*type="omhttp"(.*?)\)\s*&\s*stop', text, re.DOTALL)
    rulesets = set(re.findall(r'ruleset\(name="([^"]+)"', text))
    assert len(actions) == 2 and 'call leitstand' in text
    for action in actions:
        options = dict(re.findall(r'([\w.]+)="([^"]*)"', action))
        assert options["batch"] == "on" and options["batch.format"] == "newline"
        assert int(options["batch.maxsize"]) <= MAX_EVENTS and int(options["batch.maxbytes"]) < MAX_BODY
        # 8.2302 drops a batch that got a 5xx unless it has a retry ruleset to go back to.
        assert options["retry"] == "on" and options["retry.ruleset"] in rulesets
        assert options["restpath"].startswith("ingest/") and "X-Auth: " in action
    assert re.search(r'template\(name="leitstand_as_is" type="string" string="%msg%"\)', text)
