"""The read API on the real server: access, pages, tail, q, since, the SSE stream, and the stop."""

from __future__ import annotations

import contextlib
import datetime
import queue
import random
import signal
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import CLEAN_EXIT, TOKEN, Load, Server
from telemetry.test_metrics import scrape, value

READ = {"X-Auth": TOKEN}


def get(server: Server, path: str, token: str = TOKEN, **params: Any) -> httpx.Response:
    return httpx.get(server.url + path, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    return [event.get("n") for event in response.json()["events"]]


class Stream:
    """An SSE client on its own thread; its events (id, data) arrive on ``events``.

    httpx asks for deflate by default, as browsers and ``curl --compressed`` do; the answer is
    decoded here from the raw bytes, so that ``complete`` can tell whether it ended as a whole
    zlib stream (its trailer checked) or was cut off."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, **params: str) -> None:
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.text = b""
        self.complete = False
        self.status = 0
        self.headers: httpx.Headers | None = None
        self.ended = threading.Event()
        self.opened = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, headers or READ, params), daemon=True)
        self._thread.start()
        assert self.opened.wait(15), "the stream did not open"

    def _run(self, url: str, headers: dict[str, str], params: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, params=params, timeout=httpx.Timeout(10, read=None)) as r:
                self.status, self.headers = r.status_code, r.headers
                self.opened.set()
                decoder = zlib.decompressobj() if r.headers.get("content-encoding") == "deflate" else None
                block = b""
                for raw in r.iter_raw():
                    chunk = raw if decoder is None else decoder.decompress(raw)
                    self.text += chunk
                    block += chunk
                    while b"\n\n" in block:
                        event, block = block.split(b"\n\n", 1)
                        fields = dict(line.split(b": ", 1) for line in event.split(b"\n") if b": " in line)
                        if b"data" in fields:
                            self.events.put((fields[b"id"].decode(), fields[b"data"]))
                self.complete = decoder is None or (decoder.eof and not decoder.unused_data)
        except httpx.HTTPError:
            pass
        finally:
            self.opened.set()
            self.ended.set()

    def take(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        return [self.events.get(timeout=timeout) for _ in range(count)]


def test_access_by_token_file(make_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "writer\n"  # default: write only
        "reader access=read\n"
        "both domains=app-*,shop access=read,write\n"
        "scoped-reader domains=app-* access=read\n"
    )
    server = make_server(env={"LEITSTAND_TOKEN": TOKEN, "LEITSTAND_TOKEN_FILE": str(tokens),
                              "LEITSTAND_AUTH_FAIL_LIMIT": "0"}).start()
    for domain in ("app-1", "shop", "secret"):
        assert server.post(domain, '{"n":1}', {"X-Auth": "writer"}).status_code == 200
    # A read-only token may not write.
    refused = server.post("app-1", '{"n":2}', {"X-Auth": "reader"})
    assert (refused.status_code, refused.text) == (403, "forbidden\n")
    assert server.post("app-1", '{"n":2}', {"X-Auth": "both"}).status_code == 200

    def listed(token: str) -> list[str]:
        response = get(server, "/domains", token)
        assert response.status_code == 200, response.text
        return [d["domain"] for d in response.json()["domains"]]

    assert listed(TOKEN) == listed("reader") == ["app-1", "secret", "shop"]
    assert listed("both") == ["app-1", "shop"]
    assert listed("scoped-reader") == ["app-1"]
    for path in ("/domains", "/events/app-1", "/events/app-1/stream"):
        assert (get(server, path, "writer").status_code, get(server, path, "writer").text) == (403, "forbidden\n")
        assert get(server, path, "wrong").status_code == 401
        assert httpx.get(server.url + path).status_code == 401
    # Outside the scope: 403 whether the domain exists or not; inside it, unknown is 404.
    for domain in ("secret", "no-such-domain"):
        for path in (f"/events/{domain}", f"/events/{domain}/stream"):
            assert get(server, path, "scoped-reader").status_code == 403
    assert (get(server, "/events/app-2", "scoped-reader").status_code, get(server, "/events/app-2").text) == (
        404, "unknown domain\n")
    assert events(get(server, "/events/App-1", "scoped-reader")) == [1, 2]
    # X-Auth works as on /ingest; the token is never taken from the URL.
    assert httpx.get(server.url + "/events/app-1", headers={"X-Auth": "reader"}).status_code == 200
    assert httpx.get(server.url + "/events/app-1", params={"token": TOKEN}).status_code == 401


def test_pages_follow_each_other_without_gap_or_repeat_under_load(server: Server) -> None:
    assert server.post("app", '{"id":"first"}').status_code == 200  # the file exists before the first read
    seen: list[str] = []
    after = None
    with Load(server.url, ["app"], clients=4, batches=(1, 3)) as load:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            params = {"limit": "7"} | ({"after": after} if after else {})
            response = get(server, "/events/app", **params)
            page = response.json()
            assert response.status_code == 200 and len(page["events"]) <= 7
            seen += [event["id"] for event in page["events"]]
            after = page["next"]
    while page["events"]:
        page = get(server, "/events/app", after=after, limit="1000").json()
        seen += [event["id"] for event in page["events"]]
        after = page["next"]
    assert page["next"] == after
    stored = [orjson.loads(line)["id"] for line in (server.data_dir / "app.jsonl").read_bytes().splitlines()]
    assert seen == stored and len(set(seen)) == len(seen)
    assert load.acked <= set(seen)


def test_tail_q_and_bad_parameters(server: Server) -> None:
    assert server.post("app", orjson.dumps([{"n": n, "word": "even" if n % 2 == 0 else "odd"} for n in range(250)]))
    assert events(get(server, "/events/app", tail="3")) == [247, 248, 249]
    assert events(get(server, "/events/app")) == list(range(100))  # limit defaults to 100
    assert events(get(server, "/events/app", tail="2", q='"odd"')) == [247, 249]
    assert events(get(server, "/events/app", limit="3", q="even")) == [0, 2, 4]
    # A plain substring, not a pattern.
    assert events(get(server, "/events/app", q=".*")) == []
    # Tail's cursor follows from the end.
    tailed = get(server, "/events/app", tail="1").json()
    assert server.post("app", '{"n":250}').status_code == 200
    assert events(get(server, "/events/app", after=tailed["next"])) == [250]
    for params, reason in [
        ({"limit": "0"}, "limit must be a number from 1 to 1000"),
        ({"limit": "1001"}, "limit must be a number from 1 to 1000"),
        ({"limit": str(10**9)}, "limit must be a number from 1 to 1000"),
        ({"limit": "-1"}, "limit must be a number from 1 to 1000"),
        ({"tail": "x"}, "tail must be a number from 1 to 1000"),
        ({"after": "not-a-cursor"}, "invalid cursor"),
        ({"after": tailed["next"][:-1] + "B"}, "invalid cursor"),
        ({"since": "yesterday"}, "since must be an RFC 3339 time, e.g. 2026-12-03T14:00:00Z"),
        ({"since": "2026-12-03T14:00:00"}, "since must be an RFC 3339 time, e.g. 2026-12-03T14:00:00Z"),
        ({"q": ""}, "q must be 1 to 1000 characters"),
        ({"tail": "1", "after": tailed["next"]}, "tail goes without after and limit"),
        ({"limt": "5"}, "unknown parameter: use after, limit, tail, q, since"),
    ]:
        response = get(server, "/events/app", **params)
        assert (response.status_code, response.text) == (400, reason + "\n"), params
    twice = httpx.get(server.url + "/events/app?limit=1&limit=2", headers=READ)
    assert (twice.status_code, twice.text) == (400, "limit given twice\n")
    assert get(server, "/events/bad_domain").status_code == 400


def test_since_starts_at_the_first_event_of_that_second(server: Server) -> None:
    assert server.post("app", '{"n":0}').status_code == 200
    # The next event in a later second than the first.
    first = int(time.time())
    while int(time.time()) == first:
        time.sleep(0.02)
    second = int(time.time())
    assert server.post("app", '{"n":1}').status_code == 200
    assert server.post("app", '{"n":2}').status_code == 200

    def rfc3339(when: float) -> str:
        return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat().replace("+00:00", "Z")

    assert events(get(server, "/events/app", since=rfc3339(first))) == [0, 1, 2]
    assert events(get(server, "/events/app", since=rfc3339(second))) == [1, 2]
    assert events(get(server, "/events/app", since=rfc3339(second + 0.999))) == [1, 2]
    assert events(get(server, "/events/app", since=rfc3339(second + 1))) == []
    # Offsets other than Z mean the same instant.
    cet = datetime.datetime.fromtimestamp(second, datetime.timezone(datetime.timedelta(hours=1))).isoformat()
    assert events(get(server, "/events/app", since=cet)) == [1, 2]
    assert events(get(server, "/events/app", tail="1", since=rfc3339(second))) == [2]


def test_received_field(make_server: Any) -> None:
    server = make_server(env={"LEITSTAND_RECEIVED_FIELD": "received_at"}).start()
    before = time.time()
    assert server.post("app", '[{"n":1},{"n":2}]').status_code == 200
    stored = [orjson.loads(line) for line in (server.data_dir / "app.jsonl").read_bytes().splitlines()]
    assert [list(event) for event in stored] == [["n", "domain", "received_at"]] * 2
    stamp = stored[0]["received_at"]
    assert len(stamp) == 24 and stamp.endswith("Z") and stamp == stored[1]["received_at"]
    when = datetime.datetime.fromisoformat(stamp).timestamp()
    assert before - 0.001 <= when <= time.time()
    refused = server.post("app", '[{"n":3},{"n":4,"received_at":"x"}]')
    assert (refused.status_code, refused.text) == (400, "reserved field\n")
    assert len((server.data_dir / "app.jsonl").read_bytes().splitlines()) == 2
    # A keyed retry is the same request, though it arrives at another time: replayed, stored once.
    key = {"Idempotency-Key": "k1"}
    assert server.post("app", '{"n":5}', key).status_code == 200
    time.sleep(0.01)
    retry = server.post("app", '{"n":5}', key)
    assert (retry.status_code, retry.headers.get("idempotent-replayed")) == (200, "true")
    assert server.post("app", '{"n":6}', key).status_code == 409
    assert [e["n"] for e in map(orjson.loads, (server.data_dir / "app.jsonl").read_bytes().splitlines())] == [1, 2, 5]


def test_stream_delivers_within_a_second_from_any_worker_and_resumes(make_server: Any) -> None:
    server = make_server(command="serve", workers=2).start()
    assert server.post("app", '{"n":0}').status_code == 200
    # Several streams, likely spread over both workers; each must see every event. Two ask for
    # deflate (httpx's default), two for the stream as it is.
    plain = {**READ, "Accept-Encoding": "identity"}
    streams = [Stream(server.url + "/events/app/stream", headers) for headers in (None, plain, None, plain)]
    for stream, encoding in zip(streams, ("deflate", None, "deflate", None), strict=True):
        assert stream.status == 200 and stream.headers is not None
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-accel-buffering"] == "no"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers.get("content-encoding") == encoding
        assert stream.headers["vary"] == "accept-encoding"
    time.sleep(0.5)
    # New connections, so that both workers take some of the posts.
    for n in range(1, 6):
        with httpx.Client() as client:
            assert client.post(server.url + "/ingest/app", content=b'{"n":%d}' % n, headers=READ).status_code == 200
            acknowledged = time.monotonic()
        for stream in streams:
            ((cursor, data),) = stream.take(1, timeout=5)
            assert time.monotonic() - acknowledged < 1.0, "an event took more than a second to reach a stream"
            assert orjson.loads(data)["n"] == n
    assert all(b"retry: " in stream.text and b"data: " in stream.text for stream in streams)
    # Resume with Last-Event-ID (or after=) from the second event's id: no gap, no repeat.
    assert server.post("app", '[{"n":6},{"n":7}]').status_code == 200
    got = streams[0].take(2)
    resume_id = got[0][0]
    for kind in ("header", "param"):
        if kind == "header":
            resumed = Stream(server.url + "/events/app/stream", {**READ, "Last-Event-ID": resume_id})
        else:
            resumed = Stream(server.url + "/events/app/stream", after=resume_id)
        assert [orjson.loads(data)["n"] for _, data in resumed.take(1)] == [7]
        assert resumed.events.empty()
    # A stream with q sees only the matching events.
    filtered = Stream(server.url + "/events/app/stream", q="wanted")
    assert server.post("app", '[{"n":8},{"n":9,"tag":"wanted"}]').status_code == 200
    assert [orjson.loads(data)["n"] for _, data in filtered.take(1)] == [9]
    bad = httpx.get(server.url + "/events/app/stream", headers={**READ, "Last-Event-ID": "nonsense"})
    assert (bad.status_code, bad.text) == (400, "invalid cursor\n")


def test_open_streams_and_read_requests_in_the_metrics(server: Server) -> None:
    assert server.post("app", "{}").status_code == 200
    streams = [Stream(server.url + "/events/app/stream") for _ in range(3)]
    time.sleep(0.3)
    assert get(server, "/events/app", limit="0").status_code == 400
    assert get(server, "/events/app").status_code == 200
    samples = scrape(server)
    assert value(samples, "leitstand_open_streams") == 3
    assert value(samples, "leitstand_read_requests_total", status="400") == 1
    assert value(samples, "leitstand_read_requests_total", status="200") == 4  # the streams and the page
    del streams
    # Streams whose client is gone close and stop counting.


IN_FLIGHT = b'{"n":"in flight"}'


def _slow_ingest(server: Server) -> socket.socket:
    """A POST whose body is still coming: its headers and the first bytes of its body are sent."""
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    conn.sendall(b"POST /ingest/app HTTP/1.1\r\nHost: x\r\nX-Auth: %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (TOKEN.encode(), len(IN_FLIGHT), IN_FLIGHT[:5]))
    return conn


@pytest.mark.parametrize("command", ["uvicorn", "serve"])
def test_sigterm_with_open_streams_exits_fast_and_completes_ingests(make_server: Any, command: str) -> None:
    workers = 2 if command == "serve" else 1
    server = make_server(command=command, workers=workers).start()
    assert server.post("app", "{}").status_code == 200
    streams = [Stream(server.url + "/events/app/stream") for _ in range(6)]
    time.sleep(0.5)
    in_flight = _slow_ingest(server)
    time.sleep(0.3)
    assert server.proc is not None
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    time.sleep(0.3)
    in_flight.sendall(IN_FLIGHT[5:])
    answer = in_flight.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    code = server.proc.wait(10)
    assert time.monotonic() - started < 5.0, "the process took more than 5 s to exit with open streams"
    assert code in CLEAN_EXIT, server.output()
    assert all(stream.ended.wait(2) for stream in streams)
    # The deflated ones ended as whole zlib streams: their last block and checksum came.
    assert all(stream.complete for stream in streams)
    lines = (server.data_dir / "app.jsonl").read_bytes().splitlines()
    assert orjson.loads(lines[-1])["n"] == "in flight"


@pytest.mark.parametrize("deflate", [False, True], ids=["identity", "deflate"])
def test_a_stalled_reader_holds_no_backlog_and_catches_up_from_disk(make_server: Any, deflate: bool) -> None:
    server = make_server().start()
    assert server.post("app", "{}").status_code == 200
    # A reader that reads nothing after the head: the socket buffers fill (a few MB), then the
    # server stops reading for it.
    coding = {"Accept-Encoding": "deflate" if deflate else "identity"}
    timeout = httpx.Timeout(10)
    with httpx.stream("GET", server.url + "/events/app/stream", headers={**READ, **coding}, timeout=timeout) as r:
        assert (r.headers.get("content-encoding") == "deflate") == deflate
        time.sleep(0.5)
        assert server.proc is not None
        rss_before = _rss(server.proc.pid)
        for _ in range(120):  # about 60 MB; random hex, so that deflated it is still 30 MB
            batch = orjson.dumps([{"n": n, "pad": random.randbytes(500).hex()} for n in range(500)])
            assert server.post("app", batch).status_code == 200
        time.sleep(1.0)
        grown = _rss(server.proc.pid) - rss_before
        assert grown < 24 << 20, f"the server grew by {grown >> 20} MiB for one stalled reader"
        # It reads again: every event arrives, from disk.
        decoder = zlib.decompressobj() if deflate else None
        count, tail = 0, b""
        for raw in r.iter_raw():
            text = raw if decoder is None else decoder.decompress(raw)
            # Counted with the end of the text before, so that a marker split in two counts once.
            joined = tail + text
            count += joined.count(b"\ndata: ") - tail.count(b"\ndata: ")
            tail = joined[-6:]
            if count >= 60_000:
                break
    assert count == 60_000


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("deflate", [False, True], ids=["identity", "deflate"])
def test_heartbeats_keep_a_quiet_stream_open_and_a_stop_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deflate: bool
) -> None:
    """In process, with the heartbeat at 0.2 s instead of 15 s: comments while nothing happens, then
    the end of the answer as soon as the process is told to stop; deflated, each body decodes as
    it comes, and the last one ends the zlib stream with the checksum of all of them."""
    import asyncio

    from leitstand.server import reading
    from leitstand.storage.reader import Cursor

    monkeypatch.setattr(reading, "HEARTBEAT", 0.2)
    data = tmp_path / "data"
    data.mkdir()
    (data / "app.jsonl").write_bytes(b'{"n":1}\n')
    sent: list[dict[str, Any]] = []

    async def main() -> float:
        stopping = asyncio.Event()
        routes, receive = _in_process(data, stopping)
        stream = reading._EventStream(
            routes, reading._Key("app.jsonl", None, deflate), Cursor((data / "app.jsonl").stat().st_ino, 8)
        )

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        task = asyncio.ensure_future(stream({"type": "http"}, receive, send))
        await asyncio.sleep(0.9)
        stopped = asyncio.get_running_loop().time()
        stopping.set()
        await asyncio.wait_for(task, 2)
        routes.close()
        return asyncio.get_running_loop().time() - stopped

    took = asyncio.run(main())
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["status"] == 200
    assert (dict(sent[0]["headers"]).get(b"content-encoding"), sent[-1]["more_body"]) == (
        b"deflate" if deflate else None, False)
    if deflate:
        decoder = zlib.decompressobj()
        bodies = [decoder.decompress(body) for body in bodies]
        assert decoder.eof and not decoder.unused_data
    assert bodies[0] == b": leitstand\nretry: 2000\n\n"
    assert 3 <= bodies.count(b": heartbeat\n\n") <= 5
    assert bodies[-1] == b""
    assert took < 0.5


def test_a_stream_whose_filter_matches_nothing_of_a_busy_file_still_gets_its_heartbeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, heartbeat at 0.2 s: the file changes at every look, but no line matches the
    stream's q, so nothing else goes out. The heartbeats come from the watch's beats, not from
    quiet between changes, of which there is none."""
    import asyncio

    from leitstand.server import reading
    from leitstand.storage.reader import Cursor

    monkeypatch.setattr(reading, "HEARTBEAT", 0.2)
    monkeypatch.setattr(reading, "POLL", 0.02)
    data = tmp_path / "data"
    data.mkdir()
    path = data / "app.jsonl"
    path.write_bytes(b'{"n":0}\n')
    sent: list[bytes] = []

    async def main() -> None:
        stopping = asyncio.Event()
        routes, receive = _in_process(data, stopping)
        stream = reading._EventStream(routes, reading._Key(path.name, b"never", False), Cursor(path.stat().st_ino, 0))

        async def send(message: dict[str, Any]) -> None:
            sent.append(message.get("body", b""))

        with _appending(path, 0.005):
            task = asyncio.ensure_future(stream({"type": "http"}, receive, send))
            await asyncio.sleep(1.1)
            stopping.set()
            await asyncio.wait_for(task, 2)
        routes.close()

    asyncio.run(main())
    assert not any(b"data: " in body for body in sent)
    assert 3 <= sent.count(b": heartbeat\n\n") <= 6, sent


@contextlib.contextmanager
def _appending(path: Path, every: float) -> Iterator[list[int]]:
    """A thread that appends ``{"n":1}``, ``{"n":2}``, ... to ``path``, a line every ``every`` seconds,
    until the block ends; yields the file's length after each line, as it grows."""
    lengths: list[int] = []
    writing = threading.Event()

    def write() -> None:
        with open(path, "ab", buffering=0) as f:
            n = 1
            while not writing.is_set():
                f.write(b'{"n":%d}\n' % n)
                lengths.append(f.tell())
                n += 1
                time.sleep(every)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield lengths
    finally:
        writing.set()
        writer.join()


def _in_process(data: Path, stopping: Any) -> tuple[Any, Any]:
    """Read routes without a server, and an ASGI ``receive`` whose client never leaves."""
    import asyncio

    from leitstand.config import Config
    from leitstand.server import reading
    from leitstand.telemetry.metrics import Metrics

    metrics = Metrics(Config(tokens=TOKEN, data_dir=data))
    routes = reading.ReadRoutes(data, metrics, lambda r: None, stopping)  # type: ignore[arg-type,return-value]

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return routes, receive


def test_streams_that_read_a_change_at_different_moments_end_at_the_same_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, while a writer appends a line every millisecond: 10 streams follow from the start, 10
    more join later at the end as it is then. A read for a change stops where the file ended at
    that change, so the two groups end at the same line and from then on share one read per
    change. Read up to wherever the file ends at each read, they stayed apart, each group
    reading every change on its own (and deflating it, for a browser), for as long as they ran."""
    import asyncio

    from leitstand.server import reading
    from leitstand.storage import reader
    from leitstand.storage.reader import Cursor

    monkeypatch.setattr(reading, "POLL", 0.05)
    monkeypatch.setattr(reading, "SPREAD", 0.04)
    reads: list[float] = []
    changes: list[float] = []
    follow, changed = reading._follow, reader.Watched.changed

    def counted(directory: Path, key: Any, cursor: Cursor, until: Cursor | None) -> Any:
        reads.append(time.monotonic())
        return follow(directory, key, cursor, until)

    def counted_change(self: Any) -> None:
        changes.append(time.monotonic())
        changed(self)

    monkeypatch.setattr(reading, "_follow", counted)
    monkeypatch.setattr(reader.Watched, "changed", counted_change)
    data = tmp_path / "data"
    data.mkdir()
    path = data / "app.jsonl"
    path.write_bytes(b'{"n":0}\n')
    inode = path.stat().st_ino
    got: dict[int, int] = Counter()
    starts: dict[int, int] = {}

    async def main() -> tuple[int, int]:
        stopping = asyncio.Event()
        routes, receive = _in_process(data, stopping)

        def sender(n: int) -> Any:
            async def send(message: dict[str, Any]) -> None:
                got[n] += message.get("body", b"").count(b"\ndata: ")

            return send

        def stream(n: int, offset: int) -> asyncio.Future[None]:
            starts[n] = offset
            s = reading._EventStream(routes, reading._Key(path.name, None, False), Cursor(inode, offset))
            return asyncio.ensure_future(s({"type": "http"}, receive, sender(n)))

        with _appending(path, 0.001) as written:
            tasks = [stream(n, 8) for n in range(10)]
            await asyncio.sleep(0.3)
            tasks += [stream(n, written[-1]) for n in range(10, 20)]
            await asyncio.sleep(0.25)  # two changes: the late ones read up to where the others are
            window = time.monotonic()
            await asyncio.sleep(1.0)
            counts = sum(t > window for t in reads), sum(t > window for t in changes)
        await asyncio.sleep(0.5)
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        routes.close()
        return counts

    read, seen = asyncio.run(main())
    assert seen >= 10, f"the writer changed the file only {seen} times in a second"
    assert read <= seen + 2, f"{read} reads for {seen} changes"
    lines = path.read_bytes().count(b"\n")
    for n, offset in starts.items():
        assert got[n] == lines - path.read_bytes()[:offset].count(b"\n"), (n, got[n])


@pytest.mark.parametrize("events", [10, 2500])
def test_the_streams_of_one_change_share_one_read_and_send_spread_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: int
) -> None:
    """In process: 20 streams of one file, each waiting its own part of SPREAD after a change. Each
    page of the change (one, or three of at most 1,000 events) is read once for all of them,
    however late each one asks, and their sends do not all go out at once."""
    import asyncio

    from leitstand.server import reading
    from leitstand.storage.reader import Cursor

    monkeypatch.setattr(reading, "POLL", 0.05)
    monkeypatch.setattr(reading, "FOLLOW_EVENTS", 1000)
    pages = -(-events // 1000)
    reads: list[Cursor] = []
    follow = reading._follow

    def counted(directory: Path, key: Any, cursor: Cursor, until: Cursor | None) -> Any:
        reads.append(cursor)
        return follow(directory, key, cursor, until)

    monkeypatch.setattr(reading, "_follow", counted)
    data = tmp_path / "data"
    data.mkdir()
    path = data / "app.jsonl"
    path.write_bytes(b'{"n":0}\n')
    start = Cursor(path.stat().st_ino, 8)
    got: dict[int, list[tuple[float, bytes]]] = {n: [] for n in range(20)}

    def append(lines: bytes) -> None:
        with open(path, "ab") as f:  # one write: one change of the file
            f.write(lines)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        routes, receive = _in_process(data, stopping)

        def sender(n: int) -> Any:
            async def send(message: dict[str, Any]) -> None:
                if b"data: " in message.get("body", b""):
                    got[n].append((loop.time(), message["body"]))

            return send

        streams = [reading._EventStream(routes, reading._Key(path.name, None, False), start) for _ in got]
        tasks = [asyncio.ensure_future(s({"type": "http"}, receive, sender(n))) for n, s in enumerate(streams)]
        await asyncio.sleep(0.5)
        assert not any(got.values())
        before = len(reads)
        await asyncio.to_thread(append, b"".join(b'{"n":%d}\n' % n for n in range(1, events + 1)))
        await asyncio.sleep(1.0)
        # Each page once; twice at most if the watcher happened to look at the file in the middle
        # of the one write (the kernel sets the time before the size): one change more.
        read = Counter(reads[before:])
        assert len(read) >= pages and max(read.values()) <= 2, f"{read.total()} reads for {pages} page(s)"
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        routes.close()

    asyncio.run(main())
    assert all(len(sends) == pages for sends in got.values()), {n: len(sends) for n, sends in got.items()}
    assert all(sum(body.count(b"data: ") for _, body in sends) == events for sends in got.values())
    times = sorted(sends[0][0] for sends in got.values())
    assert times[-1] - times[0] > 0.03, "the streams of a change sent all at once"
