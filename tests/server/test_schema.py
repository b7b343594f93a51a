"""schemathesis against the real server's /openapi.json: no 5xx, and every answer is one the schema documents.

The cases are drawn with hypothesis from each operation directly: schemathesis' pytest
plugin (``from_fixture``) does not work with pytest 9.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from conftest import TOKEN, Server

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


def fuzz(operation: Any, mode: GenerationMode, seen: set[tuple[str, int]]) -> None:
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case: Any) -> None:
        response = case.call_and_validate(headers={"X-Auth": TOKEN}, checks=CHECKS)
        seen.add((operation.label, response.status_code))

    call()


def test_every_answer_is_documented(server: Server) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    assert {"POST /ingest/{domain}", "GET /health", "GET /ready", "GET /version", "GET /domains",
            "GET /events/{domain}"} <= operations.keys()
    seen: set[tuple[str, int]] = set()
    # A stream answers for as long as the service runs: test_reading.py has its own tests.
    streamed = "GET /events/{domain}/stream"
    assert streamed in operations
    for label, operation in operations.items():
        if label != streamed:
            fuzz(operation, GenerationMode.POSITIVE, seen)
    # Data the schema excludes, only where there is data to get wrong.
    fuzz(operations["POST /ingest/{domain}"], GenerationMode.NEGATIVE, seen)
    assert {("POST /ingest/{domain}", 200), ("POST /ingest/{domain}", 400)} <= seen
