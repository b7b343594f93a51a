"""The archiver: JetStream messages appended to the JSONL files exactly once, in stream order.

Why it is built this way (the Betriebshandbuch tells the same story for operators):

* **Write-ahead record.** Before the lines of a batch touch a file, ``<data dir>/.leitstand/
  archive/batch.json`` records for each file of the batch its length before the batch, the
  length of what is added, and the last stream sequence added, and is synced (temp file,
  fsync, rename, fsync of the directory). Then the lines are appended through the journal
  (group commit, fdatasync), and only then the batch is acknowledged to NATS.
* **Recovery.** After any crash the record says, per file, whether the batch landed: length
  before + added = landed, so redelivered messages up to the recorded sequence are acked
  without writing them again; anything shorter is cut back to the length before, and the
  redelivered messages write it anew. A length outside that range means another writer.
* **One batch in flight.** After the sync the batch is acked (one cumulative ack) and purged
  from the stream, and only then the next one is fetched, so at most one batch is written
  but still in the stream; a failed ack, purge or append just runs the recovery again, which
  carries forward what landed.
* **Order.** One consumer, one batch at a time, files of one batch written in parallel: a
  file gets its messages in stream order.
* **No gap.** A delivery can be lost on the way (a connection or a node dies under it), and
  the consumer moves past it; the cumulative ack of what comes next would take it along. So
  each try knows the sequence the next message must have (the stream's first at its start:
  everything before was written and purged), and a message after a gap ends the try; the
  next one reads through a new consumer, from the stream's first message on.
* **One active archiver.** A lease in a JetStream key-value bucket with a TTL, renewed by
  compare-and-set; the holder stops writing a quarter TTL before its lease could expire,
  and each term, and each new try within it, reads through a new consumer (every other one
  is deleted), so a stalled former holder can neither write nor take messages, and a batch
  that failed comes back first. On one machine the data dir lock
  ``.leitstand/archive/lock`` stands behind the lease.
* **Rotation.** The archiver seals files by the same settings as the server, but only
  between batches, with the record emptied first (its lengths name the files before the
  seal); compression and retention run in the background as in the server. ``leitstand
  rotate`` refuses to seal while an archiver holds the data dir lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from leitstand.broker import jetstream
from leitstand.config import Config
from leitstand.intake import domains
from leitstand.storage import datadir, durable
from leitstand.storage.journal import Journal, JournalError
from leitstand.storage.rotation import EVERY, Housekeeper

log = logging.getLogger("leitstand.archive")

STATE_DIR = Path(datadir.STATE_DIR) / "archive"
_RECORD = "batch.json"
_LOCK = "lock"
_CONSUMER = "archiver"
_LEASE_KEY = "active"
_BATCH = 256
_RETRY = 1.0


class ArchiveError(Exception):
    """The data dir and the write-ahead record disagree; the message is one line for the operator."""


class LeaseLost(Exception):
    """This archiver may no longer write."""


class Gap(Exception):
    """A message was delivered but never arrived (a connection or a consumer leader was lost on the
    way): the consumer has moved past it, so only a new one brings it back."""


@dataclass(frozen=True)
class Entry:
    """One file of the batch in flight: sequences ``done`` and before are in its first ``offset`` bytes."""

    done: int
    seq: int
    offset: int
    length: int


class Record:
    """The write-ahead record of the batch in flight, and the recovery it allows."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.directory = data_dir / STATE_DIR
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def write(self, stream_created: str, entries: dict[str, Entry]) -> None:
        data = orjson.dumps({"stream_created": stream_created, "files": {k: asdict(v) for k, v in entries.items()}})
        durable.write_atomically(self.directory / _RECORD, data)

    def recover(self, stream_created: str) -> dict[str, int]:
        """Cut back what did not land; returns per file the last sequence already in it."""
        try:
            saved = orjson.loads((self.directory / _RECORD).read_bytes())
        except FileNotFoundError:
            return {}
        written: dict[str, int] = {}
        for name, fields in saved["files"].items():
            entry = Entry(**fields)
            if not datadir.is_journal_name(name):
                raise ArchiveError(f"archive record names {name!r}, which is no journal file: remove {STATE_DIR}")
            size = self.size(name)
            if size == entry.offset + entry.length:
                written[name] = entry.seq
            elif entry.offset <= size < entry.offset + entry.length:
                if size > entry.offset:  # else nothing landed: the file may not even exist yet
                    self._cut(name, entry.offset)
                    log.warning("unfinished batch cut back: file=%s bytes=%d", name, size - entry.offset)
                written[name] = entry.done
            else:
                raise ArchiveError(
                    f"{name} is {size} bytes but the archiver left it at {entry.offset} to "
                    f"{entry.offset + entry.length}: another process wrote or cut it; "
                    "stop it, run leitstand verify, then see the Betriebshandbuch (Archiv-Zustand)"
                )
        if saved["stream_created"] != stream_created:
            log.warning("stream was recreated since the last batch: sequences start anew")
            return {}
        return written

    def size(self, name: str) -> int:
        try:
            return os.stat(self.data_dir / name, follow_symlinks=False).st_size
        except FileNotFoundError:
            return 0

    def _cut(self, name: str, length: int) -> None:
        fd = os.open(self.data_dir / name, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def idle(data_dir: Path) -> Iterator[bool]:
    """Whether no archiver is active on ``data_dir``; while the caller holds it, none becomes active."""
    try:
        lock = os.open(data_dir / STATE_DIR / _LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        yield free
    finally:
        os.close(lock)


class Lease:
    """The right to write, held in a key-value bucket and renewed by compare-and-set."""

    def __init__(self, kv: KeyValue, ttl: float) -> None:
        self.kv = kv
        self.ttl = ttl
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}".encode()
        self.revision = 0
        self._valid_until = 0.0
        self._lost = False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until the lease is ours (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            sent = time.monotonic()
            try:
                self.revision = await self.kv.create(_LEASE_KEY, self.identity)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            except jetstream.NATS_ERRORS as exc:
                log.debug("lease: %s", exc)
            else:
                self._lost = False
                self._valid_until = sent + self.ttl * 0.75
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.ttl / 4)
        return False

    async def keep(self) -> None:
        """Renew until the lease is lost; a renewal that fails just lets the time run out."""
        while not self._lost:
            await asyncio.sleep(self.ttl / 4)
            sent = time.monotonic()
            try:
                self.revision = await self.kv.update(_LEASE_KEY, self.identity, last=self.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self._lost = True
            except jetstream.NATS_ERRORS as exc:
                log.debug("lease renewal: %s", exc)
            else:
                self._valid_until = sent + self.ttl * 0.75

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lease is surely still ours."""
        if self._lost or time.monotonic() >= self._valid_until:
            raise LeaseLost

    async def release(self) -> None:
        with contextlib.suppress(*jetstream.NATS_ERRORS):
            await self.kv.delete(_LEASE_KEY, last=self.revision)


class Archiver:
    def __init__(self, config: Config) -> None:
        settings = jetstream.Settings.of(config)
        assert settings is not None
        self.config = config
        self.settings = settings
        self.record = Record(config.data_dir)
        self.stop = asyncio.Event()
        self._next_rotation = 0.0
        # The stream sequence the next message must have (set by each attempt).
        self._next_seq = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        connecting = asyncio.create_task(jetstream.connect(self.settings, "leitstand-archiver"))
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            return
        nc = connecting.result()
        try:
            js = nc.jetstream(timeout=self.settings.timeout)
            kv = await self._setup(js)
            if kv is None:
                return
            lease = Lease(kv, float(self.config.archive_lease))
            log.info("archiver standing by: stream=%s", self.settings.stream)
            while await lease.acquire(self.stop):
                keeper = asyncio.create_task(lease.keep())
                try:
                    await self._term(js, lease)
                except LeaseLost:
                    log.warning("lease lost: stopped writing, standing by")
                finally:
                    keeper.cancel()
                    await lease.release()
        finally:
            await nc.close()
        log.info("archiver stopped: every acked message is on disk")

    async def _setup(self, js: JetStreamContext) -> KeyValue | None:
        """The stream and the lease bucket, once the broker answers (None if stopped before)."""
        bucket = KeyValueConfig(
            bucket=f"{self.settings.stream}_ARCHIVER",
            history=1,
            ttl=float(self.config.archive_lease),
            storage=StorageType.FILE,
            replicas=self.settings.replicas,
        )
        while not self.stop.is_set():
            try:
                await jetstream.ensure_stream(js, self.settings)
                return await js.create_key_value(bucket)
            except (jetstream.BrokerUnavailable, *jetstream.NATS_ERRORS) as exc:
                log.warning("broker unavailable, retrying: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), _RETRY)
        return None

    async def _term(self, js: JetStreamContext, lease: Lease) -> None:
        """One term as the active archiver: lock the data dir, recover, then copy until stopped."""
        lock = os.open(self.record.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            while True:
                lease.check()
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.2)
            log.info("archiver active: lease revision %d", lease.revision)
            await self._copy(js, lease)
        finally:
            os.close(lock)

    async def _copy(self, js: JetStreamContext, lease: Lease) -> None:
        """Recover and copy until stopped; whatever fails (the broker, the disk) is recovered from
        anew, never the end of the process: the messages wait in the stream."""
        while not self.stop.is_set():
            lease.check()
            try:
                await self._attempt(js, lease)
            except (Gap, JournalError, OSError, *jetstream.NATS_ERRORS) as exc:
                log.warning("batch not finished, recovering: %s", exc)
                await asyncio.sleep(_RETRY)

    async def _attempt(self, js: JetStreamContext, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        info = await js.stream_info(self.settings.stream)
        created = str(info.created)
        written = await loop.run_in_executor(None, self.record.recover, created)
        # Everything before the stream's first message was written and purged; a new consumer
        # starts there, and every message after it must come, one sequence after the other.
        assert info.state is not None
        self._next_seq = info.state.first_seq if info.state.messages else info.state.last_seq + 1
        journal = Journal(
            self.config.data_dir, fsync=self.config.fsync, file_mode=self.config.file_mode, syncfs=self.config.syncfs
        )
        # Segments are compressed and expired in the background; files are sealed between batches.
        housekeeper = Housekeeper(journal, self.config.rotation)
        sub = None
        try:
            await journal.open()
            housekeeper.start(rotate=False)
            sub = await self._subscribe(js, lease)
            while not self.stop.is_set():
                written = await self._batch(js, sub, journal, lease, created, written)
                if not written:
                    await loop.run_in_executor(None, self._rotate, housekeeper, created)
        finally:
            await housekeeper.stop()
            await journal.close()
            if sub is not None:
                with contextlib.suppress(*jetstream.NATS_ERRORS):
                    await sub.unsubscribe()

    async def _skip_to(self, js: JetStreamContext, seq: int) -> None:
        """Raise :class:`Gap` if a message before ``seq`` is still in the stream: acking ``seq`` would
        ack it too (the ack is cumulative). Messages that are gone (a limit of the operator's, or
        deleted by hand) are skipped."""
        first = await js.get_msg(self.settings.stream, self._next_seq, subject=jetstream.SUBJECTS, next=True)
        if first.seq is not None and first.seq < seq:
            raise Gap(f"message {first.seq} was delivered but did not arrive (next came {seq})")
        log.warning("messages %d to %d are gone from the stream: skipped", self._next_seq, seq - 1)

    def _rotate(self, housekeeper: Housekeeper, created: str) -> None:
        """Seal the files that are due, at most once a second, while no batch is in flight. The record
        names the lengths of the live files before a batch that has landed and been purged; it is
        emptied first, so that recovery never compares a new file with the lengths of a sealed one."""
        if not housekeeper.policy.rotates or time.monotonic() < self._next_rotation:
            return
        self._next_rotation = time.monotonic() + EVERY
        due = housekeeper.due()
        if due:
            self.record.write(created, {})
            housekeeper.rotate(due)

    async def _subscribe(self, js: JetStreamContext, lease: Lease) -> JetStreamContext.PullSubscription:
        """A new consumer, after deleting every other one: a former holder's, and this term's own from
        an attempt that failed. Messages that one delivered but nobody wrote would come back only
        after its ack wait, behind later ones, and the cumulative ack of those would cover them."""
        name = f"{_CONSUMER}-{lease.revision}"
        for info in await js.consumers_info(self.settings.stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self.settings.stream, info.name)
        lease.check()
        await js.add_consumer(
            self.settings.stream,
            ConsumerConfig(
                durable_name=name,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.ALL,
                ack_wait=60,
                max_ack_pending=_BATCH * 4,
                filter_subject=jetstream.SUBJECTS,
            ),
        )
        return await js.pull_subscribe_bind(name, self.settings.stream)

    async def _batch(
        self,
        js: JetStreamContext,
        sub: JetStreamContext.PullSubscription,
        journal: Journal,
        lease: Lease,
        created: str,
        written: dict[str, int],
    ) -> dict[str, int]:
        """Fetch, write ahead, append, sync, ack, purge; returns what is written but still in the stream."""
        try:
            messages = await sub.fetch(_BATCH, timeout=1)
        except TimeoutError:  # nats.errors.TimeoutError, or asyncio's own from inside fetch
            return written
        if not messages:
            return written
        lease.check()
        lines: dict[str, list[bytes]] = {}
        last: dict[str, int] = {}
        for message in messages:
            seq = message.metadata.sequence.stream
            if seq > self._next_seq:
                await self._skip_to(js, seq)
            if seq < self._next_seq:
                continue  # delivered again after it was handled
            self._next_seq = seq + 1
            domain = jetstream.domain_of(message.subject)
            if domains.normalize(domain) != domain or not message.data.endswith(b"\n"):
                log.error("message %d on %s is no batch of journal lines: acked, not written", seq, message.subject)
                continue
            name = domains.file_name(domain)
            if seq <= written.get(name, 0):
                continue
            lines.setdefault(name, []).append(message.data)
            last[name] = seq
        data = {name: b"".join(chunks) for name, chunks in lines.items()}
        entries = {}
        for name in written | data:  # each file stat'ed once
            done = written.get(name, 0)
            entries[name] = Entry(done, last.get(name, done), self.record.size(name), len(data.get(name, b"")))
        loop = asyncio.get_running_loop()
        if data:
            await loop.run_in_executor(None, self.record.write, created, entries)
            lease.check()
            results = await asyncio.gather(
                *(journal.append(name, chunk) for name, chunk in data.items()), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        await messages[-1].ack_sync(timeout=self.settings.timeout)
        await js.purge_stream(self.settings.stream, seq=messages[-1].metadata.sequence.stream + 1)
        return {}


def run(config: Config) -> None:
    """``leitstand archive``: runs until SIGTERM or Ctrl+C, then finishes the batch in flight."""
    asyncio.run(Archiver(config).run())
