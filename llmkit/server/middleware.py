"""Pure ASGI middleware, outermost first: access log (and the last-resort 500), body size limit,
API key, rate limit, JSON body check.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a
client disconnect still reaches the stream. Each middleware answers its own errors in
the shape of the path (OpenAI's on /v1/*), and every response leaves through AccessLog,
which gives it an X-Request-ID.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llmkit.params import SURROGATE_MESSAGE, surrogate_position
from llmkit.server.metrics import Metrics
from llmkit.server.schemas import error_body
from llmkit.server.settings import RateLimit

access_log = logging.getLogger("llmkit.access")
server_log = logging.getLogger("llmkit.server")

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_TRACKED_CLIENTS = 10_000
CLIENT_GONE = 499  # logged for a request that got no answer because its client left (nginx's code for it)


async def send_error(
    send,
    path: str,
    status: int,
    message: str,
    *,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
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
    """Assigns the request id, then logs one line and records the request metrics when the last byte is sent.

    It is also the last resort for bugs: an exception that escapes the app is logged with its traceback and
    answered with a 500 here, so it never reaches Starlette's or uvicorn's handlers, which drop the
    keep-alive connection after their 500 (the client's next request on it then fails).
    """

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
        response: dict[str, Any] = {"status": CLIENT_GONE, "started": False}  # no answer at all: the client left

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                response.update(status=message["status"], started=True)
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            server_log.error(
                "unexpected error in %s %s (request id %s)",
                scope["method"],
                scope["path"],
                request_id,
                exc_info=exc,
                extra={"request_id": request_id},
            )
            if not response["started"]:  # once a response has begun it cannot be replaced; uvicorn closes it
                await send_error(
                    send_with_id,
                    scope["path"],
                    500,
                    f"internal server error (request id {request_id}); see the server log",
                    kind="server_error",
                )
        finally:
            self._log(scope, state, request_id, response["status"], time.perf_counter() - started)

    def _log(self, scope, state: dict, request_id: str, status: int, elapsed: float) -> None:
        route = self.route_label(scope)
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(elapsed)
        usage = state.get("usage") or {}
        client = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round(elapsed * 1000, 1),
            "client": client[0] if client else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": usage.get("cached_tokens"),
        }
        if state.get("ended_by"):
            fields["ended_by"] = state["ended_by"]
        tokens = f" tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" if usage else ""
        access_log.info(
            "%s %s %s %.1fms id=%s%s",
            scope["method"],
            scope["path"],
            status,
            elapsed * 1000,
            request_id,
            tokens,
            extra=fields,
        )


class BodyTooLarge(HTTPException):
    """Raised while the body is read, wherever that happens (JsonBody, or FastAPI, which re-raises
    HTTPExceptions); BodyLimit answers it with the 413."""


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
                return await send_error(
                    send, scope["path"], 400, "invalid Content-Length header", kind="invalid_request_error"
                )
            if size > self.max_bytes:
                return await send_error(send, scope["path"], 413, too_large, kind="request_too_large")
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(413, too_large)
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await send_error(send, scope["path"], 413, too_large, kind="request_too_large")


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
            message = "invalid API key" if given else "missing API key; send it as 'Authorization: Bearer <key>'"
            return await send_error(
                send, scope["path"], 401, message, kind="authentication_error", headers={"www-authenticate": "Bearer"}
            )
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
        self._buckets = {
            c: (t, last) for c, (t, last) in self._buckets.items() if t + (now - last) * self.per_second < self.capacity
        }


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
            return await send_error(
                send,
                scope["path"],
                429,
                f"rate limit exceeded ({self.limit} per client); retry in {retry} s",
                kind="rate_limit_exceeded",
                headers={"retry-after": str(retry)},
            )
        await self.app(scope, receive, send)


# --- JSON bodies ---------------------------------------------------------------------------------

JSON_MAX_DEPTH = 32  # no request field nests deeper than messages[i].content[j].text
JSON_OFF_LOOP_BYTES = 64 * 1024  # bigger bodies are checked on a worker thread, so /health stays quick
JSON_MAX_INT_DIGITS = 24  # the largest integer any field takes (seed < 2**63) has 19 digits


class _BadNumber:
    """Stands in for a number JSON allows but no field can take, so the walk can name where it was."""

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why


def _parse_int(text: str):
    if len(text.lstrip("-")) > JSON_MAX_INT_DIGITS:
        return _BadNumber(text, f"an integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def _parse_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(text, f"{text[:20]} is out of range for a number")


def _parse_constant(text: str):
    return _BadNumber(text, f"{text} is not a JSON number (JSON has no NaN or Infinity)")


def json_body_problem(body: bytes) -> tuple[str, str | None] | None:
    """(sentence, field) for a request body that is not JSON llmkit can take, or None if it is fine."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"request body is not valid UTF-8 (byte {exc.start}); send JSON text", None
    if not text.strip():
        return "request body is empty; send a JSON object", None
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        return f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", None
    except RecursionError:
        return f"request body nests too deeply to parse (llmkit takes at most {JSON_MAX_DEPTH} levels)", None
    return _value_problem(data)


def _value_problem(data: Any) -> tuple[str, str | None] | None:
    """The first bad number, lone surrogate or too-deep nesting in parsed JSON, named by its path."""
    pending: list[tuple[Any, str, int]] = [(data, "", 0)]
    while pending:
        value, path, depth = pending.pop()
        where = path or "request body"
        if depth > JSON_MAX_DEPTH:
            field = re.split(r"[.\[]", path, maxsplit=1)[0]
            return f"request body nests deeper than {JSON_MAX_DEPTH} levels (in {field})", field
        if isinstance(value, _BadNumber):
            return f"{where}: {value.why}", path or None
        if isinstance(value, str):
            position = surrogate_position(value)
            if position is not None:
                return SURROGATE_MESSAGE.format(what=where, at=position), path or None
        elif isinstance(value, dict):
            for key, item in value.items():
                if surrogate_position(key) is not None:
                    return SURROGATE_MESSAGE.format(what=f"a key in {where}", at=surrogate_position(key)), path or None
                pending.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
    return None


def _is_json(content_type: bytes) -> bool:
    media = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class JsonBody:
    """Checks the body of POST requests to `paths` before FastAPI parses it, and hands it on unchanged.

    FastAPI answers a non-JSON Content-Type with "must be a JSON object", and a 5,000-digit integer or
    deep nesting with "There was an error parsing the body"; a lone surrogate passes validation and
    fails later inside the tokenizer as a 500. Here each is a 4xx that names the header or the field.
    """

    def __init__(self, app, paths: set[str]):
        self.app, self.paths = app, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        content_type = _header(scope, b"content-type")
        if content_type is not None and not _is_json(content_type):
            return await send_error(
                send,
                scope["path"],
                415,
                f"Content-Type must be application/json (got "
                f"{content_type.decode('latin-1')[:80]!r}); send the body as JSON "
                "(curl: -H 'content-type: application/json')",
                kind="invalid_request_error",
                param="content-type",
            )
        body, messages = await _read_body(receive)
        if body is None:  # the client left while sending
            return
        problem = (
            await run_in_threadpool(json_body_problem, body)
            if len(body) > JSON_OFF_LOOP_BYTES
            else json_body_problem(body)
        )
        if problem is not None:
            message, field = problem
            return await send_error(send, scope["path"], 400, message, kind="invalid_request_error", param=field)
        await self.app(scope, _replay(messages, receive), send)


async def _read_body(receive) -> tuple[bytes | None, list[dict]]:
    """The whole body (BodyLimit, outside this, bounds its size) and the messages it came in."""
    messages: list[dict] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, messages
        messages.append(message)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), messages


def _replay(messages: list[dict], receive):
    """A receive() that gives the already-read body messages again, then whatever comes next (a disconnect)."""
    queued = list(messages)

    async def replayed():
        return queued.pop(0) if queued else await receive()

    return replayed
