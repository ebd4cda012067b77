"""/openapi.json as the server really answers, so tools that read it (schemathesis, client generators) see
what happens.

FastAPI derives request bodies from the schemas (with GenerationParams' bounds, see schemas.py) but documents
a 422 that llmkit never sends (bad bodies are 400s) and nothing else: not the 4xx/5xx each route can give,
not the SSE stream, not the text of /metrics, not the X-Request-ID every response carries. `describe` adds
them from the tables below; the response bodies are declared as models here, checked against the real
responses by the schemathesis test (tests/test_server_schema.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from llmkit.server.schemas import OPENAI_PREFIX

REF = "#/components/schemas/{model}"


# --- response bodies, for the documentation -------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Errors on /v1/*, in OpenAI's shape (the openai SDK maps them to its exception classes)."""

    error: OpenAIErrorDetail


class PlainError(BaseModel):
    """Errors on the other paths: the sentence, the field it names (or null) and its kind."""

    error: str
    field: str | None
    type: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


Timings = dict[str, float | int | None]  # llama-server style: queue_ms, prompt_n, prompt_ms, ... (schemas.py)
FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """OpenAI's completions logprobs, one entry per token (the echoed prompt's first, whose scores are null): log p
    under the model's raw distribution, before any sampling transform; top_logprobs maps the N most likely tokens
    (and the chosen one) to theirs; text_offset is where each token's text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt index * n + the choice's index among the prompt's n.")
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    timings: Timings


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str = Field(description="The token's text; `bytes:\\xNN...` for a token that is not whole UTF-8.")
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's chat logprobs: each generated token's log p under the model's raw distribution (before any sampling
    transform), with its top_logprobs alternatives."""

    content: list[TokenLogprob] | None
    refusal: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings


class GeneratedText(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    generated_tokens: int


class Generated(BaseModel):
    """/generate's answer: the simple API's fields (success, generated_text = prompt + completion, ...) and
    llmkit's."""

    success: Literal[True]
    model: str
    prompt: str
    generated_text: str
    completion: str
    completions: list[GeneratedText]
    inference_time_seconds: float
    parameters: dict[str, Any]
    seed: int | None
    usage: Usage
    timings: Timings


class Health(BaseModel):
    """status: loading, ok, degraded (a shared step failed lately), failing, stuck, error, shutting_down;
    the other fields depend on it (engine, queue, failures... once the model is ready)."""

    model_config = ConfigDict(extra="allow")

    status: str
    model: str


class Piece(BaseModel):
    id: int
    piece: str | list[int] = Field(description="The token's text, or its bytes when they are not whole UTF-8.")


class Tokenized(BaseModel):
    """/tokenize: llama-server's `tokens` (ids, or {id, piece} with with_pieces) and vLLM's `count`,
    `max_model_len` (and `token_strs` when asked)."""

    tokens: list[int] | list[Piece]
    count: int
    max_model_len: int | None
    token_strs: list[str] | None = None


class Detokenized(BaseModel):
    """/detokenize: the text, as llama-server (`content`) and vLLM (`prompt`) name it."""

    content: str
    prompt: str


class TokenizerInfo(BaseModel):
    """The special tokens, the chat template and the context of the server's tokenizer (vLLM's /tokenizer_info)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int | None
    vocab_size: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


DOCUMENTED = (
    OpenAIError,
    PlainError,
    Completion,
    ChatCompletion,
    Generated,
    Health,
    ModelList,
    Tokenized,
    Detokenized,
    TokenizerInfo,
)


# --- which route answers what ---------------------------------------------------------------------------

WHEN = {
    400: "A parameter out of range or inconsistent, a wrong type, malformed JSON, a lone surrogate, a prompt "
    "that does not fit the context; `param` names the field.",
    401: "Only with --api-key: the key is missing or wrong (send `Authorization: Bearer KEY`).",
    404: "The model cannot be found.",
    413: "The body is larger than --max-body-bytes.",
    415: "The Content-Type is not application/json.",
    429: "Only with --rate-limit: this client address sent too many requests; see Retry-After.",
    499: "The client disconnected (written to the log; the client is gone).",
    500: "A bug in the server, or a generation that failed for this request alone (see the server log).",
    503: "The model is loading, the queue is full (--max-queue), or the server is shutting down; see Retry-After.",
    504: "The request took longer than --request-timeout.",
    507: "Generation ran out of memory.",
}
GENERATION_ERRORS = (400, 401, 413, 415, 429, 499, 500, 503, 504, 507)
READ_ERRORS = (401, 429, 500)
TOKEN_ERRORS = (400, 401, 413, 415, 429, 500, 503)
TOKEN_INFO_ERRORS = (401, 429, 500, 503)
STREAM_DESCRIPTION = (
    "With `stream: true`: server-sent events, one JSON chunk per `data:` line, then "
    '`data: [DONE]`; an error after the stream began is a last `data: {"error": ...}` '
    "event before `[DONE]`."
)

# path -> (the 200 body's model or content, the error statuses it can give)
ROUTES: dict[str, tuple[Any, tuple[int, ...]]] = {
    "/v1/completions": (Completion, GENERATION_ERRORS),
    "/v1/chat/completions": (ChatCompletion, GENERATION_ERRORS),
    "/generate": (Generated, GENERATION_ERRORS),
    "/v1/models": (ModelList, READ_ERRORS),
    "/health": (Health, (500, 503)),
    "/metrics": ("text/plain", READ_ERRORS),
    "/tokenize": (Tokenized, TOKEN_ERRORS),
    "/v1/tokenize": (Tokenized, TOKEN_ERRORS),
    "/detokenize": (Detokenized, TOKEN_ERRORS),
    "/v1/detokenize": (Detokenized, TOKEN_ERRORS),
    "/tokenizer_info": (TokenizerInfo, TOKEN_INFO_ERRORS),
}
STREAMING = {"/v1/completions", "/v1/chat/completions"}
REQUEST_ID = {
    "X-Request-ID": {
        "description": "The request's id (yours if you sent a valid one); it is in the "
        "server's log line for the request.",
        "required": True,
        "schema": {"type": "string"},
    }
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


# One server-sent event, as a client's SSE parser sees it: `data` is a JSON chunk in the endpoint's shape,
# or the literal [DONE] that ends the stream.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}


def _ok(path: str, body: Any) -> dict[str, Any]:
    content: dict[str, Any]
    if body == "text/plain":
        content = {"text/plain": {"schema": {"type": "string"}}}
        description = "Prometheus text exposition."
    else:
        content = {"application/json": {"schema": _ref(body)}}
        description = "OK"
    if path in STREAMING:
        content["text/event-stream"] = {"schema": SSE_EVENT}
        description = "The completion as one JSON body. " + STREAM_DESCRIPTION
    return {"description": description, "headers": REQUEST_ID, "content": content}


def _error(path: str, status: int) -> dict[str, Any]:
    model = OpenAIError if path.startswith(OPENAI_PREFIX) else PlainError
    headers = {**REQUEST_ID, **(RETRY_AFTER if status in (429, 503) else {})}
    return {"description": WHEN[status], "headers": headers, "content": {"application/json": {"schema": _ref(model)}}}


def describe(spec: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's generated spec -> the spec of what the server does (in place; returned for convenience)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, definitions = models_json_schema([(model, "serialization") for model in DOCUMENTED], ref_template=REF)
    schemas.update(definitions.get("$defs", {}))
    for path, operations in spec.get("paths", {}).items():
        body, errors = ROUTES.get(path, (None, READ_ERRORS))
        for operation in operations.values():
            responses = {"200": _ok(path, body)} if body is not None else {}
            responses.update({str(status): _error(path, status) for status in errors})
            operation["responses"] = responses
    return spec


def install(app) -> None:
    """Serve the described spec at /openapi.json (built once, on first request)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(
                get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi
