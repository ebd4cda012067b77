"""Plain records the engine yields and returns; renderers, JSON output and the server read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's raw distribution: the log-softmax of the logits the decode step
    computed, before any sampling transform (repetition penalty, temperature, top-k, top-p, min-p), and the `top`
    most likely tokens at that position with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log p)
    offset: int = 0  # characters of the sequence's text before this token's text (0 where not known)


@dataclass(frozen=True)
class Chunk:
    """New text for sequence `index`; the last chunk of a sequence carries its finish_reason.

    `logprobs` (only when they were asked for) hold the tokens whose text begins in this chunk, in order; a token
    whose text is still held back (half a UTF-8 character, a possible stop string) comes with the chunk that shows
    it, and tokens that never show text (end of sequence, the tokens of a stop string) come with the last chunk.
    So every generated token is in exactly one chunk."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was reused (a session's last turn, serve's prefix cache)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Seconds from the start of the request. Definitions follow vLLM's benchmarks:

    ttft: request start to the first generated token (includes tokenization and prefill);
    decode: first token to last token; prefill_tokens_per_s = prompt tokens / ttft;
    decode_tokens_per_s = generated tokens after the first / decode (llama-bench's "tg").
    """

    ttft_s: float
    total_s: float
    decode_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    token_times_s: tuple[float, ...] = field(default=(), repr=False)  # per step, from request start


@dataclass(frozen=True)
class Completion:
    index: int
    text: str
    finish_reason: FinishReason
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when they were asked for


@dataclass(frozen=True)
class Result:
    prompt: str
    completions: tuple[Completion, ...]
    usage: Usage
    timings: Timings
    seed: int | None
    params: dict[str, Any]

    @property
    def text(self) -> str:
        return self.completions[0].text

    def to_dict(self) -> dict[str, Any]:
        """The --json schema: stable keys, no per-token arrays."""
        timings = asdict(self.timings)
        timings.pop("token_times_s")
        return {
            "prompt": self.prompt,
            "completions": [
                {
                    "index": c.index,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "generated_tokens": len(c.token_ids),
                }
                for c in self.completions
            ],
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.total_tokens,
                # OpenAI's shape, only when something was reused, so records without a session keep their keys
                **(
                    {"prompt_tokens_details": {"cached_tokens": self.usage.cached_tokens}}
                    if self.usage.cached_tokens
                    else {}
                ),
            },
            "timings": timings,
            "seed": self.seed,
            "params": self.params,
        }


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do beyond the contract every engine keeps (llmkit.engine.base); callers ask this
    record, never the engine's name."""

    batching: bool = False  # the server decodes many requests in one forward pass (Engine.scheduler() batches)
    # `stream_ids(..., logprobs=N)` puts each generated token's raw log p and its top N on the Chunks (TokenLogprob),
    # from the logits the step already has; `score_tokens(ids, top)` gives a prompt's with alternatives too.
    # What `llmkit serve`'s logprobs and echo need.
    decode_logprobs: bool = False
    # A sequence's state can be cut back to a prefix, saved and restored: a chat session reuses its last turn, and
    # the server's batcher keeps prompts in its prefix cache (engine/prefix_cache.py). False for llama.cpp's
    # recurrent and hybrid models.
    prefix_states: bool = False
    # Scores (explore's log p and next-token view, compare's perplexity). A local engine has the model's whole
    # distribution at every position; a remote server (engine/remote.py) has what its probe found.
    logits: bool = True  # next_token_logits and token_logprobs over token ids: the whole vocabulary
    generated_logprobs: bool = True  # generate_scored: log p of each generated token under the unmodified model
    prompt_logprobs: bool = True  # log p of a text's own tokens (compare's perplexity; remote: echo + logprobs)
    top_logprobs: int | None = None  # without logits: the most next-token candidates next_token_top can return
    local_resources: bool = True  # the model computes in this process: this process's memory and CPU are its own
    missing: dict[str, str] = field(default_factory=dict)  # capability -> why it is missing, for one-line messages


@dataclass(frozen=True)
class EngineInfo:
    """What was loaded and how; `choices` says why each speed-relevant setting is what it is."""

    model: str
    source_kind: str
    location: str
    engine: str
    device: str
    dtype: str
    parameters: int
    context_length: int | None
    has_chat_template: bool
    load_s: float
    quantize: str = "none"
    threads: int | None = None  # CPU threads that compute (torch's intra-op threads; llama.cpp's n_threads)
    # How this engine was set up to run fast, and why: {"dtype": "...", "decode_matmul": "...", ...}.
    choices: dict[str, str] = field(default_factory=dict)
    capabilities: Capabilities = field(default_factory=Capabilities)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def setup(self) -> dict[str, Any]:
        """The speed-relevant setup, for --json lines: engine, device, dtype, quantize, threads and why."""
        return {
            "engine": self.engine,
            "device": self.device,
            "dtype": self.dtype,
            "quantize": self.quantize,
            "threads": self.threads,
            "choices": dict(self.choices),
        }
