"""HTTP request bodies, response records and error bodies.

Request bodies only declare names and types, and their generation parameters are not written
here at all: `request_models` builds each body's parameter fields from the table in
llmkit/params.py (which name each API gives a field, whether OpenAI's API has it), with
GenerationParams' type, bounds and description, so /openapi.json shows the real ranges and a new
parameter reaches every body without an edit here. Every bound, default and consistency rule
comes from llmkit.params: `to_params()` maps the body onto GenerationParams names and calls
`GenerationParams.from_values`, so a bad value gets the same sentence as on the command line,
with the field renamed to the name the client sent. The table gives, today:

    OpenAI name            llmkit name
    max_tokens             max_new_tokens   (also max_completion_tokens on chat)
    n                      num_sequences
    stop (str | list)      stop (list)
    temperature, top_p, seed
    top_k, min_p, repetition_penalty  (extensions, as in vLLM and llama-server)

and /generate takes every field by its llmkit name, max_new_tokens also as max_length.

Bodies are strict: `"stream": "yes"`, `"greedy": 1` or `"presence_penalty": false` are 400s naming
the field, not quietly converted. Every bad field is reported: the message joins their sentences
and, with more than one, the error body lists them (`errors`, below).

Defaults are llmkit's (temperature 0.8, top_k 50, 64 new tokens), not OpenAI's; temperature
0 means greedy. OpenAI fields llmkit cannot honour (logprobs, echo, suffix, best_of > 1,
non-zero presence/frequency penalties, logit_bias, tools, non-text response formats) are
a 400 naming the field rather than silently ignored; unknown fields are a 400 too
(extra="forbid", like GenerationParams). `model` is accepted and ignored: one server
serves one model, and responses name it.

`/generate` keeps the contract of the Flask server it replaces (prompt, max_length, temperature; success,
generated_text, inference_time_seconds, parameters). There `max_length` means *new*
tokens, not the pipeline's prompt-plus-new total: clients send it to bound the output,
and a total would make the same request fail or shrink as prompts grow. Like the
pipeline's default (return_full_text=True), `generated_text` is the prompt followed by
the continuation; `completion` holds the continuation alone.

Errors: /v1/* answer in OpenAI's shape {"error": {"message", "type", "param", "code"}};
other paths answer {"error": message, "field": name, "type": kind}. When several fields are bad,
`param` / `field` names the first, the message joins every sentence with "; ", and `errors` lists
them: [{"param": ..., "message": ...}] on /v1/*, [{"field": ..., "message": ...}] elsewhere.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from llmkit.engine.types import Result
from llmkit.errors import InvalidParams
from llmkit.params import APIS, GenerationParams, Param, body_names, param_table

OPENAI_PREFIX = "/v1/"


# --- errors ----------------------------------------------------------------------------------


def error_body(
    path: str,
    message: str,
    *,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    errors: list[tuple[str | None, str]] | None = None,
) -> dict[str, Any]:
    """The JSON error in the path's shape; `errors` (field, sentence) are listed when there are several."""
    errors = errors or []
    several = len(errors) > 1
    if path.startswith(OPENAI_PREFIX):
        detail: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code or kind}
        if several:
            detail["errors"] = [{"param": field, "message": sentence} for field, sentence in errors]
        return {"error": detail}
    body: dict[str, Any] = {"error": message, "field": param, "type": kind}
    if several:
        body["errors"] = [{"field": field, "message": sentence} for field, sentence in errors]
    return body


def rename_error(exc: InvalidParams, names: dict[str, str]) -> InvalidParams:
    """The same InvalidParams with llmkit field names replaced by the names the client used, in every error."""
    if not any(field in names for field, _ in exc.errors):
        return exc
    renamed = []
    for field, message in exc.errors:
        if field in names:
            message = re.sub(rf"\b{re.escape(field)}\b", names[field], message)
            field = names[field]
        renamed.append((field, message))
    return InvalidParams.from_errors(renamed)


# --- request bodies ----------------------------------------------------------------------------

STRICT_BODY = ConfigDict(extra="forbid", strict=True)


def _body_type(field: FieldInfo, note: str = "") -> Any:
    """The optional type of a body field that sets a GenerationParams field: the same type, bounds and
    description, so validation and /openapi.json show one range. Omitted (null) means llmkit's default.
    A list field also takes one item alone (`"stop": "###"`)."""
    described = Field(description=" ".join(filter(None, [field.description, note])))
    metadata = [item for item in field.metadata if not isinstance(item, Param)]
    annotation = field.annotation
    if get_origin(annotation) is list:
        bounded_list = (annotation, *metadata)  # a tuple subscript: Annotated[list[str], MaxLen(8)]
        return Annotated[Union[get_args(annotation)[0], Annotated[bounded_list], None], described]
    optional = (Optional[annotation], *metadata, described)
    return Annotated[optional]


def _param_fields(api: str, params: type[GenerationParams], *, extension: bool | None = None) -> dict[str, Any]:
    """create_model's fields for the generation parameters `api`'s body takes (`extension`: only those)."""
    table = param_table(params)
    fields: dict[str, Any] = {}
    for field, names in body_names(api, params).items():
        if extension is None or table[field].extension == extension:
            for name in names:
                fields[name.name] = (_body_type(params.model_fields[field], name.note), None)
    return fields


def param_fields(params: type[GenerationParams] = GenerationParams) -> dict[str, str]:
    """Every body name of a generation parameter, in any API -> its GenerationParams field."""
    return {name.name: field for api in APIS for field, names in body_names(api, params).items() for name in names}


# Body field -> the GenerationParams field whose message a bad value of it should get.
PARAM_FIELDS = param_fields()


def param_sentence(name: str, value: Any, params: type[GenerationParams] = GenerationParams) -> str | None:
    """GenerationParams' sentence for `value` in body field `name`, with the field renamed to `name` (None when
    `name` is no generation parameter, or the value is fine there)."""
    field = param_fields(params).get(name)
    if field is None:
        return None
    try:
        params.from_values({field: value})
    except InvalidParams as exc:
        return str(rename_error(exc, {field: name}))
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class RequestBody(BaseModel):
    """What every body does with its generation parameters; its fields are built by `request_models`."""

    model_config = STRICT_BODY
    API: ClassVar[str]  # its column of the table: "completions", "chat" or "generate"
    PARAMS: ClassVar[type[GenerationParams]] = GenerationParams

    def _given(self) -> tuple[dict[str, Any], dict[str, str], list[tuple[str | None, str]]]:
        """(GenerationParams values, {field: the name used for it here, where that is another}, errors)."""
        values: dict[str, Any] = {}
        renames: dict[str, str] = {}
        errors: list[tuple[str | None, str]] = []
        for field, names in body_names(self.API, self.PARAMS).items():
            known = [name.name for name in names]
            sent = [name for name in known if getattr(self, name) is not None]
            if len(sent) > 1:
                errors.append((known[0], f"give {' or '.join(known)}, not both"))
                continue
            used = sent[0] if sent else (field if field in known else known[0])
            if used != field:
                renames[field] = used
            value = getattr(self, sent[0]) if sent else None
            if isinstance(value, str) and get_origin(self.PARAMS.model_fields[field].annotation) is list:
                value = [value]
            values[field] = value
        return values, renames, errors

    def _renames(self) -> dict[str, str]:
        """llmkit name -> the name this body uses, for error messages."""
        return self._given()[1]

    def _refused(self) -> list[tuple[str | None, str]]:
        """(field, sentence) for each field sent that llmkit cannot honour."""
        return []

    def to_params(self) -> GenerationParams:
        values, renames, errors = self._given()
        errors = self._refused() + errors
        params = None
        try:
            params = self.PARAMS.from_values(values)
        except InvalidParams as exc:
            errors += rename_error(exc, renames).errors
        if errors:
            raise InvalidParams.from_errors(errors)
        assert params is not None  # from_values either returned or raised
        return params


