"""POST /v1/logs: OpenTelemetry logs from the real Python SDK and its OTLP/HTTP exporter, and in OTLP's JSON."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import TOKEN, Server, read_lines
from google.rpc import status_pb2
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from storage.test_faults import fill, small_tmpfs  # noqa: F401 (small_tmpfs is a fixture)

PROTOBUF = {"Content-Type": "application/x-protobuf", "X-Auth": TOKEN}
JSON = {"Content-Type": "application/json", "X-Auth": TOKEN}


class App:
    """A program that logs through the OpenTelemetry SDK's logs API, exporting to ``url`` as it goes."""

    def __init__(self, url: str, service: str, **exporter: Any) -> None:
        self.provider = LoggerProvider(resource=Resource.create({"service.name": service, "deployment.environment": "test"}))
        self.provider.add_log_record_processor(
            SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{url}/v1/logs", headers={"X-Auth": TOKEN}, **exporter))
        )
        self.logger = self.provider.get_logger("app.payments", "1.0")

    def log(self, severity: SeverityNumber, body: str, **attributes: Any) -> None:
        self.logger.emit(severity_number=severity, severity_text=severity.name, body=body, attributes=attributes)

    def close(self) -> None:
        self.provider.shutdown()


@pytest.fixture
def apps() -> Iterator[list[App]]:
    made: list[App] = []
    yield made
    for app in made:
        app.close()


def events(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in read_lines(path)] if path.exists() else []


def test_the_sdk_sends_logs_that_arrive_as_documented_events(server: Server, apps: list[App]) -> None:
    app = App(server.url, "Checkout Service", compression=Compression.Gzip)
    apps.append(app)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("order") as span:
        app.log(SeverityNumber.WARN, "payment declined", **{"order.id": 4711, "amount": 12.5, "retry": True})
        context = span.get_span_context()
    app.log(SeverityNumber.ERROR, "plain error")
    stored = events(server.data_dir / "checkout-service.jsonl")
    assert [e["body"] for e in stored] == ["payment declined", "plain error"]
    first = stored[0]
    assert first["severity"] == "WARN" and first["severity_number"] == 13
    assert first["attributes"]["order.id"] == 4711 and first["attributes"]["amount"] == 12.5
    assert first["attributes"]["retry"] is True
    assert first["resource"]["service.name"] == "Checkout Service"
    assert first["resource"]["deployment.environment"] == "test"
    assert first["scope"] == {"name": "app.payments", "version": "1.0"}
    assert first["attributes"] == {"order.id": 4711, "amount": 12.5, "retry": True}
    assert first["trace_id"] == trace.format_trace_id(context.trace_id)
    assert first["span_id"] == trace.format_span_id(context.span_id)
    assert first["flags"] == context.trace_flags and first["domain"] == "checkout-service"
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-12-03T15:04:23.123456789Z")
    assert "trace_id" not in stored[1]
    line = "method=POST path=/v1/logs status=200 domain=checkout-service events=1"
    assert line in server.logged(line)


def test_json_bodies_as_the_otlp_specification_writes_them(server: Server) -> None:
    body = {
        "resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "billing"}}]},
            "scopeLogs": [{
                "scope": {"name": "billing.db", "version": "1.2"},
                "logRecords": [{
                    "timeUnixNano": "1733238263123456789",
                    "observedTimeUnixNano": "1733238263223456789",
                    "severityNumber": 17,
                    "severityText": "ERROR",
                    "traceId": "5b8efff798038103d269b633813fc60c",
                    "spanId": "eee19b7ec3c1b174",
                    "body": {"stringValue": "deadlock"},
                    "attributes": [
                        {"key": "rows", "value": {"intValue": "9007199254740993"}},
                        {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"boolValue": False}]}}},
                        {"key": "raw", "value": {"bytesValue": "AAE="}},
                        {"key": "nested", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"doubleValue": 0.5}}]}}},
                    ],
                }],
            }],
        }],
    }
    answer = httpx.post(f"{server.url}/v1/logs", content=orjson.dumps(body), headers=JSON)
    assert (answer.status_code, answer.json()) == (200, {})
    assert answer.headers["content-type"] == "application/json"
    assert events(server.data_dir / "billing.jsonl") == [{
        "time": "2024-12-03T15:04:23.123456789Z",
        "observed_time": "2024-12-03T15:04:23.223456789Z",
        "severity": "ERROR",
        "severity_number": 17,
        "body": "deadlock",
        "attributes": {"rows": 9007199254740993, "tags": ["a", False], "raw": "AAE=", "nested": {"k": 0.5}},
        "resource": {"service.name": "billing"},
        "scope": {"name": "billing.db", "version": "1.2"},
        "trace_id": "5b8efff798038103d269b633813fc60c",
        "span_id": "eee19b7ec3c1b174",
        "domain": "billing",
    }]


def record(service: str | None, body: str, **attributes: Any) -> dict[str, Any]:
    resource = [{"key": "service.name", "value": {"stringValue": service}}] if service else []
    pairs = [{"key": k.split("__")[0], "value": v} for k, v in attributes.items()]
    return {"resource": {"attributes": resource},
            "scopeLogs": [{"logRecords": [{"body": {"stringValue": body}, "attributes": pairs}]}]}


