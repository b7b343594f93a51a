"""Idempotency-Key against the real server: retries, conflicts, domains, the window, restarts, kill -9, workers."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    CLEAN_EXIT,
    TOKEN,
    Load,
    Server,
    crash_repeatedly,
    partial_batches,
    read_lines,
    run_cli,
    stored_ids,
)
from lazyfs import LazyFS
from storage.test_powerloss import CUTS, DOMAINS, power_cut, power_cut_mid_write

REQUESTS = Path(".leitstand") / "requests"


def keyed(server: Server, domain: str, body: bytes | str, key: str, **headers: str) -> httpx.Response:
    return server.post(domain, body, {"Idempotency-Key": key, **headers})


def test_a_retry_is_answered_ok_and_stored_once(server: Server) -> None:
    first = keyed(server, "orders", '{"id":"1"}', "batch-0001")
    again = keyed(server, "orders", '{"id":"1"}', "batch-0001")
    assert (first.status_code, first.text, again.status_code, again.text) == (200, "ok\n", 200, "ok\n")
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert read_lines(server.data_dir / "orders.jsonl") == [b'{"id":"1","domain":"orders"}']


def test_the_same_events_sent_differently_are_the_same_request(server: Server) -> None:
    """The key stands for the stored lines: whitespace, gzip and the content type do not change them."""
    assert keyed(server, "orders", '[{"id":"1"},{"id":"2"}]', "k").status_code == 200
    spaced = keyed(server, "orders", '[ {"id": "1"},\n {"id": "2"} ]', "k")
    zipped = keyed(server, "orders", gzip.compress(b'{"id":"1"}\n{"id":"2"}\n'), "k",
                   **{"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson"})
    assert [r.headers.get("idempotent-replayed") for r in (spaced, zipped)] == ["true", "true"]
    assert len(read_lines(server.data_dir / "orders.jsonl")) == 2


def test_the_same_key_with_other_events_is_a_conflict_and_writes_nothing(server: Server) -> None:
    assert keyed(server, "orders", '{"id":"1"}', "k-1").status_code == 200
    before = (server.data_dir / "orders.jsonl").read_bytes()
    conflict = keyed(server, "orders", '{"id":"2"}', "k-1")
    assert (conflict.status_code, conflict.text) == (409, "conflict\n")
    assert (server.data_dir / "orders.jsonl").read_bytes() == before


def test_keys_are_per_domain(server: Server) -> None:
    for domain in ("a", "b"):
        response = keyed(server, domain, '{"id":"1"}', "shared-key")
        assert (response.status_code, response.headers.get("idempotent-replayed")) == (200, None)
    assert stored_ids(server.data_dir) == Counter({"1": 2})


def test_requests_without_a_key_are_never_deduplicated(server: Server) -> None:
    for _ in range(3):
        assert server.post("plain", '{"id":"1"}').status_code == 200
    assert stored_ids(server.data_dir) == Counter({"1": 3})
    assert not (server.data_dir / REQUESTS).exists(), "no key, no request log"


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * 129, b"caf\xc3\xa9", b"tab\there", b"del\x7f"],
    ids=["empty", "129-chars", "non-ascii", "control", "del"],
)
def test_an_invalid_key_is_refused_before_anything_is_written(server: Server, value: bytes) -> None:
    body = b'{"id":"1"}'
    head = b"POST /ingest/orders HTTP/1.1\r\nHost: x\r\nX-Auth: " + TOKEN.encode() + b"\r\nIdempotency-Key: "
    answer = server.raw(head + value + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    assert answer == b"HTTP/1.1 400 Bad Request"
    assert not (server.data_dir / "orders.jsonl").exists()


def test_a_key_sent_twice_is_refused_and_the_longest_valid_one_is_taken(server: Server) -> None:
    body = b'{"id":"1"}'
    twice = (b"POST /ingest/orders HTTP/1.1\r\nHost: x\r\nX-Auth: %s\r\nIdempotency-Key: a\r\nIdempotency-Key: a\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s") % (TOKEN.encode(), len(body), body)
    assert server.raw(twice) == b"HTTP/1.1 400 Bad Request"
    longest = "".join(chr(c) for c in range(0x21, 0x7F)) + "~ -" + "x" * 31
    assert len(longest) == 128
    assert keyed(server, "orders", body, longest).status_code == 200
    assert keyed(server, "orders", body, longest).headers["idempotent-replayed"] == "true"


def test_a_key_is_forgotten_after_the_window(make_server: Any) -> None:
    server: Server = make_server(env={"LEITSTAND_IDEMPOTENCY_WINDOW": "2s"}).start()
    assert keyed(server, "w", '{"id":"1"}', "k").status_code == 200
    assert keyed(server, "w", '{"id":"1"}', "k").headers["idempotent-replayed"] == "true"
    time.sleep(2.2)
    late = keyed(server, "w", '{"id":"1"}', "k")
    assert (late.status_code, late.headers.get("idempotent-replayed")) == (200, None)
    # Stored anew, the key is remembered anew.
    assert keyed(server, "w", '{"id":"1"}', "k").headers["idempotent-replayed"] == "true"
    assert stored_ids(server.data_dir) == Counter({"1": 2})


def test_keys_survive_a_restart_and_a_kill(make_server: Any) -> None:
    server: Server = make_server().start()
    assert keyed(server, "r", '{"id":"1"}', "k1").status_code == 200
    assert server.stop() in CLEAN_EXIT
    server.start()
    assert keyed(server, "r", '{"id":"2"}', "k2").status_code == 200
    server.kill()
    server.start()
    assert keyed(server, "r", '{"id":"1"}', "k1").headers["idempotent-replayed"] == "true"
    assert keyed(server, "r", '{"id":"2"}', "k2").headers["idempotent-replayed"] == "true"
    assert keyed(server, "r", '{"id":"x"}', "k1").status_code == 409
    assert stored_ids(server.data_dir) == Counter({"1": 1, "2": 1})


def test_the_oldest_keys_are_forgotten_beyond_max_keys(make_server: Any) -> None:
    server: Server = make_server(env={"LEITSTAND_IDEMPOTENCY_MAX_KEYS": "2"}).start()
    for n in range(3):
        assert keyed(server, "m", f'{{"id":"{n}"}}', f"k{n}").status_code == 200
    # k0 was evicted: its retry stores again, as documented; k2 is still known.
    assert keyed(server, "m", '{"id":"0"}', "k0").headers.get("idempotent-replayed") is None
    assert keyed(server, "m", '{"id":"2"}', "k2").headers["idempotent-replayed"] == "true"
    assert stored_ids(server.data_dir) == Counter({"0": 2, "1": 1, "2": 1})
    assert "idempotency key evicted inside the window" in server.output()


def test_two_workers_store_a_key_sent_to_both_at_once_only_once(make_server: Any) -> None:
    server: Server = make_server(workers=2, command="serve").start()
    answered_by: set[str] = set()
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def send(key: str) -> None:
        with httpx.Client(headers={"X-Auth": TOKEN, "Idempotency-Key": key}, timeout=30) as client:
            response = client.post(f"{server.url}/ingest/both", content=f'{{"id":"{key}"}}')
        with lock:
            statuses[response.status_code] += 1
            answered_by.add(response.headers["x-request-id"].split("-")[0])

    for round_ in range(40):
        threads = [threading.Thread(target=send, args=(f"key-{round_}",)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == Counter({200: 320})
    assert len(answered_by) == 2, "both workers answered"
    assert stored_ids(server.data_dir) == Counter({f"key-{n}": 1 for n in range(40)})


def test_keyed_and_unkeyed_senders_on_the_same_domains_lose_nothing(make_server: Any) -> None:
    """Keyed and unkeyed appends meet in the same commits of one file: no keyed request may be
    answered as a replay on its first try (it would never be stored), and every acknowledged
    event is stored exactly once. (When a commit handed on the key table of the appends that
    arrived during it, this lost about 1 keyed request in 70.)"""
    server: Server = make_server().start()
    with Load(server.url, ["m1", "m2", "m3"], clients=12, batches=(3, 4), keyed=6) as load:
        load.wait_acked(4000, timeout=60)
    found = stored_ids(server.data_dir)
    assert load.statuses.keys() == {200}, load.statuses
    assert len(load.sent) > 1000, "too little load to judge"
    assert load.replayed_first_tries == 0, f"{load.replayed_first_tries} first tries answered as replays"
    assert load.acked == set(found), f"lost {len(load.acked - set(found))}"
    assert max(found.values()) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_while_clients_retry_stores_every_event_exactly_once(make_server: Any, workers: int) -> None:
    """The keys are recorded before the data and count only once the data is in the file, so a
    crash at any moment leaves each batch either stored with its key or not at all: no duplicates.
    (Recording them after the data, this test finds duplicates: 14 events in one run.) Half the
    clients send without a key and never retry: their requests, too, are stored whole or not at all."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    server: Server = make_server(workers=workers, command="serve").start()
    with Load(server.url, ["x1", "x2"], clients=24, batches=(1, 3), seed=seed, keyed=12) as load:
        crash_repeatedly(server, rng, 8, (0.2, 0.7))
        load.wait_acked(350)
    server.stop()
    found = stored_ids(server.data_dir)
    assert load.statuses.keys() <= {200, 503}, f"seed {seed}: {load.statuses}"
    assert len(load.acked) > 300 and load.retried, f"seed {seed}"
    assert load.acked <= found.keys(), f"seed {seed}: lost {len(load.acked - found.keys())}"
    duplicated = {i: n for i, n in found.items() if n > 1}
    assert not duplicated, f"seed {seed}: stored twice: {list(duplicated)[:5]} of {len(duplicated)}"
    assert not partial_batches(found, load.sent), f"seed {seed}"
    assert load.replayed_first_tries == 0, f"seed {seed}"


