"""Broker mode against real NATS servers: front ends publish, ``leitstand archive`` writes exactly once."""

from __future__ import annotations

import asyncio
import random
import resource
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import nats
import orjson
import pytest
from brokers import Broker, Nats, events_in, jetstream, leaders, wait_stored
from conftest import (
    TOKEN,
    Load,
    assert_all_acked_stored_once,
    journal_lines,
    read_lines,
    refusing_new_files,
    run_cli,
)
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from leitstand.broker.archiver import ArchiveError, Entry, Lease, LeaseLost, Record
from leitstand.intake import domains
from leitstand.storage import segments
from leitstand.storage.keylog import key_hash

# 253 characters, the longest domain: a subject of five tokens, a shortened file name.
LONGEST = ".".join(["a" * 63] * 3 + ["b" * 61])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    made = Broker(tmp_path)
    yield made
    made.close()


def post(url: str, domain: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/ingest/{domain}", content=orjson.dumps(body), headers={"X-Auth": TOKEN, **headers},
                      timeout=15)


def assert_in_order(data_dir: Path) -> None:
    """Each Load client posts one request after the other, so its events must appear in increasing order."""
    for path in data_dir.glob("*.jsonl"):
        last: dict[str, tuple[int, int]] = {}
        for line in read_lines(path):
            client, *position = orjson.loads(line)["id"].split("-")
            here = (int(position[0]), int(position[1]))
            assert here > last.get(client, (-1, -1)), f"{path.name}: client {client} out of order at {here}"
            last[client] = here


def test_round_trip_with_the_same_checks_as_direct_mode(broker: Broker, tmp_path: Path) -> None:
    broker.single()
    front = broker.frontend(LEITSTAND_DOMAINS_DENY="secret.*", LEITSTAND_MAX_EVENTS="3")
    assert httpx.get(front.url + "/ready").status_code == 200
    rejected = [
        httpx.post(front.url + "/ingest/a.example", content=b'{"id":"r1"}', headers={"X-Auth": "wrong"}),
        post(front.url, "a.example", [1]),
        front.post("a.example", b'{"id":"r3",'),
        post(front.url, "secret.example", {"id": "r4"}),
        post(front.url, "-bad-", {"id": "r5"}),
        post(front.url, "a.example", [{"id": f"r6-{i}"} for i in range(4)]),
        post(front.url, "a.example", {"id": "r7"}, **{"Idempotency-Key": "k" * 129}),
    ]
    assert [r.status_code for r in rejected] == [401, 400, 400, 403, 400, 413, 400]
    assert rejected[-1].text == "invalid idempotency key\n"
    accepted = [
        post(front.url, "a.example", {"id": "a1", "text": "ä €"}),
        post(front.url, "a.example", [{"id": "a2"}, {"id": "a3"}]),
        post(front.url, "b.example", {"id": "b1"}),
        post(front.url, "a.example", []),
        post(front.url, LONGEST, {"id": "long"}),
    ]
    assert [r.status_code for r in accepted] == [200, 200, 200, 200, 200]
    archiver = broker.archiver()
    wait_stored([archiver.data_dir], {"a1", "a2", "a3", "b1", "long"})
    assert read_lines(archiver.data_dir / domains.file_name(LONGEST)) == [
        f'{{"id":"long","domain":"{LONGEST}"}}'.encode()
    ]
    time.sleep(1)  # anything rejected would have come by now
    assert read_lines(archiver.data_dir / "a.example.jsonl") == [
        '{"id":"a1","text":"ä €","domain":"a.example"}'.encode(),
        b'{"id":"a2","domain":"a.example"}',
        b'{"id":"a3","domain":"a.example"}',
    ]
    assert sorted(events_in(archiver.data_dir)) == ["a1", "a2", "a3", "b1", "long"]
    # The archiver's state dir is not a stray to the operator commands.
    checked = run_cli("verify", "--data-dir", str(archiver.data_dir))
    assert checked.returncode == 0, checked.stdout
    assert "verify: 3 files, 0 problems" in checked.stdout
    assert archiver.stop() == 0
    assert "archiver stopped: every acked message is on disk" in archiver.output()


