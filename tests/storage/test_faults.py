"""Storage faults on real, size-limited storage: a full tmpfs and RLIMIT_FSIZE.

A failed commit answers 507 (full) and leaves no byte of the batch behind; other domains
and later requests keep working. EIO is exercised on a FUSE filesystem in test_powerloss.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from conftest import Server, read_lines, refusing_new_files, require_root


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    require_root("mounts a small tmpfs to fill it up")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path, leave: int) -> None:
    """Fill the filesystem of ``path`` until fewer than ``leave`` bytes are free."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free < leave:
                return
            os.write(fd, b"\0" * min(65536, max(4096, free - leave)))
    except OSError:
        return
    finally:
        os.close(fd)


def batch(n: int, pad: int = 100) -> bytes:
    return orjson.dumps([{"id": f"{i}", "pad": "x" * pad} for i in range(n)])


def test_disk_full_is_507_and_leaves_no_partial_batch(make_server, small_tmpfs: Path) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(data_dir=small_tmpfs / "data").start()
    assert server.post("full", batch(5)).status_code == 200
    assert server.post("other", batch(1)).status_code == 200
    before = (server.data_dir / "full.jsonl").read_bytes()
    fill(small_tmpfs / "filler", leave=16 << 10)

    # 60 KB cannot fit in what is left: part of it may be written, then it is cut back.
    response = server.post("full", batch(500))
    assert (response.status_code, response.text) == (507, "insufficient storage\n")
    assert (server.data_dir / "full.jsonl").read_bytes() == before
    # A small event still fits, in this domain and in another one.
    assert server.post("full", batch(1)).status_code == 200
    assert server.post("other", batch(1)).status_code == 200
    assert len(read_lines(server.data_dir / "full.jsonl")) == 6

    # Space comes back: everything works again, without a restart.
    (small_tmpfs / "filler").unlink()
    assert server.post("full", batch(500)).status_code == 200
    assert len(read_lines(server.data_dir / "full.jsonl")) == 506
    assert "write failed" in server.output() and str(server.data_dir) not in server.output()


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_file_size_limit_fails_one_domain_and_not_the_others(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(preexec=limit_file_size).start()
    grown = 0
    while True:
        response = server.post("big", batch(50))
        if response.status_code != 200:
            break
        grown += 50
    assert response.status_code == 507
    lines = read_lines(server.data_dir / "big.jsonl")
    assert len(lines) == grown and all(orjson.loads(line)["domain"] == "big" for line in lines)
    assert server.post("small", batch(3)).status_code == 200
    assert len(read_lines(server.data_dir / "small.jsonl")) == 3


def test_data_dir_refusing_new_files_is_not_ready(make_server) -> None:  # type: ignore[no-untyped-def]
    """No new file can be made in the data dir (permission denied, also for root)."""
    server: Server = make_server(env={"LEITSTAND_READY_MIN_FREE": "0"}).start()
    assert server.post("old", batch(1)).status_code == 200
    with refusing_new_files(server.data_dir):
        ready = httpx.get(server.url + "/ready")
        assert (ready.status_code, ready.text) == (503, "not ready: data dir permission denied\n")
        refused = server.post("new-domain", batch(1))
        assert (refused.status_code, refused.text) == (503, "storage unavailable\n")
        assert refused.headers["retry-after"] == "1"
        assert server.post("old", batch(1)).status_code == 200  # open files keep working
    assert httpx.get(server.url + "/ready").status_code == 200
    assert server.post("new-domain", batch(1)).status_code == 200
    # .leitstand holds the time indexes of both files.
    assert sorted(p.name for p in server.data_dir.iterdir()) == [".leitstand", "new-domain.jsonl", "old.jsonl"]
