"""Rotation, compression and retention, with the real server (2 workers where it matters) and real files."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import (
    ROOT,
    TOKEN,
    Load,
    Server,
    crash_repeatedly,
    journal_lines,
    partial_batches,
    require_root,
    run_cli,
)
from leitstand.cli.verify import verify as verify_reports
from leitstand.intake import domains
from leitstand.storage import datadir, segments
from leitstand.storage.journal import Journal
from leitstand.storage.rotation import Housekeeper, Policy

FAST = {"LEITSTAND_ROTATE_BYTES": "4KiB", "LEITSTAND_COMPRESS": "zstd"}


def ordered_ids(data_dir: Path) -> dict[str, list[str]]:
    """Per journal file, the event ids of its segments (oldest first), then of its live file; each line must parse."""
    return {name: [orjson.loads(line)["id"] for line in lines] for name, lines in journal_lines(data_dir).items()}


def assert_once_and_in_order(data_dir: Path, acked: set[str]) -> Counter[str]:
    """Every acknowledged id is stored exactly once, and each client's ids come in the order it sent them."""
    found: Counter[str] = Counter()
    for ids in ordered_ids(data_dir).values():
        found.update(ids)
        last: dict[str, tuple[int, int]] = {}
        for event_id in ids:
            client, seq, index = event_id.split("-")
            position = (int(seq), int(index))
            assert last.get(client, (-1, -1)) < position, f"client {client} out of order at {event_id}"
            last[client] = position
    assert not acked - set(found), f"acked events lost: {len(acked - set(found))} of {len(acked)}"
    assert not [i for i, n in found.items() if n > 1], "events stored twice"
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def names(data_dir: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if re.fullmatch(pattern, p.name))


def verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("verify", "--data-dir", str(data_dir))


# -- names -----------------------------------------------------------------------------


def test_segment_names_sort_by_time_fit_the_filesystem_and_are_no_domains_file() -> None:
    long_journal = "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".jsonl"
    longest = domains.file_name(".".join(["a" * 63] * 3 + ["b" * 61]))  # 255 bytes, shortened with a hash
    for journal in ("app.jsonl", long_journal, longest):
        made: list[segments.Segment] = []
        now = 1_800_000_000.5
        for when in (now, now, now, now + 0.000001, now - 5):  # several in one microsecond, and the clock going back
            name = segments.new_name(journal, made, when)
            segment = segments.parse(name)
            assert segment is not None and len(name + ".zst") <= 255
            made.append(segment)
        assert [s.name for s in made] == sorted(s.name for s in made) and len({s.name for s in made}) == 5
        assert segments.base_of(journal) == made[0].base
        assert {datadir.kind_of(s.name) for s in made} == {datadir.kind_of(s.name + ".zst") for s in made} == {datadir.Kind.SEGMENT}
    assert datadir.kind_of("app.jsonl.20260128T071739.123456Z.zst") is datadir.Kind.SEGMENT
    assert datadir.kind_of("app.jsonl") is datadir.Kind.JOURNAL
    # Lower-case, or without the fraction, it is no segment; a domain's file is never one.
    assert datadir.kind_of("app.jsonl.20260128t071739.123456z") is datadir.Kind.STRAY
    assert datadir.kind_of("app.jsonl.20260128T071739Z") is datadir.Kind.STRAY
    assert segments.parse("app.jsonl.20260128t071739.123456z.jsonl") is None


# -- sealing under load ----------------------------------------------------------------