def test_a_retried_idempotency_key_is_stored_once(broker: Broker) -> None:
    node = broker.single()
    front = broker.frontend()
    archiver = broker.archiver()
    key = {"Idempotency-Key": "order-4711"}
    first = post(front.url, "a.example", {"id": "k1"}, **key)
    again = post(front.url, "a.example", {"id": "k1"}, **key)
    assert (first.status_code, "idempotent-replayed" in first.headers) == (200, False)
    assert (again.status_code, again.headers["idempotent-replayed"]) == (200, "true")
    # The same key in another domain is another request.
    assert post(front.url, "b.example", {"id": "k1b"}, **key).status_code == 200
    # The same key with other events is refused and publishes nothing, as in direct mode.
    other = post(front.url, "a.example", {"id": "k1-other"}, **key)
    assert (other.status_code, other.text) == (409, "conflict\n")
    # The same events sent another way are the same request: the key stands for the stored lines.
    pair = {"Idempotency-Key": "pair"}
    assert post(front.url, "a.example", [{"id": "p1"}, {"id": "p2"}], **pair).status_code == 200
    ndjson = front.post("a.example", b'{"id":"p1"}\n{"id":"p2"}\n', headers={"Content-Type": "application/x-ndjson",
                                                                        **pair})
    assert (ndjson.status_code, ndjson.headers["idempotent-replayed"]) == (200, "true")
    wait_stored([archiver.data_dir], {"k1", "k1b", "p1", "p2"})
    # Still within the duplicate window after the archiver has written and purged it.
    assert post(front.url, "a.example", {"id": "k1"}, **key).status_code == 200
    assert post(front.url, "a.example", {"id": "k1-late"}, **key).status_code == 409
    # A claim gone before the stream forgets the message (a retry published it late): other events
    # under the key are stored, not taken for a duplicate of the first ones.
    asyncio.run(forget(node, "a.example", "order-4711"))
    assert post(front.url, "a.example", {"id": "k1-new"}, **key).status_code == 200
    assert post(front.url, "a.example", {"id": "k2"}).status_code == 200
    wait_stored([archiver.data_dir], {"k1-new", "k2"})
    assert Counter(events_in(archiver.data_dir)) == {"k1": 1, "k1b": 1, "p1": 1, "p2": 1, "k1-new": 1, "k2": 1}


async def forget(node: Nats, domain: str, key: str) -> None:
    """Delete a key's claim from the key bucket, as its TTL would."""
    async with jetstream(node.url) as js:
        keys = await js.key_value("LEITSTAND_KEYS")
        await keys.delete(key_hash(domain, key.encode()).hex())


def test_concurrent_requests_with_one_key_store_one_body_once(broker: Broker) -> None:
    broker.single()
    front = broker.frontend()
    archiver = broker.archiver()
    bodies = [{"id": f"race-{i % 2}"} for i in range(8)]
    start = threading.Barrier(len(bodies))

    def send(body: dict[str, str]) -> tuple[str, int]:
        start.wait()
        return body["id"], post(front.url, "a.example", body, **{"Idempotency-Key": "race"}).status_code

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(send, bodies))
    assert {status for _, status in answers} <= {200, 409}
    winners = {body for body, status in answers if status == 200}
    assert len(winners) == 1, answers
    assert post(front.url, "a.example", {"id": "after"}).status_code == 200
    wait_stored([archiver.data_dir], winners | {"after"})
    assert Counter(events_in(archiver.data_dir)) == {winners.pop(): 1, "after": 1}


def test_a_key_is_forgotten_after_the_window_and_an_older_stream_is_updated(broker: Broker) -> None:
    node = broker.single()

    async def stream_as_an_older_leitstand_made_it() -> None:
        async with jetstream(node.url) as js:
            await js.add_stream(name="LEITSTAND", subjects=["leitstand.ingest.>"], storage="file")

    async def windows() -> tuple[float | None, float | None]:
        async with jetstream(node.url) as js:
            stream, keys = await js.stream_info("LEITSTAND"), await js.stream_info("KV_LEITSTAND_KEYS")
        return stream.config.duplicate_window, keys.config.max_age

    asyncio.run(stream_as_an_older_leitstand_made_it())
    window = {"LEITSTAND_IDEMPOTENCY_WINDOW": "2s"}
    front = broker.frontend(**window)
    assert asyncio.run(windows()) == (2.0, 2.0)
    assert "stream LEITSTAND updated to LEITSTAND_IDEMPOTENCY_WINDOW: duplicate_window 120.0s -> 2.0s" in front.output()
    archiver = broker.archiver(**window)
    key = {"Idempotency-Key": "short"}
    assert post(front.url, "a.example", {"id": "w1"}, **key).status_code == 200
    assert post(front.url, "a.example", {"id": "w1"}, **key).status_code == 200
    assert post(front.url, "a.example", {"id": "w2"}, **key).status_code == 409
    time.sleep(3)
    # Forgotten, as in direct mode: the same events are stored again, other events are no conflict.
    assert post(front.url, "a.example", {"id": "w1"}, **key).status_code == 200
    time.sleep(3)
    assert post(front.url, "a.example", {"id": "w2"}, **key).status_code == 200
    wait_stored([archiver.data_dir], {"w1", "w2"})
    deadline = time.monotonic() + 10
    while Counter(events_in(archiver.data_dir)) != {"w1": 2, "w2": 1}:
        assert time.monotonic() < deadline, Counter(events_in(archiver.data_dir))
        time.sleep(0.1)


