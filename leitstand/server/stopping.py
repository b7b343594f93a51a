"""A stop that idle keep-alive connections over TLS cannot hold up.

On ``SIGTERM`` uvicorn stops accepting, closes every idle connection, tells those with a
request in flight to close after their answer (``Connection: close``), and waits until every
connection is gone. A plain TCP close is immediate. A TLS close is not: the event loop's SSL
transport sends ``close_notify`` and then waits for the peer's, up to its SSL shutdown
timeout (30 s). A client that keeps an idle connection in its pool does not read from it, so
it never answers, and the stop hangs for those 30 s. TLS does not require the side that
closes to wait for the other's ``close_notify``; so once the stop has begun, a connection that
has sent its last answer and is still closing after a short grace is aborted (its
``close_notify`` and every byte of its answer have been handed to the socket by then).

uvicorn has no hook for this, and under ``uvicorn app:app`` the app is all that leitstand
controls. uvicorn's own handler of ``SIGTERM`` and ``SIGINT`` is a bound method of its server,
so the app, at startup, finds the server there and chains a handler of its own after it.
"""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

from uvicorn.server import Server

# How long a closing connection may wait for the client's close_notify.
GRACE = 0.5
_TICK = 0.1


class Stopping:
    """The chained signal handler and the task that aborts what lingers, for one worker process."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Chain after uvicorn's signal handler; without a uvicorn server (another server, a test) nothing."""
        handler = signal.getsignal(signal.SIGTERM)
        server = getattr(handler, "__self__", None)
        if not isinstance(server, Server) or not callable(handler):
            return
        loop = asyncio.get_running_loop()

        def stop(signum: int, frame: FrameType | None) -> None:
            handler(signum, frame)
            if self._task is None:
                loop.call_soon_threadsafe(self._start, server)

        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) == handler:
                signal.signal(signum, stop)

    def _start(self, server: Server) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(_abort_lingering(server))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _abort_lingering(server: Server) -> None:
    """Abort each connection that has answered and closed, but still waits for the client, after ``GRACE``."""
    loop = asyncio.get_running_loop()
    closing_since: dict[object, float] = {}
    while True:
        now = loop.time()
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            cycle = getattr(connection, "cycle", None)
            answered = cycle is None or cycle.response_complete
            if transport is None or not answered or not transport.is_closing() or transport.get_write_buffer_size():
                continue
            if now - closing_since.setdefault(connection, now) >= GRACE:
                transport.abort()
        await asyncio.sleep(_TICK)