def test_rotation_under_load_with_two_workers_keeps_every_acked_event_once_and_in_order(make_server: Any) -> None:
    server: Server = make_server(workers=2, env=FAST).start()
    with Load(server.url, ["app", "other"], clients=8, batches=(1, 1, 5), pad=200, keyed=2) as load:
        time.sleep(4)

    def settled() -> bool:
        # Every segment compressed, and /ready counts the bytes on disk. Looked at until both hold
        # at once: a worker may still seal what came in just before the load stopped.
        on_disk = sum(p.stat().st_size for p in server.data_dir.glob("*.zst"))
        ready = httpx.get(server.url + "/ready").json()["bytes"]
        return not names(server.data_dir, r".*Z") and ready["sealed"] == on_disk

    wait_for(settled, 10)
    server.stop()
    assert load.statuses[200] > 100 and set(load.statuses) == {200}
    assert len(names(server.data_dir, r"app\.jsonl\..*\.zst")) >= 3
    found = assert_once_and_in_order(server.data_dir, load.acked)
    assert not partial_batches(found, load.sent)
    checked = verify(server.data_dir)
    assert checked.returncode == 0 and " 0 notes" in checked.stdout, checked.stdout


def test_rotate_command_while_two_workers_write(make_server: Any, data_dir: Path) -> None:
    server: Server = make_server(workers=2).start()
    sealed = 0
    with Load(server.url, ["app"], clients=6, batches=(1, 3), keyed=2) as load:
        for _ in range(3):
            time.sleep(0.3)
            done = run_cli("rotate", "--data-dir", str(data_dir), "app")
            assert done.returncode == 0, done.stderr
            sealed += done.stdout.count("sealed    app.jsonl -> ")
    server.stop()
    assert sealed == 3 and len(segments.of(data_dir, "app.jsonl")) == 3
    found = assert_once_and_in_order(data_dir, load.acked)
    assert not partial_batches(found, load.sent)
    assert verify(data_dir).returncode == 0


def test_a_keyed_retry_across_a_seal_is_a_replay_in_every_worker_and_after_a_restart(
    make_server: Any, data_dir: Path
) -> None:
    server: Server = make_server(workers=2).start()
    batch = b'[{"id":"k-0-0"},{"id":"k-0-1"},{"id":"k-0-2"}]'
    assert server.post("app", batch, {"Idempotency-Key": "before"}).status_code == 200
    assert run_cli("rotate", "--data-dir", str(data_dir)).returncode == 0
    # Requests of several lines after the seal: their records must name the new file, not the segment.
    for n in range(1, 6):
        body = orjson.dumps([{"id": f"k-{n}-{i}"} for i in range(3)])
        assert server.post("app", body, {"Idempotency-Key": f"after-{n}"}).status_code == 200
    for _ in range(8):  # both workers answer some of them
        retry = server.post("app", batch, {"Idempotency-Key": "before"})
        assert (retry.status_code, retry.headers.get("idempotent-replayed")) == (200, "true")
        assert server.post("app", b'{"id":"x"}', {"Idempotency-Key": "before"}).status_code == 409
    server.kill()
    server.start()
    retry = server.post("app", batch, {"Idempotency-Key": "before"})
    assert (retry.status_code, retry.headers.get("idempotent-replayed")) == (200, "true")
    assert server.post("app", b'[{"id":"k-1-0"},{"id":"k-1-1"},{"id":"k-1-2"}]',
                       {"Idempotency-Key": "after-1"}).headers.get("idempotent-replayed") == "true"
    server.stop()
    assert Counter(i for ids in ordered_ids(data_dir).values() for i in ids) == Counter(
        f"k-{n}-{i}" for n in range(6) for i in range(3)
    )


def test_a_live_file_renamed_by_hand_gets_no_more_appends(make_server: Any, data_dir: Path) -> None:
    server: Server = make_server(workers=2).start()
    for n in range(10):
        assert server.post("app", orjson.dumps([{"id": f"a-{n}-0"}, {"id": f"a-{n}-1"}]),
                           {"Idempotency-Key": f"a{n}"}).status_code == 200
    (data_dir / "app.jsonl").rename(data_dir / "app.jsonl.1")  # logrotate without copytruncate
    for n in range(10):
        assert server.post("app", orjson.dumps([{"id": f"b-{n}-0"}, {"id": f"b-{n}-1"}]),
                           {"Idempotency-Key": f"b{n}"}).status_code == 200
    moved = (data_dir / "app.jsonl.1").read_bytes()
    assert moved.count(b"\n") == 20 and b'"b-' not in moved
    # A restart must not take what the request log said of the renamed file for offsets into the new one.
    server.kill()
    make_server().start().stop()
    assert [orjson.loads(line)["id"] for line in (data_dir / "app.jsonl").read_bytes().splitlines()] == [
        f"b-{n}-{i}" for n in range(10) for i in range(2)
    ]


