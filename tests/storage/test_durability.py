"""Acknowledged means on disk: concurrency, SIGTERM, kill -9, several workers, restore."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from conftest import CLEAN_EXIT, Load, Server, assert_all_acked_stored_once, crash_repeatedly, read_lines


def test_32_concurrent_clients_lose_nothing(server: Server) -> None:
    with Load(server.url, ["a", "b", "c"], clients=32) as load:
        load.wait_acked(600)
    assert load.statuses.keys() == {200}
    found = assert_all_acked_stored_once(server.data_dir, load.acked)
    assert set(found) == load.acked and len(load.acked) > 500


def test_sigterm_under_load_loses_no_acknowledged_event(server: Server) -> None:
    with Load(server.url, ["a", "b"], clients=32, batches=(5,)) as load:
        load.wait_acked(150)
        assert server.stop() in CLEAN_EXIT
    assert len(load.acked) > 100
    assert_all_acked_stored_once(server.data_dir, load.acked)
    assert "stopped: every acknowledged event is on disk" in server.output()


def test_kill_9_at_random_moments(make_server) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    server: Server = make_server()
    server.start()
    with Load(server.url, ["k1", "k2", "k3"], clients=32, batches=(3,)) as load:
        crash_repeatedly(server, rng, 10, (0.2, 0.8))
        load.wait_acked(350)
    server.stop()
    assert len(load.acked) > 300, f"seed {seed}"
    assert_all_acked_stored_once(server.data_dir, load.acked)


def test_two_workers_append_to_one_file_safely(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(workers=2).start()
    with Load(server.url, ["shared"], clients=32, batches=(2,)) as load:
        time.sleep(3)
        server.kill()
        server.start()
        time.sleep(1)
    server.stop()
    # Request ids carry a per-process prefix: both workers answered.
    assert len({rid.split("-")[0] for rid in load.request_ids}) >= 2
    assert_all_acked_stored_once(server.data_dir, load.acked)


def test_restore_by_copying_into_an_empty_dir(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first: Server = make_server().start()
    for n in range(20):
        assert first.post(f"d{n % 3}", f'{{"id":"{n}"}}').status_code == 200
    assert first.stop() in CLEAN_EXIT
    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    for path in first.data_dir.glob("*.jsonl"):
        shutil.copy2(path, restored_dir / path.name)
    second: Server = make_server(data_dir=restored_dir).start()
    assert second.post("d0", '{"id":"after"}').status_code == 200
    assert second.stop() in CLEAN_EXIT
    assert_all_acked_stored_once(restored_dir, {str(n) for n in range(20)} | {"after"})
    assert read_lines(restored_dir / "d0.jsonl")[-1] == b'{"id":"after","domain":"d0"}'


def test_torn_tail_from_a_mid_write_backup_is_set_aside(make_server, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data_dir.mkdir()
    (data_dir / "t.jsonl").write_bytes(b'{"id":"1","domain":"t"}\n{"id":"2","dom')
    server: Server = make_server().start()
    assert (data_dir / "t.jsonl").read_bytes() == b'{"id":"1","domain":"t"}\n'
    (torn,) = data_dir.glob("t.jsonl.torn-*")
    assert torn.read_bytes() == b'{"id":"2","dom'
    assert server.post("t", '{"id":"3"}').status_code == 200
    assert read_lines(data_dir / "t.jsonl") == [b'{"id":"1","domain":"t"}', b'{"id":"3","domain":"t"}']
    assert "torn tail set aside" in server.output()
