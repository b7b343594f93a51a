"""Tokens, scopes, domain policy, rate limits, file permissions and TLS, against the real server."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TOKEN, Server, tls_files


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def status(server: Server, domain: str, token: str, **headers: str) -> int:
    return server.post(domain, "{}", headers={"X-Auth": token, **headers}).status_code


def token_file_env(tokens: Path) -> dict[str, str]:
    # The tests poll with tokens that are about to become valid; the failure limit has its own test.
    return {"LEITSTAND_TOKEN": "", "LEITSTAND_TOKEN_FILE": str(tokens), "LEITSTAND_AUTH_FAIL_LIMIT": "0"}


def files(data_dir: Path) -> list[str]:
    return sorted(name for name in os.listdir(data_dir) if name != ".leitstand")


def test_several_tokens_in_the_environment(make_server: Any) -> None:
    server = make_server(env={"LEITSTAND_TOKEN": "old-token,new-token"}).start()
    assert status(server, "a", "old-token") == 200
    assert status(server, "a", "new-token") == 200
    assert status(server, "a", "old-token,new-token") == 401
    assert len((server.data_dir / "a.jsonl").read_bytes().splitlines()) == 2


def test_token_file_scopes_give_403_and_touch_no_file(make_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("sensor-token domains=sensor-*,deploy.example.com\nadmin-token\n")
    server = make_server(env=token_file_env(tokens)).start()
    assert status(server, "sensor-1", "sensor-token") == 200
    assert status(server, "Deploy.Example.Com", "sensor-token") == 200
    response = server.post("billing", "{}", headers={"X-Auth": "sensor-token"})
    assert (response.status_code, response.text) == (403, "forbidden\n")
    assert status(server, "deploy.example.com.evil", "sensor-token") == 403
    assert status(server, "billing", "admin-token") == 200
    assert status(server, "billing", TOKEN) == 401  # LEITSTAND_TOKEN is empty here
    assert files(server.data_dir) == ["billing.jsonl", "deploy.example.com.jsonl", "sensor-1.jsonl"]
    assert len((server.data_dir / "billing.jsonl").read_bytes().splitlines()) == 1


def test_token_file_is_reloaded_on_change_without_failing_requests(make_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("steady\nold-token\n")
    server = make_server(env=token_file_env(tokens)).start()
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def steady_client() -> None:
        with httpx.Client(headers={"X-Auth": "steady"}, timeout=10) as client:
            while not stop.is_set():
                statuses[client.post(f"{server.url}/ingest/steady", content=b"{}").status_code] += 1

    clients = [threading.Thread(target=steady_client) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        # Rotation as the docs describe it: add the new token, move clients, drop the old one.
        # Each edit replaces the file the way editors and secret mounts do (new inode).
        for content in ("steady\nold-token\nnew-token\n", "steady\nnew-token\n"):
            replacement = tmp_path / "tokens.new"
            replacement.write_text(content)
            replacement.replace(tokens)
            expect_old = 200 if "old-token" in content else 401
            wait_until(lambda: status(server, "rot", "new-token") == 200)
            wait_until(lambda: status(server, "rot", "old-token") == expect_old)
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert statuses[200] > 0 and set(statuses) == {200}, statuses
    assert "token file reloaded" in server.output()


def test_sighup_reloads_the_token_file(make_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-aaaa\n")
    server = make_server(env=token_file_env(tokens)).start()
    before = tokens.stat()
    # Same size, same inode, same mtime: the change poll cannot see this edit; SIGHUP must.
    with open(tokens, "r+") as f:
        f.write("token-bbbb\n")
    os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.5)
    assert status(server, "a", "token-bbbb") == 401
    server.signal(signal.SIGHUP)
    wait_until(lambda: status(server, "a", "token-bbbb") == 200)
    assert status(server, "a", "token-aaaa") == 401
    assert server.proc is not None and server.proc.poll() is None


@pytest.mark.parametrize("breakage", ["empty", "unreadable", "removed", "malformed"])
def test_a_broken_token_file_keeps_the_tokens_in_force(make_server: Any, tmp_path: Path, breakage: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("keep-me domains=a\n")
    server = make_server(env=token_file_env(tokens)).start()
    if breakage == "empty":
        tokens.write_text("")
    elif breakage == "unreadable":
        tokens.write_bytes(b"\xff\xfe not utf-8\n")
    elif breakage == "removed":
        tokens.unlink()
    else:
        tokens.write_text("keep-me domains=a\nnew-token scope=everything\n")
    wait_until(lambda: "token file not reloaded" in server.output())
    assert status(server, "a", "keep-me") == 200
    assert status(server, "b", "keep-me") == 403
    assert status(server, "a", "new-token") == 401
    assert str(tmp_path) not in server.output() and "keep-me" not in server.output()


def test_failed_logins_are_limited_per_client_address(make_server: Any) -> None:
    server = make_server(command="serve", env={"LEITSTAND_AUTH_FAIL_LIMIT": "3/min"}).start()
    for _ in range(3):
        assert status(server, "a", "guess") == 401
    response = server.post("a", "{}", headers={"X-Auth": "guess"})
    assert (response.status_code, response.text) == (429, "too many requests\n")
    assert 1 <= int(response.headers["retry-after"]) <= 60
    # Blocked means blocked: a right guess now would tell nothing either.
    assert status(server, "a", TOKEN) == 429
    # Without LEITSTAND_TRUSTED_PROXIES, X-Forwarded-For is the client's word and ignored.
    assert status(server, "a", TOKEN, **{"X-Forwarded-For": "198.51.100.1"}) == 429
    assert not (server.data_dir / "a.jsonl").exists()
    assert httpx.get(server.url + "/health").status_code == 200


def test_trusted_proxies_name_the_client(make_server: Any) -> None:
    server = make_server(
        command="serve", env={"LEITSTAND_AUTH_FAIL_LIMIT": "2/min", "LEITSTAND_TRUSTED_PROXIES": "127.0.0.0/8"}
    ).start()
    attacker = {"X-Forwarded-For": "203.0.113.66"}
    for _ in range(2):
        assert status(server, "a", "guess", **attacker) == 401
    assert status(server, "a", TOKEN, **attacker) == 429
    # A forged entry further left changes nothing: the proxy's own entry is the rightmost.
    assert status(server, "a", TOKEN, **{"X-Forwarded-For": "192.0.2.1, 203.0.113.66"}) == 429
    # Another client behind the same proxy is not punished for the attacker.
    assert status(server, "a", TOKEN, **{"X-Forwarded-For": "203.0.113.77"}) == 200
    assert status(server, "a", TOKEN) == 200
    assert "client=203.0.113.77" in server.logged("client=203.0.113.77")


def test_rate_limit_per_token(make_server: Any) -> None:
    server = make_server(env={"LEITSTAND_TOKEN": f"{TOKEN},other", "LEITSTAND_RATE_LIMIT": "5/min"}).start()
    assert [status(server, "a", TOKEN) for _ in range(5)] == [200] * 5
    response = server.post("a", "{}")
    assert (response.status_code, response.text) == (429, "too many requests\n")
    assert 1 <= int(response.headers["retry-after"]) <= 12
    assert status(server, "a", "other") == 200
    assert len((server.data_dir / "a.jsonl").read_bytes().splitlines()) == 6


def test_domain_policy_refuses_before_any_file_is_touched(make_server: Any) -> None:
    server = make_server(
        env={"LEITSTAND_DOMAINS_ALLOW": "sensor-*,*.example.com", "LEITSTAND_DOMAINS_DENY": "sensor-test"}
    ).start()
    assert status(server, "sensor-1", TOKEN) == 200
    assert status(server, "api.example.com", TOKEN) == 200
    for refused in ("sensor-test", "billing", "example.com", "api.example.com.evil"):
        response = server.post(refused, "{}")
        assert (response.status_code, response.text) == (403, "domain not allowed\n"), refused
    assert files(server.data_dir) == ["api.example.com.jsonl", "sensor-1.jsonl"]


def test_files_and_data_dir_are_private(make_server: Any) -> None:
    old = os.umask(0o022)
    try:
        server = make_server().start()
    finally:
        os.umask(old)
    assert server.post("a", "{}").status_code == 200
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((server.data_dir / "a.jsonl").stat().st_mode) == 0o600


def test_a_planted_symlink_gets_500_and_nothing_is_written_through_it(make_server: Any, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    server = make_server().start()
    (server.data_dir / "planted.jsonl").symlink_to(target)
    response = server.post("planted", '{"x":1}')
    assert (response.status_code, response.text) == (500, "storage error\n")
    assert target.read_bytes() == b"precious\n"
    assert server.post("other", "{}").status_code == 200
    assert "file=planted.jsonl is not a regular file" in server.output()
    assert str(tmp_path) not in server.output()


def test_tls_with_a_self_signed_certificate(make_server: Any, tmp_path: Path) -> None:
    env, cafile = tls_files(tmp_path)
    server = make_server(command="serve", ca=cafile, env=env).start()
    assert server.url.startswith("https://")
    assert server.post("over-tls", '{"secret":1}').status_code == 200
    assert (server.data_dir / "over-tls.jsonl").read_bytes() == b'{"secret":1,"domain":"over-tls"}\n'
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2)
    with pytest.raises(httpx.ConnectError):  # an untrusted certificate is not accepted by default
        httpx.get(f"https://127.0.0.1:{server.port}/health", timeout=2)


def test_sighup_to_leitstand_serve_with_workers_reloads_every_worker(make_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\ntoken-aaaa\n")
    server = make_server(command="serve", workers=2, env=token_file_env(tokens)).start()
    before = tokens.stat()
    with open(tokens, "r+") as f:
        f.write(f"{TOKEN}\ntoken-bbbb\n")
    os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert server.proc is not None
    wait_until(lambda: server.output().count(" INFO started ") == 2)  # both workers take SIGHUP now
    pids = worker_pids(server.proc.pid)
    assert len(pids) == 2
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def steady_client() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                # A new connection each time, so that both workers take some.
                answer = client.post(f"{server.url}/ingest/steady", content=b"{}", headers={"X-Auth": TOKEN,
                                                                                         "Connection": "close"})
                statuses[answer.status_code] += 1

    client = threading.Thread(target=steady_client)
    client.start()
    try:
        os.kill(server.proc.pid, signal.SIGHUP)  # what `systemctl reload` sends: to the main process only

        # Every worker reloads in place: whichever takes a connection knows the new token only.
        def only_the_new_token() -> bool:
            answers = [(status(server, "a", "token-bbbb"), status(server, "a", "token-aaaa")) for _ in range(8)]
            return answers == [(200, 401)] * 8

        wait_until(only_the_new_token, timeout=10)
    finally:
        stop.set()
        client.join()
    assert [status(server, "a", "token-aaaa") for _ in range(16)] == [401] * 16
    assert worker_pids(server.proc.pid) == pids, "the workers were restarted, not reloaded"
    assert statuses[200] > 0 and set(statuses) == {200}, statuses
    assert server.proc.poll() is None


def worker_pids(parent: int) -> set[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    # uvicorn's workers (spawned), not the multiprocessing resource tracker, alive or a zombie. Not by
    # "leitstand" in the command line: every one names the checkout's path, which may well hold it.
    return {int(pid) for pid in children if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def test_sighup_without_a_token_file_stops_nothing(make_server: Any) -> None:
    server = make_server(command="serve", workers=2).start()
    assert server.proc is not None
    wait_until(lambda: server.output().count(" INFO started ") == 2)
    pids = worker_pids(server.proc.pid)
    # To the main process and both workers; the main process hands it on to each worker too, so
    # a worker takes it once or twice (two signals pending at once are one).
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.output().count("nothing to reload") >= 2)
    assert server.post("a", "{}").status_code == 200
    assert worker_pids(server.proc.pid) == pids and server.proc.poll() is None
