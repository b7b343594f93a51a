"""The shipped syslog-ng config, run for real: Debian's syslog-ng posts batches to a running leitstand.

syslog-ng runs in the foreground as a plain process, with its own config, persist, pid and
control files under the test's tmp dir. Its main config defines only what Debian's defines
for the shipped file (the source ``s_src``, here a TCP port the test writes lines to, and a
short global ``time-reopen``) and includes ``deploy/senders/syslog-ng.conf`` as it is.
A second destination, defined here, leaves out the ``Content-Type`` header: libcurl then
labels the batch ``application/x-www-form-urlencoded``, as it does for every config written
without one.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ROOT, TOKEN, Server, free_port, read_lines
from storage.test_faults import fill, small_tmpfs  # noqa: F401 (small_tmpfs is a fixture)

SHIPPED = ROOT / "deploy" / "senders" / "syslog-ng.conf"


class SyslogNg:
    """syslog-ng in the foreground: ``s_src`` is a TCP port, the shipped file sends to ``domain``."""

    def __init__(self, tmp: Path, url: str, domain: str, plain_domain: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.log_path = tmp / "syslog-ng.log"
        config = tmp / "syslog-ng.conf"
        config.write_text(
            "@version: 3.38\n"
            "options { stats_freq(0); time_reopen(1); };\n"
            f'source s_src {{ network(ip("127.0.0.1") port({self.port}) transport("tcp") flags(no-parse)); }};\n'
            f'@include "{SHIPPED}"\n'
            f'destination d_plain {{ http(url("{url}/ingest/{plain_domain}") headers("X-Auth: {TOKEN}")\n'
            '    body("$(format-json --scope rfc5424 --exclude DATE --key ISODATE)") batch-lines(1000)'
            " batch-timeout(1000)); };\n"
            "log { source(s_src); destination(d_plain); };\n"
        )
        env = {"LEITSTAND_URL": url, "LEITSTAND_DOMAIN": domain, "LEITSTAND_TOKEN": TOKEN, "PATH": "/usr/sbin:/usr/bin"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["syslog-ng", "-F", "-e", "-f", str(config), f"--persist-file={tmp / 'syslog-ng.persist'}",
                 f"--pidfile={tmp / 'syslog-ng.pid'}", f"--control={tmp / 'syslog-ng.ctl'}"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"syslog-ng did not start:\n{self.log_path.read_text()}") from None
                time.sleep(0.1)

    def log(self, lines: list[str]) -> None:
        """Lines as a local program would log them, newline-framed over TCP."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall("".join(f"{line}\n" for line in lines).encode())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture
def syslog_ng(tmp_path: Path, small_tmpfs: Path, make_server) -> Iterator[tuple[SyslogNg, Server]]:  # type: ignore[no-untyped-def]  # noqa: F811
    # 1 KiB events at most, so that a long line is refused (413); requests per token limited,
    # so that the test can take the token's share away (429).
    server: Server = make_server(
        data_dir=small_tmpfs / "data", env={"LEITSTAND_MAX_EVENT_SIZE": "1KiB", "LEITSTAND_RATE_LIMIT": "5/s"}
    ).start()
    sender = SyslogNg(tmp_path, server.url, "syslog.web-1", "syslog.plain")
    yield sender, server
    sender.stop()


def messages(path: Path) -> list[str]:
    return [orjson.loads(line)["MESSAGE"] for line in read_lines(path)] if path.exists() else []


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def answered(server: Server, domain: str, status: int) -> int:
    return server.output().count(f"path=/ingest/{domain} status={status} ")


def test_syslog_ng_batches_arrive_and_every_retryable_answer_loses_no_line(
    syslog_ng: tuple[SyslogNg, Server], small_tmpfs: Path  # noqa: F811
) -> None:
    sender, server = syslog_ng
    shipped, plain = server.data_dir / "syslog.web-1.jsonl", server.data_dir / "syslog.plain.jsonl"
    sent: list[str] = []

    def send(lines: list[str]) -> None:
        sender.log(lines)
        sent.extend(lines)

    def all_arrived() -> bool:
        return messages(shipped) == sent and messages(plain) == sent

    # 503: the data dir takes no new file (immutable), so both domains' first batches fail.
    subprocess.run(["chattr", "+i", str(server.data_dir)], check=True)
    try:
        send([f"first {n} ä \"quoted\" \\ back" for n in range(50)])
        wait_for(lambda: answered(server, "syslog.web-1", 503) >= 2 and answered(server, "syslog.plain", 503) >= 2,
                 "syslog-ng did not try again after 503")
    finally:
        subprocess.run(["chattr", "-i", str(server.data_dir)], check=True)
    wait_for(all_arrived, "lines lost after 503")
    first = orjson.loads(read_lines(shipped)[0])
    assert first["MESSAGE"] == 'first 0 ä "quoted" \\ back' and first["domain"] == "syslog.web-1"
    assert {"ISODATE", "HOST", "PRIORITY", "FACILITY"} <= set(first)

    # 507: the disk is full; the lines wait in syslog-ng until there is space again.
    fill(small_tmpfs / "filler", leave=2 << 10)
    send([f"second {n} {'x' * 100}" for n in range(100)])
    wait_for(lambda: answered(server, "syslog.web-1", 507) >= 2, "no 507, or no retry after it")
    (small_tmpfs / "filler").unlink()
    wait_for(all_arrived, "lines lost after 507")

    # 429: something else uses up the token's requests; syslog-ng's batch waits its turn.
    stop = threading.Event()

    def take_the_token() -> None:
        with httpx.Client(headers={"X-Auth": TOKEN}) as client:
            while not stop.is_set():
                client.post(f"{server.url}/ingest/other", content=b"{")

    hog = threading.Thread(target=take_the_token)
    hog.start()
    try:
        send([f"third {n}" for n in range(10)])
        wait_for(lambda: answered(server, "syslog.web-1", 429) >= 2, "no 429, or no retry after it")
    finally:
        stop.set()
        hog.join()
    wait_for(all_arrived, "lines lost after 429")

    # 413 (a line over LEITSTAND_MAX_EVENT_SIZE): the shipped config drops that batch, and the
    # lines after it are not held up. syslog-ng's default, as in the destination without
    # response-action, sends it again for ever, and every line after it waits.
    sender.log(["long " + "y" * 2000])
    wait_for(lambda: answered(server, "syslog.web-1", 413) == 1, "the long line was not refused")
    sender.log(["after the long one"])
    wait_for(lambda: messages(shipped) == [*sent, "after the long one"], "the queue is stuck behind a refused batch")
    wait_for(lambda: answered(server, "syslog.plain", 413) >= 3, "the default does not retry a 413")
    assert answered(server, "syslog.web-1", 413) == 1
    assert messages(plain) == sent
