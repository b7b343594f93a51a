"""Every route but ingest: health, readiness, version, the API description, the metrics, the
read API (:mod:`leitstand.server.reading`) and the control-room page.

They are rare beside ``POST /ingest/{domain}``, so Starlette's router and responses serve them
instead of hand-written ASGI. A refusal is raised as Starlette's ``HTTPException``, as the
router raises its own (404, 405): the app answers each in the same one line of text as the
refusals of ingest, and counts and logs every answer as it does those of ingest.

The page (``/ui/``) and the API docs (``/docs``, Swagger UI from the ``swagger-ui-bundle-v2``
package) are static files served by the service itself, nothing from elsewhere, under a
Content-Security-Policy that allows only the service's own scripts and styles (no inline
code, no eval): a page of the service's origin is where a token is typed in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import swagger_ui_bundle

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leitstand import __version__
from leitstand.access.auth import Grant
from leitstand.broker.jetstream import Publisher
from leitstand.config import Config
from leitstand.server.openapi import OPENAPI
from leitstand.server.reading import ReadRoutes
from leitstand.storage import datadir
from leitstand.storage.journal import Journal, probe, reason
from leitstand.telemetry.metrics import CONTENT_TYPE, Metrics

STATIC = Path(__file__).parent / "static"
# Only the service's own files; no inline script or style, no eval, no frames, no plugins.
CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
_PAGE_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class secured:  # noqa: N801 (used like a function)
    """``app`` with the page headers (CSP first) on every answer; an object, so that the router
    takes it for an ASGI app, not for an endpoint that wants a request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *_PAGE_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


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
        stopping: asyncio.Event,
    ) -> None:
        self.config = config
        self.journal = journal
        self.broker = broker
        self.metrics = metrics
        self.authenticate = authenticate
        self.reading = ReadRoutes(config.data_dir, metrics, authenticate, stopping)
        docs = StaticFiles(directory=STATIC / "docs")
        # GET routes take HEAD as well. No redirect from /health/ to /health: a path is one route or none.
        self.router = Router(
            [
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/version", self.version, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                Route("/docs", secured(_File(docs, "index.html")), methods=["GET"]),
                Mount("/docs/swagger-ui", secured(StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)))),
                Mount("/docs/static", secured(docs)),
                Route("/metrics", self.scrape, methods=["GET"]),
                *self.reading.routes,
                Route("/", self.home, methods=["GET"]),
                Mount("/ui", secured(StaticFiles(directory=STATIC / "ui", html=True))),
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

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/ui/", 302)

    async def scrape(self, request: Request) -> Response:
        if not self.config.metrics_public:
            grant = self.authenticate(request)
            # The figures name every domain: a token scoped to some of them may not see them.
            if not grant.all_domains:
                raise HTTPException(403, "forbidden")
        body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)


class _File:
    """One file of ``files`` as an app of its own, whatever the request's path."""

    def __init__(self, files: StaticFiles, name: str) -> None:
        self.files = files
        self.path = "/" + name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.files({**scope, "path": self.path, "root_path": ""}, receive, send)
