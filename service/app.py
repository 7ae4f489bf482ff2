"""The REST service: the HTTP contract of README.md over the same ``Classifier`` and ``Detector`` the CLI calls.

Request path: the route checks the token and the query, streams the body with the byte limit enforced while
reading (``413`` before the rest is buffered, ``408`` when it takes longer than ``upload_timeout_s``), reads each
image's header in a small thread pool (format sniffed from the bytes, pixel count checked), counts those pixels
against ``max_pixels_in_flight`` (``503`` + ``Retry-After`` beyond it), decodes, and hands the decoded images to
the ``MicroBatcher``: a bounded queue (``503`` + ``Retry-After`` when full) in front of the one thread that owns
the networks. The pixels stay counted until the answer is built, so decoded images held by requests (decoding,
queued or running) never exceed the budget, whatever arrives. While waiting, the route watches the connection; a
client that leaves cancels its jobs, which the worker then skips. Every error is ``{"error": {"code",
"message"}}``; input never causes a 500.

Several images in one multipart request (repeated ``image`` fields) are answered as ``{"results": [...]}``, one
entry per field in the order sent: the single-image answer, or ``{"image", "status", "error"}`` for an image
that failed alone. One ``image`` field keeps the single-image answer (and its error statuses).

The parts, one concept each, under ``service/api/``: ``schemas`` (response models), ``errors`` (the error shape and
its handlers), ``uploads`` (reading and decoding bodies), ``worker`` (``Service``: the models and the batch
handlers the worker thread runs) and ``routes`` (``/v1``). This module assembles them with the health, metrics and
web page routes.

Run it with ``ircnn serve`` (uvicorn), or ``uvicorn --factory service.app:create_app``.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from detector.pipeline.classify import Classifier
from service.api.errors import ApiError, install_error_handlers
from service.api.routes import api_router
from service.api.schemas import HealthResponse, ReadyResponse
from service.api.worker import Service
from service.metrics import Metrics
from service.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI and ReDoc, as the fastapi-offline package ships them (swagger-ui-bundle.js, swagger-ui.css,
# redoc.standalone.js, favicon.png): /docs and /redoc load nothing from another host.
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSETS_URL = "/docs-assets"


class MetricsMiddleware:
    """Counts and times every HTTP request by route template and status (pure ASGI: sees the real status)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets if the app raises before answering
        start = time.perf_counter()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label, scope["method"], str(status)).observe(time.perf_counter() - start)


def server_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.Config`` keywords for the connection-level limits in ``settings`` (``ircnn serve`` passes them).

    uvicorn has no timeout for reading a request's headers, and ``limit_concurrency`` answers 503 to requests
    beyond it without closing idle sockets: a client that trickles its headers holds a connection until it stops.
    README's service section says what to put in front for that.
    """
    return {"limit_concurrency": settings.limit_concurrency, "timeout_keep_alive": settings.timeout_keep_alive_s,
            "h11_max_incomplete_event_size": settings.max_header_bytes}


def create_app(settings: Settings | None = None, classifier: Classifier | None = None, detector=None) -> FastAPI:
    """The app. Without injected models the bundle (``settings.model``, else the default bundle the CLI uses)
    is loaded once in the lifespan; ``/readyz`` turns ready after a warm-up forward in the worker thread."""
    settings = settings or Settings()
    service = Service(settings, classifier, detector)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(service.load)  # a broken bundle stops startup with its message
        service.batcher.start(warmup=service.warmup)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.close)  # uvicorn has finished the in-flight requests

    app = FastAPI(title="inception-rcnn", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="GoogLeNet classification and R-CNN detection ('Going deeper with convolutions'). "
                  "Errors are {\"error\": {\"code\", \"message\"}}.")
    app.state.service = service
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    install_error_handlers(app)
    app.include_router(api_router())

    @app.get("/healthz", response_model=HealthResponse, summary="The process is alive")
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse, summary="The model is loaded and warm",
             responses={503: {"model": ReadyResponse, "description": "warming up"}})
    async def readyz() -> Response:
        b = service.batcher
        if not b.ready.is_set():
            body = ReadyResponse(ready=False, detail="warming up", queue_depth=b.depth)
            return JSONResponse(body.model_dump(), 503, {"Retry-After": str(settings.retry_after_s)})
        if b.warmup_error is not None:
            body = ReadyResponse(ready=False, detail=f"warm-up failed: {b.warmup_error}", queue_depth=b.depth)
            return JSONResponse(body.model_dump(), 503)
        return JSONResponse(ReadyResponse(ready=True, detail="ready", queue_depth=b.depth).model_dump())

    @app.get("/metrics", summary="Prometheus text format", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "not_found", "no web page installed (service/static/index.html); the API is "
                           "under /v1, its documentation at /docs")
        return FileResponse(page, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_offline_docs(app)
    return app


def add_offline_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts, styles and icon served by this app, so that the
    API docs work without a network (FastAPI's pages load them from a CDN). FastAPI's documented way: the app is
    made with ``docs_url=None, redoc_url=None`` and these routes give its page builders local URLs."""
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def local(request: Request, path: str) -> str:
        return request.scope.get("root_path", "") + path

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=local(request, app.openapi_url), title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=local(request, oauth2_redirect),
            swagger_js_url=local(request, f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=local(request, f"{DOCS_ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=local(request, f"{DOCS_ASSETS_URL}/favicon.png"),
            swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from the online validator

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=local(request, app.openapi_url), title=f"{app.title} - ReDoc",
            redoc_js_url=local(request, f"{DOCS_ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=local(request, f"{DOCS_ASSETS_URL}/favicon.png"), with_google_fonts=False)