class _OpenAIBody(RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions (the generation parameters come after these)."""

    model: Optional[str] = Field(None, description="Accepted and ignored: the server serves one model.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Accepted so that clients sending their defaults work; other values are refused in to_params.
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Any = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [
            ("presence_penalty", bool(self.presence_penalty)),
            ("frequency_penalty", bool(self.frequency_penalty)),
            ("logit_bias", bool(self.logit_bias)),
            ("logprobs", self.logprobs not in (None, False, 0)),
            ("stream_options", self.stream_options is not None and not self.stream),
        ]

    def _refused(self) -> list[tuple[str | None, str]]:
        return [
            (
                name,
                "stream_options is only allowed with stream: true"
                if name == "stream_options"
                else f"{name} is not supported by llmkit serve; leave it out",
            )
            for name, refused in self._unsupported()
            if refused
        ]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class _CompletionBody(_OpenAIBody):
    API = "completions"

    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return super()._unsupported() + [
            ("echo", bool(self.echo)),
            ("suffix", self.suffix is not None),
            ("best_of", self.best_of not in (None, 1)),
        ]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) == 1:
            return self.prompt[0]
        raise InvalidParams(
            "prompt: llmkit serve takes one prompt per request; send one request per prompt "
            "(they are batched on the server)",
            field="prompt",
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" for part in self.content):
            raise InvalidParams("messages: only text content is supported by llmkit serve", field="messages")
        return "".join(part.text or "" for part in self.content)


class _ChatBody(_OpenAIBody):
    API = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        text_format = self.response_format is None or self.response_format.get("type") == "text"
        return super()._unsupported() + [
            ("response_format", not text_format),
            ("tools", bool(self.tools)),
            ("tool_choice", self.tool_choice not in (None, "none")),
        ]

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them ('developer' is OpenAI's newer name for 'system')."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class _GenerateBody(RequestBody):
    API = "generate"

    prompt: str


GENERATE_DOC = (
    "The simple API's /generate body (prompt, max_length, temperature); every llmkit generation "
    "parameter\nis accepted too."
)


class RequestModels(NamedTuple):
    completions: type[_CompletionBody]
    chat: type[_ChatBody]
    generate: type[_GenerateBody]


def request_models(params: type[GenerationParams] = GenerationParams) -> RequestModels:
    """The three request bodies, their generation parameters from `params`' table (a test passes a model with
    one more field). Each body's own fields (the base classes above) come first, then the generation parameters:
    OpenAI's, then llmkit's extensions."""

    def openai(name: str, base: type[_OpenAIBody]) -> Any:
        built = create_model(
            name,
            __base__=base,
            __module__=__name__,
            **_param_fields(base.API, params, extension=False),
            **_param_fields(base.API, params, extension=True),
        )
        built.PARAMS = params
        return built

    generate = create_model(
        "GenerateRequest",
        __base__=_GenerateBody,
        __module__=__name__,
        __doc__=GENERATE_DOC,
        **_param_fields("generate", params),
    )
    generate.PARAMS = params
    return RequestModels(openai("CompletionRequest", _CompletionBody), openai("ChatRequest", _ChatBody), generate)


if TYPE_CHECKING:  # the built classes add only generation parameters, read through to_params()
    CompletionRequest = _CompletionBody
    ChatRequest = _ChatBody
    GenerateRequest = _GenerateBody
else:
    CompletionRequest, ChatRequest, GenerateRequest = request_models()


# --- responses ---------------------------------------------------------------------------------


def usage_body(result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
    }


def timings_body(result: Result, queue_s: float) -> dict[str, Any]:
    """llama-server style timings. prompt_ms: admission to first token (prefill); queue_ms: waiting before it;
    predicted_per_second: tokens after the first / time from the first to the last (llmkit's decode tok/s)."""
    t = result.timings
    prefill_s = max(t.ttft_s - queue_s, 0.0)
    return {
        "queue_ms": round(queue_s * 1000, 3),
        "prompt_n": result.usage.prompt_tokens,
        "prompt_ms": round(prefill_s * 1000, 3),
        "prompt_per_second": round(result.usage.prompt_tokens / prefill_s, 3) if prefill_s > 0 else None,
        "predicted_n": result.usage.completion_tokens,
        "predicted_ms": round(t.decode_s * 1000, 3),
        "predicted_per_second": round(t.decode_tokens_per_s, 3) if t.decode_tokens_per_s else None,
        "ttft_ms": round(t.ttft_s * 1000, 3),
        "total_ms": round(t.total_s * 1000, 3),
    }
