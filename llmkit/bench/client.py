"""The client side of one OpenAI-compatible endpoint: the target, a streamed request, its SSE, the probes.

`Endpoint` is where requests go: the server's root (`http://host:port`, any path prefix kept),
`/v1` under it, the model name to send, the key. `stream_request` sends one streamed completion
(`stream: true`, `stream_options.include_usage`) with httpx and turns its SSE into a RequestRecord
(metrics.py has the definitions). `SSEParser` is small and written here because httpx has no SSE
parser, and a load test must time each event when its bytes arrive: an event or a UTF-8 character
split across reads, `\\r\\n` line ends, comments (`: ping`), multi-line data. `ShardedClient`
spreads requests over small httpx pools (why: its docstring).

Which chunks carry output: a choice with a `text` string (completions) or a `delta` with a
`content` (or `reasoning_content`) string (chat). An empty string counts (llama.cpp sends one for a
token that ends inside a UTF-8 character), except on a chunk that only opens a choice (a chat
`role`) or only closes it (`finish_reason` with no text): those are not tokens. Without `usage`,
the runner counts a request's output tokens by re-encoding its text with the server's tokenizer
(as vLLM's benchmark falls back to its tokenizer), or, with no tokenizer either, counts its output
chunks, and the report says which.

Probes run once before anything is measured (`probe_request` and the functions above it): the
served models (`/v1/models`), a tokenizer (vLLM's and llama-server's `/tokenize` + `/detokenize`,
llama-cpp-python's `/extras/tokenize`), and a first small request that finds out whether the server sends usage and
which optional fields it refuses. `ignore_eos` (vLLM, llama.cpp) is sent by default; a server that
answers 400 naming it (llmkit serve forbids unknown fields) gets the requests without it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import math
import os
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from llmkit.bench.metrics import RequestRecord
from llmkit.errors import (
    AuthenticationFailed,
    EndpointFailed,
    EndpointMissing,
    EndpointUnreachable,
    InvalidParams,
    UnknownModel,
    one_line,
)

API_KEY_ENVS = ("LLMKIT_API_KEY", "OPENAI_API_KEY")
CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 60.0
# Under the 5 s idle timeout of uvicorn (so llmkit serve, vLLM, llama-cpp-python): a connection is
# never reused just as the server closes it, which would fail a request that was never sent.
KEEPALIVE_EXPIRY_S = 2.0
ERROR_TEXT_LIMIT = 200
OPTIONAL_FIELDS = ("ignore_eos",)  # sent when asked; dropped for a server that answers 400 naming them
PATHS = {"completions": "/completions", "chat": "/chat/completions"}


# --- the target -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    root: str  # scheme://host[:port][/prefix], without /v1
    model: str | None = None  # the name sent in every body (None until chosen)
    api_key: str | None = field(default=None, repr=False)

    @property
    def api_base(self) -> str:
        return self.root + "/v1"

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def with_model(self, model: str | None) -> Endpoint:
        return Endpoint(self.root, model, self.api_key)


def is_url(target: str) -> bool:
    return "://" in target


def parse_url(target: str, api_key: str | None = None) -> Endpoint:
    """`http(s)://host:port[/prefix][/v1][#model]` -> Endpoint; anything else is a usage error."""
    parts = urlsplit(target.strip())
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidParams(f"the target URL must start with http:// or https:// (got {target!r})", field="target")
    if not parts.hostname:
        raise InvalidParams(
            f"the target URL has no host (got {target!r}); e.g. http://127.0.0.1:8000/v1", field="target"
        )
    try:
        parts.port  # noqa: B018  # raises on a port that is not a number in range
    except ValueError:
        raise InvalidParams(f"the target URL has a bad port (got {target!r})", field="target") from None
    if parts.query:
        raise InvalidParams(f"the target URL must not have a query string (got {target!r})", field="target")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    root = urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))
    return Endpoint(root, parts.fragment or None, api_key)


def api_key_from_env() -> str | None:
    for name in API_KEY_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return None


# --- SSE --------------------------------------------------------------------------------------------


class SSEParser:
    """Incremental Server-Sent Events: bytes in, complete events' `data` out (multi-line data joined by \\n).

    Follows the HTML standard's parsing: lines end at \\n, \\r\\n or \\r; a blank line ends an event;
    `:` lines are comments; `data:` may be followed by one optional space; other fields are ignored.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += self._decoder.decode(chunk)
        return self._drain(final=False)

    def close(self) -> list[str]:
        """The events left when the stream ends: a last event without its blank line still counts."""
        self._buffer += self._decoder.decode(b"", final=True)
        events = self._drain(final=True)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _drain(self, final: bool) -> list[str]:
        events: list[str] = []
        buffer = self._buffer
        start = 0
        length = len(buffer)
        while start < length:
            newline = buffer.find("\n", start)
            carriage = buffer.find("\r", start, newline if newline >= 0 else length)
            if carriage >= 0:
                end, after = carriage, carriage + 1
                if after == length and not final:
                    break  # a \r at the end of what arrived: its \n may be in the next read
                if after < length and buffer[after] == "\n":
                    after += 1
            elif newline >= 0:
                end, after = newline, newline + 1
            elif final:
                end, after = length, length
            else:
                break
            line = buffer[start:end]
            start = after
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                self._data.append(line[6:] if line.startswith("data: ") else line[5:])
            # comments (":"), event:, id:, retry: and unknown fields carry nothing a completion needs
        self._buffer = buffer[start:]
        return events


def choice_output(choice: Any) -> str | None:
    """The output a streamed choice carries, or None when it carries none (see the module docstring)."""
    if not isinstance(choice, dict):
        return None
    delta = choice.get("delta")
    if "text" in choice:
        piece = choice["text"]
    elif isinstance(delta, dict):
        piece = delta.get("content")
        if piece is None:
            piece = delta.get("reasoning_content", delta.get("reasoning"))
    else:
        return None
    if not isinstance(piece, str):
        return None
    if piece == "" and (choice.get("finish_reason") or (isinstance(delta, dict) and "role" in delta)):
        return None
    return piece


def error_text(body: Any, fallback: str) -> tuple[str, str | None]:
    """(message, type) from an OpenAI error body ({"error": {...}}), FastAPI's {"detail": ...} or text."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or fallback
            kind = error.get("type") or error.get("code")
            return one_line(message, ERROR_TEXT_LIMIT), (str(kind) if kind else None)
        if isinstance(error, str):
            return one_line(error, ERROR_TEXT_LIMIT), body.get("type")
    return one_line(fallback, ERROR_TEXT_LIMIT), None


def _json_or_text(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", errors="replace")


# --- one streamed request ---------------------------------------------------------------------------


@dataclass
class StreamOutcome:
    """A request's record, plus what a probe wants to know about the answer."""

    record: RequestRecord
    status: int | None = None
    body: Any = None  # the error body of a non-200 answer


async def stream_request(
    client,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    index: int,
    timeout_s: float,
    point_start: float = 0.0,
    prompt_tokens: int | None = None,
) -> StreamOutcome:
    """Send one streamed request and time it; never raises for what the server or the network did."""
    record = RequestRecord(index=index, prompt_tokens=prompt_tokens)
    outcome = StreamOutcome(record)
    start = time.perf_counter()
    record.sent_s = start - point_start
    try:
        await asyncio.wait_for(_stream(client, url, body, headers, start, outcome), timeout_s)
    except asyncio.TimeoutError:
        _fail(record, "timeout", f"no complete answer within {timeout_s:g} s (--request-timeout)")
    except Exception as exc:  # httpx's transport errors, and anything else the network throws
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            _fail(record, "timeout", f"{type(exc).__name__}: {one_line(exc, ERROR_TEXT_LIMIT) or 'timed out'}")
        elif isinstance(exc, (httpx.TransportError, OSError)):
            _fail(record, "connection", f"{type(exc).__name__}: {connection_problem(exc)}")
        else:
            raise
    return outcome


def _fail(record: RequestRecord, kind: str, message: str) -> None:
    record.ok, record.error_kind, record.error = False, kind, message


