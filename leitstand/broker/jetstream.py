"""The broker: NATS JetStream between stateless front ends and the archiver.

Why it is built this way:

* **One message per request.** The payload is the request's journal lines, exactly as the
  journal would store them, so a batch stays all-or-nothing and the archiver appends bytes
  it never has to parse.
* **The stream is the queue.** A message lives in the stream until the archiver has synced
  its lines to the file, acked and purged it; the JSONL files are the archive. (A work-queue
  stream would delete on ack by itself, but it wants one ack per message, and a lost one
  would bring a message back after later ones; one cumulative ack and a purge cannot.)
* **No buffering while disconnected.** The client library would queue a publish during a
  reconnect and send it later; a request answered 503 must not be stored behind the
  client's back, so a publish without a connection fails at once.
* **Idempotency keys as in direct mode.** A keyed request first claims its key in a KV
  bucket (``<stream>_KEYS``, TTL = the idempotency window) with an atomic create that holds
  the hash of its lines: a key held by other lines is ``409 conflict`` and publishes nothing.
  A key claimed now, or held by the same lines, is published with ``Nats-Msg-Id`` =
  domain, key and lines hash, and JetStream's duplicate window (the idempotency window as
  well) stores it once. Publishing after a claim for the same lines is what makes a request
  that died between claim and publish safe to retry: the retry stores it. The lines hash in
  the id keeps a key claimed anew after its KV entry expired from being swallowed as a
  duplicate of other lines the stream still remembers. Unkeyed requests carry no id: they
  cost neither a KV round trip nor a place in the stream's duplicate table.
* **Failover inside the request.** A request is tried again, within its deadline
  (``LEITSTAND_NATS_TIMEOUT``), whenever nothing can have been stored: while the connection
  is down (it waits for the reconnect), and when no stream answered (a stream without a
  leader, during an election). A keyed request is also tried again when its ack is late or
  its connection dropped under it: its ``Nats-Msg-Id`` makes a second copy a duplicate that
  JetStream drops. An unkeyed one cannot be: a message the broker stored but could not
  acknowledge would be stored twice, so there the answer is 503 (at once, not after the
  whole timeout) and the client decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from leitstand.config import Config
from leitstand.storage.journal import Appended
from leitstand.storage.keylog import key_hash, lines_hash

log = logging.getLogger("leitstand.broker")

SUBJECT_PREFIX = "leitstand.ingest."
SUBJECTS = SUBJECT_PREFIX + ">"
# Room for the HPUB headers (Nats-Msg-Id of up to ~420 bytes) within the server's max_payload.
_HEADER_ROOM = 1024
# JetStream's own duplicate window for a KV bucket's stream, when the TTL is longer.
_KV_DUPLICATE_WINDOW = 120.0
# What the client library raises when the broker does not answer, answers too late, or answers
# with no body where it expects JSON (a reply seen while a cluster loses a node, nats-io/nats.py#639).
NATS_ERRORS = (nats.errors.Error, TimeoutError, json.JSONDecodeError)
# What says that nothing was stored: no stream listened (no leader), JetStream was not
# available, or the message was never sent (no connection).
_NOT_STORED = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.OutboundBufferLimitError,
)
# How long one try of a keyed request waits for its acks before it is sent again.
_TRY = 1.0
# After the connection dropped under an unkeyed publish, how long its ack may still come: a
# message the client library had not sent yet goes out on the new connection.
_LATE_ACK = 0.5
# Pauses between tries, doubling.
_PAUSE, _MAX_PAUSE = 0.05, 0.4


class BrokerError(Exception):
    """The broker cannot be used as configured; the message is one line an operator can act on."""


class BrokerUnavailable(Exception):
    """The broker did not confirm in time, or is not connected; nothing was acknowledged."""


def _unavailable(exc: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(str(exc) or type(exc).__name__)


class TooLargeForBroker(Exception):
    """The message exceeds the broker's max_payload."""


@dataclass(frozen=True)
class Settings:
    urls: tuple[str, ...]
    stream: str = "LEITSTAND"
    replicas: int = 1
    timeout: float = 5.0
    # LEITSTAND_IDEMPOTENCY_WINDOW: the stream's duplicate window and the key bucket's TTL.
    window: float = 86400.0

    @property
    def keys_bucket(self) -> str:
        return f"{self.stream}_KEYS"

    @classmethod
    def of(cls, config: Config) -> Settings | None:
        """The broker settings in broker mode, None in direct mode."""
        if not config.nats_urls:
            return None
        return cls(
            config.nats_urls,
            config.nats_stream,
            config.nats_replicas,
            float(config.nats_timeout),
            float(config.idempotency_window),
        )


def subject(domain: str) -> str:
    return SUBJECT_PREFIX + domain


def domain_of(subject_: str) -> str:
    return subject_.removeprefix(SUBJECT_PREFIX)


def msg_id(domain: str, key: bytes, digest: bytes) -> str:
    """The client's key scoped by domain and lines: only the same lines under the same key are one message."""
    return f"{domain}:{key.decode('ascii')}:{digest.hex()}"


