"""Power loss and EIO, on lazyfs (tests/lazyfs.py): a filesystem that forgets what was not fsynced.

SIGKILL alone proves little about durability: the kernel's page cache survives a killed
process, so data that was written but never synced is still there afterwards. Here the
page cache lives in lazyfs, and a power cut throws it away.

The power-loss test prints one line straight to the terminal, past pytest's capture:
``acked events lost: 0 of N over K cuts; negative control lost M``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest
from conftest import Load, Server, partial_batches, read_lines, stored_ids
from lazyfs import LazyFS

DOMAINS = ["alpha", "beta", "gamma"]
CUTS = 6


def power_cut(server: Server, fs: LazyFS, seed: int | None = None) -> None:
    """The server dies first, then the page cache: after SIGKILL returns, nothing more is written.

    Dropping the cache first would let the still-running server append to the shrunken file
    and acknowledge a sync that no longer covers earlier writes, a loss no real power cut
    can cause. A killed process waits for its FUSE requests under way to be answered, so
    the order leaves nothing in flight. ``seed`` makes it a torn cut.
    """
    server.kill()
    fs.cut(seed)


def power_cut_mid_write(server: Server, fs: LazyFS, seed: int) -> None:
    """A torn power cut while a commit writes to a journal file: the server is killed during that
    write, which then completes (as a killed process waits for it), and a random prefix of what
    was not synced, cut at any byte, reaches the disk."""
    assert server.proc is not None
    fs.hold_write(".jsonl")
    server.signal(signal.SIGKILL)
    fs.release()
    server.proc.wait(10)
    fs.cut(seed)


class Outcome(NamedTuple):
    acked: int
    lost: int
    duplicated: list[str]
    torn: int
    partial: int


def run_with_power_cuts(make_server: Any, tmp_path: Path, fsync: str, seed: int) -> Outcome:
    """Clients against a server on lazyfs, power cut ``CUTS`` times, every other cut torn.

    Stored lines are counted once the last start has repaired the last cut and the power is
    off for good: only what reached the disk.
    """
    rng = random.Random(seed)
    with LazyFS(tmp_path / f"disk-{fsync}", tmp_path / f"mnt-{fsync}", tmp_path / f"lazyfs-{fsync}.log") as fs:
        server: Server = make_server(data_dir=fs.mountpoint / "data", env={"LEITSTAND_FSYNC": fsync})
        try:
            server.start()
            with Load(server.url, DOMAINS, clients=16, batches=(1, 1, 2, 3, 5), pad=200, seed=seed) as clients:
                for n in range(CUTS):
                    time.sleep(rng.uniform(0.2, 0.8))
                    power_cut(server, fs, rng.randrange(1 << 30) if n % 2 == 0 else None)
                    server.start()
                time.sleep(rng.uniform(0.2, 0.8))
                clients.wait_acked(250, timeout=60)
            power_cut(server, fs)
        finally:
            server.kill()
        disk = fs.backing / "data"
        found = stored_ids(disk)  # fails on a torn or unparseable line
        torn = len(list(disk.glob("*.torn-*")))
    print(f"fsync={fsync} seed={seed}: acked {len(clients.acked)}, stored {len(found)}, torn tails set aside {torn}")
    duplicated = sorted(i for i, n in found.items() if n > 1)
    partial = len(partial_batches(found, clients.sent))
    return Outcome(len(clients.acked), len(clients.acked - found.keys()), duplicated, torn, partial)


def test_power_loss_loses_no_acknowledged_event(
    make_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("POWERLOSS_SEED") or random.randrange(1 << 30))
    print(f"seed {seed} (set POWERLOSS_SEED to repeat the cut schedule)")
    run = run_with_power_cuts(make_server, tmp_path, "always", seed)
    control = run_with_power_cuts(make_server, tmp_path, "never", seed)
    with capsys.disabled():
        print(f"\nacked events lost: {run.lost} of {run.acked} over {CUTS} cuts; negative control lost {control.lost}")
    assert run.acked > 200, f"too little load to judge (seed {seed})"
    assert run.lost == 0, f"acked events lost (seed {seed})"
    assert not run.duplicated, f"events stored twice: {run.duplicated[:5]} (seed {seed})"
    assert run.partial == 0, f"batches stored in part: {run.partial} (seed {seed})"
    # Without fsync the page cache holds nearly everything: the cuts must lose some and tear lines.
    assert control.lost > 0, f"LEITSTAND_FSYNC=never lost nothing of {control.acked}: the power cut is broken"
    assert control.torn > 0, f"no torn cut tore a line (seed {seed})"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("op", ["sync", "write"])
def test_eio_is_503_rolls_back_and_spares_other_domains(make_server: Any, tmp_path: Path, op: str) -> None:
    with LazyFS(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lazyfs.log") as fs:
        server: Server = make_server(data_dir=fs.mountpoint / "data").start()
        try:
            for n in range(3):
                assert server.post("sick", orjson.dumps({"id": f"before-{n}"})).status_code == 200
            journal, disk = server.data_dir / "sick.jsonl", fs.backing / "data" / "sick.jsonl"
            before = journal.read_bytes()
            assert disk.read_bytes() == before, "an acknowledged event is not on disk"

            fs.fail(op, "sick.jsonl")
            response = server.post("sick", orjson.dumps([{"id": f"failed-{n}", "pad": "x" * 500} for n in range(20)]))
            assert (response.status_code, response.text) == (503, "storage unavailable\n")
            assert int(response.headers["retry-after"]) > 0
            assert journal.read_bytes() == before, "the failed batch left bytes behind"
            assert disk.read_bytes() == before
            assert server.post("well", orjson.dumps({"id": "during"})).status_code == 200
            assert read_lines(fs.backing / "data" / "well.jsonl") == [b'{"id":"during","domain":"well"}']

            fs.heal()
            # Whatever the failed commit left pending would reach the disk with this fsync.
            fsync_path(journal)
            assert disk.read_bytes() == before
            assert server.post("sick", orjson.dumps({"id": "after"})).status_code == 200
            ids = [orjson.loads(line)["id"] for line in read_lines(journal)]
            assert ids == ["before-0", "before-1", "before-2", "after"]
            assert disk.read_bytes() == journal.read_bytes()
        finally:
            server.kill()
    assert f"{op} failed: file=sick.jsonl" in server.output()


def test_kill_9_in_the_middle_of_writing_a_batch_keeps_it_whole_or_not_at_all(make_server: Any, tmp_path: Path) -> None:
    """No power cut: only the writer dies, in the middle of writing a commit of large batches (the
    kernel hands a large write to the filesystem in pieces, and a killed writer stops between
    them). The part that reached the file is set aside at the next start, and every batch, keyed
    or not, is on disk whole or not at all."""
    with LazyFS(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lazyfs.log") as fs:
        server: Server = make_server(data_dir=fs.mountpoint / "data")
        try:
            server.start()
            with Load(server.url, ["big"], clients=4, batches=(600, 900), pad=300, keyed=2) as load:
                for _ in range(4):
                    time.sleep(0.3)
                    assert server.proc is not None
                    fs.hold_write(".jsonl")
                    server.signal(signal.SIGKILL)
                    fs.release()
                    server.proc.wait(10)
                    server.start()
                load.wait_acked(2100, timeout=60)
            server.stop()
        finally:
            server.kill()
        found = stored_ids(server.data_dir)
    assert len(load.acked) > 2000
    assert load.acked <= found.keys(), f"lost {len(load.acked - found.keys())}"
    assert max(found.values()) == 1, "stored twice"
    assert not partial_batches(found, load.sent), "a batch stored in part"
    assert "partial request set aside" in server.output(), "no kill cut a write short: the test proves nothing"