async def _stream(
    client, url: str, body: dict[str, Any], headers: dict[str, str], start: float, outcome: StreamOutcome
) -> None:
    record = outcome.record
    async with client.stream("POST", url, json=body, headers=headers) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.body = _json_or_text(await response.aread())
            message, kind = error_text(outcome.body, response.reason_phrase or "error")
            _fail(
                record,
                f"http_{response.status_code}",
                f"HTTP {response.status_code}{f' {kind}' if kind else ''}: {message}",
            )
            return
        parser = SSEParser()
        pieces: list[str] = []
        last_output: float | None = None
        last_choice: float | None = None
        done = False
        async for raw in response.aiter_bytes():
            now = time.perf_counter()
            for data in parser.feed(raw):
                state = _event(record, data, now, start, last_output, pieces)
                if state == "done":
                    done = True
                elif state == "error":
                    return
                elif state in ("output", "choice"):
                    last_choice = now
                    if state == "output":
                        last_output = now
        now = time.perf_counter()
        for data in parser.close():
            state = _event(record, data, now, start, last_output, pieces)
            if state == "error":
                return
            done = done or state == "done"
            if state in ("output", "choice"):
                last_choice = now
    if record.ttft_s is None:
        _fail(
            record, "no_output", "the stream ended without any output chunk" + ("" if done else " (and without [DONE])")
        )
        return
    record.e2e_s = (last_choice if last_choice is not None else time.perf_counter()) - start
    record.text = "".join(pieces)
    if record.usage:
        record.output_counted_by = "usage"
    else:  # the runner re-encodes the text with the server's tokenizer when it has one
        record.output_tokens, record.output_counted_by = record.output_chunks, "chunks"
    record.ok = True


def _event(
    record: RequestRecord, data: str, now: float, start: float, last_output: float | None, pieces: list[str]
) -> str:
    """Apply one SSE data payload to the record: "output", "choice", "usage", "done", "error" or "other"."""
    if data == "[DONE]":
        return "done"
    try:
        event = json.loads(data)
    except ValueError:
        _fail(record, "protocol", f"an SSE event that is not JSON: {one_line(data, 80)}")
        return "error"
    if not isinstance(event, dict):
        return "other"
    if event.get("error"):
        message, kind = error_text(event, "error event")
        _fail(record, "stream_error", f"error event{f' {kind}' if kind else ''}: {message}")
        return "error"
    state = "other"
    choices = event.get("choices")
    if choices:
        state = "choice"
        outputs = [piece for piece in map(choice_output, choices) if piece is not None]
        if outputs:
            state = "output"
            pieces.extend(outputs)
            record.output_chunks += 1
            if record.ttft_s is None:
                record.ttft_s = now - start
            elif last_output is not None:
                record.itl_s.append(now - last_output)
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        record.usage = True
        record.output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            record.prompt_tokens = usage["prompt_tokens"]
    return state


# --- the request body ----------------------------------------------------------------------------------


@dataclass
class Dialect:
    """What this server accepts, learnt once by the probe: the optional fields it refused are left out."""

    api: str
    model: str | None
    temperature: float
    ignore_eos: bool
    refused: set[str] = field(default_factory=set)
    usage: bool | None = None  # whether the probe's answer carried usage

    def body(self, prompt_body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.model:
            body["model"] = self.model
        body.update(prompt_body)
        body.update(
            max_tokens=max_tokens, temperature=self.temperature, stream=True, stream_options={"include_usage": True}
        )
        if self.ignore_eos and "ignore_eos" not in self.refused:
            body["ignore_eos"] = True
        return body

    @property
    def path(self) -> str:
        return PATHS[self.api]


# --- probes ----------------------------------------------------------------------------------------


def new_client(*, max_connections: int | None, timeout_s: float):
    """One httpx connection pool: HTTP/1.1, keep-alive, `max_connections` (None: no limit)."""
    import httpx

    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY_S
    )
    timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False, verify=_tls_context())


@functools.cache
def _tls_context():
    """One TLS context for every pool: building one loads the CA bundle (about 50 ms), per client otherwise."""
    import ssl

    try:
        import certifi  # httpx's own default bundle
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class ShardedClient:
    """Several small httpx pools behind one `stream()`, each request on the least busy one.

    Measured (benchmarks/bench_ceiling.py): httpcore's pool walks all its connections whenever a request
    starts or ends, so one pool of 64 connections completed about 200 one-token requests/s on 2 cores, most
    of the time spent in that walk. Pools of SHARD_SIZE connections keep the walk short; together they hold
    `max_connections` (None: as many as the requests in flight)."""

    SHARD_SIZE = 8

    def __init__(self, *, max_connections: int | None, expected_requests: int, timeout_s: float):
        wanted = max_connections if max_connections is not None else max(1, expected_requests)
        count = max(1, math.ceil(wanted / self.SHARD_SIZE))
        per_shard = math.ceil(max_connections / count) if max_connections is not None else None
        self.shards = [new_client(max_connections=per_shard, timeout_s=timeout_s) for _ in range(count)]
        self.busy = [0] * count

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs):
        index = min(range(len(self.busy)), key=self.busy.__getitem__)
        self.busy[index] += 1
        try:
            async with self.shards[index].stream(method, url, **kwargs) as response:
                yield response
        finally:
            self.busy[index] -= 1

    async def __aenter__(self) -> ShardedClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.gather(*(shard.aclose() for shard in self.shards), return_exceptions=True)


