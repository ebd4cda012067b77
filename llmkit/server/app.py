"""build_app(engine, settings) -> FastAPI: everything the server needs, injected, no module globals.

`engine` is a loaded TransformersEngine (tests) or a zero-argument loader (the CLI): a
loader runs on the inference thread at startup, so the socket is open and /health
answers 503 {"status": "loading"} while the model loads.

Every error leaves as JSON in the path's shape (schemas.error_body): LlmkitErrors with
their http_status, FastAPI's validation errors as 400 with the same sentence
parse_params gives (never 422, never a 500 for bad input), unknown routes as 404, and
only a bug as 500 (logged with its traceback and the request id by AccessLog, which answers
it without dropping the connection). Before FastAPI sees a body, JsonBody checks what
pydantic cannot word well: the Content-Type, malformed or non-UTF-8 JSON, numbers that do
not fit, nesting too deep, and lone surrogates in any string (each a 4xx naming the field).
"""

from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit import __version__
from llmkit.errors import LlmkitError
from llmkit.params import TYPE_WORDS, shown
from llmkit.server import openapi
from llmkit.server.metrics import Metrics
from llmkit.server.middleware import AccessLog, ApiKeyAuth, BodyLimit, JsonBody, RateLimiter
from llmkit.server.routes import build_router
from llmkit.server.runtime import ModelHost
from llmkit.server.schemas import error_body, param_sentence
from llmkit.server.settings import ServerSettings

log = logging.getLogger("llmkit.server")

RETRY_AFTER_S = {"queue_full": 1, "model_not_ready": 5, "shutting_down": 5}
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\])$")
STATUS_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_exceeded",
}


def build_app(engine, settings: ServerSettings) -> FastAPI:
    metrics = Metrics()
    host = ModelHost(engine, settings, on_step=metrics.observe_step)
    metrics.bind(
        waiting=lambda: host.scheduler.waiting if host.scheduler else 0,
        running=lambda: host.scheduler.running_rows if host.scheduler else 0,
        ready=lambda: 1.0 if host.ready else 0.0,
        failures=lambda: host.scheduler.failures if host.scheduler else None,
        prefix_cache=lambda: host.scheduler.prefix_cache if host.scheduler else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        host.start()
        yield
        await run_in_threadpool(host.stop)

    app = FastAPI(
        title="llmkit serve",
        version=__version__,
        lifespan=lifespan,
        summary="OpenAI-compatible completions with continuous batching, and a simple /generate API.",
    )
    app.state.host = host
    app.state.metrics = metrics
    app.state.settings = settings
    router = build_router()
    app.include_router(router)
    _install_error_handlers(app)
    openapi.install(app)

    routes = [route for route in router.routes if isinstance(route, APIRoute)]
    known_paths = {route.path for route in routes}

    def route_label(scope: dict[str, Any]) -> str:
        return scope["path"] if scope["path"] in known_paths else "other"

    # add_middleware wraps: the last added runs first. Order of a request: log -> size -> key -> rate -> JSON.
    app.add_middleware(JsonBody, paths={route.path for route in routes if "POST" in (route.methods or ())})
    if settings.rate_limit:
        app.add_middleware(RateLimiter, limit=settings.rate_limit, metrics=metrics)
    if settings.api_key:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics, route_label=route_label)
    return app


def _error(
    request: Request,
    status: int,
    message: str,
    *,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[tuple[str | None, str]] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(request.url.path, message, kind=kind, param=param, errors=errors),
        status_code=status,
        headers=headers,
    )


def _field_path(loc) -> list[str | int]:
    """pydantic's error location without 'body' and union member tags ('str', 'list[str]', 'function-after[...]')."""
    return [part for part in loc if part != "body" and not (isinstance(part, str) and _UNION_TAG.match(part))]


def _path_text(path: list[str | int]) -> str:
    """['messages', 0, 'content'] -> 'messages[0].content'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _validation_errors(errors: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
    """pydantic's errors for a request body -> one (field, sentence) per bad field, worded like parse_params,
    in the body's field order. A field's errors are read together (`_field_message`)."""
    fields: dict[str | None, list[dict[str, Any]]] = {}
    for error in errors:
        path = _field_path(error.get("loc", ()))
        if error.get("type") == "json_invalid" or not path:  # the body as a whole: nothing else can be said
            message, field = _field_message([error])
            return [(field, message)]
        fields.setdefault(str(path[0]), []).append(error)
    return [(field, message) for message, field in (_field_message(group) for group in fields.values())]


def _field_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The errors of one body field (or of the whole body) -> (one sentence, field).

    A value that matches no member of a union (a prompt that is neither a string nor a list) gives one
    error per member; they are read together as "must be a string or a list".
    """
    error = errors[0]
    path = _field_path(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"request body is not valid JSON{f' ({detail})' if detail else ''}", None
    if not path:
        return f"request body must be a JSON object (got {type(error.get('input')).__name__})", None
    field, where = str(path[0]), _path_text(path)
    if kind == "missing":
        return f"missing required parameter '{where}'", where
    if kind == "extra_forbidden":
        return f"unknown parameter '{where}'", where
    if len(path) <= 2:  # a generation parameter (under any of its body names): parse_params' sentence
        sentence = param_sentence(field, error.get("input"))
        if sentence is not None:
            return sentence, field
    if field == "prompt" and any(str(part).startswith("list[") for e in errors for part in e.get("loc", ())):
        got = shown(error.get("input"))
        return f"prompt must be a string or a list: of texts, of token ids, or of lists of token ids (got {got})", field
    same_place = [e for e in errors if _field_path(e.get("loc", ())) == path]
    words = [TYPE_WORDS[e["type"]] for e in same_place if e.get("type") in TYPE_WORDS]
    if words and len(words) == len(same_place):
        return f"{where} must be {' or '.join(dict.fromkeys(words))} (got {shown(error.get('input'))})", where
    return f"{where}: {error.get('msg', 'invalid value')} (got {shown(error.get('input'))})", where


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LlmkitError)
    async def llmkit_error(request: Request, exc: LlmkitError) -> JSONResponse:
        retry = RETRY_AFTER_S.get(exc.kind)
        return _error(
            request,
            exc.http_status,
            str(exc),
            kind=exc.kind,
            param=getattr(exc, "field", None),
            headers={"retry-after": str(retry)} if retry else None,
            errors=getattr(exc, "errors", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(list(exc.errors()))
        return _error(
            request,
            400,
            "; ".join(message for _, message in errors),
            kind="invalid_request_error",
            param=errors[0][0],
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(
            request,
            exc.status_code,
            message,
            kind=STATUS_KINDS.get(exc.status_code, "error"),
            headers=getattr(exc, "headers", None),
        )
