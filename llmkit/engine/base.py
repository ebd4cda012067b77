"""The engine contract, and what every engine shares on top of it.

Every engine (transformers.py, llamacpp.py, and any later one) subclasses `Engine` and provides:

- `info`: an EngineInfo; its `capabilities` record says what the engine can do beyond this contract;
- `tokenizer`: the `Tokenizer` slice of a Hugging Face tokenizer (prompts, chat templates, detokenizing);
- `_decode(prompt, ids, params, seed, started, *, logprobs)`: a generator that yields Chunks and returns the Result;
- `next_token_logits(...)` and `token_logprobs(ids)`: the unmodified model's scores (explore, compare).

From those, `Engine` gives every engine the same prompt_ids / chat_ids / encode / check_context and
stream / stream_ids / generate, so engines cannot drift apart. It also gives defaults, from the whole
distribution, for what an engine without `logits` (remote.py: a server) provides its own way and says in
`info.capabilities`: `generate_scored` (explore's log p), `next_token_top` (a partial next-token view),
`text_logprobs` (perplexity through a server's echo), `unhonoured` (knobs a server ignores),
`server_metrics` (memory and CPU the server reports) and `close`. A `BatchingEngine` adds what the server's
batcher (batch.py) needs to run many requests through one forward pass: `eos_ids`, `device`,
`new_cache()` and `forward_step(...)`. `scheduler(...)` is the server's scheduler for the engine: one
request at a time by default, the engine's batcher where `info.capabilities.batching` says it has one
(batch.py for a BatchingEngine, llamacpp_batch.py for llama.cpp's sequences). Nothing here imports torch
or needs a model, so an engine that only talks to a server can keep the contract.
"""

from __future__ import annotations

import abc
import functools
import math
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from llmkit.engine.sequence import choose_seed
from llmkit.engine.types import Chunk, EngineInfo, Result, TokenLogprob
from llmkit.errors import InvalidParams, UnsupportedFeature, one_line
from llmkit.params import GenerationParams, check_text

if TYPE_CHECKING:
    import torch

    from llmkit.engine.scheduling import Scheduler

