"""The one definition of generation parameters: defaults, bounds, consistency, and where each one appears.

The CLI, the HTTP server and explore's grids all build a GenerationParams through
`parse_params`, so a bound changes in one place and every entry point reports a bad
value with the same sentence ("temperature must be between 0.0 and 2.0 (got 5.0)").
Every bad field is reported, not only the first: InvalidParams carries them all in
`errors` and its message joins their sentences with "; " (as simonw/llm reports each
field of its Options). Only pydantic is imported here, so validation costs nothing
before a model loads.

The table. Beside its type and its Field() (default, bounds, description: what is valid),
every field carries one `Param` in its Annotated metadata: where the field appears.

    field               kind      CLI (beside --field-name)   OpenAI bodies (/v1/*)        /generate
    max_new_tokens      stopping  --max-tokens                max_tokens; chat also        max_length, max_new_tokens
                                                              max_completion_tokens
    temperature         sampling  --temp, -t                  temperature                  temperature
    top_k               sampling                              top_k (extension)            top_k
    top_p               sampling                              top_p                        top_p
    min_p               sampling                              min_p (extension)            min_p
    repetition_penalty  sampling                              repetition_penalty (ext.)    repetition_penalty
    presence_penalty    sampling                              presence_penalty             presence_penalty
    frequency_penalty   sampling                              frequency_penalty            frequency_penalty
    logit_bias          sampling  (ID=BIAS, repeatable)       logit_bias                   logit_bias
    typical_p           sampling                              typical_p (ext.)             typical_p
    top_n_sigma         sampling                              top_n_sigma (ext.)           top_n_sigma
    xtc_probability     sampling                              xtc_probability (ext.)       xtc_probability
    xtc_threshold       sampling                              xtc_threshold (ext.)         xtc_threshold
    greedy              sampling                              -  (OpenAI: temperature 0)   greedy
    seed                draws                                 seed                         seed
    num_sequences       draws     -n                          n                            num_sequences
    stop                stopping                              stop (a string or a list)    stop
    constraint          constraint  --json-schema, --json-object, response_format,         -
                                  --regex, --choice, --grammar  guided_json, guided_regex,
                                  (cli/options.py               guided_choice, guided_grammar
                                  constraint_options)           (server/schemas.py)

Derived from it, so a new parameter is one field here and nothing else:

- `llmkit generate`'s options, with their aliases, panel and help (cli/options.py `generation_options`),
  and the other spellings monitor, compare and explore accept (`OTHER_NAMES` there);
- the parameter fields of the HTTP bodies (server/schemas.py: CompletionRequest, ChatRequest,
  GenerateRequest), with the bounds and descriptions /openapi.json shows, which body name maps onto
  which field, and error messages renamed to the name the client sent;
- explore's grid names (every field that is not a draw) and its plain-sampling base (each sampling
  knob at its `neutral` value);
- the batch key (`sampling_key`, engine/batch.py): every sampling knob's value, so two requests with
  different settings are never sampled in one call, whatever knob is added later.

`kind` is the one cut that changes behaviour; every field must choose one:

- sampling: how the next token is picked from the logits. In the batch key, a grid axis in explore.
  `greedy_ignores`: greedy decoding does not read it (the batch key of greedy rows leaves it out).
- stopping: where the output ends. Each row checks its own, so not in the batch key; a grid axis.
- constraint: what the output must match (llmkit/engine/constrain.py): a mask after the logits, per row, so not in
  the batch key; not a grid axis. Its CLI options and body fields read files and speak other APIs' shapes, so they
  are declared beside the table (cli/options.py `constraint_options`, server/schemas.py) rather than derived.
- draws: which and how many random draws. Each row has its own generator, so not in the batch key;
  explore sets them itself (--seed, --samples), so not a grid axis.

HTTP names are per API, the name the API documents first: `openai` is the name in both /v1 bodies
(None: not offered there; `extension` says OpenAI's API has no such field), `chat` adds names only
/v1/chat/completions takes, `generate` lists /generate's names (default: the field's own). A body that
gets two names of one field refuses it ("give max_tokens or max_completion_tokens, not both").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmkit.errors import InvalidParams

MAX_NEW_TOKENS_LIMIT = 4096
MAX_SEQUENCES = 16
MAX_STOP_SEQUENCES = 8
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value, either sign
MAX_BIASED_TOKENS = 1024  # logit_bias entries at most

Kind = Literal["sampling", "stopping", "draws", "constraint"]
ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
API = Literal["completions", "chat", "generate"]
APIS: tuple[str, ...] = ("completions", "chat", "generate")
EXTENSION_NOTE = "(llmkit extension)"


@dataclass(frozen=True)
class Name:
    """One name a request body takes for a field, and what that body's /openapi.json description adds."""

    name: str
    note: str = ""


