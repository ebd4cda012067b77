"""The one definition of generation parameters: defaults, bounds, consistency.

The CLI, the HTTP server and explore's grids all build a GenerationParams through
`parse_params`, so a bound changes in one place and every entry point reports a bad
value with the same sentence ("temperature must be between 0.0 and 2.0 (got 5.0)").
Only pydantic is imported here, so validation costs nothing before a model loads.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmkit.errors import InvalidParams

MAX_NEW_TOKENS_LIMIT = 4096
MAX_SEQUENCES = 16
MAX_STOP_SEQUENCES = 8


class GenerationParams(BaseModel):
    """How to pick tokens. `greedy` (or temperature 0) ignores the sampling knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "yes" is not a bool, "0.7" not a number

    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Tokens to generate at most.")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Divides the logits; 0 means greedy.")
    top_k: int = Field(50, ge=0, le=100_000, description="Keep the k most likely tokens; 0 disables.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Keep the smallest set of tokens whose mass reaches p.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the top probability.")
    repetition_penalty: float = Field(1.0, ge=0.5, le=2.0, description="Above 1 discourages tokens already seen.")
    greedy: bool = Field(False, description="Always take the most likely token (deterministic).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling; same seed, same text.")
    num_sequences: int = Field(1, ge=1, le=MAX_SEQUENCES, description="Independent completions per prompt.")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES,
                            description="Cut the output before the first of these strings.")

    @model_validator(mode="after")
    def _consistent(self) -> "GenerationParams":
        if any(s == "" for s in self.stop):
            raise ValueError("stop: stop sequences must not be empty strings")
        for text in self.stop:
            position = surrogate_position(text)
            if position is not None:
                raise ValueError(f"stop: {SURROGATE_MESSAGE.format(what='a stop sequence', at=position)}")
        if self.is_greedy and self.num_sequences > 1:
            raise ValueError("num_sequences: num_sequences must be 1 with greedy decoding, which gives "
                             "identical sequences; sample (temperature > 0) for several")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


PARAM_NAMES = tuple(GenerationParams.model_fields)

SURROGATE_MESSAGE = ("{what} is not valid Unicode at character {at}: a lone UTF-16 surrogate (a JSON "
                     "\\ud800-\\udfff escape without its pair, or bytes that are not UTF-8); send valid text")


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


def bounds_text(name: str) -> str:
    """'between 0.0 and 2.0' from the Field metadata, so messages never drift from the bounds."""
    lower = upper = None
    lower_open = upper_open = False
    for item in GenerationParams.model_fields[name].metadata:
        for attr, is_open, is_lower in (("ge", False, True), ("gt", True, True),
                                        ("le", False, False), ("lt", True, False)):
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
TYPE_WORDS = {"bool_type": "true or false", "int_type": "an integer", "int_from_float": "an integer",
              "float_type": "a number", "string_type": "a string", "list_type": "a list",
              "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object"}
SHOWN_VALUE_CHARS = 60


def shown(value: Any) -> str:
    """A value quoted in an error message, cut short (a client may send megabytes)."""
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS - 1] + "…"


def type_sentence(name: str, error: Mapping[str, Any]) -> str | None:
    """'temperature must be a number (got 'hot')' for a wrong-type error; None for other errors."""
    word = TYPE_WORDS.get(error.get("type", ""))
    return f"{name} must be {word} (got {shown(error.get('input'))})" if word else None


def _message(error: Mapping[str, Any]) -> tuple[str, str | None]:
    loc = error.get("loc") or ()
    name = str(loc[0]) if loc else None
    kind = error.get("type", "")
    got = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown parameter '{name}' (known: {', '.join(PARAM_NAMES)})", name
    if kind == "value_error":  # from _consistent: "field: sentence naming the field"
        text = str(error.get("ctx", {}).get("error", error.get("msg", "")))
        field, _, sentence = text.partition(": ")
        return (sentence, field) if sentence else (text, None)
    if name in GenerationParams.model_fields and kind.startswith(("greater", "less")):
        return f"{name} must be {bounds_text(name)} (got {shown(got)})", name
    if kind == "too_long" and name == "stop":
        return f"stop takes at most {MAX_STOP_SEQUENCES} sequences (got {len(got)})", name
    if len(loc) > 1 and name == "stop":  # one of the sequences is not a string
        return f"stop must be a list of strings (got {shown(got)} in it)", name
    sentence = type_sentence(str(name), error)
    return sentence or f"{name}: {error.get('msg', 'invalid value')} (got {shown(got)})", name


def parse_params(values: Mapping[str, Any] | None = None, **more: Any) -> GenerationParams:
    """Validate user values (None means 'not given') into GenerationParams or raise InvalidParams."""
    merged = {k: v for k, v in {**(values or {}), **more}.items() if v is not None}
    try:
        return GenerationParams.model_validate(merged)
    except ValidationError as exc:
        message, field = _message(exc.errors()[0])
        raise InvalidParams(message, field=field) from None