def test_a_message_too_large_for_the_broker_is_413_and_not_stored(broker: Broker) -> None:
    broker.single(config="max_payload: 65536\n")
    front = broker.frontend()
    archiver = broker.archiver()
    big = post(front.url, "a.example", {"id": "big", "pad": "x" * 70000})
    assert (big.status_code, big.text) == (413, "payload too large\n")
    assert post(front.url, "a.example", {"id": "small"}).status_code == 200
    wait_stored([archiver.data_dir], {"small"})
    assert events_in(archiver.data_dir) == ["small"]


def test_a_reply_to_a_publish_that_is_no_ack_is_503_and_the_keyed_retry_is_stored_once(broker: Broker) -> None:
    """The client library reads a publish's reply as JSON. In a cluster losing a node, the reply
    can come without a body (nats-io/nats.py#639); that was an exception, answered 500. Here a
    subscriber in place of the stream answers every publish with an empty message: nobody
    knows whether it was stored, so it is 503, and a keyed request is tried again until the
    deadline; once the stream answers again, the client's retry under its key is stored once."""
    node = broker.single()
    front = broker.frontend(LEITSTAND_NATS_TIMEOUT="2")
    archiver = broker.archiver()
    assert post(front.url, "a.example", {"id": "before"}).status_code == 200
    wait_stored([archiver.data_dir], {"before"})
    key = {"Idempotency-Key": "empty-reply"}

    async def with_empty_replies() -> tuple[httpx.Response, httpx.Response, int]:
        replies = 0

        async def empty(msg: Msg) -> None:
            nonlocal replies
            replies += 1
            await msg.respond(b"")

        nc = await nats.connect(node.url)
        try:
            js = nc.jetstream()
            config = (await js.stream_info("LEITSTAND")).config
            await js.delete_stream("LEITSTAND")
            impostor = await nc.subscribe("leitstand.ingest.>", cb=empty)
            await nc.flush()
            async with httpx.AsyncClient(headers={"X-Auth": TOKEN}, timeout=15) as client:
                unkeyed = await client.post(f"{front.url}/ingest/a.example", json={"id": "u"})
                keyed = await client.post(f"{front.url}/ingest/a.example", json={"id": "k"}, headers=key)
            await impostor.unsubscribe()
            await js.add_stream(config)
        finally:
            await nc.close()
        return unkeyed, keyed, replies

    unkeyed, keyed, replies = asyncio.run(with_empty_replies())
    assert (unkeyed.status_code, unkeyed.text) == (503, "broker unavailable\n")
    assert (keyed.status_code, keyed.text) == (503, "broker unavailable\n")
    assert replies >= 3, "the keyed request was not tried again"
    again = post(front.url, "a.example", {"id": "k"}, **key)
    assert (again.status_code, "idempotent-replayed" in again.headers) == (200, False)
    wait_stored([archiver.data_dir], {"k"})
    assert Counter(events_in(archiver.data_dir)) == {"before": 1, "k": 1}
    assert "internal error" not in front.output()


def test_a_front_end_refuses_to_start_on_a_stream_it_cannot_use(broker: Broker, tmp_path: Path) -> None:
    node = broker.single()

    async def make_other_stream() -> None:
        async with jetstream(node.url) as js:
            await js.add_stream(name="LEITSTAND", subjects=["other.>"])

    asyncio.run(make_other_stream())
    try:
        broker.frontend()
    except RuntimeError as exc:
        message = str(exc)
    else:
        raise AssertionError("the front end started on a stream of other subjects")
    assert "stream LEITSTAND exists but subjects is ['other.>'], needs ['leitstand.ingest.>']" in message
    assert "Traceback" not in message


