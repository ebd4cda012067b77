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
    presence_penalty, frequency_penalty, logit_bias
    top_k, min_p, repetition_penalty, typical_p, top_n_sigma, xtc_probability, xtc_threshold
                           (extensions, as in vLLM or llama-server)

and /generate takes every field by its llmkit name, max_new_tokens also as max_length.

Bodies are strict: `"stream": "yes"`, `"greedy": 1` or `"presence_penalty": false` are 400s naming
the field, not quietly converted. Every bad field is reported: the message joins their sentences
and, with more than one, the error body lists them (`errors`, below).

Defaults are llmkit's (temperature 0.8, top_k 50, 64 new tokens), not OpenAI's; temperature
0 means greedy. `response_format` (json_object, json_schema) and vLLM's guided_json, guided_regex,
guided_choice and guided_grammar set GenerationParams' `constraint` (`constraint_of`), on both /v1 bodies.
OpenAI fields llmkit cannot honour (suffix, best_of > 1, tools) are a 400 naming
the field rather than silently ignored; unknown fields are a 400 too (extra="forbid", like
GenerationParams). `model` is accepted and ignored: one server serves one model, and responses
name it.

What a body asks to see besides the text is declared here, per API, not in the parameter table:
`logprobs` (an integer on /v1/completions, true/false with `top_logprobs` on chat), `echo` and a
list of prompts (strings or token ids) on /v1/completions. They change no token (the batch key,
explore's grids and the CLI options that the table derives would all be wrong to include them),
and their shapes differ between the two APIs; `output_options()` reads them into an Outputs
record that travels beside GenerationParams. `max_tokens: 0` is allowed with `echo` alone
(lm-evaluation-harness scores a prompt that way): the prompt is scored and nothing is generated.

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

import json
import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_validator
from pydantic.fields import FieldInfo

from llmkit.engine.sampling import MAX_TOP_LOGPROBS
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


MAX_PROMPTS = 32  # prompts in one /v1/completions body; each is its own request in the queue
# Body fields outside the parameter table with bounds: (lowest, highest), for the sentence a bad value gets.
BODY_BOUNDS = {"logprobs": (0, MAX_TOP_LOGPROBS), "top_logprobs": (0, MAX_TOP_LOGPROBS)}


def param_sentence(name: str, value: Any, params: type[GenerationParams] = GenerationParams) -> str | None:
    """GenerationParams' sentence for `value` in body field `name`, with the field renamed to `name` (None when
    `name` is no generation parameter, or the value is fine there). Bounded body fields (BODY_BOUNDS) get the
    same kind of sentence."""
    field = param_fields(params).get(name)
    if field is None:
        bounds = BODY_BOUNDS.get(name)
        if bounds and isinstance(value, int) and not isinstance(value, bool) and not bounds[0] <= value <= bounds[1]:
            return f"{name} must be between {bounds[0]} and {bounds[1]} (got {value})"
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
    user: Optional[str] = None  # OpenAI's end-user id: accepted and ignored
    # Structured output (llmkit/engine/constrain.py): OpenAI's response_format, or one of vLLM's guided_* fields.
    response_format: Optional[dict[str, Any]] = Field(
        None,
        description='{"type": "text"}, {"type": "json_object"} (any JSON object) or {"type": "json_schema", '
        '"json_schema": {"name": ..., "schema": {...}, "strict": ...}}: enforced while decoding.',
    )
    guided_json: Optional[Union[dict[str, Any], str]] = Field(
        None, description="A JSON schema the output must follow (vLLM's name; an llmkit extension)."
    )
    guided_regex: Optional[str] = Field(None, description="A regex the whole output must match (vLLM's name).")
    guided_choice: Optional[list[str]] = Field(None, description="The output is one of these texts (vLLM's name).")
    guided_grammar: Optional[str] = Field(
        None, description="A Lark or GBNF grammar the output must match (vLLM's name)."
    )

    def _given(self) -> tuple[dict[str, Any], dict[str, str], list[tuple[str | None, str]]]:
        values, renames, errors = super()._given()
        found = constraint_of(self)
        if isinstance(found, tuple):
            errors.append(found)
        elif found is not None:
            values["constraint"], renames["constraint"] = found[1], found[0]
        return values, renames, errors

    def _unsupported(self) -> list[tuple[str, bool]]:
        return [
            ("stream_options", self.stream_options is not None and not self.stream),
        ]

    def _rules(self) -> list[tuple[str | None, str]]:
        """(field, sentence) for fields that are fine alone but not together."""
        return []

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
        ] + self._rules()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def output_options(self) -> Outputs:
        """What the body asks to see besides the text."""
        return Outputs()


CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def constraint_of(body: Any) -> list[Any] | tuple[str, str] | None:
    """The body's constraint as [the field that set it, GenerationParams' `constraint` value], None when it asks for
    none, or (field, sentence) when its shape is wrong. Whether the constraint itself can be enforced is
    GenerationParams' check (an unsupported schema feature is a 400 naming the field and the feature)."""
    sent = [name for name in CONSTRAINT_FIELDS if getattr(body, name) is not None]
    fmt = body.response_format
    if fmt is not None and fmt.get("type") == "text" and not fmt.keys() - {"type"}:
        sent.remove("response_format")  # plain text: no constraint
    if len(sent) > 1:
        return sent[1], f"give one of {', '.join(sent)}, not several"
    if not sent:
        return None
    name = sent[0]
    value = getattr(body, name)
    if name == "guided_regex":
        return [name, {"kind": "regex", "value": value}]
    if name == "guided_grammar":
        return [name, {"kind": "grammar", "value": value}]
    if name == "guided_choice":
        if not value or not all(value):
            return name, "guided_choice must be a list of non-empty texts"
        return [name, {"kind": "choice", "value": tuple(value)}]
    if name == "guided_json":
        schema = value
    else:
        kind = value.get("type")
        if kind not in RESPONSE_FORMAT_TYPES:
            return name, f"response_format type must be one of {', '.join(RESPONSE_FORMAT_TYPES)} (got {kind!r})"
        if kind == "json_object":
            return [name, {"kind": "json_object"}]
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            return name, 'response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}'
        schema = spec.get("schema")
        if schema is None:
            return [name, {"kind": "json_object"}]  # OpenAI's schema is optional: then any JSON object
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            return name, f"{name}: the JSON schema is not valid JSON"
    if not isinstance(schema, dict):
        return name, f"{name}: the JSON schema must be a JSON object"
    return [name, {"kind": "json_schema", "value": json.dumps(schema)}]


class Outputs(NamedTuple):
    """What a request asks to see besides the text: `logprobs` (None: none; else the top alternatives per generated
    token), the prompt's own (`prompt_logprobs`, with echo), the prompt text before each choice (`echo`), and
    whether anything is generated at all (`prompt_only`: echo with max_tokens 0)."""

    logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    prompt_only: bool = False


def _bounded(name: str, description: str) -> Any:
    low, high = BODY_BOUNDS[name]
    return Field(None, ge=low, le=high, description=description)


# Lists a body may send empty or too long are checked in `_rules` (a sentence that names the field) and only
# documented here (minItems, maxItems), so the schema still says what is valid.
TokenIds = Annotated[
    list[Annotated[int, Field(json_schema_extra={"minimum": 0})]], Field(json_schema_extra={"minItems": 1})
]
PROMPT_LIST = {"minItems": 1, "maxItems": MAX_PROMPTS}


def _max_tokens_may_be_zero(schema: dict[str, Any]) -> None:
    """The completions body's schema: max_tokens 0 is valid there, with echo (validation says so: `_scores_only`)."""
    field = schema.get("properties", {}).get("max_tokens")
    if not field:
        return
    for option in field.get("anyOf", [field]):
        if option.get("type") == "integer":
            option["minimum"] = 0
    field["description"] = (
        field.get("description", "") + " 0 only with echo: the prompt is scored and nothing is generated."
    ).strip()


