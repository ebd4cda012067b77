"""HTTP request bodies, response records and error bodies.

Request bodies only declare names and types. Every bound, default and consistency rule
comes from llmkit.params: `to_params()` maps the body onto GenerationParams names and
calls `parse_params`, so a bad value gets the same sentence as on the command line,
with the field renamed to the name the client sent:

    OpenAI name            llmkit name
    max_tokens             max_new_tokens   (also max_completion_tokens on chat)
    n                      num_sequences
    stop (str | list)      stop (list)
    temperature, top_p, seed
    top_k, min_p, repetition_penalty  (extensions, as in vLLM and llama-server)

Each generation field declares GenerationParams' bounds and description (`_param`), so
/openapi.json shows the real ranges, and bodies are strict: `"stream": "yes"`, `"greedy": 1`
or `"presence_penalty": false` are 400s naming the field, not quietly converted.

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
other paths answer {"error": message, "field": name, "type": kind}.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from annotated_types import MaxLen
from pydantic import BaseModel, ConfigDict, Field

from llmkit.engine.types import Result
from llmkit.errors import InvalidParams
from llmkit.params import MAX_STOP_SEQUENCES, GenerationParams, parse_params

OPENAI_PREFIX = "/v1/"


# --- errors ----------------------------------------------------------------------------------


def error_body(path: str, message: str, *, kind: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    if path.startswith(OPENAI_PREFIX):
        return {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}
    return {"error": message, "field": param, "type": kind}


def rename_error(exc: InvalidParams, names: dict[str, str]) -> InvalidParams:
    """The same InvalidParams with llmkit field names replaced by the names the client used."""
    if exc.field not in names:
        return exc
    public = names[exc.field]
    message = re.sub(rf"\b{re.escape(exc.field)}\b", public, str(exc))
    return InvalidParams(message, field=public)


# --- request bodies ----------------------------------------------------------------------------

STRICT_BODY = ConfigDict(extra="forbid", strict=True)


def _param(name: str, note: str = "") -> Any:
    """The optional type of a request field that sets GenerationParams' `name`: the same type, bounds and
    description, so validation and /openapi.json show one range. Omitted (null) means llmkit's default."""
    field = GenerationParams.model_fields[name]
    described = Field(description=" ".join(filter(None, [field.description, note])))
    return Annotated[(field.annotation | None, *field.metadata, described)]  # type: ignore[operator]


Stop = Annotated[Union[str, Annotated[list[str], MaxLen(MAX_STOP_SEQUENCES)], None],
                 Field(description=GenerationParams.model_fields["stop"].description)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = STRICT_BODY

    model: str | None = Field(None, description="Accepted and ignored: the server serves one model.")
    max_tokens: _param("max_new_tokens") = None
    temperature: _param("temperature") = None
    top_p: _param("top_p") = None
    n: _param("num_sequences") = None
    stop: Stop = None
    seed: _param("seed") = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: _param("top_k", "(llmkit extension)") = None
    min_p: _param("min_p", "(llmkit extension)") = None
    repetition_penalty: _param("repetition_penalty", "(llmkit extension)") = None
    # Accepted so that clients sending their defaults work; other values are refused in to_params.
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    def _renames(self) -> dict[str, str]:
        """llmkit name -> the name this endpoint uses, for error messages."""
        return {"max_new_tokens": "max_tokens", "num_sequences": "n"}

    def _values(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "num_sequences": self.n, "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
                "seed": self.seed, "top_k": self.top_k, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty}

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [("presence_penalty", bool(self.presence_penalty)), ("frequency_penalty", bool(self.frequency_penalty)),
                ("logit_bias", bool(self.logit_bias)), ("logprobs", self.logprobs not in (None, False, 0)),
                ("stream_options", self.stream_options is not None and not self.stream)]

    def to_params(self) -> GenerationParams:
        for name, refused in self._unsupported():
            if refused:
                message = ("stream_options is only allowed with stream: true" if name == "stream_options"
                           else f"{name} is not supported by llmkit serve; leave it out")
                raise InvalidParams(message, field=name)
        try:
            return parse_params(self._values())
        except InvalidParams as exc:
            raise rename_error(exc, self._renames()) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAIRequest):
    prompt: Union[str, list[str]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return super()._unsupported() + [("echo", bool(self.echo)), ("suffix", self.suffix is not None),
                                          ("best_of", self.best_of not in (None, 1))]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) == 1:
            return self.prompt[0]
        raise InvalidParams("prompt: llmkit serve takes one prompt per request; send one request per prompt "
                            "(they are batched on the server)", field="prompt")


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


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _param("max_new_tokens", "(OpenAI's newer name for max_tokens)") = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def _values(self) -> dict[str, Any]:
        values = super()._values()
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None:
                raise InvalidParams("give max_tokens or max_completion_tokens, not both", field="max_tokens")
            values["max_new_tokens"] = self.max_completion_tokens
        return values

    def _renames(self) -> dict[str, str]:
        if self.max_completion_tokens is not None:
            return {**super()._renames(), "max_new_tokens": "max_completion_tokens"}
        return super()._renames()

    def _unsupported(self) -> list[tuple[str, bool]]:
        text_format = self.response_format is None or self.response_format.get("type") == "text"
        return super()._unsupported() + [("response_format", not text_format), ("tools", bool(self.tools)),
                                          ("tool_choice", self.tool_choice not in (None, "none"))]

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them ('developer' is OpenAI's newer name for 'system')."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class GenerateRequest(BaseModel):
    """The simple API's /generate body (prompt, max_length, temperature); every llmkit generation parameter
    is accepted too."""

    model_config = STRICT_BODY

    prompt: str
    max_length: _param("max_new_tokens", "(/generate's name for max_new_tokens: new tokens, not a total)") = None
    max_new_tokens: _param("max_new_tokens") = None
    temperature: _param("temperature") = None
    top_k: _param("top_k") = None
    top_p: _param("top_p") = None
    min_p: _param("min_p") = None
    repetition_penalty: _param("repetition_penalty") = None
    greedy: _param("greedy") = None
    seed: _param("seed") = None
    num_sequences: _param("num_sequences") = None
    stop: Stop = None

    def to_params(self) -> GenerationParams:
        if self.max_length is not None and self.max_new_tokens is not None:
            raise InvalidParams("give max_length or max_new_tokens, not both", field="max_length")
        values = self.model_dump(exclude={"prompt", "max_length"})
        if self.max_length is not None:
            values["max_new_tokens"] = self.max_length
        if isinstance(self.stop, str):
            values["stop"] = [self.stop]
        try:
            return parse_params(values)
        except InvalidParams as exc:
            raise rename_error(exc, {"max_new_tokens": "max_length"} if self.max_length is not None else {}) from None


# Request field -> the GenerationParams field whose message a bad value of it should get.
PARAM_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "max_length": "max_new_tokens",
                "n": "num_sequences", **{name: name for name in GenerationParams.model_fields}}


# --- responses ---------------------------------------------------------------------------------


def usage_body(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
            "total_tokens": result.usage.total_tokens}


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