Decode = Generator[Chunk, None, Result]  # what _decode returns: Chunks as they come, then the Result


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that llmkit calls (LlamaCppTokenizer is a small complete one).

    Read when present: `get_vocab()` (the prompt's character bound) and `pad_token_id` (batch padding)."""

    bos_token_id: int | None  # the first token of a text scored for perplexity
    eos_token_id: int | None  # ends a sequence; pads batch rows when there is no pad token

    def __call__(self, text: str, add_special_tokens: bool = True) -> Mapping[str, Sequence[int]]:
        """{"input_ids": the token ids of `text`}."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (incremental detokenizing calls it on short windows)."""
        ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        ...


@dataclass(frozen=True)
class TopTokens:
    """The most likely next tokens after a prompt, most likely first, with their log p at temperature 1."""

    tokens: tuple[str, ...]  # each token's text
    logprobs: tuple[float, ...]
    token_ids: tuple[int | None, ...]  # None where the engine does not know the id (a server's top_logprobs)
    prompt_tokens: int
    vocab_size: int | None  # None: unknown (a server)
    cap: int | None  # the most candidates the engine can return (a server's top_logprobs limit); None: no cap
    asked: int | None = None  # how many were asked for, when fewer came back (a server that keys them by text
    # merges tokens that read the same): then the listed ones are not surely the most likely ones

    @property
    def complete(self) -> bool:
        """The listed tokens are the most likely ones, none missing among them."""
        return self.asked is None or len(self.tokens) >= self.asked

    @property
    def mass(self) -> float:
        """The probability the listed tokens cover together."""
        return sum(math.exp(value) for value in self.logprobs)


@dataclass(frozen=True)
class TextToken:
    """One token of a scored text: its text, where it starts in the text (characters), its log p given the ones
    before it (None: not predicted, the first)."""

    text: str
    offset: int
    logprob: float | None


class Generation:
    """An iterator of Chunks over an engine's `_decode`; once it is exhausted, `.result` is the Result
    that `_decode` returned (typed as a Result, so callers need no None check)."""

    def __init__(self, decode: Decode):
        self._decode = decode
        self._result: Result | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Chunk:
        try:
            return next(self._decode)
        except StopIteration as done:
            if self._result is None:  # a second exhaustion (value None) must not erase it
                self._result = done.value
            raise

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> Result:
        """The Result; a RuntimeError before the stream is exhausted (or after close())."""
        if self._result is None:
            raise RuntimeError("the generation has not finished: iterate it to the end first")
        return self._result

    def close(self) -> None:
        """Stop early (a cancelled server request): the decode loop ends where it is, with no Result."""
        self._decode.close()


PROMPT_CHARS_SLACK = 2  # normalizers that merge characters (NFKC, accent stripping) make tokens cover a little more
HEAD_CHARS_PER_TOKEN = 8  # a long text's first context x 8 characters are tokenized first (English: ~4 per token)


def longest_token_chars(tokenizer) -> int | None:
    """Characters in the longest vocabulary entry (byte-level and SentencePiece entries are at least as long as
    the text they stand for); None when the tokenizer does not list its vocabulary."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = get_vocab() if callable(get_vocab) else None
    return max(map(len, vocab), default=0) or None if vocab else None


class Engine(abc.ABC):
    """The contract every engine keeps (see the module docstring), and the code all engines share on it."""

    info: EngineInfo  # what was loaded and how; `capabilities` says what it can do beyond this contract
    tokenizer: Tokenizer  # prompts, chat templates and detokenizing

    # --- prompts ----------------------------------------------------------------------------

    @functools.cached_property
    def max_prompt_chars(self) -> int | None:
        """A prompt longer than this many characters cannot fit the context, without tokenizing it: no token
        covers more characters than the longest vocabulary entry. None when either is unknown."""
        longest = longest_token_chars(self.tokenizer)
        limit = self.info.context_length
        return limit * longest * PROMPT_CHARS_SLACK if limit and longest else None

    def check_prompt_chars(self, chars: int, field: str = "prompt") -> None:
        """Refuse a text that cannot fit the context before spending time tokenizing it. A text of at most
        context x PROMPT_CHARS_SLACK characters is under any such bound, so the bound (a scan of the whole
        vocabulary: 0.3 s for 262k entries) is only computed for longer ones."""
        limit = self.info.context_length
        if not limit or chars <= limit * PROMPT_CHARS_SLACK:
            return
        bound = self.max_prompt_chars
        if bound is not None and chars > bound:
            raise InvalidParams(
                f"{field} has {chars} characters, more than the model's context of "
                f"{self.info.context_length} tokens can hold (at most {bound} characters); "
                "shorten it",
                field=field,
            )

    def prompt_ids(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt; with chat=True, through the model's chat template."""
        check_text(prompt, "the prompt", "prompt")
        check_text(system or "", "the system prompt", "system")
        self.check_prompt_chars(len(prompt) + len(system or ""))
        if chat:
            if not self.info.has_chat_template:
                from llmkit.models import no_chat_template

                raise UnsupportedFeature(no_chat_template(self.info.model))
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return self.chat_ids(messages, field="prompt")[1]
        ids = self.encode(prompt, "prompt", add_special_tokens=True)
        if not ids:
            raise InvalidParams("prompt is empty after tokenization; give some text", field="prompt")
        return ids

    def chat_ids(self, messages: list[dict[str, str]], field: str = "messages") -> tuple[str, list[int]]:
        """(the text the chat template makes of `messages`, its token ids)."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's TemplateError: e.g. roles that must alternate
            raise InvalidParams(
                f"{field}: the model's chat template rejected them: {one_line(exc)}", field=field
            ) from None
        ids = self.encode(text, field, add_special_tokens=False)
        if not ids:
            raise InvalidParams(f"{field} are empty after applying the chat template", field=field)
        return text, ids

    def encode(self, text: str, field: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`. A text far longer than the context is judged by its head first: if the first
        context x HEAD_CHARS_PER_TOKEN characters already hold more tokens than the context, the whole cannot
        fit, and the rest (megabytes, seconds of CPU, hundreds of MB of token records) is never tokenized."""
        limit = self.info.context_length
        head_chars = (limit or 0) * HEAD_CHARS_PER_TOKEN
        if limit and len(text) > head_chars:
            head = self.tokenizer(text[:head_chars], add_special_tokens=add_special_tokens)["input_ids"]
            if len(head) > limit + 1:  # + 1: the last token of the head may merge with what follows it
                raise InvalidParams(
                    f"{field} has more than {limit} tokens, the model's context (its first "
                    f"{head_chars} characters alone are {len(head)} tokens); shorten it",
                    field=field,
                )
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_context(self, prompt_tokens: int, params: GenerationParams) -> None:
        """The request fits the model: prompt plus new tokens within the context, logit_bias ids in the vocabulary."""
        size = getattr(self, "vocab_size", None) if params.logit_bias else None
        if isinstance(size, int):
            bad = [key for key in params.logit_bias if int(key) >= size]
            if bad:
                raise InvalidParams(
                    f"logit_bias names token {bad[0]}, outside the model's vocabulary (ids 0 to {size - 1})",
                    field="logit_bias",
                )
        limit = self.info.context_length
        if limit and prompt_tokens + params.max_new_tokens > limit:
            raise InvalidParams(
                f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {limit} tokens; shorten the prompt or lower max_new_tokens",
                field="max_new_tokens",
            )

    def check_length(self, tokens: int, what: str) -> None:
        """For scoring: `what` (e.g. 'the prompt') must fit in the context on its own."""
        limit = self.info.context_length
        if limit and tokens > limit:
            raise InvalidParams(
                f"{what} has {tokens} tokens, more than the model's context of {limit} tokens; shorten it",
                field="prompt",
            )

    # --- generation -------------------------------------------------------------------------

    def stream(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        chat: bool = False,
        system: str | None = None,
        logprobs: int | None = None,
    ) -> Generation:
        """Start generating; iterate the returned Generation for Chunks, then read `.result`. `logprobs`: as in
        stream_ids (each token's raw log p and top `logprobs` on the Chunks; `llmkit generate --logprobs`)."""
        started = time.perf_counter()
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        self.check_context(len(ids), params)
        return self.stream_ids(prompt, ids, params, seed=choose_seed(params), started=started, logprobs=logprobs)

    def stream_ids(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        *,
        seed: int | None,
        started: float,
        logprobs: int | None = None,
    ) -> Generation:
        """stream() for ids made and checked elsewhere: the server tokenizes (and applies chat templates) on
        its own thread, and its timings count from `started`, the request's arrival. `logprobs` asks for each
        token's raw log p and its top `logprobs` on the Chunks (capabilities.decode_logprobs; None: not asked)."""
        if logprobs is None:  # an engine without decode_logprobs may leave the keyword out of its _decode
            return Generation(self._decode(prompt, ids, params, seed, started))
        if not self.info.capabilities.decode_logprobs:
            raise UnsupportedFeature(f"the {self.info.engine} engine does not return log-probs while generating")
        return Generation(self._decode(prompt, ids, params, seed, started, logprobs=logprobs))

    def generate(
        self, prompt: str, params: GenerationParams, *, chat: bool = False, system: str | None = None
    ) -> Result:
        generation = self.stream(prompt, params, chat=chat, system=system)
        for _ in generation:
            pass
        return generation.result

    def session(self) -> Session:
        """A conversation on this engine (`llmkit chat`). This default recomputes every turn; the local engines
        return one that keeps the KV cache between turns."""
        return Session(self)

    def scheduler(self, **options: Any) -> Scheduler:
        """The server's scheduler for this engine (options: max_batch_size, max_queue, on_step, prefix_cache). This
        default serves one request at a time, without a prefix cache (serial.py); an engine that batches
        (info.capabilities.batching) returns its batcher."""
        from llmkit.engine.serial import SerialScheduler

        no_flash_attn(self, options)
        options.pop("max_batch_size", None)
        options.pop("prefix_cache", None)
        return SerialScheduler(self, **options)

    # --- scores and resources, with defaults for the engines that hold the model ---------------------

    def generate_scored(
        self, prompt: str, params: GenerationParams, *, chat: bool = False, system: str | None = None
    ) -> tuple[Result, list[list[float] | None]]:
        """generate(), and per completion the log p of each generated token (end of sequence included) under the
        unmodified model: no sampling knob touches them (explore's log p). None for a completion the engine cannot
        score (capabilities.generated_logprobs is False: a server that returns no logprobs)."""
        result = self.generate(prompt, params, chat=chat, system=system)
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        scores: list[list[float] | None] = []
        for completion in result.completions:
            scored = self.token_logprobs([*ids, *completion.token_ids])
            scores.append(scored[len(ids) - 1 :])
        return result, scores

    def score_tokens(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """token_logprobs with the `top` most likely tokens at each position: one TokenLogprob per ids[1:] (the
        server's echo with logprobs). This default has the log p alone; the local engines add the alternatives
        from the same forward pass."""
        return [TokenLogprob(int(token), value) for token, value in zip(ids[1:], self.token_logprobs(ids))]

    def next_token_top(self, prompt: str, top: int, *, chat: bool = False, system: str | None = None) -> TopTokens:
        """The `top` most likely next tokens and their log p under the unmodified model: what explore next-token
        shows for an engine without `logits` (a server's top_logprobs). From the whole distribution here."""
        import torch

        logprobs = torch.log_softmax(self.next_token_logits(prompt, chat=chat, system=system).float(), dim=-1)
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[0]))
        return TopTokens(
            tokens=tuple(self.tokenizer.decode([int(i)]) for i in ids),
            logprobs=tuple(float(v) for v in values),
            token_ids=tuple(int(i) for i in ids),
            prompt_tokens=len(self.prompt_ids(prompt, chat=chat, system=system)),
            vocab_size=int(logprobs.shape[0]),
            cap=None,
        )

    def text_logprobs(self, text: str) -> list[TextToken]:
        """The tokens of `text` (as the engine splits it), each with its character offset and log p given the ones
        before it (None for the first): compare's perplexity for an engine without `logits` (a server's echo).
        Raises ContextExceeded (with the context when known) for a text longer than the context."""
        raise UnsupportedFeature(f"the {self.info.engine} engine scores token ids (token_logprobs), not texts")

    def unhonoured(self, params: GenerationParams) -> list[str]:
        """One sentence per knob of `params` this engine would not apply (a server that ignores or refuses top_k,
        say); none for an engine that samples itself."""
        return []

    def server_metrics(self) -> dict[str, float] | None:
        """For an engine whose model runs elsewhere (capabilities.local_resources False): the figures the server
        reports about itself now (its Prometheus /metrics), or None when it reports none."""
        return None

    def close(self) -> None:  # noqa: B027  # a hook with nothing to do for the engines that hold their model
        """Let go of what the engine holds outside the model (a remote engine's connections)."""

    # --- what each engine implements ----------------------------------------------------------

    @abc.abstractmethod
    def _decode(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        seed: int | None,
        started: float,
        *,
        logprobs: int | None = None,
    ) -> Decode:
        """Yield Chunks for the prompt `ids` (`prompt` is their text), then return the Result; sequence i samples
        with seed + i (None: greedy), and the Result's timings count from `started` (a perf_counter value).
        With `logprobs` (only passed to an engine whose capabilities.decode_logprobs is True; others may leave the
        keyword out) each Chunk carries its tokens' raw log p and top `logprobs` alternatives (TokenLogprob)."""

    @abc.abstractmethod
    def next_token_logits(self, prompt: str, *, chat: bool = False, system: str | None = None) -> torch.Tensor:
        """Raw logits (1-D float32, on the CPU) for the token after the prompt, under the unmodified model."""

    @abc.abstractmethod
    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1..n-1 under the unmodified model: no sampling knob touches them."""


def check_messages(messages: list[dict[str, str]]) -> None:
    """A conversation's messages as every session takes them: at least one, each content valid text."""
    if not messages:
        raise InvalidParams("messages are empty: a conversation needs at least one message", field="messages")
    for message in messages:
        role = message.get("role")
        check_text(message.get("content", ""), f"a {role} message" if role else "a message", "messages")