def test_refused_records_are_a_partial_success_and_the_rest_is_stored(make_server: Any) -> None:
    server: Server = make_server(env={"LEITSTAND_DOMAINS_DENY": "secret"}).start()
    body = {"resourceLogs": [
        record("good", "kept"),
        record(None, "no service"),
        record("secret", "denied"),
        record("good", "twice", a={"stringValue": "1"}, a__again={"stringValue": "2"}),
        record("good", "nan", x={"doubleValue": "NaN"}),
    ]}
    answer = httpx.post(f"{server.url}/v1/logs", content=orjson.dumps(body), headers=JSON)
    assert answer.status_code == 200
    assert answer.json() == {"partialSuccess": {
        "rejectedLogRecords": "4",
        "errorMessage": "no service.name (1), domain not allowed (1), duplicate key (1), number out of range (1)",
    }}
    assert [e["body"] for e in events(server.data_dir / "good.jsonl")] == ["kept"]
    assert not (server.data_dir / "secret.jsonl").exists()
    # In protobuf, the same answer as an ExportLogsServiceResponse.
    request = ExportLogsServiceRequest()
    request.resource_logs.add().scope_logs.add().log_records.add().body.string_value = "no service"
    answer = httpx.post(f"{server.url}/v1/logs", content=request.SerializeToString(), headers=PROTOBUF)
    response = ExportLogsServiceResponse.FromString(answer.content)
    assert (answer.status_code, response.partial_success.rejected_log_records) == (200, 1)
    assert answer.headers["content-type"] == "application/x-protobuf"


def test_a_token_with_an_otlp_domain_writes_there(make_server: Any, tmp_path: Path, apps: list[App]) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} domains=app.* otlp-domain=app.orders\nreader access=read\n")
    server: Server = make_server(env={"LEITSTAND_TOKEN_FILE": str(tokens), "LEITSTAND_TOKEN": ""}).start()
    app = App(server.url, "whatever")
    apps.append(app)
    app.log(SeverityNumber.INFO, "to the fixed domain")
    assert [e["body"] for e in events(server.data_dir / "app.orders.jsonl")] == ["to the fixed domain"]
    # A token that may only read may not send logs either.
    request = ExportLogsServiceRequest()
    request.resource_logs.add().scope_logs.add().log_records.add().body.string_value = "not from a reader"
    refused = httpx.post(f"{server.url}/v1/logs", content=request.SerializeToString(),
                         headers={**PROTOBUF, "X-Auth": "reader"})
    assert (refused.status_code, status_pb2.Status.FromString(refused.content).message) == (403, "forbidden")


def test_refusals_are_status_messages_and_a_retry_is_stored_once(server: Server) -> None:
    bad = httpx.post(f"{server.url}/v1/logs", content=b"\xff\xff not protobuf", headers=PROTOBUF)
    status = status_pb2.Status.FromString(bad.content)
    assert (bad.status_code, status.code, status.message) == (400, 3, "invalid otlp")
    bad_json = httpx.post(f"{server.url}/v1/logs", content=b'{"resourceLogs": 5}', headers=JSON)
    assert (bad_json.status_code, bad_json.json()) == (400, {"code": 3, "message": "invalid otlp"})
    nobody = httpx.post(f"{server.url}/v1/logs", content=b"", headers={"Content-Type": "application/x-protobuf"})
    assert (nobody.status_code, status_pb2.Status.FromString(nobody.content).code) == (401, 16)
    text = httpx.post(f"{server.url}/v1/logs", content=b"{}", headers={**JSON, "Content-Type": "text/plain"})
    assert text.status_code == 415
    assert httpx.get(f"{server.url}/v1/logs", headers=JSON).status_code == 405

    assert [e["body"] for e in sent_twice(server)] == ["once"]


def sent_twice(server: Server) -> list[dict[str, Any]]:
    """One log record sent as an SDK retries it (the same body, a little later); what is stored."""
    request = ExportLogsServiceRequest()
    logs = request.resource_logs.add()
    logs.resource.attributes.add(key="service.name").value.string_value = "retried"
    logs.scope_logs.add().log_records.add(time_unix_nano=1).body.string_value = "once"
    for _ in range(2):
        answer = httpx.post(f"{server.url}/v1/logs", content=request.SerializeToString(), headers=PROTOBUF)
        response = ExportLogsServiceResponse.FromString(answer.content)
        assert (answer.status_code, response.partial_success.rejected_log_records) == (200, 0)
        time.sleep(0.01)
    return events(server.data_dir / "retried.jsonl")


def test_a_retry_is_stored_once_with_the_receive_time_too(make_server: Any) -> None:
    server: Server = make_server(env={"LEITSTAND_RECEIVED_FIELD": "received_at"}).start()
    stored = sent_twice(server)
    assert [e["body"] for e in stored] == ["once"] and stored[0]["received_at"].endswith("Z")


def test_a_full_disk_is_503_and_the_sdk_retries_until_it_is_stored(
    make_server: Any, small_tmpfs: Path, apps: list[App]  # noqa: F811
) -> None:
    server: Server = make_server(data_dir=small_tmpfs / "data").start()
    app = App(server.url, "full", timeout=20)
    apps.append(app)
    app.log(SeverityNumber.INFO, "before")
    fill(small_tmpfs / "filler", leave=1 << 10)
    logging_done = threading.Event()

    def log_big() -> None:
        app.log(SeverityNumber.INFO, "x" * 4000)  # SimpleLogRecordProcessor exports at once, retrying as the SDK does
        logging_done.set()

    threading.Thread(target=log_big, daemon=True).start()
    deadline = time.monotonic() + 15
    while server.output().count("path=/v1/logs status=503") < 2:
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.1)
    assert not logging_done.is_set()
    (small_tmpfs / "filler").unlink()
    assert logging_done.wait(15)
    assert [len(e["body"]) for e in events(server.data_dir / "full.jsonl")] == [6, 4000]
    assert "path=/v1/logs status=503 domain=full" in server.output()
