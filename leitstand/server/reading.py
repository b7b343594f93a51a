"""The read API: ``GET /domains``, ``GET /events/{domain}`` and the live stream ``/events/{domain}/stream``.

It only translates between HTTP and :mod:`leitstand.storage.reader`: parameters are checked
here (a bad one is ``400`` with a one-line reason), every file is read on a small thread pool
of its own, so that reads never hold up the event loop that acknowledges ingests, and lines
go out as stored, joined into JSON or Server-Sent Events without being parsed again (a stream
deflated, once per page for all its readers that accept it: :mod:`leitstand.server.deflate`).

A stream follows the file on disk, not a queue in this process, so it sees what every worker
appended: one ``stat`` per followed file and :data:`POLL` seconds tells its followers that it
grew, and each reads on from its own cursor, one bounded page at a time. A slow reader only
falls behind on disk. Streams end when the process is told to stop (``stopping``), so that
uvicorn, which waits for open responses, can exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from leitstand.access.auth import Grant
from leitstand.intake import domains
from leitstand.intake.events import rfc3339
from leitstand.server.deflate import Deflate, Identity, Piece, accepts_deflate, piece
from leitstand.storage import datadir, reader, segments
from leitstand.storage.reader import Cursor, JournalFile, ReadError
from leitstand.telemetry.metrics import Metrics

# How often a followed file is looked at; a new event reaches its streams within this, SPREAD
# and a read.
POLL = 0.25
# Every page costs each stream a turn of the loop, a send and a wake-up of its reader, so a busy
# file goes out in few, large pages: at most FOLLOW_EVENTS, and FOLLOW_BYTES before compression
# (deflate sends about a ninth; 256 KiB is about 1,000 events of 250 bytes). The streams of one
# change are woken in turns spread over SPREAD seconds (reader.Watch), so that their sends do not
# hold up ingest in one burst.
FOLLOW_EVENTS = 8000
FOLLOW_BYTES = {False: 256 << 10, True: 2 << 20}
SPREAD = 0.1
# Pages kept per followed file, filter and encoding: spread out, the streams of one change are at
# several pages of it at once, and each page is read for all of them.
SHARED_PAGES = 8
HEARTBEAT = 15.0
RETRY_MS = 2000
DEFAULT_LIMIT = 100
MAX_Q = 1000
READ_THREADS = 4
_JSON = "application/json"
_NO_STORE = {"cache-control": "no-store"}
_T = TypeVar("_T")


class ReadRoutes:
    """The read routes; ``authenticate`` is the app's, so that a wrong token counts against the address."""

    def __init__(
        self, data_dir: Path, metrics: Metrics, authenticate: Callable[[Request], Grant], stopping: asyncio.Event
    ) -> None:
        self.data_dir = data_dir
        self.metrics = metrics
        self.authenticate = authenticate
        self.stopping = stopping
        self.watch = reader.Watch(data_dir, POLL, SPREAD, HEARTBEAT)
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="reader")
        # Lines per minute that is over, per file (name, inode): minute -> count.
        self._minutes: dict[tuple[str, int], dict[int, int]] = {}
        # The pages last read per followed file, filter and encoding, by cursor: streams at the same
        # cursor (all that keep up) share one read, one framing and one compression, and only send it each.
        self._pages: dict[_Key, dict[Cursor, _Shared]] = {}
        self._followers: Counter[_Key] = Counter()
        self.routes = [
            Route("/domains", self.domains, methods=["GET"]),
            Route("/events/{domain}", self.events, methods=["GET"]),
            Route("/events/{domain}/stream", self.stream, methods=["GET"]),
        ]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, call: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    # -- GET /domains ------------------------------------------------------------------

    async def domains(self, request: Request) -> Response:
        grant = self._reader(request)
        _params(request, ())
        found = await self._run(self._list, grant)
        return Response(orjson.dumps({"domains": found}), media_type=_JSON, headers=_NO_STORE)

    def _list(self, grant: Grant) -> list[dict[str, object]]:
        """Every domain with a live file or segments; bytes count both, the activity the live file's."""
        now = datetime.datetime.now(datetime.UTC).timestamp()
        found = []
        seen = set()
        sealed: dict[str, list[os.stat_result]] = {}
        for segment in datadir.sealed(self.data_dir):
            with contextlib.suppress(FileNotFoundError):
                sealed.setdefault(segment.base, []).append(os.stat(self.data_dir / segment.name))
        names = {segments.base_of(name): name for name in datadir.journal_names(self.data_dir)}
        # A domain sealed a moment ago has no live file until its next event.
        names.update({base: base for base in sealed.keys() - names.keys() if not segments.is_shortened_base(base)})
        for base, name in sorted(names.items(), key=lambda item: item[1]):
            stats = sealed.get(base, [])
            size = sum(st.st_size for st in stats)
            modified = max((st.st_mtime for st in stats), default=0.0)
            per_minute, recent = [0] * 60, 0
            try:
                with JournalFile(self.data_dir, name) as journal:
                    domain = _domain_of(journal)
                    if domain is None or not grant.may_read(domain):
                        continue
                    length = journal.length()
                    known = self._minutes.setdefault((name, journal.inode), {})
                    per_minute, recent = journal.activity(length.whole, now, known)
                    seen.add((name, journal.inode))
                    size += length.size
                    modified = os.fstat(journal.fd).st_mtime
            except FileNotFoundError:
                domain = name.removesuffix(domains.SUFFIX)
                if not stats or not grant.may_read(domain):
                    continue
            found.append(
                {
                    "domain": domain,
                    "bytes": size,
                    "modified": rfc3339(modified),
                    "events_per_minute": recent,
                    "per_minute": per_minute,
                }
            )
        if grant.all_domains:  # only a listing of every domain knows which files are gone
            for gone in set(self._minutes) - seen:
                self._minutes.pop(gone, None)
        return found

    # -- GET /events/{domain} ----------------------------------------------------------

    async def events(self, request: Request) -> Response:
        domain = self._readable(request)
        params = _params(request, ("after", "limit", "tail", "q", "since"))
        q, since = _q(params), _since(params)
        if "tail" in params:
            if "after" in params or "limit" in params:
                raise HTTPException(400, "tail goes without after and limit")
            page = await self._read(reader.tail, domain, _count(params, "tail", None), q, since)
        else:
            after = _cursor(params.get("after"))
            page = await self._read(reader.page, domain, after, _count(params, "limit", DEFAULT_LIMIT), q, since)
        body = b'{"events":[' + b",".join(page.lines) + b'],"next":"' + str(page.next).encode() + b'"}'
        return Response(body, media_type=_JSON, headers=_NO_STORE)

    async def _read(self, call: Callable[..., reader.Page], domain: str, *args: Any) -> reader.Page:
        try:
            return await self._run(call, self.data_dir, domains.file_name(domain), *args)
        except FileNotFoundError:
            raise HTTPException(404, "unknown domain") from None
        except ReadError as exc:
            raise HTTPException(400, str(exc)) from None

    # -- GET /events/{domain}/stream ---------------------------------------------------

    async def stream(self, request: Request) -> Response:
        domain = self._readable(request)
        params = _params(request, ("after", "q", "since"))
        q, since = _q(params), _since(params)
        resume = request.headers.get("last-event-id") or params.get("after")
        after = _cursor(resume)
        name = domains.file_name(domain)
        try:
            start = await self._run(reader.start, self.data_dir, name, after, since)
        except FileNotFoundError:
            raise HTTPException(404, "unknown domain") from None
        except ReadError as exc:
            raise HTTPException(400, str(exc)) from None
        deflate = accepts_deflate(request.headers.get("accept-encoding", ""))
        return _EventStream(self, _Key(name, q, deflate), start)

    # -- access --------------------------------------------------------------------------

    async def follow(self, key: _Key, cursor: Cursor, changes: int, until: Cursor | None) -> _Framed:
        """The events after ``cursor`` up to ``until`` (where the file ended at its last change), read
        once for every stream at that cursor that asks after the same number of ``changes`` of the
        file (or fewer)."""
        pages = self._pages.setdefault(key, {})
        shared = pages.get(cursor)
        if shared is None or _stale(shared, changes):
            reading = self._run(_follow, self.data_dir, key, cursor, until)
            future: asyncio.Future[_Framed] = asyncio.ensure_future(reading)
            pages.pop(cursor, None)
            shared = pages[cursor] = _Shared(changes, future)
            if len(pages) > SHARED_PAGES:
                del pages[next(iter(pages))]  # the oldest
        if shared.future.done():
            return shared.future.result()
        return await asyncio.shield(shared.future)

    @contextlib.contextmanager
    def following(self, key: _Key) -> Iterator[None]:
        """One stream more of a file, filter and encoding; once the last is gone, so is their page."""
        self._followers[key] += 1
        try:
            yield
        finally:
            self._followers[key] -= 1
            if not self._followers[key]:
                del self._followers[key]
                self._pages.pop(key, None)

    def _reader(self, request: Request) -> Grant:
        grant = self.authenticate(request)
        if not grant.reads:
            raise HTTPException(403, "forbidden")
        return grant

    def _readable(self, request: Request) -> str:
        """The domain of the path, once the token may read it: 403 outside its scope, known or not."""
        grant = self._reader(request)
        domain = domains.normalize(request.path_params["domain"])
        if domain is None:
            raise HTTPException(400, "invalid domain")
        if not grant.may_read(domain):
            raise HTTPException(403, "forbidden")
        return domain