class Session:
    """One conversation on one engine: every turn sends the whole history through the chat template.

    This base recomputes the whole prompt each turn, which any engine can do. The local engines' sessions
    (TransformersEngine.session, LlamaCppEngine.session) keep the KV cache of the last turn and compute only the
    tokens after the longest prefix the new prompt shares with it; their Results say how many in
    `usage.cached_tokens`."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def stream(
        self,
        messages: list[dict[str, str]],
        params: GenerationParams,
        *,
        logprobs: int | None = None,
        fit_context: bool = False,
    ) -> Generation:
        """Engine.stream for a chat history: the same checks and seed, the prompt from the chat template.
        `fit_context` lowers max_new_tokens to the room the history leaves in the context (a long chat), instead
        of refusing; a history that fills the context on its own is still refused."""
        started = time.perf_counter()
        engine = self.engine
        if not engine.info.has_chat_template:
            from llmkit.models import no_chat_template

            raise UnsupportedFeature(no_chat_template(engine.info.model))
        check_messages(messages)
        engine.check_prompt_chars(sum(len(message.get("content", "")) for message in messages), "messages")
        prompt, ids = engine.chat_ids(messages)
        limit = engine.info.context_length
        if fit_context and limit and limit < len(ids) + params.max_new_tokens:
            if len(ids) >= limit:
                raise InvalidParams(
                    f"the conversation ({len(ids)} tokens) no longer fits the model's context of {limit} tokens; "
                    "/clear starts over",
                    field="messages",
                )
            params = params.model_copy(update={"max_new_tokens": limit - len(ids)})
        engine.check_context(len(ids), params)
        return self.stream_ids(prompt, ids, params, seed=choose_seed(params), started=started, logprobs=logprobs)

    def stream_ids(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        *,
        seed: int | None,
        started: float,
        logprobs: int | None = None,
    ) -> Generation:
        """Engine.stream_ids within this conversation: the reusing sessions override it."""
        return self.engine.stream_ids(prompt, ids, params, seed=seed, started=started, logprobs=logprobs)

    def reset(self) -> None:
        """Forget what the next turn could reuse (the chat's /clear); this base keeps nothing."""


class BatchingEngine(Engine):
    """An engine whose forward pass takes many left-padded rows at once (info.capabilities.batching is True):
    what the server's BatchScheduler calls besides the Engine contract. The batcher owns the batch state
    (masks, positions, which rows are whose) and edits the cache between steps: it pads, concatenates and
    drops rows and leading columns of every layer's keys and values."""

    eos_ids: frozenset[int]  # token ids that end a sequence

    def scheduler(self, **options: Any) -> Scheduler:
        from llmkit.engine.batch import BatchScheduler

        no_flash_attn(self, options)
        return BatchScheduler(self, **options)

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the batch's tensors and seeded generators live."""

    @abc.abstractmethod
    def new_cache(self) -> Any:
        """An empty KV cache for rows that will join the batch: `.layers`, each with `.keys` / `.values` tensors
        [rows, heads, columns, head_dim] of one shape in every layer, and `batch_select_indices(index)`."""

    @abc.abstractmethod
    def forward_step(
        self,
        input_ids: torch.Tensor,
        cache: Any = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """One forward pass of `input_ids` [rows, new columns] extending `cache` (None: the engine starts one);
        returns (the last position's logits [rows, vocab], the cache)."""

    def forward_mixed(self, running: BatchStep, prompts: BatchStep) -> tuple[torch.Tensor, Any, torch.Tensor, Any]:
        """The running rows' decode step (one token each) and newcomers' prompts: (the running rows' logits, their
        cache, the prompts' last-position logits, theirs). An engine that can put both in one pass overrides this;
        here they are two."""
        logits, cache = self.forward_step(
            running.input_ids, running.cache, attention_mask=running.attention_mask, position_ids=running.position_ids
        )
        prompt_logits, prompt_cache = self.forward_step(
            prompts.input_ids, prompts.cache, attention_mask=prompts.attention_mask, position_ids=prompts.position_ids
        )
        return logits, cache, prompt_logits, prompt_cache


@dataclass
class BatchStep:
    """One part of a batched forward pass: `input_ids` [rows, new columns] left-padded, extending `cache`;
    `attention_mask` [rows, cached + new columns] (1 = a real token), `position_ids` [rows, new columns]."""

    input_ids: torch.Tensor
    cache: Any
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def no_flash_attn(engine: Engine, options: dict[str, Any]) -> None:
    """`llmkit serve --flash-attn` is llama.cpp's; any other engine says so rather than ignore it."""
    if options.pop("flash_attn", False):
        raise UnsupportedFeature(f"--flash-attn applies to the llama.cpp engine, not {engine.info.engine}")
