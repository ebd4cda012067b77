"""The llama.cpp engine for GGUF models (extra `llmkit[llamacpp]`, llama-cpp-python).

llama.cpp runs the forward passes on the quantized weights as they are in the file
(no de-quantizing, no conversion cache); llmkit keeps doing everything after the
logits: the same `pick_tokens` with a seeded torch.Generator per sequence, the same
SequenceState (incremental detokenizing, stop strings, EOS), the same Result
records. So a seed, a stop string or `--json` mean the same with either engine, and
`generate`, `explore`, `monitor` and `compare` take `--engine llama.cpp` unchanged.

`num_sequences > 1` runs the sequences one after another (the engine's own context
holds one sequence); token_logprobs evaluates one token at a time, reading the
logits after each, which is exact and fast enough for perplexity windows. The server
batches requests in a second context over the same weights (llamacpp_batch.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.engine import LoadOptions
from llmkit.engine.base import Decode, Engine, Generation, Session
from llmkit.engine.prefix_cache import common_prefix
from llmkit.engine.sampling import needs_history, pick_tokens, raw_logprobs
from llmkit.engine.sequence import SequenceState, build_result
from llmkit.engine.types import Capabilities, EngineInfo, TokenLogprob
from llmkit.errors import ModelLoadError, UnsupportedFeature, one_line
from llmkit.models import ALIASES, MARKER_TOKEN, Progress, assemble_alias, check_gguf_magic, resolve
from llmkit.params import GenerationParams

if TYPE_CHECKING:
    from llmkit.engine.scheduling import Scheduler

ENGINE_NAME = "llama.cpp"
DEFAULT_CONTEXT = 4096  # tokens of KV cache allocated; capped at the model's training context


def install_hint() -> str:
    """How to add llama-cpp-python where this llmkit was installed from (llmkit.extras)."""
    from llmkit.extras import install_hint as extra_hint

    return f"{extra_hint('llamacpp')} (llama-cpp-python; it compiles for several minutes)"


def llamacpp_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("llama_cpp") is not None


log = logging.getLogger("llmkit.llamacpp")
_log_callback = None  # the ctypes callback must stay referenced while llama.cpp may call it


def route_llama_logs() -> None:
    """llama.cpp's own log lines go to the `llmkit.llamacpp` logger at DEBUG instead of raw stderr.

    llama-cpp-python prints every message llama.cpp tags ERROR even with verbose=False, and
    llama.cpp tags notices as ERROR (Gemma 3: "using full-size SWA cache"), which then land in
    the middle of generated text. Real failures still reach users: llama-cpp-python raises them.
    """
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def forward(level, text, user_data):  # noqa: ARG001 (ctypes signature)
        log.debug("%s", text.decode("utf-8", errors="replace").rstrip("\n"))

    _log_callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


def default_threads() -> int:
    """torch's thread count (the physical cores it found); llama-cpp-python's own default is half the
    logical CPUs, which is 1 on a 2-vCPU machine: 136 vs 152 tok/s for SmolLM2 there (1 vs 2 threads)."""
    import torch

    return torch.get_num_threads()


def gguf_path_for(reference: str | None, progress: Progress | None = None) -> Path:
    """The GGUF file behind a reference; llama.cpp reads nothing else."""
    source = resolve(reference)
    if source.kind == "gguf":
        return Path(source.location)
    if source.kind == "alias":
        return assemble_alias(ALIASES[source.location], progress)
    raise UnsupportedFeature(
        f"the llama.cpp engine loads GGUF files; {source.name} is a {source.kind} model: "
        "use --engine transformers, or point --model at a .gguf file"
    )


def _file_type_name(code: str | None) -> str:
    """GGUF's general.file_type number as its quantization name (3 -> 'Q4_1')."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(code)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]  # None: TypeError
    except (TypeError, ValueError):
        return "gguf"