def connection_problem(exc: BaseException) -> str:
    """What went wrong under an httpx transport error, in words: the causes it wraps say more than it does
    ("All connection attempts failed" hides a refused connection)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "unknown host"
        if isinstance(cause, ssl.SSLError):
            return f"TLS failed ({one_line(cause, 120)})"
        cause = cause.__cause__ or cause.__context__
    return one_line(exc, 160) or type(exc).__name__


def _unreachable(endpoint: Endpoint, exc: BaseException) -> EndpointUnreachable:
    problem = connection_problem(exc)
    hint = "; is the server running on that address and port?" if problem == "connection refused" else ""
    return EndpointUnreachable(f"cannot reach {endpoint.root}: {problem}{hint}")


async def get_json(client, endpoint: Endpoint, url: str) -> tuple[int, Any]:
    import httpx

    try:
        response = await client.get(url, headers=endpoint.headers(), timeout=PROBE_TIMEOUT_S)
    except (httpx.TransportError, OSError) as exc:
        raise _unreachable(endpoint, exc) from None
    return response.status_code, _json_or_text(response.content)


def check_auth(status: int, body: Any, endpoint: Endpoint) -> None:
    if status in (401, 403):
        message, _ = error_text(body, "unauthorized")
        given = "the key given was refused" if endpoint.api_key else "no key was given"
        raise AuthenticationFailed(
            f"{endpoint.root} answered {status} ({message}): {given}; pass --api-key KEY "
            f"or set {API_KEY_ENVS[0]} (or {API_KEY_ENVS[1]})"
        )


async def served_models(client, endpoint: Endpoint) -> list[str] | None:
    """The model ids of GET /v1/models, or None when the server has no such list."""
    status, body = await get_json(client, endpoint, endpoint.api_base + "/models")
    check_auth(status, body, endpoint)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    return [str(item["id"]) for item in body["data"] if isinstance(item, dict) and "id" in item]


def choose_model(endpoint: Endpoint, models: list[str] | None) -> str | None:
    """URL#name when the server serves it (or cannot say), else the server's first model."""
    if endpoint.model:
        if models is not None and endpoint.model not in models:
            listed = ", ".join(models[:10]) or "none"
            raise UnknownModel(
                f"model {endpoint.model!r} is not served at {endpoint.root} (it serves: {listed}); "
                "pick one with URL#name"
            )
        return endpoint.model
    return models[0] if models else None


