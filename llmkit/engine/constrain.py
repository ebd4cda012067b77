"""Structured output: a constraint (JSON schema, any JSON object, regex, choice, grammar) enforced while decoding.

A constraint is one more step of the one sampling path, after the logits and before `pick_tokens`: every row that
carries one gets a token mask (the tokens that keep the output a prefix of something the constraint accepts), its
logits outside the mask become -inf, and the token it samples is fed to its matcher. The matcher lives with the
row (`SequenceState.guide`), so both local engines and every batched row of `llmkit serve` apply it the same way,
and rows with different constraints (or none) share one batch and one sampling call. When the matcher says the
output is complete, the sequence finishes with finish_reason "stop". A row that reaches max_new_tokens first ends
with "length", its output cut short (as OpenAI's API does).

The spec travels in GenerationParams.constraint (llmkit/params.py), so the CLI, the HTTP bodies and validation
share it; `problems` checks it (llguidance compiles the grammar without a tokenizer) before any model loads.

Why llguidance (https://github.com/guidance-ai/llguidance), not outlines-core or xgrammar: it computes a mask
lazily per step over a token trie (no per-schema precompilation over the vocabulary, so a schema compiles in
milliseconds whatever the vocabulary), it supports JSON schema, regex, Lark and GBNF in one library, it has no
torch dependency (a 10 MB wheel), it reads both Hugging Face fast tokenizers and llama.cpp's vocabulary, and it
releases the GIL while it computes a mask, so the mask for the next step can be computed on a thread while the
model runs its forward pass (`MaskComputer`; measured not to pay on 2 cores, so off by default: OVERLAP below).
Measured on a 2-core AMD EPYC (docs/structured-output.md): a schema compiles in 0.7-0.9 ms; a mask takes 0.06 ms per
token at the median on SmolLM2's 49k vocabulary and 0.08 ms on Gemma 3's 262k, and the whole masking step (mask,
unpacking, -inf) 0.25 and 0.73 ms, under 2% of a forward pass; reading the vocabulary once takes 0.6 s and 6.5 s.
xgrammar 0.2.9's wheel requires torch, transformers and triton. It refuses the schema features it cannot enforce by name
("Unimplemented keys: ...") instead of ignoring them, which is what makes the one-line 400 / exit 2 possible.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.errors import InvalidParams

if TYPE_CHECKING:
    import numpy as np
    import torch

    from llmkit.params import Constraint

EXTRA = "structured"  # pyproject.toml's optional extra that installs llguidance
ANY_JSON_OBJECT = {"type": "object"}
# JSON as json.dumps writes it ({"a": 1, "b": [2, 3]}): what models have read most, and no room for the endless runs
# of whitespace that llguidance's default (any whitespace between tokens) lets a weak model wander into.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
KIND_WORDS = {
    "json_schema": "the JSON schema",
    "json_object": "the JSON object constraint",
    "regex": "the regex",
    "choice": "the choice list",
    "grammar": "the grammar",
}


def missing_library_message() -> str:
    from llmkit.extras import install_hint

    return f"structured output needs the llguidance library: {install_hint(EXTRA)}"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise InvalidParams(missing_library_message(), field="constraint") from None
    return llguidance


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (raises ValueError for a text llguidance cannot even read)."""
    llguidance = _llguidance()
    kind, value = constraint.kind, constraint.value
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_LAYOUT)
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_LAYOUT)
    if kind == "choice":
        return llguidance.grammar_from("choice", list(value or ()))
    if kind == "regex":
        return llguidance.grammar_from("regex", value)
    return llguidance.grammar_from("grammar", value)  # Lark, or GBNF (converted to Lark)


def problems(constraint: Constraint) -> list[str]:
    """One sentence per reason the constraint cannot be enforced ([]: it compiles), before any model loads.
    llguidance names the feature it does not support ("Unimplemented keys: [\"if\"]")."""
    what = KIND_WORDS[constraint.kind]
    try:
        grammar = grammar_text(constraint)
    except ValueError as exc:
        return [f"{what} cannot be read: {_one_line(exc)}"]
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    return [f"{what} is not supported: {_one_line(error)}"] if error else []


def _one_line(message: object) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= 300 else text[:299] + "…"


# --- per-row state ------------------------------------------------------------------------------------------


class TokenGuide:
    """One row's matcher: which tokens may come next, fed with the token the row sampled."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def consume(self, token: int) -> bool:
        """Feed the sampled token; True when the output is complete (the grammar accepts and allows nothing more)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the constraint refused a token the mask allowed: {self.matcher.get_error()}")
        return bool(self.matcher.is_stopped())

    def fill(self, row: np.ndarray) -> None:
        """Write this row's allowed-token bitmask (int32 words, bit i of word w: token 32w + i) into `row`."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)


def make_guides(constraint: Constraint | None, tokenizer: Any, rows: int) -> list[TokenGuide | None]:
    """One TokenGuide per row (the grammar compiled once, copied per row), or Nones without a constraint.
    `tokenizer` is the engine's llguidance tokenizer (the engines' `constraint_tokenizer()`)."""
    if constraint is None:
        return [None] * rows
    llguidance = _llguidance()
    first = llguidance.LLMatcher(tokenizer, grammar_text(constraint), log_level=0)
    if first.is_error():
        raise InvalidParams(
            f"{KIND_WORDS[constraint.kind]} is not supported: {_one_line(first.get_error())}", field="constraint"
        )
    return [TokenGuide(first if i == 0 else first.deep_copy()) for i in range(rows)]


def guides_for(engine: Any, constraint: Constraint | None, rows: int) -> list[TokenGuide | None]:
    """make_guides with the engine's llguidance tokenizer (its `constraint_tokenizer()`, built once per engine)."""
    if constraint is None:
        return [None] * rows
    return make_guides(constraint, engine.constraint_tokenizer(), rows)


