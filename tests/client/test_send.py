"""``leitstand send`` as a producer runs it, against the real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from conftest import ROOT, TOKEN, Server, read_lines, run_cli
from leitstand.client.jsonstream import Invalid, values


def ids(path: Path) -> list[int]:
    return [orjson.loads(line)["id"] for line in read_lines(path)]


def send(server: Server | str, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.url
    return run_cli("send", *args, env={"LEITSTAND_URL": url, "LEITSTAND_TOKEN": token})


def producer_env(server: Server, token: str = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEITSTAND_")}
    return env | {"LEITSTAND_URL": server.url, "LEITSTAND_TOKEN": token}


def write_lines(path: Path, start: int, stop: int, pad: str = "") -> Path:
    """JSONL of events with ids ``start`` to ``stop``, written in large pieces to be quick."""
    with open(path, "wb") as out:
        for first in range(start, stop, 10000):
            last = min(first + 10000, stop)
            out.write("".join(f'{{"id":{n},"pad":"{pad}"}}\n' for n in range(first, last)).encode())
    return path


MIXED = """\
{"id": 0}
[{"id": 1}, {"id": 2}]
{"id": 3, "id": 4}
{
  "id": 5,
  "tags": ["a", "b"]
}
not json
{"id": 6}
{"id": 7, "big": 1e400}
{"id": 8}{"id": 9}
"""


def split(text: bytes) -> list[bytes | Invalid]:
    return list(values(text.splitlines(keepends=True), "f"))


def test_values_are_passed_on_as_written_one_line_each() -> None:
    items = [{"id": n, "tags": ["a", "b"]} for n in range(3)]
    found = split(orjson.dumps(items, option=orjson.OPT_INDENT_2))
    assert [orjson.loads(value) for value in found if isinstance(value, bytes)] == items
    assert not any(b"\n" in value for value in found if isinstance(value, bytes))
    assert split(b'{\n  "id": 1\n}\n') == [b'{   "id": 1 }']
    assert split(b'{"a":"x\\ny", "b" : 1e400}\n[{"c":1} ,{"d":2}]{"e":3}\n') == [
        b'{"a":"x\\ny", "b" : 1e400}', b'{"c":1}', b'{"d":2}', b'{"e":3}']


def test_what_is_no_event_is_reported_once_per_stretch_and_reading_goes_on() -> None:
    text = b'{"id": 1\n{"id": 2}\n\xff\n{\n  "id": tru,\n  "x": [\n    {\n      "y": 1\n    }\n  ]\n}\n3\n{"id": 4}\n{"id":'
    assert split(text) == [
        Invalid("f:1", "invalid json"), b'{"id": 2}', Invalid("f:3-12", "invalid json"), b'{"id": 4}',
        Invalid("f:14", "invalid json"),
    ]
    # Outside a bad stretch, a value that is no object is reported on its own.
    assert split(b'3\n{"id": 1}\n') == [Invalid("f:1", "invalid payload"), b'{"id": 1}']


def test_bad_items_are_reported_and_the_rest_is_delivered_in_order(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "mixed.json"
    source.write_text(MIXED)
    done = send(server, "mixed", str(source))
    assert done.returncode == 1, done.stderr
    assert ids(server.data_dir / "mixed.jsonl") == [0, 1, 2, 5, 6, 8, 9]
    problems = done.stderr.splitlines()
    assert f"rejected (invalid json): {source}:8" in problems
    assert 'rejected (400 duplicate key): {"id": 3, "id": 4}' in problems
    assert 'rejected (400 number out of range): {"id": 7, "big": 1e400}' in problems
    assert len(problems) == 3
    assert done.stdout.startswith("send: 7 stored, 3 rejected, 0 not delivered")


def test_stdin_and_tail_send_only_the_last_events(server: Server, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", 0, 100)
    env = producer_env(server, f"{TOKEN},other-token")
    with open(source, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "leitstand", "send", "tailed", "--tail", "5"], cwd=ROOT, env=env,
                              stdin=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert ids(server.data_dir / "tailed.jsonl") == [95, 96, 97, 98, 99]


def test_dry_run_sends_nothing(tmp_path: Path) -> None:
    source = tmp_path / "mixed.json"
    source.write_text(MIXED)
    done = run_cli("send", "mixed", str(source), "--dry-run", "--max-events", "3")
    assert done.returncode == 1  # the line that is not JSON
    assert done.stdout.startswith("send: dry run, 10 events read, 3 requests, 1 rejected")


def test_without_a_service_or_an_outbox_it_says_how_many_were_not_delivered(make_server: Any, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", 0, 50)
    done = send(make_server().url, "down", str(source), "--deadline", "0.5", "--max-events", "10")
    assert done.returncode == 2
    assert "service unreachable" in done.stderr and "50 events not delivered" in done.stderr
    assert "--outbox" in done.stderr


def test_the_token_flag_warns_about_ps_and_what_cannot_run_is_one_line(tmp_path: Path) -> None:
    assert "ps" in run_cli("send", "--help").stdout
    no_token = run_cli("send", "orders", "/dev/null")
    missing = run_cli("send", "orders", str(tmp_path / "missing.jsonl"), "--dry-run")
    assert [(done.returncode, done.stderr.count("\n")) for done in (no_token, missing)] == [(2, 1), (2, 1)]
    assert "LEITSTAND_TOKEN" in no_token.stderr and "no such file" in missing.stderr


def test_server_killed_mid_send_with_outbox_stores_every_event_once_in_order(make_server: Any, tmp_path: Path) -> None:
    total = 100_000
    source = write_lines(tmp_path / "in.jsonl", 0, total)
    outbox = tmp_path / "outbox"
    server = make_server().start()
    journal = server.data_dir / "killed.jsonl"
    env = producer_env(server)
    producer = subprocess.Popen(
        [sys.executable, "-m", "leitstand", "send", "killed", str(source), "--outbox", str(outbox),
         "--max-events", "200", "--deadline", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Kill it a third of the way in: some batches acknowledged, one perhaps stored unacknowledged.
    while not journal.exists() or journal.stat().st_size < total * 28 // 3:
        assert producer.poll() is None, "the send finished before the server could be killed"
        time.sleep(0.005)
    server.kill()
    out, err = producer.communicate(timeout=60)
    assert producer.returncode == 2, out + err
    assert "stay in the outbox" in err
    assert list(outbox.glob("*.jsonl"))
    stored_before = len(read_lines(journal)) if journal.exists() else 0
    assert 0 < stored_before < total

    again = make_server(data_dir=server.data_dir).start()
    done = send(again, "killed", "--outbox", str(outbox), "/dev/null")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ids(journal) == list(range(total))
    assert not list(outbox.glob("*.jsonl"))


def test_a_200_mb_file_is_sent_in_bounded_memory(make_server: Any, tmp_path: Path) -> None:
    """LEITSTAND_FSYNC=never on the server keeps this quick; the client is what is measured."""
    total = 1_000_000
    source = write_lines(tmp_path / "big.jsonl", 0, total, pad="x" * 190)
    assert source.stat().st_size >= 200_000_000
    server = make_server(env={"LEITSTAND_FSYNC": "never"}).start()
    env = producer_env(server)
    # The peak is read by the process itself at exit (VmHWM): a child's ru_maxrss also counts
    # the pages it shared with pytest between fork and exec, hundreds of MiB late in a suite.
    report_peak = (
        "import atexit, re, sys\n"
        "atexit.register(lambda: sys.stderr.write('VmHWM ' + re.search(r'VmHWM:\\s+(\\d+)',"
        " open('/proc/self/status').read()).group(1) + '\\n'))\n"
        "from leitstand.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    with open(tmp_path / "out", "wb") as out:
        producer = subprocess.run(
            [sys.executable, "-c", report_peak, "send", "big", str(source)], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT,
        )
    output = (tmp_path / "out").read_text()
    assert producer.returncode == 0, output
    peak_mb = int(re.findall(r"^VmHWM (\d+)$", output, re.M)[-1]) / 1024
    print(f"\nleitstand send, {source.stat().st_size / 1e6:.0f} MB JSONL: peak RSS {peak_mb:.1f} MiB; {output.strip()}")
    assert peak_mb < 200, f"peak RSS {peak_mb:.1f} MiB"
    lines = 0
    with open(server.data_dir / "big.jsonl", "rb") as journal:
        while chunk := journal.read(1 << 24):
            lines += chunk.count(b"\n")
    assert lines == total
    # The peak goes to stderr, unbuffered, and may come before the summary on a buffered stdout.
    assert re.search(f"^send: {total} stored, 0 rejected, 0 not delivered", output, re.M), output


def test_a_bad_domain_is_one_line_and_exit_1_after_one_request(server: Server, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", 0, 5000)
    done = send(server, "bad_domain", str(source))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "rejected (400 invalid domain)" in done.stderr, done.stderr
    assert server.output().count("path=/ingest/") == 1


def test_the_token_is_found_in_the_token_file_the_service_uses(make_server: Any, tmp_path: Path) -> None:
    """As with scripts/start: LEITSTAND_TOKEN_FILE, and no LEITSTAND_TOKEN; the first token that may write to
    the domain is used."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# producers\nsensor-token domains=sensor-*\napp-token domains=app.*  # the app\n")
    server = make_server(env={"LEITSTAND_TOKEN": "", "LEITSTAND_TOKEN_FILE": str(tokens)}).start()
    source = write_lines(tmp_path / "in.jsonl", 0, 3)
    env = {"LEITSTAND_URL": server.url, "LEITSTAND_TOKEN_FILE": str(tokens)}
    for domain in ("sensor-1", "app.orders"):
        done = run_cli("send", domain, str(source), env=env)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert ids(server.data_dir / f"{domain}.jsonl") == [0, 1, 2]
    # No token in the file may write there: the first is tried, and the service says why not.
    refused = run_cli("send", "other", str(source), env=env)
    assert refused.returncode == 1 and "403 forbidden" in refused.stderr
    unusable = run_cli("send", "app.orders", str(source), env={**env, "LEITSTAND_TOKEN_FILE": str(tmp_path / "no")})
    assert unusable.returncode == 2 and unusable.stderr.count("\n") == 1
    assert "LEITSTAND_TOKEN_FILE is not usable: cannot read it" in unusable.stderr