class _Key(NamedTuple):
    """What streams share a page by."""

    name: str  # the journal file's
    q: bytes | None
    deflate: bool


class _Shared(NamedTuple):
    """A page read for the streams at a cursor, begun once the file had had ``changes``."""

    changes: int
    future: asyncio.Future[_Framed]


# The next events after a cursor, framed as SSE and encoded, the cursor after them, and whether
# more may follow at once (a full page); None: the file is gone.
_Framed = tuple[Piece, Cursor, bool] | None
# The comments a stream sends (first, and when quiet), as they are and deflated: (first, heartbeat).
_COMMENTS = {
    deflate: (piece(b": leitstand\nretry: %d\n\n" % RETRY_MS, deflate), piece(b": heartbeat\n\n", deflate))
    for deflate in (False, True)
}


def _follow(directory: Path, key: _Key, cursor: Cursor, until: Cursor | None) -> _Framed:
    """The next page after ``cursor``, across seals; None once its file is gone (removed by retention,
    or replaced)."""
    try:
        page = reader.page(
            directory, key.name, cursor, FOLLOW_EVENTS, key.q, size=FOLLOW_BYTES[key.deflate], until=until
        )
    except (FileNotFoundError, ReadError):
        return None
    return piece(frame(page), key.deflate), page.next, not page.done or len(page.lines) >= FOLLOW_EVENTS


