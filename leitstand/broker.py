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
* **Dedup by JetStream.** ``Nats-Msg-Id`` is the client's idempotency key (scoped by
  domain) or a fresh id; a retry within the stream's duplicate window is stored once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

log = logging.getLogger("leitstand.broker")

SUBJECT_PREFIX = "leitstand.ingest."
SUBJECTS = SUBJECT_PREFIX + ">"
# Room for the HPUB headers (Nats-Msg-Id of up to ~400 bytes) within the server's max_payload.
_HEADER_ROOM = 1024


class BrokerError(Exception):
    """The broker cannot be used as configured; the message is one line an operator can act on."""


class BrokerUnavailable(Exception):
    """The broker did not confirm in time, or is not connected; nothing was acknowledged."""


class TooLargeForBroker(Exception):
    """The message exceeds the broker's max_payload."""


@dataclass(frozen=True)
class Settings:
    urls: tuple[str, ...]
    stream: str = "LEITSTAND"
    replicas: int = 1
    timeout: float = 5.0


def subject(domain: str) -> str:
    return SUBJECT_PREFIX + domain


def domain_of(subject_: str) -> str:
    return subject_.removeprefix(SUBJECT_PREFIX)


def msg_id(domain: str, key: bytes | None) -> str:
    """The client's key scoped by domain, so two domains never dedup each other's requests."""
    return f"{domain}:{key.decode('ascii')}" if key is not None else "leitstand:" + secrets.token_hex(16)


async def connect(settings: Settings, name: str) -> Client:
    """A connection that reconnects for ever and never queues a publish while it is down.

    Returns only once a server answered: the first connect is retried for ever as well.
    """
    return await nats.connect(
        servers=list(settings.urls),
        name=name,
        connect_timeout=settings.timeout,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        pending_size=0,
        error_cb=_quiet,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
    )


async def _quiet(exc: Exception) -> None:
    log.debug("nats: %s", exc)


async def _disconnected() -> None:
    log.warning("broker disconnected; reconnecting")


async def _reconnected() -> None:
    log.info("broker reconnected")


def stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=settings.stream,
        subjects=[SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
    )


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the stream, or check that the one there is the one leitstand needs.

    Raises :class:`BrokerError` for a stream that differs, :class:`BrokerUnavailable` if
    JetStream does not answer.
    """
    wanted = stream_config(settings)
    try:
        try:
            info = await js.stream_info(settings.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(wanted)
            log.info("stream created: stream=%s replicas=%d", settings.stream, settings.replicas)
            return
    except nats.js.errors.BadRequestError as exc:
        raise BrokerError(f"stream {settings.stream} cannot be created: {exc.description}") from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise BrokerUnavailable(str(exc) or type(exc).__name__) from None
    have = info.config
    problems = [
        f"{what} is {got}, needs {need}"
        for what, got, need in (
            ("subjects", have.subjects, wanted.subjects),
            ("retention", _value(have.retention), _value(wanted.retention)),
            ("storage", _value(have.storage), _value(wanted.storage)),
            ("replicas", have.num_replicas, wanted.num_replicas),
        )
        if got != need
    ]
    if problems:
        raise BrokerError(
            f"stream {settings.stream} exists but {'; '.join(problems)}: "
            f"set LEITSTAND_NATS_STREAM to another name or LEITSTAND_NATS_REPLICAS to match, "
            f"or change the stream with the nats CLI"
        )


def _value(enum_or_value: Any) -> Any:
    return getattr(enum_or_value, "value", enum_or_value)


class Publisher:
    """The front end's side: one connection per worker process, the stream made sure of once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._stream_ok = False
        self._ensuring = asyncio.Lock()
        self._connecting: asyncio.Task[None] | None = None

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
        nc = await connect(self.settings, "leitstand-frontend")
        self._js = nc.jetstream(timeout=self.settings.timeout)
        self._nc = nc
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

    async def _ensure(self) -> None:
        assert self._js is not None
        async with self._ensuring:
            if not self._stream_ok:
                await ensure_stream(self._js, self.settings)
                self._stream_ok = True

    async def publish(self, domain: str, lines: bytes, key: bytes | None) -> None:
        """Return once JetStream has stored ``lines`` (or had them already, for a retried key)."""
        nc, js = self._nc, self._js
        if nc is None or js is None or not nc.is_connected:
            raise BrokerUnavailable("not connected")
        if len(lines) + _HEADER_ROOM > nc.max_payload:
            raise TooLargeForBroker
        try:
            if not self._stream_ok:
                await self._ensure()
            await js.publish(
                subject(domain),
                lines,
                timeout=self.settings.timeout,
                stream=self.settings.stream,
                headers={"Nats-Msg-Id": msg_id(domain, key)},
            )
        except BrokerError as exc:
            log.error("%s", exc)
            raise BrokerUnavailable(str(exc)) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from None