# -- crashes ---------------------------------------------------------------------------


def test_kill_9_during_sealing_and_compression_loses_and_doubles_nothing(make_server: Any, data_dir: Path) -> None:
    env = {**FAST, "LEITSTAND_ROTATE_BYTES": "16KiB"}
    server: Server = make_server(workers=2, env=env).start()
    with Load(server.url, ["app", "other"], clients=8, batches=(1, 4), pad=300, keyed=8) as load:
        crash_repeatedly(server, random.Random(16), times=4, pause=(0.3, 0.8))
        time.sleep(0.5)
    wait_for(lambda: not names(data_dir, r".*Z"), 10)
    server.stop()
    assert len(segments.every(data_dir)) >= 4
    found = assert_once_and_in_order(data_dir, load.acked)
    assert not partial_batches(found, load.sent)
    assert load.replayed_first_tries == 0
    checked = verify(data_dir)
    assert checked.returncode == 0, checked.stdout
    assert not (data_dir / ".leitstand" / "tmp").exists() or not any((data_dir / ".leitstand" / "tmp").iterdir())


_DYING_SEAL = """
import os, signal, sys
from pathlib import Path
from leitstand.storage import journal
rename, step = os.rename, sys.argv[2]

def dying(src, dst, **kw):
    if src == "app.jsonl" and step == "before-rename":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst, **kw)
    if src == "app.jsonl" and step == "after-rename":
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = dying
journal.seal(Path(sys.argv[1]), ["app.jsonl"], key_window=86400, max_keys=1000)
"""


@pytest.mark.parametrize("step", ["before-rename", "after-rename"])
def test_kill_9_in_the_middle_of_a_seal_keeps_every_key_and_cuts_no_event(
    make_server: Any, data_dir: Path, step: str
) -> None:
    """The request log is rewritten before the file is renamed; a seal killed on either side of the
    rename leaves the keys known and no record that could cut the next file."""
    server: Server = make_server().start()

    def batch(tag: str) -> bytes:
        return orjson.dumps([{"id": f"{tag}-{i}"} for i in range(3)])

    for n in range(5):
        assert server.post("app", batch(f"k{n}"), {"Idempotency-Key": f"k{n}"}).status_code == 200
    died = subprocess.run([sys.executable, "-c", _DYING_SEAL, str(data_dir), step], cwd=ROOT, check=False)
    assert died.returncode == -signal.SIGKILL
    assert len(segments.every(data_dir)) == (1 if step == "after-rename" else 0)
    for n in range(5):
        assert server.post("app", batch(f"l{n}"), {"Idempotency-Key": f"l{n}"}).status_code == 200
    server.kill()
    server = make_server().start()
    for tag in (*(f"k{n}" for n in range(5)), *(f"l{n}" for n in range(5))):
        retry = server.post("app", batch(tag), {"Idempotency-Key": tag})
        assert (retry.status_code, retry.headers.get("idempotent-replayed")) == (200, "true"), tag
    server.stop()
    assert Counter(i for ids in ordered_ids(data_dir).values() for i in ids) == Counter(
        f"{t}{n}-{i}" for t in "kl" for n in range(5) for i in range(3))
    assert verify(data_dir).returncode == 0


