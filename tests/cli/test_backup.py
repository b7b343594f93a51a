"""leitstand backup and restore on real data dirs, with a real server writing during the backup."""

from __future__ import annotations

import hashlib
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from conftest import ROOT, Load, Server, read_lines, run_cli

SUMMARY = re.compile(r"backup: (\d+) files, (\d+) bytes copied, (\d+) bytes skipped, [\d.]+ s")


def backup(source: Path, dest: Path) -> tuple[list[int], list[str]]:
    """Runs the backup; the summary's files, copied and skipped, and the other lines of its output."""
    result = run_cli("backup", str(dest), "--data-dir", str(source))
    assert result.returncode == 0, result.stdout + result.stderr
    *others, last = result.stdout.splitlines()
    match = SUMMARY.fullmatch(last)
    assert match, last
    return [int(n) for n in match.groups()], others


def manifest(dest: Path) -> dict[str, Any]:
    files: dict[str, Any] = orjson.loads((dest / "leitstand-backup.json").read_bytes())["files"]
    return files


def assert_consistent_copy(source: Path, dest: Path) -> None:
    """Every backed-up file is whole lines, a prefix of its source, and matches its manifest entry."""
    entries = manifest(dest)
    assert set(entries) == {p.name for p in source.glob("*.jsonl")}
    for name, entry in entries.items():
        copy = (dest / name).read_bytes()
        read_lines(dest / name)
        assert (source / name).read_bytes().startswith(copy)
        assert entry == {"size": len(copy), "sha256": hashlib.sha256(copy).hexdigest()}


def test_backup_while_the_server_takes_load(tmp_path: Path, data_dir: Path, server: Server) -> None:
    dest = tmp_path / "backup"
    with Load(server.url, ["a", "b", "c", "d"], clients=8, batches=(1, 50), pad=200):
        time.sleep(0.5)
        (files, copied, skipped), _ = backup(data_dir, dest)
        assert files == 4 and copied > 0 and skipped == 0
        assert_consistent_copy(data_dir, dest)
        first = manifest(dest)
        time.sleep(0.3)
        (files, copied, skipped), rewritten = backup(data_dir, dest)
        assert rewritten == []
        # The second run keeps what the first copied and copies only what came since.
        assert skipped == sum(e["size"] for e in first.values())
        assert copied == sum(e["size"] for e in manifest(dest).values()) - skipped
        assert copied > 0
    assert_consistent_copy(data_dir, dest)


def test_incremental_run_copies_only_appended_bytes(tmp_path: Path) -> None:
    source, dest = tmp_path / "data", tmp_path / "backup"
    source.mkdir()
    (source / "a.jsonl").write_bytes(b'{"domain":"a"}\n' * 10)
    (source / "b.jsonl").write_bytes(b'{"domain":"b"}\n{"domain":"b","half')
    (source / "notes.txt").write_bytes(b"not a journal")
    assert backup(source, dest) == ([2, 150 + 15, 0], [])
    assert sorted(p.name for p in dest.iterdir()) == ["a.jsonl", "b.jsonl", "leitstand-backup.json"]
    assert (dest / "b.jsonl").read_bytes() == b'{"domain":"b"}\n', "the torn tail is not copied"
    inode = (dest / "a.jsonl").stat().st_ino

    with open(source / "a.jsonl", "ab") as f:
        f.write(b'{"domain":"a","n":2}\n')
    assert backup(source, dest) == ([2, 21, 165], [])
    assert (dest / "a.jsonl").stat().st_ino == inode, "appended to, not copied anew"
    assert (dest / "a.jsonl").read_bytes() == (source / "a.jsonl").read_bytes()
    assert backup(source, dest) == ([2, 0, 186], [])
    assert_consistent_copy(source, dest)


