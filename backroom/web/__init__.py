"""The dashboard and HTTP API as one ASGI app: `create_app(app)` to mount it in your own
Starlette/FastAPI app, `serve(app)` to run it with uvicorn (what `backroom dashboard` does)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from backroom.app import App
from backroom.errors import BrokerError
from backroom.web import pages
from backroom.web.api import VIEW_CACHE_S, Api, broker_unavailable
from backroom.web.auth import (
    ENV_TOKEN,
    ENV_TOKENS,
    LOOPBACK_HOSTS,
    Guard,
    TokenSpec,
    build_tokens,
    route_path,
    tokens_from_env,
)
from backroom.web.checks import ApiError, JSONResponse, error_response
from backroom.web.metrics import exposition, metrics_registry
from backroom.web.openapi import openapi

__all__ = ["ENV_TOKEN", "ENV_TOKENS", "create_app", "serve"]

logger = logging.getLogger("backroom.web")


def create_app(
    app: App,
    tokens: TokenSpec | None = None,
    *,
    allowed_hosts: list[str] | None = None,
    cache_s: float = VIEW_CACHE_S,
) -> Starlette:
    """The dashboard (`GET /`), the HTTP API (`/api/...`), `/metrics` and `/healthz`.

    `tokens` maps a source to its bearer token(s), e.g. {"api": "tok1", "web": ["tok2"]}; None
    reads $BACKROOM_DASHBOARD_TOKENS ("api=tok1,web=tok2") and $BACKROOM_DASHBOARD_TOKEN (source
    "dashboard"); {} turns authentication off. With any token, every /api and /metrics request
    needs `Authorization: Bearer <token>` and enqueues as the token's source; without tokens,
    requests enqueue as `app.source`. `allowed_hosts` refuses requests for other Host names
    (DNS rebinding); serve() sets it to the loopback names when it binds loopback. The
    per-tag stats and last-hour charts are read from the broker at most every `cache_s`."""
    known = build_tokens(tokens_from_env() if tokens is None else tokens)
    api = Api(app, cache_s=cache_s)
    registry = metrics_registry(app)

    def metrics(request: Request) -> Response:
        return Response(
            exposition(registry),
            media_type="text/plain; version=0.0.4; charset=utf-8",
            headers={"cache-control": "no-store"},
        )

    def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(openapi(list(app.registry.names())))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def broker_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BrokerError)
        logger.warning("broker error on %s %s: %s", request.method, request.url.path, exc)
        return error_response(broker_unavailable(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if route_path(request.scope).startswith("/api"):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
            text = f"{request.method} {route_path(request.scope)[:200]}: {exc.detail}"
            return error_response(ApiError(exc.status_code, code, text))
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            ApiError(
                500,
                "internal_error",
                "unexpected server error; the dashboard's log has the details",
            )
        )

    routes: list[Any] = [
        *api.routes(),
        Route("/api/openapi.json", openapi_json, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *pages.routes(),
    ]
    web = Starlette(
        routes=routes,
        middleware=[
            Middleware(Guard, tokens=known, default_source=app.source, allowed_hosts=allowed_hosts)
        ],
        exception_handlers={
            ApiError: api_error,
            BrokerError: broker_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )
    web.state.backroom = app
    web.state.sources = known.sources
    return web


def serve(
    app: App,
    host: str = "127.0.0.1",
    port: int = 8787,
    tokens: TokenSpec | None = None,
    **uvicorn_options: Any,
) -> None:
    """Run the dashboard with uvicorn until interrupted. Binds 127.0.0.1 by default; on a
    loopback address without tokens it answers only for loopback Host names."""
    import uvicorn

    spec = tokens_from_env() if tokens is None else tokens
    loopback = host in LOOPBACK_HOSTS
    allowed = sorted(LOOPBACK_HOSTS | {host}) if loopback and not spec else None
    web = create_app(app, spec, allowed_hosts=allowed)
    if not spec and not loopback:
        logger.warning(
            "the dashboard listens on %s without a token: anyone who can reach it can enqueue "
            "and cancel jobs; set %s or %s",
            host,
            ENV_TOKEN,
            ENV_TOKENS,
        )
    shown = f"[{host}]" if ":" in host else host
    auth = "bearer token required" if spec else f"no token: jobs enqueue as {app.source!r}"
    logger.info("backroom dashboard on http://%s:%d/ (%s)", shown, port, auth)
    uvicorn_options.setdefault("log_level", "info")
    uvicorn_options.setdefault("server_header", False)
    uvicorn.run(web, host=host, port=port, **uvicorn_options)