async def connect(
    settings: Settings, name: str, on_down: Callable[[], None] = lambda: None, on_up: Callable[[], None] = lambda: None
) -> Client:
    """A connection that reconnects for ever and never queues a publish while it is down.

    Returns only once a server answered: the first connect is retried for ever as well.
    ``on_down`` and ``on_up`` are told when it drops and when it is back.
    """

    async def disconnected() -> None:
        log.warning("broker disconnected; reconnecting")
        on_down()

    async def reconnected() -> None:
        log.info("broker reconnected")
        on_up()

    return await nats.connect(
        servers=list(settings.urls),
        name=name,
        connect_timeout=settings.timeout,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        pending_size=0,
        error_cb=_quiet,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
    )


async def _quiet(exc: Exception) -> None:
    log.debug("nats: %s", exc)


def stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=settings.stream,
        subjects=[SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        duplicate_window=settings.window,
    )


def keys_config(settings: Settings) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=settings.keys_bucket,
        history=1,
        ttl=settings.window,
        storage=StorageType.FILE,
        replicas=settings.replicas,
    )


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the stream, or check that the one there is the one leitstand needs.

    A duplicate window that differs (an older leitstand, another LEITSTAND_IDEMPOTENCY_WINDOW)
    is updated, not refused: it is a setting of leitstand's, not a choice of the operator's.
    Raises :class:`BrokerError` for a stream that differs otherwise, :class:`BrokerUnavailable`
    if JetStream does not answer.
    """
    wanted = stream_config(settings)
    await _ensure(
        js,
        settings,
        settings.stream,
        lambda: js.add_stream(wanted),
        fixed=(
            ("subjects", "subjects", wanted.subjects),
            ("retention", "retention", _value(wanted.retention)),
            ("storage", "storage", _value(wanted.storage)),
            ("replicas", "num_replicas", wanted.num_replicas),
        ),
        tunable={"duplicate_window": settings.window},
    )


async def ensure_keys(js: JetStreamContext, settings: Settings) -> KeyValue:
    """Create the idempotency key bucket, or check it as :func:`ensure_stream` checks the stream."""
    wanted = keys_config(settings)
    await _ensure(
        js,
        settings,
        f"KV_{wanted.bucket}",
        lambda: js.create_key_value(wanted),
        fixed=(
            ("history", "max_msgs_per_subject", wanted.history),
            ("storage", "storage", _value(wanted.storage)),
            ("replicas", "num_replicas", wanted.replicas),
        ),
        tunable={"max_age": settings.window, "duplicate_window": min(settings.window, _KV_DUPLICATE_WINDOW)},
    )
    try:
        return await js.key_value(wanted.bucket)
    except NATS_ERRORS as exc:
        raise _unavailable(exc) from None


async def _ensure(
    js: JetStreamContext,
    settings: Settings,
    name: str,
    create: Callable[[], Awaitable[object]],
    fixed: tuple[tuple[str, str, Any], ...],
    tunable: dict[str, float],
) -> None:
    """Create stream ``name``; if it exists, refuse it unless ``fixed`` fields match, update ``tunable`` ones."""
    try:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await create()
            log.info("stream created: stream=%s replicas=%d", name, settings.replicas)
            return
        have = info.config
        problems = [
            f"{what} is {got}, needs {need}"
            for what, field, need in fixed
            if (got := _value(getattr(have, field))) != need
        ]
        if problems:
            raise BrokerError(
                f"stream {name} exists but {'; '.join(problems)}: "
                f"set LEITSTAND_NATS_STREAM to another name or LEITSTAND_NATS_REPLICAS to match, "
                f"or change the stream with the nats CLI"
            )
        changed: dict[str, Any] = {field: need for field, need in tunable.items() if getattr(have, field) != need}
        if changed:
            await js.update_stream(dataclasses.replace(have, **changed))
            log.warning(
                "stream %s updated to LEITSTAND_IDEMPOTENCY_WINDOW: %s",
                name,
                ", ".join(f"{field} {getattr(have, field)}s -> {need}s" for field, need in changed.items()),
            )
    except nats.js.errors.BadRequestError as exc:
        raise BrokerError(f"stream {name} cannot be created or updated: {exc.description}") from None
    except NATS_ERRORS as exc:
        raise _unavailable(exc) from None


def _value(enum_or_value: Any) -> Any:
    return getattr(enum_or_value, "value", enum_or_value)


class Publisher:
    """The front end's side: one connection per worker process, the stream and key bucket made sure of once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._keys: KeyValue | None = None
        self._ensuring = asyncio.Lock()
        self._connecting: asyncio.Task[None] | None = None
        # Set while connected; ``_dropped`` is resolved when the current connection drops.
        self._up = asyncio.Event()
        self._dropped: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Connect and make sure of the stream; raises :class:`BrokerError` only for a wrong stream.

        A broker that cannot be reached is no reason not to start: requests get 503 until it is,
        while the connection is tried in the background.
        """
        self._connecting = asyncio.create_task(self._connect())
        done, _ = await asyncio.wait({self._connecting}, timeout=self.settings.timeout)
        if done:
            self._connecting.result()
        else:
            log.warning("broker unreachable at start, answering 503 until it is back")

    async def _connect(self) -> None:
        nc = await connect(self.settings, "leitstand-frontend", self._down, self._back)
        self._js = nc.jetstream(timeout=self.settings.timeout)
        self._nc = nc
        self._back()
        try:
            await self._ensure()
        except BrokerUnavailable as exc:
            log.warning("broker unavailable at start, answering 503 until it is back: %s", exc)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._nc is not None:
            await self._nc.close()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def _down(self) -> None:
        self._up.clear()
        if self._dropped is not None and not self._dropped.done():
            self._dropped.set_result(None)

    def _back(self) -> None:
        self._dropped = asyncio.get_running_loop().create_future()
        self._up.set()

    async def _ensure(self) -> KeyValue:
        assert self._js is not None
        async with self._ensuring:
            if self._keys is None:
                await ensure_stream(self._js, self.settings)
                self._keys = await ensure_keys(self._js, self.settings)
            return self._keys

    async def publish(self, domain: str, lines: bytes, key: bytes | None, same: bytes | None = None) -> Appended:
        """Return once JetStream has stored ``lines``, or had them already under ``key``, or ``key`` conflicts.

        ``same``: what a retry under ``key`` must repeat to be the same request (default: ``lines``).
        Tried again within the deadline as long as that cannot store them twice (see the module).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout
        pause = _PAUSE
        while True:
            try:
                return await self._try(domain, lines, key, lines if same is None else same, deadline)
            except _Again as exc:
                if loop.time() + pause >= deadline:
                    raise BrokerUnavailable(str(exc)) from None
            await asyncio.sleep(pause)
            pause = min(2 * pause, _MAX_PAUSE)

    async def _try(self, domain: str, lines: bytes, key: bytes | None, same: bytes, deadline: float) -> Appended:
        """One try: raises :class:`_Again` if another one may follow, :class:`BrokerUnavailable` if not."""
        nc = await self._connection(deadline)
        if len(lines) + _HEADER_ROOM > nc.max_payload:
            raise TooLargeForBroker
        loop = asyncio.get_running_loop()
        dropped = self._dropped
        assert dropped is not None
        remaining = deadline - loop.time()
        sending = asyncio.ensure_future(self._send(domain, lines, key, same, remaining))
        waiting: set[asyncio.Future[Any]] = {sending, dropped}
        try:
            await asyncio.wait(waiting, timeout=remaining if key is None else min(remaining, _TRY),
                               return_when=asyncio.FIRST_COMPLETED)
            if not sending.done() and dropped.done() and key is None:
                with contextlib.suppress(BrokerUnavailable):
                    await self._connection(deadline)
                await asyncio.wait({sending}, timeout=min(_LATE_ACK, max(0.0, deadline - loop.time())))
        finally:
            if not sending.done():
                sending.cancel()
                await asyncio.wait({sending})
        try:
            return sending.result()
        except asyncio.CancelledError:
            if key is not None:
                raise _Again("no ack in time") from None
            raise BrokerUnavailable("no ack: the connection dropped" if dropped.done() else "no ack in time") from None
        except (*_NOT_STORED, BrokerUnavailable) as exc:
            raise _Again(str(exc) or type(exc).__name__) from None
        except BrokerError as exc:
            log.error("%s", exc)
            raise BrokerUnavailable(str(exc)) from None
        except NATS_ERRORS as exc:
            if key is not None:
                raise _Again(str(exc) or type(exc).__name__) from None
            raise _unavailable(exc) from None

    async def _connection(self, deadline: float) -> Client:
        """The connection, once it is up; :class:`BrokerUnavailable` if it is not by ``deadline``."""
        loop = asyncio.get_running_loop()
        while self._nc is None or self._js is None or not self._nc.is_connected:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerUnavailable("not connected")
            try:
                await asyncio.wait_for(self._up.wait(), remaining)
            except TimeoutError:
                raise BrokerUnavailable("not connected") from None
            await asyncio.sleep(0.01 if self._nc is None or not self._nc.is_connected else 0)
        return self._nc

    async def _send(self, domain: str, lines: bytes, key: bytes | None, same: bytes, timeout: float) -> Appended:
        assert self._js is not None
        keys = self._keys or await self._ensure()
        headers = None
        if key is not None:
            digest = lines_hash(same)
            if not await _claim(keys, key_hash(domain, key).hex(), digest):
                return Appended.CONFLICT
            headers = {"Nats-Msg-Id": msg_id(domain, key, digest)}
        ack = await self._js.publish(
            subject(domain), lines, timeout=timeout, stream=self.settings.stream, headers=headers
        )
        return Appended.DUPLICATE if ack.duplicate else Appended.STORED


class _Again(Exception):
    """A try that stored nothing, or that may be repeated without storing twice."""


async def _claim(keys: KeyValue, name: str, digest: bytes) -> bool:
    """Whether the key ``name`` may be published with lines of ``digest``: claimed now, or held by the same lines."""
    while True:
        try:
            await keys.create(name, digest)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        try:
            return (await keys.get(name)).value == digest
        except nats.js.errors.KeyNotFoundError:
            pass  # expired between the two: claim it again