def test_truncated_or_rewritten_file_is_copied_whole(tmp_path: Path) -> None:
    source, dest = tmp_path / "data", tmp_path / "backup"
    source.mkdir()
    for name in ("short", "same", "longer", "kept"):
        (source / f"{name}.jsonl").write_bytes(f'{{"domain":"{name}","v":1}}\n'.encode() * 4)
    backup(source, dest)
    (source / "short.jsonl").write_bytes(b'{"domain":"short","v":1}\n')
    (source / "same.jsonl").write_bytes(b'{"domain":"same","v":2}\n' * 4)
    (source / "longer.jsonl").write_bytes(b'{"domain":"longer","v":2}\n' * 8)
    (_, copied, skipped), rewritten = backup(source, dest)
    assert sorted(rewritten) == [f"copied whole: {n}.jsonl (sealed, truncated or rewritten since the last backup, or missing in "
                                 "DEST)" for n in ("longer", "same", "short")]
    assert copied == sum((source / f"{n}.jsonl").stat().st_size for n in ("short", "same", "longer"))
    assert skipped == (source / "kept.jsonl").stat().st_size
    for path in source.glob("*.jsonl"):
        assert (dest / path.name).read_bytes() == path.read_bytes()
    assert_consistent_copy(source, dest)


def test_a_run_cut_short_is_completed_by_the_next(tmp_path: Path) -> None:
    source, dest = tmp_path / "data", tmp_path / "backup"
    source.mkdir()
    (source / "a.jsonl").write_bytes(b'{"domain":"a"}\n')
    backup(source, dest)
    with open(source / "a.jsonl", "ab") as f:
        f.write(b'{"domain":"a","n":2}\n')
    with open(dest / "a.jsonl", "ab") as f:  # appended, but the manifest never replaced
        f.write(b'{"domain":"a","n"')
    assert backup(source, dest) == ([1, 21, 15], [])
    assert (dest / "a.jsonl").read_bytes() == (source / "a.jsonl").read_bytes()


def test_backup_refuses_a_dest_inside_the_data_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    result = run_cli("backup", str(tmp_path / "data" / "b"), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "inside the data dir" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "data" / "b").exists()


def test_restore_refuses_a_non_empty_data_dir(tmp_path: Path) -> None:
    source, target = tmp_path / "backup", tmp_path / "data"
    source.mkdir()
    (source / "a.jsonl").write_bytes(b'{"domain":"a"}\n')
    target.mkdir()
    (target / "b.jsonl").write_bytes(b'{"domain":"b"}\n')
    result = run_cli("restore", str(source), env={"LEITSTAND_DATA_DIR": str(target)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not empty" in result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["b.jsonl"]


def test_restore_then_serve(tmp_path: Path, data_dir: Path, make_server: Any) -> None:
    server = make_server(data_dir).start()
    for n in range(5):
        assert server.post("app", f'{{"n":{n}}}').status_code == 200
    assert server.post("db", '[{"n":1},{"n":2}]').status_code == 200
    backup(data_dir, tmp_path / "backup")
    server.stop()

    restored = tmp_path / "restored"
    result = run_cli("restore", str(tmp_path / "backup"), "--data-dir", str(restored))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == f"restore: 2 files, {sum(p.stat().st_size for p in data_dir.glob('*.jsonl'))} bytes"
    assert "2 files, 0 problems" in result.stdout
    assert sorted(p.name for p in restored.iterdir()) == ["app.jsonl", "db.jsonl"]

    again = make_server(restored).start()
    assert again.post("app", '{"n":5}').status_code == 200
    again.stop()
    assert [orjson.loads(line)["n"] for line in read_lines(restored / "app.jsonl")] == list(range(6))


def test_restore_reports_a_copy_that_differs_from_the_manifest(tmp_path: Path) -> None:
    source, dest = tmp_path / "data", tmp_path / "backup"
    source.mkdir()
    (source / "a.jsonl").write_bytes(b'{"domain":"a","v":1}\n')
    backup(source, dest)
    (dest / "a.jsonl").write_bytes(b'{"domain":"a","v":2}\n')
    result = run_cli("restore", str(dest), "--data-dir", str(tmp_path / "restored"))
    assert result.returncode == 1
    assert "PROBLEM   a.jsonl: differs from the backup manifest" in result.stdout


def test_backup_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    source = tmp_path / "data"
    source.mkdir()
    (source / "a.jsonl").write_bytes(b'{"domain":"a"}\n' * 1000)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "leitstand", "backup", str(tmp_path / "b"), "--data-dir", str(source)],
                            cwd=ROOT, stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.wait(30) == 0
    assert b"\x1b[?25l" in shown, "rich's live display hides the cursor while it shows progress"
    assert SUMMARY.search(shown.decode())

    piped = run_cli("backup", str(tmp_path / "c"), "--data-dir", str(source))
    assert "\x1b" not in piped.stdout and len(piped.stdout.splitlines()) == 1
