"""leitstand verify [--repair] on real data dirs, also while the server writes to them."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Load, Server, assert_all_acked_stored_once, read_lines, run_cli
from storage.test_journal import die_mid_write

LONG = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters: its file name is shortened with a hash


def write(directory: Path, name: str, data: bytes) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(data)


def test_clean_data_dir(data_dir: Path, server: Server) -> None:
    for domain in ("app", "db.primary", LONG):
        assert server.post(domain, '[{"n":1},{"n":2}]').status_code == 200
    result = run_cli("verify", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 files, 0 problems" in result.stdout
    assert "ok        app.jsonl: 2 lines" in result.stdout
    assert any("_" in line and line.startswith("ok") for line in result.stdout.splitlines()), "shortened name"


def test_every_kind_of_problem_is_reported_per_file(data_dir: Path) -> None:
    write(data_dir, "good.jsonl", b'{"domain":"good"}\n')
    write(data_dir, "badjson.jsonl", b'{"domain":"badjson"}\n{"domain":\n')
    write(data_dir, "array.jsonl", b'[1]\n')
    write(data_dir, "elsewhere.jsonl", b'{"domain":"other"}\n')
    write(data_dir, "torn.jsonl", b'{"domain":"torn"}\n{"domain":"to')
    write(data_dir, "torn.jsonl.torn-20260101T000000Z", b'{"half')
    write(data_dir, "Upper.jsonl", b'')
    write(data_dir, "notes.txt", b'hi')
    write(data_dir, ".leitstand-probe-123-456", b'probe\n')
    (data_dir / "sub").mkdir()

    result = run_cli("verify", "--data-dir", str(data_dir))
    assert result.returncode == 1
    out = result.stdout
    assert "ok        good.jsonl: 1 lines" in out
    assert "ok        torn.jsonl: 1 lines" in out
    assert "PROBLEM   badjson.jsonl: line 2: not JSON" in out
    assert "PROBLEM   array.jsonl: line 1: not a JSON object" in out
    assert "PROBLEM   elsewhere.jsonl: line 1: domain 'other' belongs in other.jsonl" in out
    # What a crash leaves of a request never acknowledged is a note, not a problem.
    assert "note      torn.jsonl: 13 bytes at the end are not a whole request" in out
    assert "note      torn.jsonl.torn-20260101T000000Z: set aside after a crash" in out
    assert "PROBLEM   Upper.jsonl: stray file" in out
    assert "PROBLEM   notes.txt: stray file" in out
    assert "PROBLEM   sub: stray file" in out
    assert "ignored   .leitstand-probe-123-456" in out
    assert "6 problems, 2 notes" in out
    assert result.stderr == ""


def test_repair_sets_the_torn_tail_aside_like_the_server(tmp_path: Path, make_server: object) -> None:
    by_cli, by_server = tmp_path / "cli", tmp_path / "server"
    for directory in (by_cli, by_server):
        write(directory, "app.jsonl", b'{"domain":"app"}\n{"dom')
    result = run_cli("verify", "--repair", "--data-dir", str(by_cli))
    assert "repaired  app.jsonl: 5 bytes that were not a whole request set aside" in result.stdout
    # The fragment is left for the operator to look at, as a note: it was never acknowledged.
    assert result.returncode == 0
    assert "note      app.jsonl.torn-" in result.stdout and "ok        app.jsonl: 1 lines" in result.stdout
    assert run_cli("verify", "--data-dir", str(by_cli)).returncode == 0, "verify after verify --repair is clean"

    make_server(by_server).start().stop()  # type: ignore[operator]
    for directory in (by_cli, by_server):
        assert (directory / "app.jsonl").read_bytes() == b'{"domain":"app"}\n'
        (torn,) = directory.glob("app.jsonl.torn-*")
        assert torn.read_bytes() == b'{"dom'
        assert torn.stat().st_mode & 0o777 == 0o600
        torn.unlink()
    assert run_cli("verify", "--repair", "--data-dir", str(by_cli)).returncode == 0


def test_verify_and_repair_while_the_server_writes(data_dir: Path, server: Server) -> None:
    """Writes in flight are never taken for torn tails, and a repair takes nothing from the server."""
    with Load(server.url, ["a", "b", "c"], clients=8, batches=(1, 20)) as load:
        time.sleep(0.3)
        for _ in range(3):
            for args in (["verify"], ["verify", "--repair"]):
                result = run_cli(*args, "--data-dir", str(data_dir))
                assert result.returncode == 0, result.stdout
                assert "repaired" not in result.stdout
    assert load.acked
    assert_all_acked_stored_once(data_dir, load.acked)
    assert all(read_lines(path) for path in data_dir.glob("*.jsonl"))


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    result = run_cli("verify", env={"LEITSTAND_DATA_DIR": str(tmp_path / "nope")})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no such file or directory" in result.stderr


def test_a_request_cut_short_by_a_crash_is_a_note_and_is_never_backed_up(tmp_path: Path) -> None:
    """Before any server has started again, the request log already tells verify, backup and tail
    where the last whole request ends: the part after it is never taken for events."""
    data = tmp_path / "data"
    data.mkdir()
    line = '{"domain":"a","n":%d}|'
    die_mid_write(data, 2 * len(line % 1), [("".join(line % n for n in (1, 2, 3)), "")], first=line % 0)
    events = [b'{"domain":"a","n":%d}\n' % n for n in range(4)]
    assert (data / "a.jsonl").read_bytes() == b"".join(events[:3]), "two whole lines of a request of three"
    result = run_cli("verify", "--data-dir", str(data))
    assert result.returncode == 0, result.stdout
    assert "ok        a.jsonl: 1 lines" in result.stdout
    assert "note      a.jsonl: 42 bytes at the end are not a whole request" in result.stdout
    assert run_cli("backup", str(tmp_path / "backup"), "--data-dir", str(data)).returncode == 0
    assert (tmp_path / "backup" / "a.jsonl").read_bytes() == events[0]
    tail = run_cli("tail", "a", "-n", "5", "--data-dir", str(data))
    assert tail.stdout.encode() == events[0], tail.stdout + tail.stderr

    repaired = run_cli("verify", "--repair", "--data-dir", str(data))
    assert "repaired  a.jsonl: 42 bytes that were not a whole request set aside" in repaired.stdout
    assert (data / "a.jsonl").read_bytes() == events[0]
    checked = run_cli("check-config", env={"LEITSTAND_TOKEN": "t", "LEITSTAND_DATA_DIR": str(data),
                                             "LEITSTAND_READY_MIN_FREE": "0"})
    assert checked.returncode == 0, checked.stdout
    assert "note     a.jsonl.torn-" in checked.stdout and "check-config: 0 problems, 1 notes" in checked.stdout
