"""A client for leitstand: batches under the server's limits, safe retries, an optional outbox.

Everything but the I/O is one generator, :meth:`_Core._plan`: it yields what it wants done
(a POST, a sleep) and is sent what came of it. :class:`Client` and :class:`AsyncClient`
only carry that out, with one httpx connection pool each, so the two cannot drift apart.

Every batch carries an ``Idempotency-Key`` that its retries reuse, so a request the
service stored but could not answer (a timeout, a dropped connection) is not stored twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip as gzip_codec
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import httpx
import orjson

from leitstand import __version__
from leitstand.access import auth
from leitstand.intake import domains
from leitstand.client.outbox import Batch, Outbox

# The server's defaults (LEITSTAND_MAX_EVENTS, LEITSTAND_MAX_BODY).
MAX_EVENTS = 10000
MAX_BYTES = 1 << 20
_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 10.0
# Retried like 5xx: the same request may well succeed later.
_RETRY = frozenset({408, 429})
# A 400 with one of these phrases is about some event of the batch: halving the batch finds
# it, and the rest is delivered. Every 413 is about size, which halving cures as well.
_PER_EVENT = frozenset(
    {"invalid json", "number out of range", "duplicate key", "json too deep", "invalid payload", "domain mismatch"}
)
# About every request alike (token, scope, domain, address, encoding): raised, since nothing
# can be delivered; so is any other 400 (invalid domain, invalid gzip, ...), which no halving cures.
_FATAL = frozenset({401, 403, 404, 405, 415})
# What orjson writes for NaN and Infinity instead of refusing them, as the service does.
_NULL = b"null"

Event = Mapping[str, Any] | bytes


class Rejected(Exception):
    """Events the server refused with ``status`` and its ``reason`` phrase (``status`` None: refused here)."""

    def __init__(self, status: int | None, reason: str, events: list[bytes]) -> None:
        super().__init__(f"{status} {reason}" if status else reason)
        self.status = status
        self.reason = reason
        self.events = events


Reporter = Callable[[Rejected], None]


@dataclass
class Result:
    """What became of the events of one call.

    ``pending``: not delivered because the service was unreachable until the deadline
    (``unavailable`` says why); with an outbox they are in it, for the next run.
    ``rejections``: what was refused, unless the call was given ``on_rejected``.
    """

    stored: int = 0
    rejected: int = 0
    pending: int = 0
    unavailable: str | None = None
    rejections: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class Post:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    retry_after: float | None

    @classmethod
    def of(cls, response: httpx.Response) -> Reply:
        return cls(response.status_code, response.text.strip()[:200], retry_after(response.headers.get("retry-after")))


Op = Post | Sleep
Outcome = Reply | httpx.TransportError | None
Plan = Generator[Op | Result, Outcome, None]


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def batches(
    domain: str, lines: Iterable[bytes], reject: Reporter, max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES
) -> Iterator[Batch]:
    """Encoded events in batches of at most ``max_events`` and ``max_bytes``, each with a new key."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        length = len(line) + 1
        if length > max_bytes:
            reject(Rejected(None, f"event too large: {length} bytes, a request may hold {max_bytes}", [line]))
            continue
        if batch and (len(batch) == max_events or size + length > max_bytes):
            yield Batch(domain, uuid.uuid4().hex, batch)
            batch, size = [], 0
        batch.append(line)
        size += length
    if batch:
        yield Batch(domain, uuid.uuid4().hex, batch)


def _encode(events: Iterable[Event], reject: Reporter) -> Iterator[bytes]:
    for event in events:
        if not isinstance(event, bytes):
            line = orjson.dumps(event)
            # Only an event with a null in it pays for the walk.
            if _NULL in line and not _finite(event):
                reject(Rejected(None, "invalid json: NaN and Infinity are not JSON (the service refuses them too)",
                                [json.dumps(event, default=repr).encode()]))
                continue
            yield line
        elif b"\n" in event:
            raise ValueError("an event given as bytes must be one line of JSON")
        else:
            yield event


