"""The floor: the least an app on this stack must do to store events as leitstand promises.

It parses the body (a refusal needs it), writes each event as one compact JSON line to the
domain's file, kept open, and answers 200 only once the line is ``fdatasync``'d, with the
requests that arrive meanwhile grouped into one write and sync per file, on one pool thread,
as leitstand's journal does (from three files on, one ``syncfs``). No token, no checks of the
domain or the events, no logs, no metrics, no torn-tail repair, no record of where a batch
starts. bench/run.py measures every goal for it too: what it reaches is what is left of a goal
on this machine once everything but the durable write is left out. Run it from ``bench/`` with
``uvicorn floor_app:app``; it reads LEITSTAND_DATA_DIR like leitstand.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
from concurrent.futures import Future, ThreadPoolExecutor

import orjson
from noop_app import Receive, Scope, Send, ok

_DIR = os.environ.get("LEITSTAND_DATA_DIR", "data")
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
_LINE = orjson.OPT_APPEND_NEWLINE

os.makedirs(_DIR, exist_ok=True)
_dir_fd = os.open(_DIR, os.O_RDONLY | os.O_DIRECTORY)
_libc = ctypes.CDLL(None, use_errno=True)
# One descriptor per domain stays open: as many as the hard limit allows.
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

_pool = ThreadPoolExecutor(1)
_files: dict[str, int] = {}
_waiting: dict[str, list[bytes]] = {}
_waiters: list[asyncio.Future[None]] = []
_busy = False


def _commit(pending: dict[str, list[bytes]]) -> None:
    """On the pool thread: one write per file, then one sync for them all."""
    fds, created = [], False
    for domain, lines in pending.items():
        fd = _files.get(domain)
        if fd is None:
            fd = _files[domain] = os.open(domain + ".jsonl", _FLAGS, 0o644, dir_fd=_dir_fd)
            created = True
        os.write(fd, b"".join(lines))
        fds.append(fd)
    if created:
        os.fsync(_dir_fd)
    if len(fds) >= 3:
        if _libc.syncfs(_dir_fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    else:
        for fd in fds:
            os.fdatasync(fd)


def _start() -> None:
    global _busy, _waiting, _waiters
    loop = asyncio.get_running_loop()
    pending, waiters, _waiting, _waiters = _waiting, _waiters, {}, []
    _busy = True

    def done(round_: Future[None]) -> None:
        loop.call_soon_threadsafe(_done, waiters, round_)

    _pool.submit(_commit, pending).add_done_callback(done)


def _done(waiters: list[asyncio.Future[None]], round_: Future[None]) -> None:
    global _busy
    error = round_.exception()
    for waiter in waiters:
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
    _busy = False
    if _waiters:
        _start()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    value = orjson.loads(body)
    lines = (
        b"".join(orjson.dumps(item, option=_LINE) for item in value)
        if type(value) is list
        else orjson.dumps(value, option=_LINE)
    )
    domain = scope["path"].rpartition("/")[2]
    waiter = asyncio.get_running_loop().create_future()
    _waiting.setdefault(domain, []).append(lines)
    _waiters.append(waiter)
    if not _busy:
        _start()
    await waiter
    await ok(send)
