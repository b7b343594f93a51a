"""The API description served at ``/openapi.json`` and rendered at ``/docs`` (static/docs)."""

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


# OTLP's two encodings; an answer comes in the encoding of its request.
_OTLP_CONTENT = {
    "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object"}},
}


def _otlp(description: str) -> dict[str, Any]:
    return {"description": description, "content": _OTLP_CONTENT}


_EVENT = {"type": "object", "additionalProperties": True}
_READ_REFUSALS = {
    "401": _text("unauthorized"),
    "403": _text("forbidden: the token may not read (access=write), or not this domain (domains=)"),
    "429": _text("too many requests: too many wrong tokens from this address"),
}
_DOMAIN = {
    "name": "domain",
    "in": "path",
    "required": True,
    "description": (
        "Dot-separated labels of a-z, 0-9 and '-' (each 1-63, at most 253 in all); stripped and lowercased first"
    ),
    "schema": {"type": "string", "maxLength": 253, "pattern": f"^{domains.PATTERN}$"},
}
_CURSOR = {"type": "string", "description": "opaque; the next or an event id of an earlier answer"}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_AFTER = _query("after", _CURSOR, "go on after this cursor (without: from the start)")
_Q = _query("q", {"type": "string", "minLength": 1, "maxLength": 1000}, "only events whose stored line holds this text")
_SINCE = _query(
    "since",
    {"type": "string", "format": "date-time"},
    "RFC 3339: start at the first event received in this second or later (the second the service wrote it)",
)

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
                    _DOMAIN,
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
                    "description": (
                        "Content-Encoding gzip or zstd. Labelled text/plain, application/x-www-form-urlencoded "
                        "or not at all: one JSON value, or else NDJSON (as log shippers send)"
                    ),
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
                        "invalid payload, domain mismatch, empty body, invalid gzip, invalid zstd, "
                        "invalid idempotency key, reserved field"
                    ),
                    "401": _text("unauthorized"),
                    "403": _text("forbidden (the token may not write, or not to this domain), domain not allowed"),
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
        "/v1/logs": {
            "post": {
                "summary": "OpenTelemetry logs (OTLP/HTTP): one event per log record, in the domain of its resource",
                "security": [{"xAuth": []}, {"bearer": []}],
                "requestBody": {
                    "required": True,
                    "description": "An ExportLogsServiceRequest, in protobuf or OTLP's JSON; Content-Encoding gzip or zstd",
                    "content": _OTLP_CONTENT,
                },
                "responses": {
                    "200": _otlp("ExportLogsServiceResponse: stored; partial_success counts refused records"),
                    "400": _otlp("google.rpc.Status: invalid otlp, invalid gzip, invalid zstd (never retried)"),
                    "401": _otlp("google.rpc.Status: unauthorized"),
                    "403": _otlp("google.rpc.Status: forbidden (the token may not write)"),
                    "408": _otlp("google.rpc.Status: request timeout"),
                    "413": _otlp("google.rpc.Status: payload too large, too many events"),
                    "415": _otlp("google.rpc.Status: unsupported content-type, unsupported content-encoding"),
                    "429": _otlp("google.rpc.Status: too many requests; retry after Retry-After seconds"),
                    "503": _otlp(
                        "google.rpc.Status: storage unavailable, insufficient storage, broker unavailable; "
                        "retry after Retry-After seconds"
                    ),
                },
            }
        },
        "/domains": {
            "get": {
                "summary": "The domains the token may read, with their size and recent rate",
                "security": [{"xAuth": []}, {"bearer": []}],
                "responses": {
                    "200": {
                        "description": "one entry per domain with events that the token may read",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["domains"],
                                    "properties": {
                                        "domains": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "properties": {
                                                    "domain": {"type": "string"},
                                                    "bytes": {"type": "integer"},
                                                    "modified": {"type": "string", "format": "date-time"},
                                                    "events_per_minute": {
                                                        "type": "integer",
                                                        "description": "events written in the last 60 s",
                                                    },
                                                    "per_minute": {
                                                        "type": "array",
                                                        "items": {"type": "integer"},
                                                        "description": "events per minute of the last hour, now last",
                                                    },
                                                },
                                            },
                                        }
                                    },
                                }
                            }
                        },
                    },
                    **_READ_REFUSALS,
                },
            }
        },
        "/events/{domain}": {
            "get": {
                "summary": "A page of stored events, oldest first, with the cursor that goes on",
                "security": [{"xAuth": []}, {"bearer": []}],
                "parameters": [
                    _DOMAIN,
                    _AFTER,
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "events (default 100)"),
                    _query(
                        "tail",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                        "the last N events instead (without after and limit); next follows from the end",
                    ),
                    _Q,
                    _SINCE,
                ],
                "responses": {
                    "200": {
                        "description": "the events as stored; next equals after on an empty page without q",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["events", "next"],
                                    "properties": {"events": {"type": "array", "items": _EVENT}, "next": _CURSOR},
                                }
                            }
                        },
                    },
                    "400": _text("invalid domain, invalid cursor, a limit, tail, q or since out of range, ..."),
                    "404": _text("unknown domain: no events for it yet"),
                    **_READ_REFUSALS,
                },
            }
        },
        "/events/{domain}/stream": {
            "get": {
                "summary": "Server-Sent Events: each new event as id (its cursor) and data (its stored line)",
                "description": (
                    "Starts at the end (only new events), after a cursor (Last-Event-ID or after=) or at since. "
                    "A comment every 15 s keeps the connection open; the answer ends when the service stops. "
                    "With Accept-Encoding: deflate, the stream comes compressed (Content-Encoding: deflate)."
                ),
                "security": [{"xAuth": []}, {"bearer": []}],
                "parameters": [
                    _DOMAIN,
                    _AFTER,
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": _CURSOR},
                    _Q,
                    _SINCE,
                ],
                "responses": {
                    "200": {
                        "description": "an endless stream of events",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": _text("invalid domain, invalid cursor, a q or since out of range"),
                    "404": _text("unknown domain: no events for it yet"),
                    **_READ_REFUSALS,
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