class LlamaCppTokenizer:
    """The slice of a Hugging Face tokenizer's interface that llmkit uses, over llama.cpp's vocabulary."""

    def __init__(self, llm):
        self.llm = llm
        self.bos_token_id = llm.token_bos() if llm.token_bos() >= 0 else None
        self.eos_token_id = llm.token_eos() if llm.token_eos() >= 0 else None
        self.chat_template = llm.metadata.get("tokenizer.chat_template")
        self._add_bos = bool(llm._model.add_bos_token())
        self._markers: dict[int, bool] = {}  # token id -> is a user-defined marker (asked once per id)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens and self._add_bos, special=True)
        return {"input_ids": list(ids)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not self._is_marker(i)]
        return self.llm.detokenize(ids, special=not skip_special_tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The token's own bytes, exactly (half a UTF-8 character stays half): the server's logprobs `bytes`."""
        return bytes(self.llm._model.detokenize([int(token)], special=True))

    def __len__(self) -> int:
        return int(self.llm.n_vocab())

    def _is_marker(self, token: int) -> bool:
        """A user-defined token shaped like a control marker (Gemma 3's <start_of_image>): llama.cpp
        detokenizes those as text, so they are skipped here as the GGUF conversion does for transformers."""
        known = self._markers.get(token)
        if known is None:
            import llama_cpp

            model = self.llm._model
            user_defined = bool(model.token_get_attr(token) & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED)
            text = model.token_get_text(token)
            text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
            known = self._markers[token] = user_defined and bool(MARKER_TOKEN.match(text))
        return known

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        bos = self.decode([self.bos_token_id], skip_special_tokens=False) if self.bos_token_id is not None else ""
        eos = self.decode([self.eos_token_id], skip_special_tokens=False) if self.eos_token_id is not None else ""
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )


class LlamaCppEngine(Engine):
    """The Engine contract over llama.cpp: its own decode loop, next_token_logits and token_logprobs, over a
    context that holds one sequence; `scheduler()` gives the server a batcher with a context of its own."""

    def __init__(self, llm, info: EngineInfo):
        self.llm = llm
        self.info = info
        self.tokenizer = LlamaCppTokenizer(llm)
        # End of generation: EOS and end-of-turn (asking llama.cpp about every token costs seconds).
        self.eos_ids = frozenset(t for t in (llm.token_eos(), llm._model.token_eot()) if t >= 0)
        self._constraint_tokenizer: Any = None

    def constraint_tokenizer(self) -> Any:
        """llguidance's view of llama.cpp's vocabulary, built on the first constrained request, then kept."""
        if self._constraint_tokenizer is None:
            from llmkit.engine.constrain import llamacpp_tokenizer

            self._constraint_tokenizer = llamacpp_tokenizer(self.llm)
        return self._constraint_tokenizer

    @classmethod
    def load(
        cls, reference: str | None = None, options: LoadOptions | None = None, *, progress: Progress | None = None
    ) -> LlamaCppEngine:
        from llmkit.devices import quantize_asked, requested_threads, use_threads

        options = options or LoadOptions(engine=ENGINE_NAME)
        device, dtype, quantize, threads = options.device, options.dtype, options.quantize, options.threads
        asked_threads = requested_threads(threads)[0]
        if device not in ("auto", "cpu"):
            raise UnsupportedFeature(
                "llmkit's llama.cpp engine runs on the CPU; use --device cpu or --engine transformers"
            )
        if dtype != "auto":
            raise UnsupportedFeature(
                "the llama.cpp engine computes in the GGUF file's own quantized types; "
                "drop --dtype, or use --engine transformers"
            )
        if quantize_asked(quantize):
            raise UnsupportedFeature(
                "the llama.cpp engine runs the GGUF file's own quantization; drop "
                "--quantize, or use --engine transformers"
            )
        if not llamacpp_installed():
            raise UnsupportedFeature(f"the llama.cpp engine needs llama-cpp-python: {install_hint()}")
        path = gguf_path_for(reference, progress)
        check_gguf_magic(path)  # llama.cpp's own loader reports a truncated file
        started = time.perf_counter()
        from llama_cpp import Llama

        route_llama_logs()
        # Asked for: torch (sampling) and llama.cpp (decode and prompt batches) get the count. Not asked: llama.cpp
        # decodes with torch's count (see default_threads) and keeps its own default for prompt batches.
        thread_count, threads_why = use_threads(threads)

        if progress:
            progress(f"loading {path.name} with llama.cpp", 0, None)
        try:
            llm = Llama(
                model_path=str(path),
                n_ctx=DEFAULT_CONTEXT,
                n_threads=thread_count,
                n_threads_batch=asked_threads,
                verbose=False,
            )
        except Exception as exc:  # llama.cpp reports every failure as a ValueError or RuntimeError
            raise ModelLoadError(f"llama.cpp could not load {path}: {one_line(exc)}") from None
        context = min(llm._model.n_ctx_train(), llm.n_ctx())
        info = EngineInfo(
            model=resolve(reference).name,
            source_kind=resolve(reference).kind,
            location=str(path),
            engine=ENGINE_NAME,
            device="cpu",
            dtype=_file_type_name(llm.metadata.get("general.file_type")),
            parameters=int(llm._model.n_params()),
            context_length=context,
            has_chat_template=bool(llm.metadata.get("tokenizer.chat_template")),
            load_s=time.perf_counter() - started,
            threads=llm.n_threads,
            capabilities=Capabilities(
                batching=True, decode_logprobs=True, prefix_states=not _is_recurrent_or_hybrid(llm)
            ),
            choices={
                "dtype": "the GGUF file's own tensor types",
                "quantize": "as stored in the GGUF",
                "decode_matmul": f"llama.cpp ggml kernels, {llm.n_threads} threads",
                "kv_cache": f"llama.cpp, {DEFAULT_CONTEXT} tokens",
                "threads": f"{llm.n_threads} ({threads_why}); prompt batches {llm.n_threads_batch}",
            },
        )
        return cls(llm, info)

    # --- generation ----------------------------------------------------------------------------

    def _logits(self):
        """The last evaluated position's logits as a [1, vocab] float32 tensor (a copy)."""
        import numpy as np
        import torch

        view = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return torch.from_numpy(view.copy())[None, :]

    def _decode(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        seed: int | None,
        started: float,
        *,
        logprobs: int | None = None,
        cached: int = 0,
    ) -> Decode:
        """`logprobs` (None: not asked): each token's raw log p and its top `logprobs` alternatives on the Chunks,
        from the logits llama.cpp already returned for the step. `cached`: the context already holds ids[:cached]
        (a session's, LlamaCppSession), so the first sequence evaluates only the rest."""
        import torch

        guides: list[Any] = [None] * params.num_sequences
        masks = None
        if params.constraint is not None:
            from llmkit.engine.constrain import MaskComputer, guides_for

            guides = guides_for(self, params.constraint, params.num_sequences)
            masks = MaskComputer(self.vocab_size)
        sequences = [
            SequenceState.start(i, self.tokenizer, ids, params, logprobs=logprobs is not None, guide=guides[i])
            for i in range(params.num_sequences)
        ]
        token_times: list[float] = []
        cached = same_batches(cached, len(ids), self.llm.n_batch)
        for sequence in sequences:
            generator = None if seed is None else [torch.Generator().manual_seed(seed + sequence.index)]
            seen = torch.tensor([ids]) if needs_history(params) else None
            reused = cached if sequence.index == 0 else 0
            self.llm.reset()
            self.llm.n_tokens = reused  # eval drops the context's KV from here on, then appends
            if masks is not None:  # the first mask is computed on a thread while llama.cpp reads the prompt
                masks.start([sequence.guided])
            self.llm.eval(ids[reused:])
            while not sequence.finish_reason:
                logits = self._logits()
                allowed = logits if masks is None else masks.apply(logits, [sequence.guided])
                picked = pick_tokens(allowed, params, generator, seen, len(ids))
                scored = None if logprobs is None else raw_logprobs(logits, picked, logprobs)[0]
                token = int(picked[0])
                token_times.append(time.perf_counter() - started)
                chunk = sequence.advance(token, self.eos_ids, scored)
                if chunk is not None:
                    yield chunk
                if sequence.finish_reason:
                    break
                if seen is not None:
                    seen = torch.cat([seen, torch.tensor([[token]])], dim=1)
                if masks is not None:
                    masks.start([sequence.guided])
                self.llm.eval([token])
        return build_result(prompt, ids, params, seed, sequences, token_times, cached_tokens=cached)

    def scheduler(self, **options: Any) -> Scheduler:
        """The server's batcher: a row per sequence of a second llama.cpp context (llamacpp_batch.py; options as
        there, flash_attn included). A recurrent or hybrid model's state cannot be cut back to a prefix, so it gets
        no prefix cache."""
        from llmkit.engine.llamacpp_batch import LlamaCppBatchScheduler

        if not self.info.capabilities.prefix_states:
            options["prefix_cache"] = None
        return LlamaCppBatchScheduler(self, **options)

    def session(self) -> Session:
        """A reusing LlamaCppSession, or the recomputing base for a recurrent or hybrid model, whose state
        cannot be cut back to a prefix."""
        return LlamaCppSession(self) if self.info.capabilities.prefix_states else Session(self)

    # --- analysis --------------------------------------------------------------------------------

    def next_token_logits(self, prompt: str, *, chat: bool = False, system: str | None = None):
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        self.check_length(len(ids), "the prompt")
        self.llm.reset()
        self.llm.eval(ids)
        return self._logits()[0].float()

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        return [entry.logprob for entry in self.score_tokens(ids, 0)]

    def score_tokens(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """token_logprobs with the `top` most likely tokens at each position (the server's echo with logprobs)."""
        import torch

        ids = [int(i) for i in ids]
        self.check_length(len(ids), "the text to score")
        entries: list[TokenLogprob] = []
        self.llm.reset()
        for position in range(len(ids) - 1):
            self.llm.eval([ids[position]])
            value, alternatives = raw_logprobs(self._logits(), torch.tensor([ids[position + 1]]), top)[0]
            entries.append(TokenLogprob(ids[position + 1], value, alternatives))
        return entries

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())


def same_batches(reused: int, length: int, n_batch: int) -> int:
    """How many of `reused` prompt tokens to keep so that the rest is evaluated as exactly as the whole prompt.

    llama.cpp computes a batch of one token by another kernel than a batch of several (matrix-vector, not
    matrix-matrix), and the two differ in the last bits: a prompt whose last token is evaluated alone gives the
    same first token but, through that token's keys and values, a different 20th one at temperature 1. A whole
    prompt is evaluated in batches of n_batch, so its last token is alone only when length % n_batch == 1; the
    part after a reused prefix must end the same way."""
    lone_whole = length % n_batch == 1
    if reused <= 0 or ((length - reused) % n_batch == 1) == lone_whole:
        return max(reused, 0)
    if lone_whole:  # keep a multiple of n_batch before the last token
        return reused - (reused - (length - 1)) % n_batch
    return reused - 1


def _is_recurrent_or_hybrid(llm) -> bool:
    """A model whose state cannot be cut back to a prefix (Mamba, RWKV, hybrids): every turn starts over."""
    return bool(getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False))


class LlamaCppSession(Session):
    """A conversation that keeps llama.cpp's context: the next turn keeps the longest prefix its prompt shares
    with the tokens the context holds and evaluates only the rest (at least the last prompt token, whose logits
    the first new token needs).

    The engine has one context, which any other call (generate, scores, another session) overwrites; so a turn
    reuses only the tokens this session left there that are still there (Llama.input_ids[:n_tokens] says
    what the context holds). llama.cpp allocates full-size sliding-window caches by default (swa_full), so
    cutting back is exact for Gemma 3 too. A turn with num_sequences > 1 reuses for its first sequence only."""

    engine: LlamaCppEngine

    def __init__(self, engine: LlamaCppEngine):
        super().__init__(engine)
        self._kept: list[int] = []  # the ids this session's last turn left in the context, in order

    def reset(self) -> None:
        self._kept = []

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
        return Generation(self._turn(prompt, ids, params, seed, started, logprobs))

    def _turn(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        seed: int | None,
        started: float,
        logprobs: int | None,
    ) -> Decode:
        """The engine's decode loop after the reusable prefix, judged when the stream starts (the context is the
        engine's: a call made between stream_ids and the first chunk would change it)."""
        llm = self.engine.llm
        held = [int(token) for token in llm.input_ids[: llm.n_tokens]]
        kept = self._kept[: common_prefix(self._kept, held)]
        self.reset()  # until the turn ends, the context holds tokens not yet known here (a stopped stream)
        reused = min(common_prefix(kept, ids), len(ids) - 1)
        result = yield from self.engine._decode(prompt, ids, params, seed, started, logprobs=logprobs, cached=reused)
        self._kept = [int(token) for token in llm.input_ids[: llm.n_tokens]]
        return result
