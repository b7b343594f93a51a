"""OpenTelemetry logs (OTLP/HTTP): an ``ExportLogsServiceRequest`` turned into journal lines.

Each log record becomes one event, a flat JSON object that reads without the OTLP
specification at hand::

    {"time":"2026-12-03T15:04:23.123456789Z","observed_time":"...","severity":"ERROR",
     "severity_number":17,"body":"disk full","attributes":{"http.route":"/x"},
     "resource":{"service.name":"checkout"},"scope":{"name":"app.db"},
     "trace_id":"5b8efff798038103d269b633813fc60c","span_id":"eee19b7ec3c1b174","flags":1,
     "domain":"checkout"}

``time`` is the record's time, or its observed time where the sender set none (RFC 3339,
UTC, nanoseconds); ids are lowercase hex; a bytes value is base64; a key whose value is
unset or empty is left out. The domain is the record's resource attribute named by
``LEITSTAND_OTLP_DOMAIN_ATTRIBUTE`` (``service.name``), made a valid domain name, or the
token's fixed ``otlp-domain``.

Nothing a sender sends is changed silently: a record that cannot be stored as it is (a
duplicate attribute key, NaN, nesting deeper than allowed, too large, no domain) is
refused on its own and counted in the answer's ``partial_success``; the others are stored.
A body that is no ``ExportLogsServiceRequest`` is refused whole. The protobuf is parsed by
the ``opentelemetry-proto`` package; the JSON form by protobuf's own JSON reader, after the
ids (hex in OTLP, unlike protobuf's JSON mapping) are turned into what it expects.
"""

from __future__ import annotations

import base64
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from leitstand.intake import domains
from leitstand.intake.events import Limits, PayloadError, TooLarge

PROTOBUF = b"application/x-protobuf"
JSON = b"application/json"
_NEWLINE = orjson.OPT_APPEND_NEWLINE
# The gRPC status code an OTLP answer's Status carries, by HTTP status.
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 408: 4, 413: 3, 415: 3, 429: 8, 500: 13, 503: 14}
_IDS = ("traceId", "trace_id", "spanId", "span_id")


class _Refused(Exception):
    """One record that is not stored; the message is the reason the answer gives."""


@dataclass
class Converted:
    """What a request holds: the lines of each domain, and the records refused, by reason."""

    lines: dict[str, list[bytes]] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)

    @property
    def rejected(self) -> int:
        return sum(self.refused.values())

    def message(self) -> str:
        """The reasons of the refused records, the commonest first: ``domain not allowed (3), ...``."""
        return ", ".join(f"{reason} ({count})" for reason, count in self.refused.most_common())


def parse(body: bytes, json: bool) -> ExportLogsServiceRequest:
    """The request in ``body``, protobuf or (``json``) OTLP's JSON; :class:`PayloadError` if it is neither."""
    request = ExportLogsServiceRequest()
    try:
        if not json:
            request.ParseFromString(body)
            return request
        tree = orjson.loads(body)
        if type(tree) is not dict:
            raise PayloadError("invalid otlp")
        _hex_ids_to_base64(tree)
        json_format.ParseDict(tree, request, ignore_unknown_fields=True)
        return request
    except (DecodeError, json_format.ParseError, orjson.JSONDecodeError, ValueError, TypeError, RecursionError):
        raise PayloadError("invalid otlp") from None


def _hex_ids_to_base64(tree: dict[str, Any]) -> None:
    """OTLP's JSON writes trace and span ids in hex; protobuf's JSON reader takes bytes in base64."""
    for resource_logs in _list(tree, "resourceLogs", "resource_logs"):
        for scope_logs in _list(resource_logs, "scopeLogs", "scope_logs"):
            for record in _list(scope_logs, "logRecords", "log_records"):
                if type(record) is not dict:
                    continue
                for name in _IDS:
                    if type(value := record.get(name)) is str:
                        try:
                            record[name] = base64.b64encode(bytes.fromhex(value)).decode()
                        except ValueError:
                            raise PayloadError("invalid otlp") from None


def _list(tree: Any, *names: str) -> Iterable[Any]:
    if type(tree) is not dict:
        return ()
    for name in names:
        if type(found := tree.get(name)) is list:
            return found
    return ()