_COMPRESS_DYING = """
import os, signal, sys
from pathlib import Path
from leitstand.storage.journal import Journal
from leitstand.storage.rotation import Housekeeper, Policy

calls, dying_at = 0, int(sys.argv[3])

def dying(real):
    def call(*args, **kw):
        global calls
        calls += 1
        if calls == dying_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)
    return call

for name in ("write", "fsync", "rename", "replace", "unlink", "utime"):
    setattr(os, name, dying(getattr(os, name)))
Housekeeper(Journal(Path(sys.argv[1])), Policy(compress=sys.argv[2])).tidy()
print("done", calls)
"""


@pytest.mark.parametrize("codec", ["zst", "gz"])
def test_kill_9_at_every_step_of_a_compression_leaves_the_original_or_the_compressed_whole(
    tmp_path: Path, codec: str
) -> None:
    """The compressor is killed before each of its writes, syncs, renames and removals in turn: whatever
    has a segment's name is whole, never neither, and the next pass finishes with verify clean."""
    rng = random.Random(7)
    original = b"".join(orjson.dumps({"id": n, "domain": "app", "r": rng.random()}) + b"\n" for n in range(20_000))
    stem = "app.jsonl.20260128T071739.123456Z"
    seen = set()
    for step in itertools.count(1):
        directory = tmp_path / f"data-{step}"
        directory.mkdir()
        (directory / stem).write_bytes(original)
        run = subprocess.run([sys.executable, "-c", _COMPRESS_DYING, str(directory), codec, str(step)], cwd=ROOT,
                             capture_output=True, text=True, check=False)
        left = tuple(sorted(p.name for p in directory.iterdir() if p.name.startswith("app")))
        if run.returncode == 0:
            assert left == (f"{stem}.{codec}",) and step > 10, run.stdout
            break
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert left in ((stem,), (stem, f"{stem}.{codec}"), (f"{stem}.{codec}",)), left
        for name in left:
            segment = segments.parse(name)
            assert segment is not None and b"".join(segments.chunks(directory / name, segment.codec)) == original
        seen.add(left)
        Housekeeper(Journal(directory), Policy(compress=codec)).tidy()
        assert sorted(p.name for p in directory.iterdir() if p.name.startswith("app")) == [f"{stem}.{codec}"]
        assert not list((directory / ".leitstand").glob("tmp/*"))
        assert [(r.name, r.lines, r.problems, r.notes) for r in verify_reports(directory)] == [
            (f"{stem}.{codec}", 20_000, [], [])]
    # Killed before the compressed file had its name, and between the rename and the removal of the original.
    assert {(stem,), (stem, f"{stem}.{codec}")} <= seen


# -- compression -----------------------------------------------------------------------


@pytest.mark.parametrize(("codec", "reader"), [("zstd", ["zstdcat"]), ("gzip", ["zcat"])])
def test_compressed_segments_are_read_by_the_standard_tools_and_verify_checks_their_checksum(
    make_server: Any, data_dir: Path, codec: str, reader: list[str]
) -> None:
    server: Server = make_server(env={"LEITSTAND_COMPRESS": codec}).start()
    lines = b"".join(orjson.dumps({"n": n, "domain": "app"}) + b"\n" for n in range(500))
    assert server.post("app", lines, {"Content-Type": "application/x-ndjson"}).status_code == 200
    assert run_cli("rotate", "--data-dir", str(data_dir)).returncode == 0
    suffix = "zst" if codec == "zstd" else "gz"
    wait_for(lambda: bool(names(data_dir, rf"app\.jsonl\..*Z\.{suffix}")))
    server.stop()
    (compressed,) = names(data_dir, rf"app\.jsonl\..*Z\.{suffix}")
    assert not names(data_dir, r"app\.jsonl\..*Z")  # the original is gone
    assert subprocess.run([*reader, str(data_dir / compressed)], capture_output=True, check=True).stdout == lines
    checked = verify(data_dir)
    assert checked.returncode == 0 and f"ok        {compressed}: 500 lines" in checked.stdout
    path = data_dir / compressed
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    checked = verify(data_dir)
    assert checked.returncode == 1
    assert f"PROBLEM   {compressed}: checksum mismatch" in checked.stdout


