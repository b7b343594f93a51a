"""The HTTP app: the ASGI callable that uvicorn runs, its lifespan, and ``POST /ingest/{domain}``.

Ingest is written against ASGI directly, without a framework, because every microsecond per
request shows in its throughput: no routing table, no request object, no dependency injection.
Every other route is rare and served by Starlette (:mod:`leitstand.server.routes`). Both kinds
answer with an ``X-Request-ID``, count in the metrics and write a log line alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import itertools
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from leitstand import __version__
from leitstand.access.auth import Grant
from leitstand.access.deadlines import Deadlines, Expired
from leitstand.access.proxies import TrustedProxies
from leitstand.access.ratelimit import FailureLimit, TokenBucket, retry_after
from leitstand.broker.jetstream import BrokerError, BrokerUnavailable, Publisher, Settings, TooLargeForBroker
from leitstand.config import Config
from leitstand.intake import compression, domains, events, otlp
from leitstand.server.routes import Routes
from leitstand.server.stopping import Stopping
from leitstand.storage.journal import Appended, Journal, StorageFull, StorageRefused, StorageUnavailable, reason
from leitstand.storage.rotation import Housekeeper
from leitstand.telemetry.logs import RequestLog
from leitstand.telemetry.metrics import Metrics

log = logging.getLogger("leitstand")

_TEXT = b"text/plain; charset=utf-8"
_NDJSON_TYPES = (b"application/x-ndjson", b"application/jsonl", b"application/x-jsonlines")
# Labels that senders put on one JSON value as well as on NDJSON: the body tells which.
# libcurl's default (syslog-ng, curl -d) and rsyslog's newline batches; none at all is read alike.
_EITHER_TYPES = (b"application/x-www-form-urlencoded", b"text/plain")
_RID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_RETRY_AFTER = (b"retry-after", b"1")
# How often the token file is checked for changes.
_TOKEN_FILE_POLL = 1.0
_CLOSE = (b"connection", b"close")
# 1-128 printable ASCII characters.
_KEY_CHARS = frozenset(range(0x20, 0x7F))
_REPLAYED = (b"idempotent-replayed", b"true")
# Objects allocated (and not yet freed) between two collections of the youngest generation.
_YOUNG_COLLECTION_EVERY = 20_000


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


class _Headers:
    """The request headers leitstand reads, picked out in one pass over the list."""

    __slots__ = (
        "x_auth",
        "authorization",
        "content_length",
        "content_type",
        "content_encoding",
        "request_id",
        "forwarded_for",
        "idempotency_key",
    )

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.x_auth = self.authorization = self.content_length = None
        self.content_type = self.content_encoding = self.request_id = self.forwarded_for = None
        self.idempotency_key: bytes | None = None
        for name, value in raw:
            if name == b"x-auth":
                self.x_auth = value
            elif name == b"authorization":
                self.authorization = value
            elif name == b"content-length":
                self.content_length = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"content-encoding":
                self.content_encoding = value.strip().lower()
            elif name == b"x-request-id" and 0 < len(value) <= 128 and _RID_CHARS.issuperset(value):
                self.request_id = value
            elif name == b"x-forwarded-for":
                self.forwarded_for = value
            elif name == b"idempotency-key":
                # Sent twice, it is no key at all.
                self.idempotency_key = value if self.idempotency_key is None else b""


class Response:
    """What ingest answers, as every refusal: one line of text, the reason phrase.

    ``events``, ``nbytes`` and ``domain`` only go to the log, ``reason`` to the metrics.
    """

    __slots__ = ("status", "body", "headers", "reason", "domain", "events", "nbytes", "content_type")

    def __init__(self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.status = status
        self.reason = reason
        self.body = reason.encode() + b"\n"
        self.content_type = _TEXT
        self.headers = headers
        self.domain: str | None = None
        self.events = 0
        self.nbytes = 0


def _text(status: int, phrase: str, *headers: tuple[bytes, bytes]) -> Response:
    return Response(status, phrase, headers)


def _too_many(wait: float) -> Response:
    return _text(429, "too many requests", (b"retry-after", retry_after(wait)))


def _refused(exc: HTTPException) -> Response:
    """A refusal raised for Starlette, answered as one line of text like every other.

    The router's own 405 carries the standard phrase in title case, and its ``Allow`` lists
    the route's methods in the order of a set.
    """
    headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
    if "allow" in headers:
        headers["allow"] = ", ".join(sorted(headers["allow"].split(", ")))
    encoded = ((name.encode(), value.encode()) for name, value in headers.items())
    # The standard phrase in lower case, as every refusal; a reason of leitstand's own as it is.
    standard = exc.detail == HTTPStatus(exc.status_code).phrase
    return _text(exc.status_code, exc.detail.lower() if standard else exc.detail, *encoded)


async def _answer(send: Send, response: Response, request_id: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [
                (b"content-type", response.content_type),
                (b"content-length", str(len(response.body)).encode()),
                (b"x-request-id", request_id),
                *response.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


class Leitstand:
    """The ASGI application; one per process, with its own journal."""

    def __init__(self, config: Config, request_log: RequestLog | None = None) -> None:
        self.config = config
        self.keyring = config.keyring()
        self.policy = domains.Policy(config.domains_allow, config.domains_deny)
        self.failures = FailureLimit(*config.auth_fail_limit) if config.auth_fail_limit else None
        self.rate = TokenBucket(*config.rate_limit) if config.rate_limit else None
        self.proxies = TrustedProxies(config.trusted_proxies)
        self.metrics = Metrics(config)
        self.journal = Journal(
            config.data_dir,
            fsync=config.fsync,
            max_open_files=config.max_open_files,
            syncfs=config.syncfs,
            file_mode=config.file_mode,
            key_window=config.idempotency_window,
            max_keys=config.idempotency_max_keys,
            observer=self.metrics,
        )
        broker = Settings.of(config)
        # Broker mode: accepted requests go to NATS JetStream instead of the journal.
        self.broker = Publisher(broker) if broker is not None else None
        # Direct mode: live files sealed on schedule, segments compressed and expired, in every worker.
        self.housekeeper = Housekeeper(self.journal, config.rotation, self.metrics) if broker is None else None
        self._watch: asyncio.Task[None] | None = None
        self.stopping = Stopping()
        self.request_log = request_log
        self.body_deadlines = Deadlines(config.body_timeout)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4) + "-"
        self.routes = Routes(
            config, self.journal, self.broker, self.metrics, self._authenticate_request, self.stopping.event
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"].startswith("/ingest/"):
                await self._post(scope, receive, send, "/ingest", self._ingest)
            elif scope["path"] == "/v1/logs":
                await self._post(scope, receive, send, "/v1/logs", self._otlp, _otlp_answer)
            else:
                await self._route(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    # -- lifecycle -------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    repaired = await self.journal.open()
                except OSError as exc:
                    log.error("data dir not usable: %s", reason(exc))
                    await send({"type": "lifespan.startup.failed", "message": reason(exc)})
                    return
                if self.broker is not None:
                    try:
                        await self.broker.start()
                    except BrokerError as exc:
                        log.error("%s", exc)
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                self._watch_token_file()
                self.stopping.install()
                if self.housekeeper is not None:
                    self.housekeeper.start()
                details = {
                    "version": __version__,
                    "torn_tails_repaired": repaired,
                    "tokens": len(self.keyring.grants),
                    **self.config.describe(),
                }
                log.info("started", extra=details)
                _tune_garbage_collector()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn has stopped accepting and finished every request by now.
                self.stopping.event.set()
                self.routes.reading.close()
                if self._watch is not None:
                    self._watch.cancel()
                self.stopping.close()
                if self.housekeeper is not None:
                    await self.housekeeper.stop()
                await self.journal.close()
                if self.broker is not None:
                    await self.broker.close()
                self.metrics.close()
                if self.request_log is not None:
                    self.request_log.flush()
                log.info("stopped: every acknowledged event is on disk")
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _watch_token_file(self) -> None:
        """Reload the token file on SIGHUP and whenever it changes, without a restart.

        SIGHUP is taken even without a token file: its default action would end the process.
        """
        loop = asyncio.get_running_loop()
        # Only the main thread may take signals; under a test harness there may be none.
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self.keyring.reload)
        if self.keyring.path is not None:
            self._watch = loop.create_task(self._poll_token_file())

    async def _poll_token_file(self) -> None:
        while True:
            await asyncio.sleep(_TOKEN_FILE_POLL)
            if self.keyring.changed():
                self.keyring.reload()

    # -- requests --------------------------------------------------------------------

    def _arrived(self, scope: Scope) -> tuple[float, _Headers, bytes, str]:
        """When a request came, its headers, its id (the client's, or a new one) and the client's address."""
        started = time.perf_counter()
        headers = _Headers(scope["headers"])
        request_id = headers.request_id or f"{self._id_prefix}{next(self._ids):x}".encode()
        return started, headers, request_id, self._address(scope, headers)

    def _address(self, scope: Scope, headers: _Headers) -> str:
        client = scope.get("client")
        address: str = client[0] if client else "-"
        if headers.forwarded_for is not None and self.proxies:
            address = self.proxies.client(address, headers.forwarded_for)
        return address

    async def _post(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: str,
        handle: Callable[[_Headers, Receive, str, str], Awaitable[Response]],
        encode: Callable[[Response, _Headers], None] | None = None,
    ) -> None:
        """A route that only takes POST, hand-written: ingest and OTLP logs. ``encode`` puts an
        answer in the route's own format; without it, every answer is one line of text."""
        started, headers, request_id, address = self._arrived(scope)
        try:
            if scope["method"] == "POST":
                response = await handle(headers, receive, scope["path"], address)
            else:
                response = _text(405, "method not allowed", (b"allow", b"POST"))
        except ClientGone:
            self.metrics.answered(route, 499, "client gone", time.perf_counter() - started)
            self._log(scope, 499, None, 0, 0, request_id, started, address)
            return
        except Exception:
            log.exception("internal error", extra={"request_id": request_id.decode()})
            response = _text(500, "internal error")
        if encode is not None:
            encode(response, headers)
        self.metrics.answered(route, response.status, response.reason, time.perf_counter() - started)
        await _answer(send, response, request_id)
        self._log(
            scope, response.status, response.domain, response.events, response.nbytes, request_id, started, address
        )

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every other route, through Starlette's router; ``route`` in the metrics is the route's path, or ``other``."""
        started, _, request_id, address = self._arrived(scope)
        status = 0

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message["headers"], (b"x-request-id", request_id)]}
                self.metrics.answered(_route_name(scope), status, "ok", time.perf_counter() - started)
            await send(message)

        # Inside an app, Starlette raises its refusals (404, 405) instead of answering them itself.
        scope["app"] = self
        try:
            await self.routes(scope, receive, counted)
        except Exception as exc:
            if status:  # already answered: nothing more can be said
                raise
            if isinstance(exc, HTTPException):
                response = _refused(exc)
            else:
                log.exception("internal error", extra={"request_id": request_id.decode()})
                response = _text(500, "internal error")
            status = response.status
            self.metrics.answered(_route_name(scope), status, response.reason, time.perf_counter() - started)
            await _answer(send, response, request_id)
        self._log(scope, status, None, 0, 0, request_id, started, address)

    def _log(
        self,
        scope: Scope,
        status: int,
        domain: str | None,
        count: int,
        nbytes: int,
        request_id: bytes,
        started: float,
        address: str,
    ) -> None:
        if self.request_log is None:
            return
        self.request_log.write(
            scope["method"],
            scope["path"],
            status,
            domain or "-",
            count,
            nbytes,
            time.perf_counter() - started,
            request_id.decode(),
            address,
        )

    def _authenticate_request(self, request: Request) -> Grant:
        """For the routes: the grant of the token presented, or the same refusal as for ingest, raised."""
        headers = _Headers(request.scope["headers"])
        grant = self._authenticate(headers, self._address(request.scope, headers))
        if isinstance(grant, Response):
            raise HTTPException(grant.status, grant.reason, {k.decode(): v.decode() for k, v in grant.headers})
        return grant

    def _authenticate(self, headers: _Headers, address: str) -> Grant | Response:
        """The grant of the token presented, or the refusal: 429 while the address has failed too often, else 401."""
        if self.failures is not None and (wait := self.failures.blocked(address)):
            return _too_many(wait)
        grant = self.keyring.find(headers.x_auth, headers.authorization)
        if grant is None:
            if self.failures is not None:
                self.failures.failed(address)
            return _text(401, "unauthorized")
        return grant

    async def _ingest(self, headers: _Headers, receive: Receive, path: str, address: str) -> Response:
        # Everything that can be judged from the headers is, before a byte of the body is read
        # and before any file is touched.
        grant = self._authenticate(headers, address)
        if isinstance(grant, Response):
            return grant
        domain = domains.normalize(path[8:])
        if domain is None:
            return _text(400, "invalid domain")
        if not self.policy.allows(domain):
            return _text(403, "domain not allowed")
        if not grant.may_write(domain):
            return _text(403, "forbidden")
        if self.rate is not None and (wait := self.rate.take(grant)):
            return _too_many(wait)
        key = headers.idempotency_key
        if key is not None and not (0 < len(key) <= 128 and _KEY_CHARS.issuperset(key)):
            return _text(400, "invalid idempotency key")
        read = await self._read(headers, receive)
        if isinstance(read, Response):
            return read
        body, nbytes = read
        media_type = _media_type(headers)
        # Without a Content-Type, as with the labels senders put on either, the body tells.
        ndjson = None if media_type is None or media_type in _EITHER_TYPES else media_type in _NDJSON_TYPES
        try:
            stamp = self._stamp()
            lines, count = events.encode(body, domain, ndjson=ndjson, limits=self.config.limits, stamp=stamp)
            appended = await self._append(domain, lines, key, stamp) if count else Appended.STORED
        except events.TooLarge as exc:
            response = _text(413, exc.reason)
        except events.PayloadError as exc:
            response = _text(400, exc.reason)
        except _NOT_STORED as exc:
            response = _not_stored(exc, only_503=False)
        else:
            if appended is Appended.STORED:
                response = _text(200, "ok")
                response.events = count
                self.metrics.stored(domain, count, len(lines))
            elif appended is Appended.DUPLICATE:
                response = _text(200, "ok", _REPLAYED)
            else:
                response = _text(409, "conflict")
        response.domain = domain
        response.nbytes = nbytes
        return response

    async def _read(self, headers: _Headers, receive: Receive) -> tuple[bytes, int] | Response:
        """The body, decompressed, and its size as sent; or the refusal, if it is too large, late or garbled."""
        limit = self.config.max_body
        length, encoding = headers.content_length, headers.content_encoding
        # uvicorn's parser has refused a Content-Length that is not a number before the app is called.
        if length is not None and length.isdigit() and int(length) > limit:
            return _text(413, "payload too large")
        if encoding is not None and encoding not in compression.ENCODINGS:
            return _text(415, "unsupported content-encoding")
        try:
            # One deadline for the whole body: a client trickling it byte by byte is cut off.
            body = await self.body_deadlines.run(_read_body(receive, limit))
        except Expired:
            return _text(408, "request timeout", _CLOSE)
        if body is None:
            return _text(413, "payload too large")
        nbytes = len(body)
        if encoding is not None:
            try:
                body = compression.decompress(body, encoding, limit)
            except events.PayloadError as exc:
                return _text(400, exc.reason)
            if body is None:
                return _text(413, "payload too large")
        return body, nbytes

    def _stamp(self) -> tuple[str, str] | None:
        """The receive time that every stored event gets, if LEITSTAND_RECEIVED_FIELD names a field."""
        field = self.config.received_field
        return None if field is None else events.received(field, time.time())

    async def _append(self, domain: str, lines: bytes, key: bytes | None, stamp: tuple[str, str] | None) -> Appended:
        """Store ``lines`` in the domain's file, or publish them in broker mode. A retry under ``key``
        is the same request if it repeats the lines as sent, whatever receive time ``stamp`` added."""
        same = events.unstamped(lines, stamp) if key is not None and stamp is not None else None
        if self.broker is not None:
            return await self.broker.publish(domain, lines, key, same)
        return await self.journal.append(domains.file_name(domain), lines, key, same)

    # -- OpenTelemetry logs ----------------------------------------------------------

    async def _otlp(self, headers: _Headers, receive: Receive, path: str, address: str) -> Response:
        """``POST /v1/logs``: store the records of an ``ExportLogsServiceRequest``. OTLP's clients retry
        429, 502, 503 and 504 only, so everything that may pass (a full disk too) is 503 with ``Retry-After``."""
        content_type = _media_type(headers)
        grant = self._authenticate(headers, address)
        if isinstance(grant, Response):
            return grant
        if not grant.writes:
            return _text(403, "forbidden")
        if self.rate is not None and (wait := self.rate.take(grant)):
            return _too_many(wait)
        if content_type not in (otlp.PROTOBUF, otlp.JSON):
            return _text(415, "unsupported content-type")
        read = await self._read(headers, receive)
        if isinstance(read, Response):
            return read

        def refusal(domain: str) -> str | None:
            if not self.policy.allows(domain):
                return "domain not allowed"
            return None if grant.may_write(domain) else "forbidden"

        body, nbytes = read
        try:
            request = otlp.parse(body, content_type == otlp.JSON)
            converted = otlp.convert(
                request,
                attribute=self.config.otlp_domain_attribute,
                fixed=grant.otlp_domain,
                limits=self.config.limits,
                refusal=refusal,
                stamp=(stamp := self._stamp()),
            )
        except events.TooLarge as exc:
            return _text(413, exc.reason)
        except events.PayloadError as exc:
            return _text(400, exc.reason)
        # A retry of the same request is stored once: OTLP clients send no key, the body is one.
        key = b"otlp-" + hashlib.sha256(body).hexdigest().encode()
        response = _text(200, "ok")
        for domain, lines in converted.lines.items():
            joined = b"".join(lines)
            try:
                appended = await self._append(domain, joined, key, stamp)
            except _NOT_STORED as exc:
                failed = _not_stored(exc, only_503=True)
                failed.domain = domain
                return failed
            if appended is Appended.STORED:
                response.events += len(lines)
                self.metrics.stored(domain, len(lines), len(joined))
            elif appended is Appended.CONFLICT:
                converted.refused["conflict"] += len(lines)
        response.body = otlp.success(content_type == otlp.JSON, converted)
        response.domain = next(iter(converted.lines)) if len(converted.lines) == 1 else None
        response.nbytes = nbytes
        return response


_NOT_STORED = (StorageFull, StorageUnavailable, StorageRefused, BrokerUnavailable, TooLargeForBroker)


def _not_stored(exc: Exception, only_503: bool) -> Response:
    """The answer when lines were not stored; ``only_503`` for clients that retry 503 but not 507 or 500 (OTLP)."""
    if isinstance(exc, TooLargeForBroker):
        return _text(413, "payload too large")
    if isinstance(exc, BrokerUnavailable):
        return _text(503, "broker unavailable", _RETRY_AFTER)
    if isinstance(exc, StorageFull):
        return _text(503, "insufficient storage", _RETRY_AFTER) if only_503 else _text(507, "insufficient storage")
    if isinstance(exc, StorageRefused) and not only_503:
        return _text(500, "storage error")
    return _text(503, "storage unavailable", _RETRY_AFTER)


def _media_type(headers: _Headers) -> bytes | None:
    """The media type of ``Content-Type``, lowercased and without parameters; None without the header."""
    content_type = headers.content_type
    return None if content_type is None else content_type.split(b";", 1)[0].strip().lower()


def _otlp_answer(response: Response, headers: _Headers) -> None:
    """An OTLP answer is in the encoding of its request; a refusal carries a ``google.rpc.Status``."""
    json = _media_type(headers) == otlp.JSON
    if response.status != 200:
        response.body = otlp.failure(json, response.status, response.reason)
    response.content_type = otlp.JSON if json else otlp.PROTOBUF


def _route_name(scope: Scope) -> str:
    """The path of the route the router matched, also for a wrong method, else ``other``: never the client's text."""
    route = scope.get("route")
    return getattr(route, "path", "other")


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past ``limit`` (chunked bodies included)."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks) if size <= limit else None


def _tune_garbage_collector() -> None:
    """Hide what imports and startup made from the cyclic garbage collector: it lives as long as
    the process, and each full collection scanned it again, a pause of 20 to 40 ms every few
    thousand requests that every request in flight waited out (the p99 at 64 connections).

    Then collect the youngest generation less often. Each young collection walks every object
    of the requests in flight, and at the default (every 700 objects more than freed) it ran
    every few requests: 1.6 µs of each single-event request (``perf``). Once in
    :data:`_YOUNG_COLLECTION_EVERY` leaves the same garbage for fewer, larger walks: +3% single
    events and +8% at 100 domains, +2 to 4% in batches (``bench/compare.py``, docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_YOUNG_COLLECTION_EVERY, middle, old)