class ServerTokenizer:
    """The server's /tokenize and /detokenize, in the shape it answered the probe in."""

    # (name, tokenize path, body builder, detokenize path, detokenize body builder, keys holding the text)
    SHAPES = (
        (
            "vLLM",
            "/tokenize",
            lambda m, t: {**({"model": m} if m else {}), "prompt": t, "add_special_tokens": False},
            "/detokenize",
            lambda m, ids: {**({"model": m} if m else {}), "tokens": ids},
        ),
        ("llama.cpp server", "/tokenize", lambda m, t: {"content": t}, "/detokenize", lambda m, ids: {"tokens": ids}),
        (
            "llama-cpp-python",
            "/extras/tokenize",
            lambda m, t: {"input": t, **({"model": m} if m else {})},
            "/extras/detokenize",
            lambda m, ids: {"tokens": ids, **({"model": m} if m else {})},
        ),
    )
    TEXT_KEYS = ("prompt", "content", "text")

    def __init__(self, client, endpoint: Endpoint, shape) -> None:
        self.client, self.endpoint, self.shape = client, endpoint, shape
        self.name = shape[0]

    def using(self, client) -> ServerTokenizer:
        """The same tokenizer over another connection pool (the probe's is closed once the plan is made)."""
        return ServerTokenizer(client, self.endpoint, self.shape)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        """POST to a (de)tokenize endpoint. It changes nothing on the server, so a connection the server closed
        while the pool kept it (llama-server closes idle keep-alive connections) is retried once on a new one."""
        import httpx

        url = self.endpoint.root + path
        for attempt in (1, 2):
            try:
                response = await self.client.post(
                    url, json=body, headers=self.endpoint.headers(), timeout=PROBE_TIMEOUT_S
                )
                break
            except (httpx.TransportError, OSError) as exc:
                if attempt == 2 or isinstance(exc, httpx.TimeoutException):
                    raise _unreachable(self.endpoint, exc) from None
        if response.status_code != 200:
            raise EndpointFailed(f"{self.endpoint.root}{path} answered {response.status_code} while building prompts")
        return response.json()

    async def encode(self, text: str) -> list[int]:
        answer = await self._post(self.shape[1], self.shape[2](self.endpoint.model, text))
        return [int(t) for t in answer["tokens"]]

    async def decode(self, ids: Sequence[int]) -> str:
        answer = await self._post(self.shape[3], self.shape[4](self.endpoint.model, list(ids)))
        for key in self.TEXT_KEYS:
            if isinstance(answer.get(key), str):
                return answer[key]
        raise EndpointFailed(f"{self.endpoint.root}{self.shape[3]} answered without the text")

    @classmethod
    async def find(cls, client, endpoint: Endpoint) -> ServerTokenizer | None:
        """The first shape whose tokenize and detokenize both answer sensibly, or None."""
        import httpx

        for shape in cls.SHAPES:
            tokenizer = cls(client, endpoint, shape)
            try:
                ids = await tokenizer.encode("Hello there")
                if not ids:
                    continue
                text = await tokenizer.decode(ids)
            except (httpx.HTTPError, EndpointFailed, ValueError, KeyError, TypeError, AttributeError):
                continue
            if "Hello" in text:
                return tokenizer
        return None


async def probe_request(
    client, endpoint: Endpoint, dialect: Dialect, prompt_body: dict[str, Any], max_tokens: int
) -> RequestRecord:
    """One small streamed request before anything is measured: it must work, and its answer says whether the
    server sends usage and which optional fields it refuses (each refused one is dropped and the request
    tried again). Errors a user can fix become one line (401: --api-key; 404: another --api or model)."""
    url = endpoint.api_base + dialect.path
    while True:
        outcome = await stream_request(
            client,
            url,
            dialect.body(prompt_body, max_tokens),
            endpoint.headers(),
            index=-1,
            timeout_s=PROBE_TIMEOUT_S * 5,
        )
        record = outcome.record
        if record.ok:
            dialect.usage = record.usage
            return record
        if outcome.status is None:
            if record.error_kind == "connection":
                raise EndpointUnreachable(f"cannot reach {endpoint.root}: {record.error}")
            raise EndpointFailed(f"the first request to {url} failed: {record.error}")
        check_auth(outcome.status, outcome.body, endpoint)
        refused = _refused_field(outcome.status, outcome.body, dialect)
        if refused:
            dialect.refused.add(refused)
            continue
        message, _ = error_text(outcome.body, "error")
        if outcome.status == 404:
            if "model" in message.lower() and endpoint.model:
                raise UnknownModel(f"{endpoint.root} does not serve model {endpoint.model!r}: {message}")
            other = "completions" if dialect.api == "chat" else "chat"
            raise EndpointMissing(f"{endpoint.root} has no POST /v1{dialect.path} ({message}); try --api {other}")
        if 400 <= outcome.status < 500:
            raise EndpointMissing(f"{url} refused the first request with {outcome.status}: {message}")
        raise EndpointFailed(f"the first request to {url} failed: {record.error}")


def _refused_field(status: int, body: Any, dialect: Dialect) -> str | None:
    """The optional field a 400/422 names, when we sent it and have not dropped it yet."""
    if status not in (400, 422):
        return None
    text = json.dumps(body) if not isinstance(body, str) else body
    for name in OPTIONAL_FIELDS:
        if name not in dialect.refused and name in text and (name != "ignore_eos" or dialect.ignore_eos):
            return name
    return None