def test_a_full_disk_during_compression_leaves_the_segment_uncompressed_and_logs_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_root("mounts a small tmpfs to fill it up")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        stem = "app.jsonl.20260128T071739.123456Z"
        # Random hex compresses to about half: no room for that beside 900 KB in 1 MiB.
        original = b"".join(orjson.dumps({"r": os.urandom(48).hex(), "domain": "app"}) + b"\n" for _ in range(7500))
        (mount / stem).write_bytes(original)
        housekeeper = Housekeeper(Journal(mount), Policy(compress="zst"))
        housekeeper.tidy()
        housekeeper.tidy()  # the failure is not retried (nor logged) on every pass
        assert (mount / stem).read_bytes() == original
        assert sorted(p.name for p in mount.iterdir()) == [".leitstand", stem]
        failures = [r.getMessage() for r in caplog.records if "compression failed" in r.getMessage()]
        assert failures == [f"compression failed, the segment stays uncompressed: file={stem} error=no space left"]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


# -- retention -------------------------------------------------------------------------


def post_and_seal(server: Server, domain: str, events: int) -> str:
    body = b"".join(orjson.dumps({"id": f"{domain}-{n}"}) + b"\n" for n in range(events))
    assert server.post(domain, body, {"Content-Type": "application/x-ndjson"}).status_code == 200
    done = run_cli("rotate", "--data-dir", str(server.data_dir), domain)
    return done.stdout.split(" -> ")[1].split()[0]