def convert(
    request: ExportLogsServiceRequest,
    *,
    attribute: str,
    fixed: str | None,
    limits: Limits,
    refusal: Callable[[str], str | None],
    stamp: tuple[str, str] | None = None,
) -> Converted:
    """The journal lines of every record, by domain.

    ``fixed``: the token's own domain, else the resource attribute named ``attribute`` decides.
    ``refusal``: why a domain may not be written (policy, the token's scope), or None.
    ``stamp``: the receive-time field and its value, as :func:`~leitstand.intake.events.encode` adds it.
    Raises :class:`TooLarge` for more records than ``limits.events``.
    """
    if sum(len(scope.log_records) for rl in request.resource_logs for scope in rl.scope_logs) > limits.events:
        raise TooLarge("too many events")
    out = Converted()
    for resource_logs in request.resource_logs:
        count = sum(len(scope.log_records) for scope in resource_logs.scope_logs)
        try:
            resource = _map(resource_logs.resource.attributes, limits.depth - 1)
            domain = fixed or _domain(resource.get(attribute), attribute)
            if (reason := refusal(domain)) is not None:
                raise _Refused(reason)
        except _Refused as exc:
            out.refused[str(exc)] += count
            continue
        lines = out.lines.setdefault(domain, [])
        for scope_logs in resource_logs.scope_logs:
            try:
                scope = _scope(scope_logs.scope.name, scope_logs.scope.version, scope_logs.scope.attributes,
                               limits.depth - 1)
            except _Refused as exc:
                out.refused[str(exc)] += len(scope_logs.log_records)
                continue
            for record in scope_logs.log_records:
                try:
                    lines.append(_line(record, resource, scope, domain, limits, stamp))
                except _Refused as exc:
                    out.refused[str(exc)] += 1
        if not lines:
            del out.lines[domain]
    return out


def _domain(name: Any, attribute: str) -> str:
    domain = domains.from_name(name) if type(name) is str else None
    if domain is None:
        raise _Refused(f"no {attribute}")
    return domain


def _scope(name: str, version: str, attributes: Iterable[KeyValue], depth: int) -> dict[str, Any]:
    scope: dict[str, Any] = {}
    if name:
        scope["name"] = name
    if version:
        scope["version"] = version
    if attributes:
        scope["attributes"] = _map(attributes, depth - 1)
    if scope and depth < 1:
        raise _Refused("json too deep")
    return scope


def _line(
    record: LogRecord,
    resource: dict[str, Any],
    scope: dict[str, Any],
    domain: str,
    limits: Limits,
    received: tuple[str, str] | None,
) -> bytes:
    event: dict[str, Any] = {}
    if stamp := record.time_unix_nano or record.observed_time_unix_nano:
        event["time"] = _rfc3339(stamp)
    if record.observed_time_unix_nano:
        event["observed_time"] = _rfc3339(record.observed_time_unix_nano)
    if record.severity_text:
        event["severity"] = record.severity_text
    if record.severity_number:
        event["severity_number"] = int(record.severity_number)
    if record.event_name:
        event["event_name"] = record.event_name
    if record.HasField("body"):
        event["body"] = _value(record.body, limits.depth - 1)
    if record.attributes:
        event["attributes"] = _map(record.attributes, limits.depth - 1)
    if record.dropped_attributes_count:
        event["dropped_attributes_count"] = record.dropped_attributes_count
    if resource:
        event["resource"] = resource
    if scope:
        event["scope"] = scope
    if any(record.trace_id):
        event["trace_id"] = record.trace_id.hex()
    if any(record.span_id):
        event["span_id"] = record.span_id.hex()
    if record.flags:
        event["flags"] = record.flags
    event["domain"] = domain
    if received is not None:
        event[received[0]] = received[1]
    line = orjson.dumps(event, option=_NEWLINE)
    if len(line) > limits.event_size:
        raise _Refused("event too large")
    return line


def _rfc3339(nanos: int) -> str:
    seconds, fraction = divmod(nanos, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def _map(pairs: Iterable[KeyValue], depth: int) -> dict[str, Any]:
    """Attributes as a JSON object at nesting level ``limits.depth - depth``; a key given twice is refused."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if depth < 1:
            raise _Refused("json too deep")
        if pair.key in out:
            raise _Refused("duplicate key")
        out[pair.key] = _value(pair.value, depth - 1)
    return out


def _value(value: AnyValue, depth: int) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        if not math.isfinite(value.double_value):
            raise _Refused("number out of range")
        return value.double_value
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if kind == "array_value":
        if depth < 1:
            raise _Refused("json too deep")
        return [_value(item, depth - 1) for item in value.array_value.values]
    if kind == "kvlist_value":
        if depth < 1:
            raise _Refused("json too deep")
        return _map(value.kvlist_value.values, depth)
    return None


def success(json: bool, converted: Converted) -> bytes:
    """The answer to a request that was stored (all but the refused records)."""
    response = ExportLogsServiceResponse()
    if converted.rejected:
        response.partial_success.rejected_log_records = converted.rejected
        response.partial_success.error_message = converted.message()
    return orjson.dumps(json_format.MessageToDict(response)) if json else response.SerializeToString()


def failure(json: bool, status: int, message: str) -> bytes:
    """The body of an error answer: a ``google.rpc.Status``, in the request's encoding."""
    answer = status_pb2.Status(code=_GRPC_CODES.get(status, 2), message=message)
    return orjson.dumps(json_format.MessageToDict(answer)) if json else answer.SerializeToString()