def test_a_front_end_starts_without_the_broker_and_answers_503_until_it_is_there(broker: Broker, tmp_path: Path) -> None:
    node = Nats(tmp_path / "nats-late", "late")
    broker.nodes.append(node)
    front = broker.frontend(LEITSTAND_NATS_TIMEOUT="1")
    early = post(front.url, "a.example", {"id": "early"})
    assert (early.status_code, early.text) == (503, "broker unavailable\n")
    assert httpx.get(front.url + "/ready").text == "not ready: broker unavailable\n"
    node.start().wait_ready()
    deadline = time.monotonic() + 15
    while post(front.url, "a.example", {"id": "late"}).status_code != 200:
        assert time.monotonic() < deadline, "no 200 after the broker came up"
        time.sleep(0.2)
    archiver = broker.archiver()
    wait_stored([archiver.data_dir], {"late"})
    assert "early" not in events_in(archiver.data_dir)


def test_broker_down_is_503_and_every_200_is_archived_after_it_is_back(broker: Broker) -> None:
    node = broker.single()
    front = broker.frontend()
    with Load(front.url, ["d1", "d2"], clients=8) as load:
        load.wait_acked(100)
        node.kill()
        time.sleep(1)
        down = post(front.url, "d1", {"id": "while-down"})
        ready = httpx.get(front.url + "/ready")
        with load._lock:
            acked_while_down = len(load.acked)
        time.sleep(0.5)
        with load._lock:
            assert len(load.acked) == acked_while_down, "200 while the broker was down"
        node.start().wait_ready()
        load.wait_acked(acked_while_down + 50)
    assert (down.status_code, down.text, down.headers["retry-after"]) == (503, "broker unavailable\n", "1")
    assert ready.status_code == 503
    assert load.statuses[503] > 0
    assert set(load.statuses) <= {200, 503}
    archiver = broker.archiver()
    wait_stored([archiver.data_dir], load.acked)
    assert_all_acked_stored_once(archiver.data_dir, load.acked)
    assert "while-down" not in events_in(archiver.data_dir)


def test_archivers_killed_with_kill_9_in_a_loop_store_exactly_once_in_order(broker: Broker) -> None:
    broker.single()
    front = broker.frontend()
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    # Two archivers on one data dir: one writes, the other takes over when it dies.
    archivers = [broker.archiver(), broker.archiver()]
    with Load(front.url, ["k1", "k2", "k3"], clients=16, batches=(1, 3)) as load:
        for _ in range(6):
            deadline = time.monotonic() + 15
            while not any(a.active for a in archivers) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.1, 1.0))
            victim = next((a for a in archivers if a.active), archivers[0])
            victim.kill()
            victim.spawn()
        load.wait_acked(350, timeout=60)
    for archiver in archivers:
        assert archiver.proc is not None and archiver.proc.poll() is None, f"seed {seed}: {archiver.output()}"
    data_dir = archivers[0].data_dir
    wait_stored([data_dir], load.acked, timeout=60)
    found = assert_all_acked_stored_once(data_dir, load.acked)
    assert len(load.acked) > 300 and set(found) == load.acked, f"seed {seed}"
    assert_in_order(data_dir)


def test_an_archiver_that_cannot_make_a_new_file_tries_again_until_it_can(broker: Broker) -> None:
    """The record names the new file before the journal makes it; a recovery must not trip over it."""
    broker.single()
    front = broker.frontend()
    archiver = broker.archiver()
    assert post(front.url, "a.example", {"id": "old"}).status_code == 200
    wait_stored([archiver.data_dir], {"old"})
    with refusing_new_files(archiver.data_dir):
        assert post(front.url, "b.example", {"id": "new"}).status_code == 200
        archiver.wait_for("batch not finished, recovering", count=3)
    wait_stored([archiver.data_dir], {"old", "new"})
    assert archiver.proc is not None and archiver.proc.poll() is None


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))


