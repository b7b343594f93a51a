"""The ceiling: a raw ASGI app that reads the whole body and answers 200, storing nothing.

It costs what uvicorn, uvloop and httptools cost per request and no more, so
leitstand/noop shows how much of the server's budget leitstand itself uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]

_HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"3")]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b"ok\n"})