@dataclass(frozen=True)
class Param:
    """Where a GenerationParams field appears (its row of the table in the module docstring)."""

    kind: Kind
    cli_aliases: tuple[str, ...] = ()  # long flags beside --field-name: other tools' spellings
    short: str | None = None  # the one-letter flag
    cli_help: str | None = None  # CLI help instead of "description (bounds; default)"
    cli_note: str = ""  # appended to the CLI help
    openai: str | None = None  # its name in /v1/completions and /v1/chat/completions; None: not offered
    extension: bool = False  # in the /v1 bodies but not in OpenAI's API (as vLLM and llama-server add them)
    chat: tuple[Name, ...] = ()  # more names /v1/chat/completions alone takes, after `openai`
    generate: tuple[Name | str, ...] = ()  # /generate's names, its own first; () = the field's name
    greedy_ignores: bool = False  # sampling: greedy decoding does not read it
    neutral: Any = None  # sampling: the value that leaves the model's distribution alone (None: the default)


class Constraint(BaseModel):
    """What the output must match, enforced while decoding (llmkit/engine/constrain.py). `value`: the JSON schema
    as JSON text (json_schema), the pattern (regex), the options (choice), the Lark or GBNF text (grammar); None for
    json_object (any JSON object)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: ConstraintKind
    value: str | tuple[str, ...] | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _choices_from_json(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # a JSON list (--input-file, a JSON body)


class GenerationParams(BaseModel):
    """How to pick tokens. `greedy` (or temperature 0) ignores the sampling knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "yes" is not a bool, "0.7" not a number

    max_new_tokens: Annotated[
        int,
        Param(
            "stopping",
            cli_aliases=("--max-tokens",),
            openai="max_tokens",
            chat=(Name("max_completion_tokens", "(OpenAI's newer name for max_tokens)"),),
            generate=(
                Name("max_length", "(/generate's name for max_new_tokens: new tokens, not a total)"),
                "max_new_tokens",
            ),
        ),
    ] = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Tokens to generate at most.")
    temperature: Annotated[
        float,
        Param(
            "sampling",
            cli_aliases=("--temp",),
            short="-t",
            openai="temperature",
            greedy_ignores=True,
            neutral=1.0,
        ),
    ] = Field(0.8, ge=0.0, le=2.0, description="Divides the logits; 0 means greedy.")
    top_k: Annotated[
        int,
        Param(
            "sampling",
            openai="top_k",
            extension=True,
            greedy_ignores=True,
            neutral=0,
        ),
    ] = Field(50, ge=0, le=100_000, description="Keep the k most likely tokens; 0 disables.")
    top_p: Annotated[
        float,
        Param(
            "sampling",
            openai="top_p",
            greedy_ignores=True,
        ),
    ] = Field(1.0, gt=0.0, le=1.0, description="Keep the smallest set of tokens whose mass reaches p.")
    min_p: Annotated[
        float,
        Param(
            "sampling",
            openai="min_p",
            extension=True,
            greedy_ignores=True,
        ),
    ] = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the top probability.")
    repetition_penalty: Annotated[
        float,
        Param(
            "sampling",
            openai="repetition_penalty",
            extension=True,
        ),
    ] = Field(1.0, ge=0.5, le=2.0, description="Above 1 discourages tokens already seen.")
    presence_penalty: Annotated[
        float,
        Param("sampling", openai="presence_penalty"),
    ] = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of each token the output already holds.")
    frequency_penalty: Annotated[
        float,
        Param("sampling", openai="frequency_penalty"),
    ] = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time the output holds it.")
    logit_bias: Annotated[
        dict[str, float],
        Param(
            "sampling",
            openai="logit_bias",
            cli_help=(
                f"Add BIAS ({-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}) to token ID's logit: ID=BIAS, repeatable "
                "(-100 bans the token, 100 forces it)."
            ),
        ),
    ] = Field(
        default_factory=dict,
        description=f"Token id (a string) -> bias from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g} added to its logit.",
    )
    typical_p: Annotated[
        float,
        Param("sampling", openai="typical_p", extension=True, greedy_ignores=True),
    ] = Field(1.0, gt=0.0, le=1.0, description="Keep the tokens of most typical surprise up to mass p; 1 disables.")
    top_n_sigma: Annotated[
        float,
        Param("sampling", openai="top_n_sigma", extension=True, greedy_ignores=True),
    ] = Field(0.0, ge=0.0, le=10.0, description="Keep logits within n standard deviations of the top; 0 disables.")
    xtc_probability: Annotated[
        float,
        Param("sampling", openai="xtc_probability", extension=True, greedy_ignores=True),
    ] = Field(0.0, ge=0.0, le=1.0, description="XTC: how often a step excludes the top choices; 0 disables.")
    xtc_threshold: Annotated[
        float,
        Param("sampling", openai="xtc_threshold", extension=True, greedy_ignores=True),
    ] = Field(0.1, ge=0.0, le=1.0, description="XTC: tokens at least this likely are top choices (above 0.5: none).")
    greedy: Annotated[
        bool,
        Param(
            "sampling",
            greedy_ignores=True,  # not in the /v1 bodies: OpenAI's greedy is temperature 0
            cli_help="Always take the most likely token (deterministic; ignores the sampling options).",
        ),
    ] = Field(False, description="Always take the most likely token (deterministic).")
    seed: Annotated[
        int | None,
        Param(
            "draws",
            openai="seed",
            cli_help="Seed for sampling: same seed and parameters, same text (default: random, reported).",
        ),
    ] = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling; same seed, same text.")
    num_sequences: Annotated[
        int,
        Param(
            "draws",
            short="-n",
            openai="n",
            cli_note=" Like the OpenAI API's n; llama.cpp's -n (tokens to generate) is --max-tokens here.",
        ),
    ] = Field(1, ge=1, le=MAX_SEQUENCES, description="Independent completions per prompt.")
    stop: Annotated[
        list[str],
        Param(
            "stopping",
            openai="stop",
            cli_help="Cut the output before this text (repeatable).",
        ),
    ] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        description="Cut the output before the first of these strings.",
    )
    constraint: Annotated[
        Constraint | None,
        Param(
            "constraint",  # the CLI's constraint_options and the bodies' response_format / guided_* set it
            cli_help="What the output must match: a JSON schema, any JSON object, a regex, a choice or a grammar.",
        ),
    ] = Field(None, description="What the output must match, enforced while decoding.")

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParams:
        problems = []  # "field: sentence" each; _messages splits them, so every one is reported
        if any(s == "" for s in self.stop):
            problems.append("stop: stop sequences must not be empty strings")
        for text in self.stop:
            position = surrogate_position(text)
            if position is not None:
                problems.append(f"stop: {SURROGATE_MESSAGE.format(what='a stop sequence', at=position)}")
                break
        if self.is_greedy and self.num_sequences > 1:
            problems.append(
                "num_sequences: num_sequences must be 1 with greedy decoding, which gives "
                "identical sequences; sample (temperature > 0) for several"
            )
        if self.constraint is not None:
            from llmkit.engine.constrain import problems as constraint_problems

            problems.extend(f"constraint: {problem}" for problem in constraint_problems(self.constraint))
        problems.extend(f"logit_bias: {problem}" for problem in bias_problems(self.logit_bias))
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @classmethod
    def from_values(cls, values: Mapping[str, Any]):
        """Validate user values (None means 'not given') into this model, or raise InvalidParams naming every
        bad field (`errors`: one (field, sentence) per field)."""
        merged = {k: v for k, v in values.items() if v is not None}
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise InvalidParams.from_errors(_messages(exc.errors(), cls)) from None