def test_a_batch_that_failed_to_write_comes_back_before_anything_after_it(broker: Broker) -> None:
    """An append that fails (here: a file size limit) leaves its messages delivered but not written;
    the next attempt must get them again, not the messages after them, whose cumulative ack and
    purge would take the unwritten ones along."""
    broker.single()
    front = broker.frontend()
    # A long lease: the tries after the failure fall within one renewal, under one lease revision.
    lease = "20"
    limited = broker.archiver(preexec=limit_file_size, LEITSTAND_ARCHIVE_LEASE=lease)
    assert post(front.url, "a.example", {"id": "small"}).status_code == 200
    wait_stored([limited.data_dir], {"small"})
    assert post(front.url, "a.example", {"id": "big", "pad": "x" * (20 << 10)}).status_code == 200
    limited.wait_for("batch not finished, recovering")
    assert post(front.url, "a.example", {"id": "after"}).status_code == 200
    # Tried again and again with the big one first: nothing after it is written or purged.
    limited.wait_for("batch not finished, recovering", count=3, timeout=20)
    assert events_in(limited.data_dir) == ["small"]
    assert limited.stop() == 0
    archiver = broker.archiver(LEITSTAND_ARCHIVE_LEASE=lease)
    wait_stored([archiver.data_dir], {"small", "big", "after"})
    assert events_in(archiver.data_dir) == ["small", "big", "after"]


def test_the_archiver_fetches_a_lost_delivery_again_and_skips_a_deleted_message(broker: Broker) -> None:
    """A delivery lost on the way (a node or a connection dies under it) moves the consumer past
    the message. Here another client takes the delivery, while the archiver is paused; the cumulative
    ack of what comes next would cover the missing message, so the archiver must notice the gap.
    A message an operator deleted from the stream is no such gap."""
    node = broker.single()
    front = broker.frontend()
    # A long lease: the pauses do not cost the term (a new term would read anew anyway).
    archiver = broker.archiver(LEITSTAND_ARCHIVE_LEASE="30")
    assert post(front.url, "a.example", {"id": "e1"}).status_code == 200
    wait_stored([archiver.data_dir], {"e1"})

    async def take_one() -> bytes:
        async with jetstream(node.url) as js:
            (consumer,) = await js.consumers_info("LEITSTAND")
            sub = await js.pull_subscribe_bind(consumer.name, "LEITSTAND")
            (message,) = await sub.fetch(1, timeout=5)
            return message.data

    async def delete_last() -> None:
        async with jetstream(node.url) as js:
            await js.delete_msg("LEITSTAND", (await js.stream_info("LEITSTAND")).state.last_seq)

    @contextmanager
    def paused() -> Iterator[None]:
        archiver.pause()
        try:
            time.sleep(1.5)  # its pull request expires
            yield
        finally:
            archiver.resume()

    with paused():
        assert post(front.url, "a.example", {"id": "e2"}).status_code == 200
        assert b'"e2"' in asyncio.run(take_one())
        assert post(front.url, "a.example", {"id": "e3"}).status_code == 200
    wait_stored([archiver.data_dir], {"e1", "e2", "e3"})
    assert "was delivered but did not arrive" in archiver.output()
    with paused():
        assert post(front.url, "a.example", {"id": "deleted"}).status_code == 200
        asyncio.run(delete_last())
        assert post(front.url, "a.example", {"id": "e4"}).status_code == 200
    wait_stored([archiver.data_dir], {"e4"})
    assert events_in(archiver.data_dir) == ["e1", "e2", "e3", "e4"]
    assert "gone from the stream: skipped" in archiver.output()


def test_the_archiver_seals_between_batches_and_rotate_leaves_it_alone(broker: Broker) -> None:
    broker.single()
    front = broker.frontend()
    archiver = broker.archiver(LEITSTAND_ROTATE_BYTES="4KiB")
    with Load(front.url, ["a.example", "b.example"], clients=4, pad=200) as load:
        time.sleep(2)
    wait_stored([archiver.data_dir], load.acked)
    assert len(segments.every(archiver.data_dir)) >= 2
    refused = run_cli("rotate", "--data-dir", str(archiver.data_dir))
    assert refused.returncode == 2 and "leitstand archive is writing this data dir" in refused.stderr
    # A restart after seals finds the write-ahead record consistent with the new live files.
    archiver.kill()
    archiver = broker.archiver(LEITSTAND_ROTATE_BYTES="4KiB")
    with Load(front.url, ["c.example"], clients=2, pad=200) as more:
        time.sleep(1)
    wait_stored([archiver.data_dir], more.acked)
    for name, lines in journal_lines(archiver.data_dir).items():
        ids = Counter(orjson.loads(line)["id"] for line in lines)
        assert not [i for i, n in ids.items() if n > 1], name
    archiver.stop()
    assert run_cli("verify", "--data-dir", str(archiver.data_dir)).returncode == 0