class _CompletionBody(_OpenAIBody):
    API = "completions"
    model_config = ConfigDict(**STRICT_BODY, json_schema_extra=_max_tokens_may_be_zero)
    _prompt_only: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _scores_only(cls, data: Any, handler: Any) -> Any:
        """`echo` with `max_tokens: 0` (lm-evaluation-harness's loglikelihood): valid, and nothing is generated. Every
        other max_tokens keeps the table's bounds, checked with the body's other fields."""
        zero = isinstance(data, dict) and data.get("echo") is True and type(data.get("max_tokens")) is int
        if not zero or data["max_tokens"] != 0:
            return handler(data)
        body = handler({**data, "max_tokens": None})
        body._prompt_only = True
        return body

    prompt: Union[
        str,
        Annotated[list[str], Field(json_schema_extra=PROMPT_LIST)],
        TokenIds,
        Annotated[list[TokenIds], Field(json_schema_extra=PROMPT_LIST)],
    ] = Field(
        description=f"A text, a list of up to {MAX_PROMPTS} texts, a list of token ids, or a list of such lists; "
        "each prompt gets n choices, indexed prompt_index * n + j."
    )
    logprobs: Optional[int] = _bounded(
        "logprobs",
        "Return each token's log-probability and those of the N most likely tokens at its position (0: the chosen "
        "token's alone), under the model's raw distribution: before temperature, top-k, top-p, min-p and penalties.",
    )
    echo: Optional[bool] = Field(
        None,
        description="Put the prompt before each choice's text (with logprobs: the prompt tokens' too, the first "
        "null). With max_tokens 0 the prompt is only scored.",
    )
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return super()._unsupported() + [
            ("suffix", self.suffix is not None),
            ("best_of", self.best_of not in (None, 1)),
        ]

    def _rules(self) -> list[tuple[str | None, str]]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if not prompt or any(isinstance(item, list) and not item for item in prompt):
                return [("prompt", "prompt must not be empty (nor any prompt in its list)")]
            if not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
                return [("prompt", f"prompt takes at most {MAX_PROMPTS} prompts in one body (got {len(prompt)})")]
        return []

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: score the prompt, generate nothing."""
        return self._prompt_only

    def _given(self) -> tuple[dict[str, Any], dict[str, str], list[tuple[str | None, str]]]:
        values, renames, errors = super()._given()
        if self.prompt_only:  # GenerationParams wants >= 1 new token; this request generates none
            values["max_new_tokens"] = 1
        return values, renames, errors

    def output_options(self) -> Outputs:
        echo = bool(self.echo)
        return Outputs(
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if echo else None,
            echo=echo,
            prompt_only=self.prompt_only,
        )

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the body: a text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [[int(token) for token in prompt]]  # one list of token ids
        return [item if isinstance(item, str) else list(item) for item in prompt if not isinstance(item, int)]


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
    logprobs: Optional[bool] = Field(
        None,
        description="Return each generated token's log-probability (and top_logprobs alternatives) under the "
        "model's raw distribution: before temperature, top-k, top-p, min-p and penalties.",
    )
    top_logprobs: Optional[int] = _bounded(
        "top_logprobs", "With logprobs: true, the N most likely tokens at each position, with their log-probability."
    )
    tools: Optional[list[Any]] = None
    tool_choice: Any = None

    def _unsupported(self) -> list[tuple[str, bool]]:
        return super()._unsupported() + [
            ("tools", bool(self.tools)),
            ("tool_choice", self.tool_choice not in (None, "none")),
        ]

    def _rules(self) -> list[tuple[str | None, str]]:
        if self.top_logprobs and not self.logprobs:
            return [("top_logprobs", "top_logprobs needs logprobs: true")]
        return []

    def output_options(self) -> Outputs:
        return Outputs(logprobs=(self.top_logprobs or 0) if self.logprobs else None)

    def chat_messages(self) -> list[dict[str, str]]:
        return chat_messages(self.messages)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates expect them ('developer' is OpenAI's newer name for 'system')."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class _GenerateBody(RequestBody):
    API = "generate"

    prompt: str


class TokenizeRequest(BaseModel):
    """/tokenize in llama-server's shape (`content`, `add_special`, `with_pieces`) or vLLM's (`prompt` or
    `messages`, `add_special_tokens`, `return_token_strs`)."""

    model_config = STRICT_BODY

    model: Optional[str] = Field(None, description="Accepted and ignored: the server serves one model.")
    content: Optional[str] = Field(None, description="The text to tokenize (llama-server's name).")
    prompt: Optional[str] = Field(None, description="The text to tokenize (vLLM's name).")
    messages: Optional[list[ChatMessage]] = Field(
        None, description="Chat messages, tokenized as the model's chat template writes them (vLLM)."
    )
    add_special: Optional[bool] = Field(
        None, description="Add the special tokens a prompt starts with (BOS); llama-server's name, default false."
    )
    add_special_tokens: Optional[bool] = Field(
        None, description="The same, vLLM's name; default true for `prompt`, false for `content` and `messages`."
    )
    with_pieces: bool = Field(False, description="llama-server: tokens as {id, piece} objects.")
    return_token_strs: Optional[bool] = Field(None, description="vLLM: add token_strs, each token's vocabulary entry.")

    def problems(self) -> list[tuple[str | None, str]]:
        given = [name for name in ("content", "prompt", "messages") if getattr(self, name) is not None]
        errors: list[tuple[str | None, str]] = []
        if len(given) != 1:
            sent = " and ".join(given) if given else "none"
            errors.append(
                (given[1] if len(given) > 1 else "content", f"give one of content, prompt or messages (got {sent})")
            )
        if self.add_special is not None and self.add_special_tokens is not None:
            errors.append(("add_special", "give add_special or add_special_tokens, not both"))
        return errors

    def add_special_text(self) -> bool:
        """Whether to add the special tokens: either flag, else the default of the shape the body is in."""
        flag = self.add_special if self.add_special is not None else self.add_special_tokens
        return flag if flag is not None else self.prompt is not None


class DetokenizeRequest(BaseModel):
    """/detokenize in llama-server's and vLLM's shape: `tokens` in; the text comes back as `content` and `prompt`."""

    model_config = STRICT_BODY

    model: Optional[str] = Field(None, description="Accepted and ignored: the server serves one model.")
    tokens: list[Annotated[int, Field(json_schema_extra={"minimum": 0})]] = Field(
        description="Token ids of the model's vocabulary."
    )


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


def usage_body(result: Result) -> dict[str, Any]:
    """OpenAI's usage record; prompt_tokens_details.cached_tokens: prompt tokens the prefix cache supplied."""
    return {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": result.usage.cached_tokens},
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
        "cache_n": result.usage.cached_tokens,
        "predicted_n": result.usage.completion_tokens,
        "predicted_ms": round(t.decode_s * 1000, 3),
        "predicted_per_second": round(t.decode_tokens_per_s, 3) if t.decode_tokens_per_s else None,
        "ttft_ms": round(t.ttft_s * 1000, 3),
        "total_ms": round(t.total_s * 1000, 3),
    }