PROBLEM_SEPARATOR = "\n"


def bias_problems(bias: Mapping[str, float]) -> list[str]:
    """Sentences for a logit_bias OpenAI would refuse: keys are token ids written as decimal integers, values are
    finite and within +-MAX_LOGIT_BIAS. Whether an id is in the model's vocabulary is checked once a model is known
    (Engine.check_context)."""
    if len(bias) > MAX_BIASED_TOKENS:
        return [f"logit_bias takes at most {MAX_BIASED_TOKENS} tokens (got {len(bias)})"]
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            return [f"logit_bias keys must be token ids, integers written as strings (got {shown(key)})"]
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:  # NaN fails too
            return [
                f"logit_bias values must be between {-MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g} "
                f"(got {shown(value)} for token {key})"
            ]
    return []


def parse_bias(items: Iterable[str], field: str = "logit_bias") -> dict[str, float]:
    """`["42=5", "7=-100"]` (the CLI's ID=BIAS) -> {"42": 5.0, "7": -100.0}; bounds are checked by GenerationParams."""
    bias: dict[str, float] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = None
        if not sep or value is None:
            raise InvalidParams(f"{field} takes TOKEN_ID=BIAS, e.g. 42=-100 (got {shown(item)})", field=field)
        bias[key.strip()] = value
    return bias