def wait_purged(url: str, timeout: float = 20) -> None:
    """Until the archiver has acked and purged every message of the stream."""

    async def left() -> int:
        async with jetstream(url) as js:
            return int((await js.stream_info("LEITSTAND")).state.messages)

    deadline = time.monotonic() + timeout
    while asyncio.run(left()):
        assert time.monotonic() < deadline, "the archiver did not purge the stream"
        time.sleep(0.05)


def test_only_the_lease_holder_writes_and_a_standby_takes_over(broker: Broker, tmp_path: Path) -> None:
    node = broker.single()
    front = broker.frontend()
    # Separate data dirs show who wrote what; in production they share one (or the same disk).
    first = broker.archiver(tmp_path / "first")
    first.wait_for("archiver active")
    second = broker.archiver(tmp_path / "second")
    dirs = [first.data_dir, second.data_dir]
    ids = [f"e{i}" for i in range(40)]
    for i in ids[:10]:
        assert post(front.url, "a.example", {"id": i}).status_code == 200
    wait_stored(dirs, set(ids[:10]))
    assert not second.active and events_in(second.data_dir) == []
    # Stopped between its append and its ack, the holder would leave a batch for the standby to
    # write again into its own data dir; in a shared one the write-ahead record skips it.
    wait_purged(node.url)
    # A stalled holder (SIGSTOP) loses the lease; the standby takes over; when the stalled
    # one wakes up it must not write again.
    first.pause()
    for i in ids[10:20]:
        assert post(front.url, "a.example", {"id": i}).status_code == 200
    second.wait_for("archiver active", timeout=15)
    wait_stored(dirs, set(ids[:20]))
    first.resume()
    first.wait_for("lease lost", timeout=10)
    for i in ids[20:30]:
        assert post(front.url, "a.example", {"id": i}).status_code == 200
    wait_stored(dirs, set(ids[:30]))
    assert events_in(first.data_dir) == ids[:10]
    # The holder stops cleanly: the former one takes over at once, without waiting for the TTL.
    assert second.stop() == 0
    first.wait_for("archiver active", count=2, timeout=5)
    for i in ids[30:]:
        assert post(front.url, "a.example", {"id": i}).status_code == 200
    wait_stored(dirs, set(ids))
    assert events_in(first.data_dir) + events_in(second.data_dir) == ids[:10] + ids[30:] + ids[10:30]


def test_cluster_nodes_stopped_and_killed_in_turn_cost_clients_nothing(broker: Broker) -> None:
    """At a steady ~160 requests/s, every node goes down and comes back in turn.

    A node that leads the stream or the key bucket is stopped (SIGTERM: a planned restart,
    it hands its leaderships over); any other node is killed (SIGKILL: a crash), among them
    the node the front end is connected to. Clients with keys notice nothing: every answer
    is 200, none slower than 2 s. Then the stream's leader itself is killed: until a new one
    is elected (nats-server waits 4 to 9 s for a lost leader) nothing can be acknowledged;
    with a timeout that covers the election, requests wait instead of failing. A few clients
    without keys run alongside: a request of theirs under way on a connection that dies may
    get 503 (a second publish could store it twice), nothing else; what they were told is
    stored is stored once.
    """
    nodes = broker.cluster()
    front = broker.frontend(LEITSTAND_NATS_REPLICAS="3", LEITSTAND_NATS_TIMEOUT="15")
    archiver = broker.archiver(LEITSTAND_NATS_REPLICAS="3")
    streams = ("LEITSTAND", "KV_LEITSTAND_KEYS")
    with Load(front.url, ["c1", "c2"], clients=16, keyed=16, pace=0.1) as load, \
            Load(front.url, ["c1", "c2"], clients=4, pace=0.1, prefix="u") as unkeyed:
        time.sleep(1)
        for node in nodes:
            if node.name in leaders(nodes, streams).values():
                node.stop()
            else:
                node.kill()
            time.sleep(1.5)
            node.start().wait_ready()
            time.sleep(1.5)
        with load._lock:
            planned = (Counter(load.statuses), load.unanswered, load.slowest)
        leader = next(n for n in nodes if n.name == leaders(nodes, streams)["LEITSTAND"])
        leader.kill()
        time.sleep(1.5)
        leader.start().wait_ready()
        leaders(nodes, streams)
        time.sleep(1)
    # What the front end logged for a 500, so that a rare one shows its cause in the failure.
    failed = [line for line in front.output().splitlines() if "internal error" in line]
    assert set(planned[0]) == {200} and planned[0][200] > 1000 and planned[1] == 0, (planned, failed)
    assert planned[2] < 2, f"an answer took {planned[2]:.1f} s"
    assert set(load.statuses) == {200} and load.unanswered == 0, (load.statuses, load.unanswered, failed)
    assert set(unkeyed.statuses) <= {200, 503} and unkeyed.statuses[200] > 200, (unkeyed.statuses, failed)
    acked = load.acked | unkeyed.acked
    wait_stored([archiver.data_dir], acked, timeout=60)
    assert_all_acked_stored_once(archiver.data_dir, acked)
    assert_in_order(archiver.data_dir)


