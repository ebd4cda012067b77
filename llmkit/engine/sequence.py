"""Per-sequence bookkeeping shared by every decode loop (single request or server batch).

A SequenceState turns sampled token ids into safe text Chunks (incremental detokenizing,
stop strings, end-of-sequence, the length limit); `build_result` turns finished states
and their token timestamps into the Result record. Keeping this in one place is what
makes a stream from the CLI and from the server behave the same.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from llmkit.engine.detokenize import IncrementalDetokenizer, StopMatcher
from llmkit.engine.types import Chunk, Completion, Result, Timings, TokenLogprob, Usage
from llmkit.params import GenerationParams

if TYPE_CHECKING:
    from llmkit.engine.constrain import TokenGuide

DETOKENIZE_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first new ones, so leading spaces survive


def choose_seed(params: GenerationParams) -> int | None:
    """The seed a request samples with: the user's, or a fresh random one (reported back so the
    text can be reproduced); None for greedy decoding, which uses no randomness."""
    if params.is_greedy:
        return None
    return params.seed if params.seed is not None else secrets.randbits(63)


Scored = tuple[float, tuple[tuple[int, float], ...]]  # a token's raw log p and its top (id, log p): raw_logprobs


@dataclass
class SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: list[TokenLogprob] | None = None  # every token's, when they were asked for
    produced: int = 0  # characters the detokenizer has given so far (the stop matcher may hold some back)
    unshown: list[TokenLogprob] = field(default_factory=list)  # scored tokens whose text has not been shown yet
    guide: TokenGuide | None = None  # the row's constraint matcher (engine/constrain.py); its mask is applied
    # before sampling by the decode loop, and the output is complete when the matcher says so

    @property
    def guided(self) -> TokenGuide | None:
        """The matcher whose mask this row's next token needs: None without a constraint or once finished."""
        return None if self.finish_reason else self.guide

    @classmethod
    def start(
        cls,
        index: int,
        tokenizer,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        *,
        logprobs: bool = False,
        guide: TokenGuide | None = None,
    ) -> SequenceState:
        context = list(prompt_ids)[-DETOKENIZE_CONTEXT_TOKENS:]
        return cls(
            index,
            IncrementalDetokenizer(tokenizer, context),
            StopMatcher(params.stop),
            params.max_new_tokens,
            logprobs=[] if logprobs else None,
            guide=guide,
        )

    def advance(self, token: int, eos_ids: frozenset[int], scored: Scored | None = None) -> Chunk | None:
        """Feed one sampled token (with its log p and top alternatives when logprobs were asked for); return the
        Chunk to emit, if any (the last one has finish_reason).

        A token's log p leaves with the chunk that shows the first character of its text (its `offset`), so a token
        held back by the detokenizer or the stop matcher comes out with its text; what never shows text (end of
        sequence, the tokens of a stop string) leaves with the last chunk."""
        if self.finish_reason:
            return None
        self.token_ids.append(token)
        if self.logprobs is not None and scored is not None:
            self.unshown.append(TokenLogprob(token, scored[0], scored[1], self.produced))
        finish: Literal["stop", "length"] | None
        complete = self.guide is not None and self.guide.consume(token)  # the constraint is satisfied: stop here
        if token in eos_ids:
            text, finish = self.stops.flush(self._produce(self.detokenizer.flush())), "stop"
        else:
            text, hit_stop = self.stops.feed(self._produce(self.detokenizer.feed(token)))
            finish = "stop" if hit_stop else None
            if finish is None and complete:
                text, finish = text + self.stops.flush(self._produce(self.detokenizer.flush())), "stop"
            if finish is None and len(self.token_ids) >= self.max_new_tokens:
                text, finish = text + self.stops.flush(self._produce(self.detokenizer.flush())), "length"
        self.text += text
        self.finish_reason = finish
        if text or finish:
            return Chunk(self.index, text, (token,), finish, self._release(final=finish is not None))
        return None

    def _produce(self, text: str) -> str:
        self.produced += len(text)
        return text

    def _release(self, *, final: bool) -> tuple[TokenLogprob, ...]:
        """The scored tokens whose text is now shown (all of them at the end, offsets kept within the text)."""
        if not self.unshown:
            return ()
        shown = len(self.text)
        count = len(self.unshown) if final else sum(1 for entry in self.unshown if entry.offset < shown)
        released = tuple(
            entry if entry.offset <= shown else replace(entry, offset=shown) for entry in self.unshown[:count]
        )
        del self.unshown[:count]
        assert self.logprobs is not None  # unshown only fills when logprobs were asked for
        self.logprobs.extend(released)
        return released


def build_result(
    prompt: str,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    seed: int | None,
    sequences: Sequence[SequenceState],
    token_times: Sequence[float],
    *,
    cached_tokens: int = 0,
) -> Result:
    """token_times: seconds from request start at which each decode step produced its tokens; cached_tokens: the
    leading prompt tokens whose KV was reused (a session's last turn, the server's prefix cache), not computed."""
    completions = tuple(
        Completion(
            s.index,
            s.text,
            s.finish_reason or "length",
            tuple(s.token_ids),
            None if s.logprobs is None else tuple(s.logprobs),
        )
        for s in sequences
    )
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
    usage = Usage(len(prompt_ids), generated, cached_tokens)
    return Result(prompt, completions, usage, timings, seed, params.model_dump())


def build_prompt_result(
    prompt: str,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    seed: int | None,
    elapsed: float,
    *,
    logprobs: bool,
) -> Result:
    """The Result of a request that generates nothing (the server's echo with max_tokens 0, which only scores the
    prompt): num_sequences empty completions, no generated tokens, `elapsed` seconds from its arrival."""
    completions = tuple(Completion(i, "", "length", (), () if logprobs else None) for i in range(params.num_sequences))
    timings = Timings(
        ttft_s=elapsed,
        total_s=elapsed,
        decode_s=0.0,
        prefill_tokens_per_s=len(prompt_ids) / elapsed if elapsed > 0 else 0.0,
        decode_tokens_per_s=None,
    )
    return Result(prompt, completions, Usage(len(prompt_ids), 0), timings, seed, params.model_dump())
