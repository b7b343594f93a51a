"""Start-up refusals: no token, or a data dir that cannot take durable writes.

Each must exit non-zero before the port is bound, with one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import CLEAN_EXIT, ROOT, TOKEN, Server, free_port, refusing_new_files, require_root


def run(argv_kind: str, env: dict[str, str], port: int, workers: int = 1) -> subprocess.CompletedProcess[str]:
    server = Server(Path("unused"), Path("unused"), workers=workers, command=argv_kind, port=port)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LEITSTAND_")} | env
    return subprocess.run(server.argv(), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(("kind", "workers"), [("uvicorn", 1), ("serve", 1), ("serve", 2)])
@pytest.mark.parametrize("token", [None, "", "  "])
def test_missing_token_refuses_to_start(tmp_path: Path, kind: str, workers: int, token: str | None) -> None:
    env = {"LEITSTAND_DATA_DIR": str(tmp_path / "data")} | ({} if token is None else {"LEITSTAND_TOKEN": token})
    port = free_port()
    result = run(kind, env, port, workers)
    assert_one_line_refusal(result, "LEITSTAND_TOKEN", "export")
    assert port_is_free(port)


@contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    require_root("mounts a tmpfs")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def full_tmpfs(path: Path) -> Iterator[Path]:
    with mounted_tmpfs(path, "size=64k") as mount:
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        yield mount


@pytest.mark.parametrize("kind", ["uvicorn", "serve"])
def test_data_dir_that_is_a_file(tmp_path: Path, kind: str) -> None:
    (tmp_path / "data").write_text("not a dir")
    result = run(kind, {"LEITSTAND_TOKEN": TOKEN, "LEITSTAND_DATA_DIR": str(tmp_path / "data")}, free_port())
    assert_one_line_refusal(result, "LEITSTAND_DATA_DIR", "not a directory")


def test_read_only_data_dir(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        result = run("uvicorn", {"LEITSTAND_TOKEN": TOKEN, "LEITSTAND_DATA_DIR": str(ro)}, free_port())
    assert_one_line_refusal(result, "LEITSTAND_DATA_DIR", "read-only")


def test_data_dir_without_space(tmp_path: Path) -> None:
    with contextmanager(full_tmpfs)(tmp_path / "full") as full:
        result = run("uvicorn", {"LEITSTAND_TOKEN": TOKEN, "LEITSTAND_DATA_DIR": str(full)}, free_port())
    assert_one_line_refusal(result, "LEITSTAND_DATA_DIR", "no space")


def test_data_dir_without_permission(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir()
    with refusing_new_files(tmp_path / "locked") as locked:
        result = run("uvicorn", {"LEITSTAND_TOKEN": TOKEN, "LEITSTAND_DATA_DIR": str(locked)}, free_port())
    assert_one_line_refusal(result, "LEITSTAND_DATA_DIR", "permission denied")


def test_missing_data_dir_is_created(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = make_server(data_dir=tmp_path / "not" / "yet" / "data").start()
    assert server.data_dir.is_dir()
    assert server.post("s", "{}").status_code == 200


def test_leitstand_serve_runs_and_mirrors_flags(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = make_server(command="serve", workers=2).start()
    assert server.post("via-serve", "{}").status_code == 200
    assert server.stop() in CLEAN_EXIT
    assert (server.data_dir / "via-serve.jsonl").exists()
    help_text = subprocess.run(
        [sys.executable, "-m", "leitstand", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--host", "--port", "--workers", "--data-dir", "--fsync", "--max-body", "--log-format",
                 "--token-file", "--ssl-certfile", "--ssl-keyfile", "--domains-allow", "--rate-limit"):
        assert flag in help_text
    # A path to a token file may be a flag; a token may not (it would show in `ps`).
    assert re.search(r"--token(?!-file)", help_text) is None


def test_leitstand_serve_reads_host_and_port_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEITSTAND_")} | {
        "LEITSTAND_TOKEN": TOKEN,
        "LEITSTAND_DATA_DIR": str(tmp_path / "data"),
        "LEITSTAND_HOST": "127.0.0.1",
        "LEITSTAND_PORT": str(port),
    }
    proc = subprocess.Popen([sys.executable, "-m", "leitstand", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        response = httpx.post(f"http://127.0.0.1:{port}/ingest/env", content=b"{}", headers={"X-Auth": TOKEN})
        assert response.status_code == 200
        assert (tmp_path / "data" / "env.jsonl").exists()
    finally:
        proc.terminate()
        proc.wait(30)


def test_startup_tunes_the_garbage_collector() -> None:
    """The startup heap is frozen, out of every collection's walk, and the youngest generation is
    collected less often than Python's default, the older ones as often as before: in a process
    of its own, as the freeze is for good."""
    script = (
        "import gc; from leitstand.server import app; "
        "default = gc.get_threshold(); app._tune_garbage_collector(); "
        "print(*default, *gc.get_threshold(), gc.get_freeze_count(), app._YOUNG_COLLECTION_EVERY)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    young, middle, old, young_now, middle_now, old_now, frozen, wanted = map(int, result.stdout.split())
    assert young_now == wanted > young
    assert (middle_now, old_now) == (middle, old)
    assert frozen > 1000, "the imports' objects are frozen"
