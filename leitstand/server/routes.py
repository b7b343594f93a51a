"""Every route but ingest: health, readiness, version, the API description and the metrics.

They are rare beside ``POST /ingest/{domain}``, so Starlette's router and responses serve them
instead of hand-written ASGI. A refusal is raised as Starlette's ``HTTPException``, as the
router raises its own (404, 405): the app answers each in the same one line of text as the
refusals of ingest, and counts and logs every answer as it does those of ingest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from leitstand import __version__
from leitstand.access.auth import Grant
from leitstand.broker.jetstream import Publisher
from leitstand.config import Config
from leitstand.server.openapi import DOCS_HTML, OPENAPI
from leitstand.storage import datadir
from leitstand.storage.journal import Journal, probe, reason
from leitstand.telemetry.metrics import CONTENT_TYPE, Metrics


class Routes:
    """The router of every route but ingest; ``authenticate`` is the app's, so that a wrong token
    on ``/metrics`` counts against the address as one on ingest does."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        broker: Publisher | None,
        metrics: Metrics,
        authenticate: Callable[[Request], Grant],
    ) -> None:
        self.config = config
        self.journal = journal
        self.broker = broker
        self.metrics = metrics
        self.authenticate = authenticate
        # GET routes take HEAD as well. No redirect from /health/ to /health: a path is one route or none.
        self.router = Router(
            [
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/version", self.version, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                Route("/docs", self.docs, methods=["GET"]),
                Route("/metrics", self.scrape, methods=["GET"]),
            ],
            redirect_slashes=False,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if self.broker is not None:
            if not self.broker.connected:
                raise HTTPException(503, "not ready: broker unavailable")
            return JSONResponse({"status": "ready"})
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, probe, self.config.data_dir)
            free = await loop.run_in_executor(None, self.journal.free_bytes)
            used = await loop.run_in_executor(None, datadir.usage, self.config.data_dir)
        except OSError as exc:
            raise HTTPException(503, f"not ready: data dir {reason(exc)}") from None
        if free < self.config.ready_min_free:
            raise HTTPException(503, "not ready: low disk space")
        return JSONResponse({"status": "ready", "bytes": {"live": used.live, "sealed": used.sealed, "free": free}})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_HTML)

    async def scrape(self, request: Request) -> Response:
        if not self.config.metrics_public:
            grant = self.authenticate(request)
            # The figures name every domain: a token scoped to some of them may not see them.
            if not grant.all_domains:
                raise HTTPException(403, "forbidden")
        body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)
