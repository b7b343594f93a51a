"""A stop that open streams and idle keep-alive connections over TLS cannot hold up.

uvicorn waits for every open response before it stops (and before the lifespan's shutdown),
and tells the app nothing: live event streams must learn of the stop by the signal itself, and
end.

On ``SIGTERM`` uvicorn stops accepting, closes every idle connection, tells those with a
request in flight to close after their answer (``Connection: close``), and waits until every
connection is gone. A plain TCP close is immediate. A TLS close is not: the event loop's SSL
transport sends ``close_notify`` and then waits for the peer's, up to its SSL shutdown
timeout (30 s). A client that keeps an idle connection in its pool does not read from it, so
it never answers, and the stop hangs for those 30 s. TLS does not require the side that
closes to wait for the other's ``close_notify``; so once the stop has begun, a connection that
has sent its last answer and is still closing after a short grace is aborted (its
``close_notify`` and every byte of its answer have been handed to the socket by then).

uvicorn has no hook for either, and under ``uvicorn app:app`` the app is all that leitstand
controls. uvicorn's own handler of ``SIGTERM`` and ``SIGINT`` is a bound method of its server,
so the app, at startup, chains a handler of its own after it, and finds the server there.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from uvicorn.server import Server

# How long a closing connection may wait for the client's close_notify.
GRACE = 0.5
_TICK = 0.1


class Stopping:
    """The chained signal handler, what it tells the streams, and the task that aborts what lingers,
    for one worker process."""

    def __init__(self) -> None:
        # Set when the process is told to stop: open streams end, so that uvicorn can finish.
        self.event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Chain after the handlers of SIGTERM and SIGINT in place (uvicorn's stay in charge)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue
            owner = getattr(previous, "__self__", None)
            server = owner if isinstance(owner, Server) else None

            def stop(
                number: int,
                frame: FrameType | None,
                previous: Callable[..., Any] = previous,
                server: Server | None = server,
            ) -> None:
                previous(number, frame)
                loop.call_soon_threadsafe(self._begin, server)

            # Only the main thread may take signals; under a test harness there may be none.
            with contextlib.suppress(ValueError):
                signal.signal(signum, stop)

    def _begin(self, server: Server | None) -> None:
        self.event.set()
        if self._task is None and server is not None:
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
