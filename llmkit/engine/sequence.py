"""Per-sequence bookkeeping shared by every decode loop (single request or server batch).

A SequenceState turns sampled token ids into safe text Chunks (incremental detokenizing,
stop strings, end-of-sequence, the length limit); `build_result` turns finished states
and their token timestamps into the Result record. Keeping this in one place is what
makes a stream from the CLI and from the server behave the same.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from llmkit.engine.detokenize import IncrementalDetokenizer, StopMatcher
from llmkit.engine.types import Chunk, Completion, Result, Timings, Usage
from llmkit.params import GenerationParams

DETOKENIZE_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first new ones, so leading spaces survive


def choose_seed(params: GenerationParams) -> int | None:
    """The seed a request samples with: the user's, or a fresh random one (reported back so the
    text can be reproduced); None for greedy decoding, which uses no randomness."""
    if params.is_greedy:
        return None
    return params.seed if params.seed is not None else secrets.randbits(63)


@dataclass
class SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None

    @classmethod
    def start(cls, index: int, tokenizer, prompt_ids: Sequence[int], params: GenerationParams) -> SequenceState:
        context = list(prompt_ids)[-DETOKENIZE_CONTEXT_TOKENS:]
        return cls(index, IncrementalDetokenizer(tokenizer, context), StopMatcher(params.stop), params.max_new_tokens)

    def advance(self, token: int, eos_ids: frozenset[int]) -> Chunk | None:
        """Feed one sampled token; return the Chunk to emit, if any (the last one has finish_reason)."""
        if self.finish_reason:
            return None
        self.token_ids.append(token)
        finish: Literal["stop", "length"] | None
        if token in eos_ids:
            text, finish = self.stops.flush(self.detokenizer.flush()), "stop"
        else:
            text, hit_stop = self.stops.feed(self.detokenizer.feed(token))
            finish = "stop" if hit_stop else None
            if finish is None and len(self.token_ids) >= self.max_new_tokens:
                text, finish = text + self.stops.flush(self.detokenizer.flush()), "length"
        self.text += text
        self.finish_reason = finish
        if text or finish:
            return Chunk(self.index, text, (token,), finish)
        return None


def build_result(
    prompt: str,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    seed: int | None,
    sequences: Sequence[SequenceState],
    token_times: Sequence[float],
) -> Result:
    """token_times: seconds from request start at which each decode step produced its tokens."""
    completions = tuple(Completion(s.index, s.text, s.finish_reason or "length", tuple(s.token_ids)) for s in sequences)
    generated = sum(len(s.token_ids) for s in sequences)
    ttft = token_times[0]
    total = token_times[-1]
    decode = total - ttft
    after_first = generated - len(sequences)
    timings = Timings(
        ttft_s=ttft,
        total_s=total,
        decode_s=decode,
        prefill_tokens_per_s=len(prompt_ids) / ttft if ttft > 0 else 0.0,
        decode_tokens_per_s=after_first / decode if decode > 0 and after_first > 0 else None,
        token_times_s=tuple(token_times),
    )
    return Result(prompt, completions, Usage(len(prompt_ids), generated), timings, seed, params.model_dump())