def _finite(value: object) -> bool:
    """Whether ``value`` holds no float that JSON cannot write (NaN, Infinity), wherever orjson looks."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(map(_finite, value.values()))
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    if is_dataclass(value) and not isinstance(value, type):
        return all(_finite(getattr(value, item.name)) for item in fields(value))
    return True


def token_from_env(domain: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The token to send with, found where the service finds its own: the first of ``LEITSTAND_TOKEN``,
    else the first in ``LEITSTAND_TOKEN_FILE`` that may write to ``domain`` (any, without one).

    Raises :class:`~leitstand.access.auth.TokenFileError` if the file is named but not usable.
    """
    env = os.environ if environ is None else environ
    listed = auth.split_list(env.get("LEITSTAND_TOKEN", ""))
    if listed:
        return listed[0]
    path = env.get("LEITSTAND_TOKEN_FILE", "").strip()
    if not path:
        return None
    tokens = auth.read_tokens(Path(path))
    normal = domains.normalize(domain) if domain is not None else None
    fitting = [token for token, grant in tokens if (grant.writes if normal is None else grant.may_write(normal))]
    return fitting[0] if fitting else tokens[0][0]


class _Core:
    """Batching, keys, retry policy and response classification; no I/O but the outbox."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        gzip: bool = False,
        max_events: int = MAX_EVENTS,
        max_bytes: int = MAX_BYTES,
        timeout: float = 30.0,
        deadline: float = 60.0,
        outbox: str | Path | None = None,
    ) -> None:
        """``timeout``: per network operation; ``deadline``: seconds a batch is retried before the
        service counts as unreachable."""
        self.url = url.rstrip("/")
        self.gzip = gzip
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.deadline = deadline
        self._headers = {"X-Auth": token, "Content-Type": "application/x-ndjson"}
        if gzip:
            self._headers["Content-Encoding"] = "gzip"
        self.outbox = Outbox(Path(outbox)) if outbox is not None else None
        self._connect({"base_url": self.url, "timeout": timeout, "headers": {"User-Agent": f"leitstand/{__version__}"}})

    def _connect(self, options: dict[str, Any]) -> None:
        raise NotImplementedError

    def _close_outbox(self) -> None:
        if self.outbox is not None:
            self.outbox.close()

    def _plan(self, domain: str | None, events: Iterable[Event], on_rejected: Reporter | None) -> Plan:
        """Deliver what the outbox holds, then ``events``; the last thing yielded is the :class:`Result`."""
        result = Result()
        report = on_rejected or result.rejections.append

        def reject(rejection: Rejected) -> None:
            result.rejected += len(rejection.events)
            report(rejection)

        if self.outbox is not None:
            for batch in self.outbox.pending():
                yield from self._deliver(batch, result, reject)
        if domain is not None:
            for batch in batches(domain, _encode(events, reject), reject, self.max_events, self.max_bytes):
                if self.outbox is not None:
                    self.outbox.add(batch)
                yield from self._deliver(batch, result, reject)
        yield result

    def _deliver(self, batch: Batch, result: Result, reject: Reporter) -> Generator[Op, Outcome, None]:
        yield from self._settle(batch, result, reject)
        if self.outbox is not None and result.unavailable is None:
            self.outbox.remove(batch)

    def _settle(self, batch: Batch, result: Result, reject: Reporter) -> Generator[Op, Outcome, None]:
        """Deliver ``batch``; if the server refuses it for some event, deliver the rest without it."""
        if result.unavailable is not None:
            result.pending += len(batch.lines)
            return
        answer = yield from self._exchange(batch)
        if isinstance(answer, str):
            result.unavailable = answer
            result.pending += len(batch.lines)
        elif answer.status == 200:
            result.stored += len(batch.lines)
        elif answer.status in _FATAL or (answer.status == 400 and answer.reason not in _PER_EVENT):
            raise Rejected(answer.status, answer.reason, batch.lines)
        elif answer.status in (400, 413) and len(batch.lines) > 1:
            for half in batch.halves():
                yield from self._settle(half, result, reject)
        else:
            reject(Rejected(answer.status, answer.reason, batch.lines))

    def _exchange(self, batch: Batch) -> Generator[Op, Outcome, Reply | str]:
        """POST ``batch`` until it has a final answer, or the reason the service counts as unreachable."""
        body = gzip_codec.compress(batch.body, 5) if self.gzip else batch.body
        post = Post(f"/ingest/{quote(batch.domain, safe='')}", body, {**self._headers, "Idempotency-Key": batch.key})
        give_up = time.monotonic() + self.deadline
        attempt = 0
        while True:
            outcome = yield post
            if isinstance(outcome, Reply) and outcome.status not in _RETRY and outcome.status < 500:
                return outcome
            wait = _backoff(attempt, outcome)
            if time.monotonic() + wait > give_up:
                return _describe(outcome)
            yield Sleep(wait)
            attempt += 1


def _backoff(attempt: int, outcome: Outcome) -> float:
    """What the server asked for, else exponential backoff with full jitter."""
    if isinstance(outcome, Reply) and outcome.retry_after is not None:
        return outcome.retry_after
    return random.uniform(0, min(_MAX_BACKOFF, _FIRST_BACKOFF * 2**attempt))


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, Reply):
        return f"{outcome.status} {outcome.reason}".rstrip()
    return f"{type(outcome).__name__}: {outcome}" if str(outcome) else type(outcome).__name__


class Client(_Core):
    """A blocking client with one connection pool; use it as a context manager, or :meth:`close` it."""

    _http: httpx.Client

    def _connect(self, options: dict[str, Any]) -> None:
        self._http = httpx.Client(**options)

    def send(self, domain: str, events: Iterable[Event], *, on_rejected: Reporter | None = None) -> Result:
        """Deliver ``events`` to ``domain`` (and, first, whatever the outbox holds)."""
        return self._run(self._plan(domain, events, on_rejected))

    def flush(self) -> Result:
        """Deliver whatever the outbox holds."""
        return self._run(self._plan(None, (), None))

    def _run(self, plan: Plan) -> Result:
        step = next(plan)
        while not isinstance(step, Result):
            step = plan.send(self._do(step))
        return step

    def _do(self, op: Op) -> Outcome:
        if isinstance(op, Sleep):
            time.sleep(op.seconds)
            return None
        try:
            return Reply.of(self._http.post(op.path, content=op.body, headers=op.headers))
        except httpx.TransportError as exc:
            return exc

    def close(self) -> None:
        self._http.close()
        self._close_outbox()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Core):
    """The same client for asyncio. The outbox, if any, writes with blocking fsyncs."""

    _http: httpx.AsyncClient

    def _connect(self, options: dict[str, Any]) -> None:
        self._http = httpx.AsyncClient(**options)

    async def send(self, domain: str, events: Iterable[Event], *, on_rejected: Reporter | None = None) -> Result:
        """Deliver ``events`` to ``domain`` (and, first, whatever the outbox holds)."""
        return await self._run(self._plan(domain, events, on_rejected))

    async def flush(self) -> Result:
        """Deliver whatever the outbox holds."""
        return await self._run(self._plan(None, (), None))

    async def _run(self, plan: Plan) -> Result:
        step = next(plan)
        while not isinstance(step, Result):
            step = plan.send(await self._do(step))
        return step

    async def _do(self, op: Op) -> Outcome:
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        try:
            return Reply.of(await self._http.post(op.path, content=op.body, headers=op.headers))
        except httpx.TransportError as exc:
            return exc

    async def aclose(self) -> None:
        await self._http.aclose()
        self._close_outbox()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