def test_retention_by_age_removes_exactly_the_expired_segments(make_server: Any, data_dir: Path,
                                                               tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    env = {"LEITSTAND_COMPRESS": "off", "LEITSTAND_RETENTION": "4s,keep.*=off",
           "LEITSTAND_ARCHIVE_DIR": str(archive)}
    server: Server = make_server(env=env).start()
    stray = "no_domain.jsonl.20200101T000000.000000Z"  # looks like a segment of no valid domain: not ours
    (data_dir / stray).write_bytes(b"{}\n")
    old, kept = post_and_seal(server, "app", 10), post_and_seal(server, "keep.me", 10)
    time.sleep(3)
    young = post_and_seal(server, "app", 10)
    assert server.post("app", b'{"id":"live"}').status_code == 200
    wait_for(lambda: not (data_dir / old).exists(), 8)
    assert sorted(p.name for p in data_dir.iterdir() if p.name != ".leitstand") == sorted(
        [young, kept, "app.jsonl", stray])
    assert (archive / old).read_bytes().count(b"\n") == 10  # moved, not deleted
    metrics = httpx.get(server.url + "/metrics", headers={"X-Auth": TOKEN}).text
    assert 'leitstand_segments_removed_total{reason="age"} 1.0' in metrics
    assert 'leitstand_data_dir_bytes{kind="sealed"}' in metrics
    server.stop()
    assert f"segment moved to the archive dir by retention: file={old} reason=age" in server.output()


def test_retention_by_size_removes_the_oldest_segments_of_any_domain_first(make_server: Any, data_dir: Path) -> None:
    server: Server = make_server(env={"LEITSTAND_COMPRESS": "off"}).start()
    made = [post_and_seal(server, domain, 20) for domain in ("a", "b", "a", "b", "a")]
    assert server.post("a", b'{"id":"live"}').status_code == 200
    server.stop()
    sizes = {name: (data_dir / name).stat().st_size for name in made}
    live = (data_dir / "a.jsonl").stat().st_size
    limit = live + sizes[made[2]] + sizes[made[3]] + sizes[made[4]]
    server = make_server(env={"LEITSTAND_COMPRESS": "off", "LEITSTAND_RETENTION_MAX_BYTES": str(limit)}).start()
    wait_for(lambda: not (data_dir / made[1]).exists())
    time.sleep(1.5)  # a pass more removes nothing more
    server.stop()
    assert sorted(p.name for p in data_dir.iterdir() if p.name != ".leitstand") == sorted([*made[2:], "a.jsonl"])
    assert (data_dir / "a.jsonl").read_bytes() == b'{"id":"live","domain":"a"}\n'


# -- everything else understands segments ------------------------------------------------


def test_backup_copies_a_segment_once_and_a_restore_by_copying_files_serves_all(
    make_server: Any, data_dir: Path, tmp_path: Path
) -> None:
    server: Server = make_server(env={"LEITSTAND_COMPRESS": "off"}).start()
    post_and_seal(server, "app", 100)
    assert server.post("app", b'{"id":"live-1"}').status_code == 200
    backup = tmp_path / "backup"
    first = run_cli("backup", "--data-dir", str(data_dir), str(backup))
    assert first.returncode == 0 and "2 files" in first.stdout
    server.stop()
    # Compressed meanwhile: the backup has the segment already, under its plain name.
    server = make_server(env={"LEITSTAND_COMPRESS": "zstd"}).start()
    wait_for(lambda: bool(names(data_dir, r"app\.jsonl\..*Z\.zst")))
    assert server.post("app", b'{"id":"live-2"}').status_code == 200
    second = run_cli("backup", "--data-dir", str(data_dir), str(backup))
    appended = len(b'{"id":"live-2","domain":"app"}\n')
    assert f" {appended} bytes copied" in second.stdout, second.stdout
    assert len(names(backup, r"app\.jsonl\..*Z")) == 1 and not names(backup, r".*\.zst")
    server.stop()
    # A restore by copying the files (no .leitstand) into an empty data dir.
    restored = tmp_path / "restored"
    restored.mkdir()
    for path in data_dir.iterdir():
        if path.is_file():
            (restored / path.name).write_bytes(path.read_bytes())
    server = make_server(data_dir=restored, env={"LEITSTAND_COMPRESS": "zstd"}).start()
    assert server.post("app", b'{"id":"live-3"}').status_code == 200
    # The read API serves the restored segment and the live file, in order.
    assert read_all(server, "app", 40) == [f"app-{n}" for n in range(100)] + ["live-1", "live-2", "live-3"]
    server.stop()
    stats = orjson.loads(run_cli("stats", "--json", "--data-dir", str(restored)).stdout)
    assert [(s["domain"], s["events"], s["segments"]) for s in stats] == [("app", 103, 1)]
    tail = run_cli("tail", "--data-dir", str(restored), "app", "-n", "5").stdout.splitlines()
    assert [orjson.loads(line)["id"] for line in tail] == ["app-98", "app-99", "live-1", "live-2", "live-3"]
    checked = verify(restored)
    assert checked.returncode == 0 and "no checksum recorded" in checked.stdout
    # leitstand restore from the backup brings the segment back with what the manifest vouches for.
    target = tmp_path / "from-backup"
    done = run_cli("restore", "--data-dir", str(target), str(backup))
    assert done.returncode == 0 and " 0 notes" in done.stdout, done.stdout


def read(server: Server, domain: str, **params: Any) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/events/{domain}", params=params, headers={"X-Auth": TOKEN}, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def ids_of(page: dict[str, Any]) -> list[str]:
    return [event["id"] for event in page["events"]]


def read_all(server: Server, domain: str, limit: int, after: str | None = None) -> list[str]:
    """Every event from ``after`` on (the start without it), page by page."""
    found: list[str] = []
    while True:
        page = read(server, domain, limit=limit, **({"after": after} if after else {}))
        if not page["events"]:
            return found
        found += ids_of(page)
        after = page["next"]


@pytest.mark.parametrize("codec", ["zstd", "gzip", "off"])
def test_the_read_api_serves_segments_across_seals_to_pages_tails_and_streams(
    make_server: Any, data_dir: Path, codec: str
) -> None:
    from server.test_reading import Stream

    server: Server = make_server(env={"LEITSTAND_COMPRESS": codec}).start()
    began = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    post_and_seal(server, "app", 30)
    for n in range(30, 60):
        assert server.post("app", orjson.dumps({"id": f"app-{n}"})).status_code == 200
    first = read(server, "app", limit=40)  # 30 from the segment, 10 from the live file
    assert ids_of(first) == [f"app-{n}" for n in range(40)]
    inside = read(server, "app", limit=10, after=first["next"])["next"]  # a cursor into the live file
    following = Stream(f"{server.url}/events/app/stream", after=first["next"])
    # The live file becomes a segment (and is compressed) while the cursor and the stream point into it.
    assert run_cli("rotate", "--data-dir", str(data_dir), "app").returncode == 0
    if codec != "off":
        wait_for(lambda: len(names(data_dir, rf"app\.jsonl\..*Z\.{'zst' if codec == 'zstd' else 'gz'}")) == 2)
    assert not (data_dir / "app.jsonl").exists()
    # No live file: the domain is still listed, read and tailed, from its segments.
    listed = httpx.get(f"{server.url}/domains", headers={"X-Auth": TOKEN}, timeout=10).json()["domains"]
    on_disk = sum(p.stat().st_size for p in data_dir.iterdir() if p.name.startswith("app.jsonl."))
    assert [(d["domain"], d["bytes"]) for d in listed] == [("app", on_disk)]
    assert ids_of(read(server, "app", tail=15)) == [f"app-{n}" for n in range(45, 60)]
    assert read_all(server, "app", 7, after=inside) == [f"app-{n}" for n in range(50, 60)]
    for n in range(60, 70):
        assert server.post("app", orjson.dumps({"id": f"app-{n}"})).status_code == 200
    assert read_all(server, "app", 7) == [f"app-{n}" for n in range(70)]
    assert ids_of(read(server, "app", tail=25)) == [f"app-{n}" for n in range(45, 70)]
    assert ids_of(read(server, "app", limit=3, since=began)) == ["app-0", "app-1", "app-2"]
    # The stream went on from the sealed file into the next one, every event once, in order.
    assert [orjson.loads(data)["id"] for _, data in following.take(30)] == [f"app-{n}" for n in range(40, 70)]
    assert following.events.empty()


def test_tail_follows_a_domain_across_a_seal(make_server: Any, data_dir: Path) -> None:
    server: Server = make_server().start()
    assert server.post("app", b'{"id":"one"}').status_code == 200
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEITSTAND_")}
    follower = subprocess.Popen([sys.executable, "-m", "leitstand", "tail", "--data-dir", str(data_dir), "app", "-f"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert orjson.loads(follower.stdout.readline())["id"] == "one"
        for n in range(3):
            assert server.post("app", orjson.dumps({"id": f"before-seal-{n}"})).status_code == 200
            assert run_cli("rotate", "--data-dir", str(data_dir)).returncode == 0
            assert server.post("app", orjson.dumps({"id": f"after-seal-{n}"})).status_code == 200
        seen = [orjson.loads(follower.stdout.readline())["id"] for _ in range(6)]
        assert seen == [f"{when}-seal-{n}" for n in range(3) for when in ("before", "after")]
    finally:
        follower.kill()
        follower.wait()
    server.stop()


def test_interval_rotation_seals_a_file_once_its_first_event_is_that_old(make_server: Any, data_dir: Path) -> None:
    server: Server = make_server(env={"LEITSTAND_ROTATE_INTERVAL": "2s", "LEITSTAND_COMPRESS": "off"}).start()
    assert server.post("app", b'{"id":"1"}').status_code == 200
    time.sleep(0.5)
    assert not segments.every(data_dir)
    wait_for(lambda: len(segments.every(data_dir)) == 1, 5)
    assert not (data_dir / "app.jsonl").exists()  # the next file is made by the next event
    server.stop()