def frame(page: reader.Page) -> bytes:
    """The page's events as Server-Sent Events: ``id:`` the cursor after each, ``data:`` its line."""
    return b"".join(map(b"id: %s\ndata: %s\n\n".__mod__, zip(page.ids(), page.lines)))


class _EventStream(Response):
    """Server-Sent Events from a cursor on: ``id:`` the cursor after the event, ``data:`` its line."""

    media_type = "text/event-stream"

    def __init__(self, routes: ReadRoutes, key: _Key, start: Cursor) -> None:
        self.routes = routes
        self.key = key
        self.cursor = start
        self.coding = Deflate() if key.deflate else Identity()
        self.status_code = 200
        self.background = None
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "vary": "accept-encoding"}
        if self.coding.encoding is not None:
            headers["content-encoding"] = self.coding.encoding
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = self.routes
        task = asyncio.current_task()
        assert task is not None
        gone: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(receive))
        stopping: asyncio.Future[Any] = asyncio.ensure_future(routes.stopping.wait())
        streaming = True

        def cut(_: asyncio.Future[Any]) -> None:
            # A client that left, or a stop, ends the stream wherever it waits (a send to a stalled
            # client, the next change): one callback each instead of a race around every await.
            if streaming:
                task.cancel()

        gone.add_done_callback(cut)
        stopping.add_done_callback(cut)
        routes.metrics.streams(1)
        try:
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                # Comment first: the answer (and nginx's) starts at once, before any event.
                await send(self._body(_COMMENTS[self.key.deflate][0]))
                with routes.following(self.key):
                    async with routes.watch.watching(self.key.name) as watched:
                        await self._events(send, watched, watched.followers, (gone, stopping))
            except asyncio.CancelledError:
                if not (gone.done() or stopping.done()):
                    raise
                task.uncancel()
            streaming = False
            if not gone.done():
                # Also at a stop: a client that stalls this last write is cut off after a second.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await send({"type": "http.response.body", "body": self.coding.end(), "more_body": False})
        finally:
            streaming = False
            routes.metrics.streams(-1)
            gone.cancel()
            stopping.cancel()

    async def _events(
        self, send: Send, watched: reader.Watched, place: int, stops: tuple[asyncio.Future[Any], ...]
    ) -> None:
        beats = watched.beats
        while not any(stop.done() for stop in stops):
            # This stream's turn after the next change, and how many came before it: a read begun
            # now sees them all, up to where the file ended at the last of them (what came after is
            # the next change's).
            woken, changes = watched.turn(place), watched.changes
            framed = await self.routes.follow(self.key, self.cursor, changes, watched.until)
            if framed is None:
                return  # replaced or removed: the client comes back and is told why
            chunk, after, more = framed
            self.cursor = after
            if chunk.plain:
                await send(self._body(chunk))
                if more:
                    continue
            # Up to date: wait for the turn (set already if the file grew since the read), so that
            # the streams of a busy file read together, a few times a second, not each on its own
            # after every write. A beat of the watch is a heartbeat.
            while True:
                await woken.wait()
                if watched.beats != beats:
                    beats = watched.beats
                    await send(self._body(_COMMENTS[self.key.deflate][1]))
                if watched.changes != changes:
                    break
                woken = watched.turn(place)

    def _body(self, p: Piece) -> dict[str, Any]:
        return {"type": "http.response.body", "body": self.coding.send(p), "more_body": True}


