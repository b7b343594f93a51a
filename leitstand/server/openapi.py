"""The API description served at ``/openapi.json`` and rendered at ``/docs``."""

from __future__ import annotations

from typing import Any

from leitstand import __version__
from leitstand.intake import domains


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _status(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string"}}}}},
    }


_EVENT = {"type": "object", "additionalProperties": True}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "leitstand",
        "version": __version__,
        "description": "Appends JSON events to one append-only JSONL file per domain.",
    },
    "components": {
        "securitySchemes": {
            "xAuth": {"type": "apiKey", "in": "header", "name": "X-Auth"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
    },
    "paths": {
        "/ingest/{domain}": {
            "post": {
                "summary": "Store one event, an array of events, or NDJSON",
                "security": [{"xAuth": []}, {"bearer": []}],
                "parameters": [
                    {
                        "name": "domain",
                        "in": "path",
                        "required": True,
                        "description": (
                            "Dot-separated labels of a-z, 0-9 and '-' (each 1-63, at most 253 in all); "
                            "stripped and lowercased first"
                        ),
                        "schema": {"type": "string", "maxLength": 253, "pattern": f"^{domains.PATTERN}$"},
                    },
                    {"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": (
                            "1-128 printable ASCII characters. A retry with the same key and domain within the "
                            "window (LEITSTAND_IDEMPOTENCY_WINDOW) is answered 200 (Idempotent-Replayed: true) "
                            "without storing again, the same key with other events is 409; in direct and broker mode"
                        ),
                        "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[ -~]+$"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"oneOf": [_EVENT, {"type": "array", "items": _EVENT}]}},
                        "application/x-ndjson": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "200": {
                        **_text("ok: every event is on disk (fdatasync'ed), now or by the first request with its key"),
                        "headers": {
                            "Idempotent-Replayed": {
                                "description": "true when the Idempotency-Key was stored before: nothing written",
                                "schema": {"type": "string", "enum": ["true"]},
                            }
                        },
                    },
                    "400": _text(
                        "invalid domain, invalid json, number out of range, duplicate key, json too deep, "
                        "invalid payload, domain mismatch, invalid gzip, invalid content-length, invalid idempotency key"
                    ),
                    "401": _text("unauthorized"),
                    "403": _text("forbidden (the token may not write to this domain), domain not allowed"),
                    "408": _text("request timeout: the body did not arrive in time; the connection is closed"),
                    "413": _text("payload too large, too many events, event too large"),
                    "409": _text("conflict: the Idempotency-Key was stored with other events; nothing written"),
                    "415": _text("unsupported content-encoding"),
                    "429": _text("too many requests; retry after Retry-After seconds"),
                    "500": _text("storage error, internal error"),
                    "503": _text("storage unavailable, broker unavailable; retry after Retry-After seconds"),
                    "507": _text("insufficient storage"),
                },
            }
        },
        "/health": {"get": {"summary": "Liveness", "responses": {"200": _status("the process answers")}}},
        "/metrics": {
            "get": {
                "summary": "Metrics in the Prometheus text format (no token with LEITSTAND_METRICS_PUBLIC=1)",
                "security": [{"xAuth": []}, {"bearer": []}],
                "responses": {
                    "200": _text("the metrics of all worker processes"),
                    "401": _text("unauthorized"),
                    "403": _text("forbidden: the token is scoped to some domains and may not see all"),
                    "429": _text("too many requests: too many wrong tokens from this address"),
                },
            }
        },
        "/ready": {
            "get": {
                "summary": "Readiness: the data dir takes writes and has free space",
                "responses": {
                    "200": {
                        "description": "ready, with the bytes of the data dir",
                        "content": {"application/json": {"schema": {"type": "object", "properties": {
                            "status": {"type": "string"},
                            "bytes": {
                                "type": "object",
                                "description": "live files, sealed segments and free space in the data dir",
                                "properties": {k: {"type": "integer"} for k in ("live", "sealed", "free")},
                            },
                        }}}},
                    },
                    "503": _text("not ready, with the reason"),
                },
            }
        },
        "/version": {
            "get": {
                "summary": "The running version",
                "responses": {
                    "200": {
                        "description": "version",
                        "content": {
                            "application/json": {
                                "schema": {"type": "object", "properties": {"version": {"type": "string"}}}
                            }
                        },
                    }
                },
            }
        },
    },
}

DOCS_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>leitstand API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui"});</script>
<noscript>The API description is at <a href="openapi.json">openapi.json</a>.</noscript>
</body>
</html>
"""
