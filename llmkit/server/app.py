"""build_app(engine, settings) -> FastAPI: everything the server needs, injected, no module globals.

`engine` is a loaded TransformersEngine (tests) or a zero-argument loader (the CLI): a
loader runs on the inference thread at startup, so the socket is open and /health
answers 503 {"status": "loading"} while the model loads.

Every error leaves as JSON in the path's shape (schemas.error_body): LlmkitErrors with
their http_status, FastAPI's validation errors as 400 with the same sentence
parse_params gives (never 422, never a 500 for bad input), unknown routes as 404, and
only a bug as 500 (logged with its traceback and the request id).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit import __version__
from llmkit.errors import InvalidParams, LlmkitError
from llmkit.params import parse_params
from llmkit.server.metrics import Metrics
from llmkit.server.middleware import AccessLog, ApiKeyAuth, BodyLimit, RateLimiter
from llmkit.server.routes import build_router
from llmkit.server.runtime import ModelHost
from llmkit.server.schemas import PARAM_FIELDS, error_body, rename_error
from llmkit.server.settings import ServerSettings

log = logging.getLogger("llmkit.server")

RETRY_AFTER_S = {"queue_full": 1, "model_not_ready": 5, "shutting_down": 5}
STATUS_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_exceeded"}


def build_app(engine, settings: ServerSettings) -> FastAPI:
    metrics = Metrics()
    host = ModelHost(engine, settings, on_step=metrics.observe_step)
    metrics.bind(waiting=lambda: host.scheduler.waiting if host.scheduler else 0,
                 running=lambda: host.scheduler.running_rows if host.scheduler else 0,
                 ready=lambda: 1.0 if host.ready else 0.0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        host.start()
        yield
        await run_in_threadpool(host.stop)

    app = FastAPI(title="llmkit serve", version=__version__, lifespan=lifespan,
                  summary="OpenAI-compatible completions with continuous batching, and the tutorial's /generate.")
    app.state.host = host
    app.state.metrics = metrics
    app.state.settings = settings
    router = build_router()
    app.include_router(router)
    _install_error_handlers(app)

    known_paths = {route.path for route in router.routes}

    def route_label(scope: dict[str, Any]) -> str:
        return scope["path"] if scope["path"] in known_paths else "other"

    # add_middleware wraps: the last added runs first. Order of a request: log -> size -> key -> rate.
    if settings.rate_limit:
        app.add_middleware(RateLimiter, limit=settings.rate_limit, metrics=metrics)
    if settings.api_key:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics, route_label=route_label)
    return app


def _error(request: Request, status: int, message: str, *, kind: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, message, kind=kind, param=param), status_code=status,
                        headers=headers)


def _validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """One pydantic error from a request body -> (sentence, field), worded like parse_params."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"request body is not valid JSON{f' ({detail})' if detail else ''}", None
    if not loc:
        return "request body must be a JSON object", None
    field = loc[0]
    if kind == "missing" and len(loc) == 1:
        return f"missing required parameter '{field}'", field
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"unknown parameter '{field}'", field
    if field in PARAM_FIELDS and len(loc) <= 2:  # bad type for a generation parameter: parse_params' sentence
        try:
            parse_params({PARAM_FIELDS[field]: error.get("input")})
        except InvalidParams as exc:
            renamed = rename_error(exc, {PARAM_FIELDS[field]: field})
            return str(renamed), field
    return f"{'.'.join(loc)}: {error.get('msg', 'invalid value')}", field


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LlmkitError)
    async def llmkit_error(request: Request, exc: LlmkitError) -> JSONResponse:
        retry = RETRY_AFTER_S.get(exc.kind)
        return _error(request, exc.http_status, str(exc), kind=exc.kind, param=getattr(exc, "field", None),
                      headers={"retry-after": str(retry)} if retry else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc.errors()[0])
        return _error(request, 400, message, kind="invalid_request_error", param=field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(request, exc.status_code, message, kind=STATUS_KINDS.get(exc.status_code, "error"),
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.scope.get("state", {}).get("request_id", "?")
        log.error("unexpected error in %s %s (request id %s)", request.method, request.url.path, request_id,
                  exc_info=exc, extra={"request_id": request_id})
        return _error(request, 500, f"internal server error (request id {request_id}); see the server log",
                      kind="server_error")
