"""Pure ASGI middleware, outermost first: access log, body size limit, API key, rate limit.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a
client disconnect still reaches the stream. Each middleware answers its own errors in
the shape of the path (OpenAI's on /v1/*).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
import uuid
from typing import Any, Callable

from starlette.exceptions import HTTPException

from llmkit.server.metrics import Metrics
from llmkit.server.schemas import error_body
from llmkit.server.settings import RateLimit

access_log = logging.getLogger("llmkit.access")

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_TRACKED_CLIENTS = 10_000


async def send_error(send, path: str, status: int, message: str, *, kind: str, param: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(path, message, kind=kind, param=param), separators=(",", ":")).encode()  # as FastAPI
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class AccessLog:
    """Assigns the request id, then logs one line and records the request metrics when the last byte is sent."""

    def __init__(self, app, metrics: Metrics, route_label: Callable[[dict], str]):
        self.app, self.metrics, self.route_label = app, metrics, route_label

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        incoming = (_header(scope, REQUEST_ID_HEADER) or b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = started  # perf_counter; a request's timings and deadline count from here
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (REQUEST_ID_HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = self.route_label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            usage = state.get("usage") or {}
            client = scope.get("client")
            fields: dict[str, Any] = {
                "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                "latency_ms": round(elapsed * 1000, 1), "client": client[0] if client else None,
                "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            }
            if state.get("ended_by"):
                fields["ended_by"] = state["ended_by"]
            tokens = f" tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" if usage else ""
            access_log.info("%s %s %s %.1fms id=%s%s", scope["method"], scope["path"], status, elapsed * 1000,
                            request_id, tokens, extra=fields)


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI re-raises HTTPExceptions, so it reaches the 413 handler."""


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        too_large = f"request body is larger than the server's limit of {self.max_bytes} bytes"
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await send_error(send, scope["path"], 400, "invalid Content-Length header",
                                        kind="invalid_request_error")
            if size > self.max_bytes:
                return await send_error(send, scope["path"], 413, too_large, kind="request_too_large")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


class ApiKeyAuth:
    """Bearer token (what the openai client sends) or X-API-Key, compared in constant time; /health is exempt."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH_PATH:
            return await self.app(scope, receive, send)
        given = b""
        authorization = _header(scope, b"authorization") or b""
        if authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        else:
            given = (_header(scope, b"x-api-key") or b"").strip()
        if not secrets.compare_digest(given, self.api_key):
            message = ("invalid API key" if given else
                       "missing API key; send it as 'Authorization: Bearer <key>'")
            return await send_error(send, scope["path"], 401, message, kind="authentication_error",
                                    headers={"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)


class TokenBuckets:
    """Per-client token buckets: `count` requests per `period_s`, refilled continuously."""

    def __init__(self, limit: RateLimit):
        self.capacity = float(limit.count)
        self.per_second = limit.count / limit.period_s
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """0.0 if the request may go ahead (and spends a token); otherwise seconds until one is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.per_second)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._forget_full(now)
            return (1.0 - tokens) / self.per_second

    def _forget_full(self, now: float) -> None:
        self._buckets = {c: (t, last) for c, (t, last) in self._buckets.items()
                         if t + (now - last) * self.per_second < self.capacity}


class RateLimiter:
    """429 with Retry-After once a client (by IP address) exceeds --rate-limit; /health and /metrics are exempt."""

    def __init__(self, app, limit: RateLimit, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics
        self.buckets = TokenBuckets(limit)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in (HEALTH_PATH, METRICS_PATH):
            return await self.app(scope, receive, send)
        client = scope.get("client")
        wait = self.buckets.take(client[0] if client else "unknown")
        if wait > 0:
            self.metrics.ended.labels("rate_limited").inc()
            retry = max(1, int(wait + 0.999))
            return await send_error(send, scope["path"], 429,
                                    f"rate limit exceeded ({self.limit} per client); retry in {retry} s",
                                    kind="rate_limit_exceeded", headers={"retry-after": str(retry)})
        await self.app(scope, receive, send)