def _stale(shared: _Shared, changes: int) -> bool:
    """Whether a shared read is no answer for a stream that has seen ``changes`` of the file: it
    failed, or it read up to the end before the last of those changes."""
    future = shared.future
    if not future.done():
        return False
    if future.cancelled() or future.exception() is not None:
        return True
    framed = future.result()
    return framed is not None and not framed[2] and shared.changes < changes


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _domain_of(journal: JournalFile) -> str | None:
    """The domain a journal file belongs to: its name, or for a shortened name, its last line's."""
    domain = journal.name.removesuffix(domains.SUFFIX)
    if domains.file_name(domain) == journal.name:
        return domain
    page = journal.backward(journal.end(), 1)
    with contextlib.suppress(orjson.JSONDecodeError, IndexError, TypeError):
        named = orjson.loads(page.lines[0]).get("domain")
        if isinstance(named, str) and domains.file_name(named) == journal.name:
            return named
    return None


# -- parameters ------------------------------------------------------------------------


def _params(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in allowed:
            raise HTTPException(400, "unknown parameter" + (f": use {', '.join(allowed)}" if allowed else ""))
        if key in params:
            raise HTTPException(400, f"{key} given twice")
        params[key] = value
    return params


def _count(params: dict[str, str], key: str, default: int | None) -> int:
    raw = params.get(key)
    if raw is None and default is not None:
        return default
    if raw is None or not raw.isdigit() or not 1 <= int(raw) <= reader.MAX_LIMIT:
        raise HTTPException(400, f"{key} must be a number from 1 to {reader.MAX_LIMIT}")
    return int(raw)


def _cursor(raw: str | None) -> Cursor | None:
    if raw is None:
        return None
    try:
        return Cursor.parse(raw)
    except ReadError as exc:
        raise HTTPException(400, str(exc)) from None


def _q(params: dict[str, str]) -> bytes | None:
    raw = params.get("q")
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_Q:
        raise HTTPException(400, f"q must be 1 to {MAX_Q} characters")
    return raw.encode()


def _since(params: dict[str, str]) -> float | None:
    raw = params.get("since")
    if raw is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(raw)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or "T" not in raw.upper():
        raise HTTPException(400, "since must be an RFC 3339 time, e.g. 2026-12-03T14:00:00Z")
    return when.timestamp()