PARAM_NAMES = tuple(GenerationParams.model_fields)


# --- the table, read ---------------------------------------------------------------------------------


@cache
def param_table(model: type[GenerationParams] = GenerationParams) -> dict[str, Param]:
    """Field name -> its Param, in field order; a field without one, or a name two fields claim, is a bug here."""
    table = {}
    for name, info in model.model_fields.items():
        found = [item for item in info.metadata if isinstance(item, Param)]
        if len(found) != 1:
            raise TypeError(
                f"{model.__name__}.{name} needs exactly one Param in its Annotated metadata "
                f"(kind, CLI flags, HTTP names): llmkit/params.py"
            )
        table[name] = found[0]
    for api in APIS:
        claimed: dict[str, str] = {}
        for field, body_names_of_field in _api_names(table, api).items():
            for body_name in body_names_of_field:
                if claimed.setdefault(body_name.name, field) != field:
                    raise TypeError(
                        f"the {api} body name {body_name.name!r} is claimed by {claimed[body_name.name]} and {field}"
                    )
    return table


def _api_names(table: Mapping[str, Param], api: str) -> dict[str, tuple[Name, ...]]:
    names = {}
    for field, spec in table.items():
        if spec.kind == "constraint":
            continue  # the bodies spell constraints their own way (response_format, guided_*: server/schemas.py)
        if api == "generate":
            found = tuple(Name(n) if isinstance(n, str) else n for n in spec.generate) or (Name(field),)
        elif spec.openai is None:
            continue
        else:
            found = (Name(spec.openai, EXTENSION_NOTE if spec.extension else ""),)
            if api == "chat":
                found += spec.chat
        names[field] = found
    return names


def body_names(api: str, model: type[GenerationParams] = GenerationParams) -> dict[str, tuple[Name, ...]]:
    """Field -> the names `api`'s body takes for it ("completions", "chat", "generate"), the API's own first.
    Fields an API does not offer are left out."""
    if api not in APIS:
        raise ValueError(f"unknown API {api!r} (known: {', '.join(APIS)})")
    return _api_names(param_table(model), api)


def cli_flags(name: str, model: type[GenerationParams] = GenerationParams) -> tuple[str, ...]:
    """The long flags of a field: --field-name, then the other spellings."""
    return (f"--{name.replace('_', '-')}", *param_table(model)[name].cli_aliases)


def names_of(kind: str, model: type[GenerationParams] = GenerationParams) -> tuple[str, ...]:
    return tuple(name for name, spec in param_table(model).items() if spec.kind == kind)


SAMPLING_KNOBS = names_of("sampling")


def neutral_values(model: type[GenerationParams] = GenerationParams) -> dict[str, Any]:
    """Every sampling knob at the value that leaves the model's distribution alone: plain sampling."""
    fields = model.model_fields
    return {
        name: fields[name].get_default(call_default_factory=True) if spec.neutral is None else spec.neutral
        for name, spec in param_table(model).items()
        if spec.kind == "sampling"
    }


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def sampling_key(params: GenerationParams) -> tuple:
    """Equal keys pick tokens by the same rule: the value of every sampling knob of the params' table (only
    those greedy decoding reads, for greedy params). The batcher samples rows with equal keys in one call."""
    table = param_table(type(params))
    if params.is_greedy:
        return (
            "greedy",
            *(_hashable(getattr(params, n)) for n, s in table.items() if s.kind == "sampling" and not s.greedy_ignores),
        )
    return ("sample", *(_hashable(getattr(params, n)) for n, s in table.items() if s.kind == "sampling"))