def test_a_holder_stops_writing_before_a_standby_can_get_the_lease(broker: Broker) -> None:
    """Fencing: with no renewal (a stalled holder), the holder's own check fails before the lease expires."""
    node = broker.single()

    async def race() -> tuple[float, float]:
        async with jetstream(node.url) as js:
            kv = await js.create_key_value(KeyValueConfig(bucket="LEASE_TEST", history=1, ttl=2.0))
            holder, standby = Lease(kv, 2.0), Lease(kv, 2.0)
            assert await holder.acquire(asyncio.Event())
            holder.check()
            stopped = None
            contender = asyncio.create_task(standby.acquire(asyncio.Event()))
            while not contender.done():
                try:
                    holder.check()
                except LeaseLost:
                    stopped = stopped or time.monotonic()
                await asyncio.sleep(0.01)
            taken = time.monotonic()
        assert stopped is not None
        return stopped, taken

    stopped, taken = asyncio.run(race())
    assert stopped < taken


def test_recovery_cuts_an_unfinished_batch_and_refuses_a_foreign_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    record = Record(data)
    (data / "a.jsonl").write_bytes(b"1\n2\n")
    (data / "b.jsonl").write_bytes(b"x\n")
    record.write("s1", {"a.jsonl": Entry(done=5, seq=9, offset=4, length=4), "b.jsonl": Entry(3, 7, 0, 2)})
    (data / "a.jsonl").write_bytes(b"1\n2\n3")  # a crash in the middle of the append
    assert record.recover("s1") == {"a.jsonl": 5, "b.jsonl": 7}
    assert (data / "a.jsonl").read_bytes() == b"1\n2\n"
    (data / "a.jsonl").write_bytes(b"1\n2\n3\n4\n")  # landed whole
    assert record.recover("s1") == {"a.jsonl": 9, "b.jsonl": 7}
    assert record.recover("other stream") == {}
    (data / "b.jsonl").write_bytes(b"x\ny\n")  # someone else appended
    try:
        record.recover("s1")
    except ArchiveError as exc:
        assert "b.jsonl is 4 bytes but the archiver left it at 0 to 2" in str(exc)
    else:
        raise AssertionError("a file longer than the archiver left it went unnoticed")
    # Killed after the record, before the journal made a new file of the batch: nothing to cut.
    record.write("s1", {"a.jsonl": Entry(9, 12, 8, 2), "new.jsonl": Entry(0, 11, 0, 3)})
    assert record.recover("s1") == {"a.jsonl": 9, "new.jsonl": 0}
    assert not (data / "new.jsonl").exists()


def test_check_config_hides_the_credentials_in_a_nats_url(tmp_path: Path) -> None:
    url = "nats://archiver:s3cret-pw@n1:4222,nats://n2:4222"
    shown = run_cli("check-config", "--data-dir", str(tmp_path), env={"LEITSTAND_TOKEN": TOKEN,
                                                                      "LEITSTAND_NATS_URL": url})
    assert shown.returncode == 0, shown.stdout
    assert "nats://<redacted>@n1:4222,nats://n2:4222  (env)" in shown.stdout
    assert "s3cret" not in shown.stdout + shown.stderr
