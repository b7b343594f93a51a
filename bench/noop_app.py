"""The ceiling: a raw ASGI app that reads the whole body and answers 200, storing nothing.

It costs what uvicorn, uvloop and httptools cost per request and no more, so
leitstand/noop shows how much of the server's budget leitstand itself uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"3")]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    # Written out rather than through ok(): the ceiling pays for no call of its own.
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b"ok\n"})


async def ok(send: Send) -> None:
    """The same answer, for the floor app."""
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b"ok\n"})