# --- messages ----------------------------------------------------------------------------------------

SURROGATE_MESSAGE = (
    "{what} is not valid Unicode at character {at}: a lone UTF-16 surrogate (a JSON "
    "\\ud800-\\udfff escape without its pair, or bytes that are not UTF-8); send valid text"
)


def check_text(text: str, what: str, field: str | None = None) -> str:
    """`text` unchanged, or InvalidParams if it holds a lone surrogate (tokenizers and UTF-8 output cannot take it)."""
    position = surrogate_position(text)
    if position is not None:
        raise InvalidParams(SURROGATE_MESSAGE.format(what=what, at=position), field=field or what)
    return text


def surrogate_position(text: str) -> int | None:
    """Where `text` holds a lone surrogate (a str that cannot be encoded as UTF-8), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


def bounds_text(name: str, model: type[BaseModel] = GenerationParams) -> str:
    """'between 0.0 and 2.0' from the Field metadata, so messages never drift from the bounds."""
    lower = upper = None
    lower_open = upper_open = False
    for item in model.model_fields[name].metadata:
        for attr, is_open, is_lower in (
            ("ge", False, True),
            ("gt", True, True),
            ("le", False, False),
            ("lt", True, False),
        ):
            value = getattr(item, attr, None)
            if value is None:
                continue
            if is_lower:
                lower, lower_open = value, is_open
            else:
                upper, upper_open = value, is_open
    if lower is not None and upper is not None:
        if lower_open:
            return f"greater than {lower} and at most {upper}"
        return f"between {lower} and {upper}"
    if lower is not None:
        return f"{'greater than' if lower_open else 'at least'} {lower}"
    if upper is not None:
        return f"{'less than' if upper_open else 'at most'} {upper}"
    return ""


# pydantic's error type for a value of the wrong type -> what the value must be, in words
TYPE_WORDS = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
SHOWN_VALUE_CHARS = 60


def shown(value: Any) -> str:
    """A value quoted in an error message, cut short (a client may send megabytes)."""
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 1] + "…"


def type_sentence(name: str, error: Mapping[str, Any]) -> str | None:
    """'temperature must be a number (got 'hot')' for a wrong-type error; None for other errors."""
    word = TYPE_WORDS.get(error.get("type", ""))
    return f"{name} must be {word} (got {shown(error.get('input'))})" if word else None


def _message(error: Mapping[str, Any], model: type[BaseModel] = GenerationParams) -> tuple[str, str | None]:
    loc = error.get("loc") or ()
    name = str(loc[0]) if loc else None
    kind = error.get("type", "")
    got = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown parameter '{name}' (known: {', '.join(model.model_fields)})", name
    if name in model.model_fields and kind.startswith(("greater", "less")):
        return f"{name} must be {bounds_text(name, model)} (got {shown(got)})", name
    if kind == "too_long" and name == "stop":
        return f"stop takes at most {MAX_STOP_SEQUENCES} sequences (got {len(got or ())})", name
    if len(loc) > 1 and name == "stop":  # one of the sequences is not a string
        return f"stop must be a list of strings (got {shown(got)} in it)", name
    sentence = type_sentence(str(name), error)
    return sentence or f"{name}: {error.get('msg', 'invalid value')} (got {shown(got)})", name


def _messages(
    errors: Iterable[Mapping[str, Any]], model: type[BaseModel] = GenerationParams
) -> list[tuple[str | None, str]]:
    """pydantic's errors -> one (field, sentence) per bad field, in field order (a field's first error speaks
    for it: a stop list with two bad items is one sentence)."""
    found: dict[str | None, str] = {}
    for error in errors:
        if error.get("type") == "value_error":  # from _consistent: "field: sentence" lines, each naming its field
            text = str(error.get("ctx", {}).get("error", error.get("msg", "")))
            for line in text.split(PROBLEM_SEPARATOR):
                named, _, sentence = line.partition(": ")
                found.setdefault(named if sentence else None, sentence or line)
            continue
        message, field = _message(error, model)
        found.setdefault(field, message)
    return list((field, message) for field, message in found.items())


def parse_params(values: Mapping[str, Any] | None = None, **more: Any) -> GenerationParams:
    """Validate user values (None means 'not given') into GenerationParams or raise InvalidParams (every bad
    field in its `errors`, the first in `field`)."""
    return GenerationParams.from_values({**(values or {}), **more})