def allowed_tokens(engine: Any, constraint: Constraint, width: int) -> torch.Tensor:
    """The first token's mask under `constraint` (1-D bool over `width` ids): what explore next-token shows removed."""
    import torch

    (guide,) = guides_for(engine, constraint, 1)
    dummy = torch.zeros((1, width))
    return MaskComputer(width).apply(dummy, [guide])[0] == 0


def hf_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's tokenizer for a Hugging Face fast tokenizer, as wide as the model's logits (about 1 s; cache it)."""
    from llguidance.hf import from_tokenizer

    _llguidance()
    return from_tokenizer(tokenizer, n_vocab=vocab_size)


def llamacpp_tokenizer(llm: Any) -> Any:
    """llguidance's tokenizer for a loaded llama_cpp.Llama (about 1 s on a large vocabulary; cache it)."""
    _llguidance()
    import llama_cpp
    from llguidance.llamacpp import lltokenizer_from_vocab

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    with warnings.catch_warnings():  # llguidance calls llama_token_get_attr, which llama-cpp-python deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        return lltokenizer_from_vocab(vocab, n_vocab=llm.n_vocab())


# --- masks --------------------------------------------------------------------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
# Compute the next mask on a thread while the model runs its forward pass. Off: on the 2-core machine of
# docs/structured-output.md it did not pay (decode 0.97 of plain with it, 0.99 without on transformers; 0.89 and 0.90
# on llama.cpp), as the median mask takes 0.05-0.1 ms and the thread competes with the model's own threads for the
# cores. It may pay with spare cores and heavy grammars; benchmarks/structured_speed.py measures both.
OVERLAP = False


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmkit-mask")
        return _POOL


@dataclass
class _Pending:
    guides: tuple[TokenGuide | None, ...]
    future: Future | None
    bits: np.ndarray


class MaskComputer:
    """Computes the rows' token masks (on a thread, so it can overlap the forward pass) and applies them.

    `start(guides)` begins the masks for the rows' current states; `apply(logits, guides)` waits for them (or
    computes them now, when `start` was not called for exactly these guides) and returns the logits with every
    disallowed token at -inf, a copy: the caller keeps the raw logits for log-probabilities."""

    def __init__(self, vocab_size: int | None):
        self.words = ((vocab_size or 0) + 31) // 32  # 0 (width unknown until the logits come): no overlap
        self._pending: _Pending | None = None

    def start(self, guides: Sequence[TokenGuide | None]) -> None:
        self.wait()
        if not any(guides) or not OVERLAP or not self.words:
            self._pending = None
            return
        import numpy as np

        bits = np.full((len(guides), self.words), -1, dtype=np.int32)
        frozen = tuple(guides)
        self._pending = _Pending(frozen, _pool().submit(_fill, frozen, bits), bits)

    def wait(self) -> None:
        """Let a mask still computing finish (a failed step may leave one behind), so no matcher is read on the
        thread while the loop feeds it a token."""
        pending = self._pending
        if pending is not None and pending.future is not None:
            pending.future.result()

    def apply(self, logits: torch.Tensor, guides: Sequence[TokenGuide | None]) -> torch.Tensor:
        if not any(guides):
            return logits
        import numpy as np
        import torch

        pending, self._pending = self._pending, None
        if pending is not None and pending.future is not None and pending.guides == tuple(guides):
            pending.future.result()
            bits = pending.bits
        else:
            if pending is not None and pending.future is not None:
                pending.future.result()  # never leave a matcher being read on the thread
            bits = np.full((len(guides), (logits.shape[-1] + 31) // 32), -1, dtype=np.int32)
            _fill(tuple(guides), bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[-1]]
        if allowed.shape[1] < logits.shape[-1]:  # logits wider than the tokenizer's vocabulary: padding ids
            allowed = np.pad(allowed, ((0, 0), (0, logits.shape[-1] - allowed.shape[1])))
        keep = torch.from_numpy(allowed.astype(bool)).to(logits.device)
        for row, guide in enumerate(guides):
            if guide is None:
                keep[row] = True
            elif not bool(keep[row].any()):  # nothing allowed: the matcher failed; TokenGuide.consume reports why
                keep[row] = True
        return logits.masked_fill(~keep, float("-inf"))


def _fill(guides: tuple[TokenGuide | None, ...], bits: np.ndarray) -> None:
    for row, guide in enumerate(guides):
        if guide is not None:
            guide.fill(bits[row])


def constrain_logits(logits: torch.Tensor, guides: Sequence[TokenGuide | None]) -> torch.Tensor:
    """The logits with each guided row's disallowed tokens at -inf (a copy; unguided rows untouched)."""
    return MaskComputer(logits.shape[-1]).apply(logits, guides)


def parse_json_schema(text: str, *, field: str = "constraint") -> str:
    """A JSON schema given as JSON text, checked to be an object, as one line of JSON text. The key order is kept:
    properties are generated in the schema's order."""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParams(f"the JSON schema is not valid JSON: {exc}", field=field) from None
    if not isinstance(schema, dict):
        raise InvalidParams("the JSON schema must be a JSON object", field=field)
    return json.dumps(schema)