# A fixed cut schedule (it failed one run in four before requests were kept whole), and one drawn at
# random and printed (POWERLOSS_SEED repeats it).
POWER_CUT_SEEDS = [177921911, None]


@pytest.mark.parametrize("seed", POWER_CUT_SEEDS, ids=lambda seed: str(seed or "random"))
def test_power_cuts_keep_every_request_whole_and_retries_stored_once(
    make_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int | None
) -> None:
    """On lazyfs, which forgets what was not fsynced (every other cut torn: a random prefix of
    what was not synced survives, cut at any byte). Half the clients send keyed batches and retry
    them until answered, the other half send without a key and never retry, on the same domains.
    No acknowledged event may be lost, none stored twice, and no batch stored in part: records
    are synced before the events are written, so no events reach the disk without the record of
    where their request ends. (Writing the events before the key is synced, this test found 1 to
    4 duplicates in each of three runs; keeping only the torn line, not the whole request, it
    failed about one run in four.)"""
    seed = seed or int(os.environ.get("POWERLOSS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    with LazyFS(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lazyfs.log") as fs:
        server: Server = make_server(data_dir=fs.mountpoint / "data")
        try:
            server.start()
            with Load(server.url, DOMAINS, clients=16, batches=(1, 3, 4), seed=seed, keyed=8) as load:
                for n in range(CUTS):
                    time.sleep(rng.uniform(0.2, 0.8))
                    # In turn: torn in the middle of a commit's write, torn at any moment, clean.
                    if n % 3 == 0:
                        power_cut_mid_write(server, fs, rng.randrange(1 << 30))
                    else:
                        power_cut(server, fs, rng.randrange(1 << 30) if n % 3 == 1 else None)
                    server.start()
                load.wait_acked(250, timeout=60)
            power_cut(server, fs)
            server.start()  # the last recovery, on what reached the disk
        finally:
            server.kill()
        found = stored_ids(fs.backing / "data")  # fails on a torn or unparseable line
    duplicated = {i for i, n in found.items() if n > 1}
    partial = partial_batches(found, load.sent)
    set_aside = server.output().count(" set aside: ")
    with capsys.disabled():
        print(f"\nseed {seed}: {len(load.acked)} events acknowledged over {CUTS} power cuts, {len(load.sent)} "
              f"batches sent; lost {len(load.acked - found.keys())}, stored twice {len(duplicated)}, "
              f"stored in part {len(partial)}, set aside {set_aside}")
    assert len(load.acked) > 200 and load.retried, f"seed {seed}"
    assert load.acked <= found.keys(), f"seed {seed}: lost {len(load.acked - found.keys())}"
    assert not duplicated, f"seed {seed}: stored twice: {sorted(duplicated)[:5]}"
    assert not partial, f"seed {seed}: stored in part: {partial[:5]}"
    assert load.replayed_first_tries == 0, f"seed {seed}"
    assert set_aside > 0, f"seed {seed}: no cut tore a line or a request: the test proves nothing"


def test_operator_commands_know_the_state_dir(make_server: Any, tmp_path: Path) -> None:
    server: Server = make_server().start()
    assert keyed(server, "ops", '{"id":"1"}', "k").status_code == 200
    assert (server.data_dir / REQUESTS / "ops.jsonl.log").stat().st_size > 0
    assert httpx.get(server.url + "/ready").status_code == 200
    env = {"LEITSTAND_DATA_DIR": str(server.data_dir), "LEITSTAND_TOKEN": TOKEN}
    verified = run_cli("verify", env=env)
    assert verified.returncode == 0, verified.stdout
    assert ".leitstand" not in verified.stdout, "the state dir is not the operator's business"
    checked = run_cli("check-config", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    dest = tmp_path / "backup"
    assert run_cli("backup", str(dest), env=env).returncode == 0
    assert not (dest / ".leitstand").exists(), "key logs are not backed up"
    assert (dest / "ops.jsonl").exists()
    server.stop()
    # A planted symlink under the state dir's name is a stray, never followed.
    shutil.rmtree(server.data_dir / ".leitstand")
    (server.data_dir / ".leitstand").symlink_to(tmp_path)
    assert "PROBLEM   .leitstand: stray file" in run_cli("verify", env=env).stdout
    server.start()
    assert keyed(server, "ops", '{"id":"2"}', "k2").status_code == 500
    assert server.post("ops", '{"id":"3"}').status_code == 200, "appends without a key go on"
    assert "state dir refused: .leitstand in the data dir is not a directory" in server.output()
    assert list(tmp_path.glob("keys*")) == []
