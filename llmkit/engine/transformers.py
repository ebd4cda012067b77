"""The transformers engine: one loaded model, a decode loop that yields Chunks.

The loop is ours rather than `model.generate` with a streamer thread because every
request needs its own seeded generator, exact per-token timestamps (TTFT, ITL) and
stop strings that never leak into the stream. It runs the model's own forward pass
with its own KV cache, so any causal LM transformers can load works here.

It is a BatchingEngine (base.py): `forward_step` is the one forward call of both this
loop and the server's batcher (batch.py).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmkit.engine import LoadOptions
from llmkit.engine.base import BatchingEngine, BatchStep, Decode, Generation, Session
from llmkit.engine.constrain import guides_for
from llmkit.engine.prefix_cache import common_prefix
from llmkit.engine.sampling import needs_history, pick_tokens, raw_logprobs
from llmkit.engine.sequence import SequenceState, build_result
from llmkit.engine.types import Capabilities, EngineInfo, TokenLogprob
from llmkit.errors import (
    InvalidParams,
    ModelLoadError,
    ModelUnavailableOffline,
    OutOfMemory,
    UnknownModel,
    one_line,
)
from llmkit.models import Progress, available_aliases, local_folder, resolve
from llmkit.params import GenerationParams

if TYPE_CHECKING:
    import torch

    from llmkit.engine.decode_step import LeanDecoder


class TransformersEngine(BatchingEngine):
    """Load once with `TransformersEngine.load`; then `stream()` / `generate()` any number of times."""

    def __init__(self, model, tokenizer, info: EngineInfo, lean: LeanDecoder | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._lean = lean  # the one-token step after the prompt; None: every step through transformers' forward
        self.eos_ids = _eos_ids(model, tokenizer)
        from llmkit.engine.fastpath import uses_gemv_switch

        self._gemv_switch = info.quantize == "none" and uses_gemv_switch(info.device, model.dtype)
        # transformers 5 renamed forward's `past_key_values` to `cache`; accept either.
        forward_args = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._constraint_tokenizer: Any = None

    def constraint_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer, built on the first constrained request (about a second), then kept."""
        if self._constraint_tokenizer is None:
            from llmkit.engine.constrain import hf_tokenizer

            self._constraint_tokenizer = hf_tokenizer(self.tokenizer, self.vocab_size)
        return self._constraint_tokenizer

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls, reference: str | None = None, options: LoadOptions | None = None, *, progress: Progress | None = None
    ) -> TransformersEngine:
        from llmkit.devices import choose_dtype, choose_quantize, resolve_device, use_threads

        options = options or LoadOptions()
        quantize = options.quantize
        if quantize == "int8" and options.dtype not in ("auto", "bfloat16"):
            raise InvalidParams(
                f"--quantize int8 computes in bfloat16 (its kernel takes bfloat16 activations); "
                f"drop --dtype {options.dtype} or use --dtype bfloat16",
                field="dtype",
            )
        if quantize in ("bf16", "fp16") and options.dtype not in ("auto", "float32"):
            weights = {"bf16": "bfloat16", "fp16": "float16"}[quantize]
            raise InvalidParams(
                f"--quantize {quantize} keeps {weights} weights with float32 activations, which --dtype "
                f"{options.dtype} contradicts: drop one of them",
                field="dtype",
            )
        source = resolve(reference)
        started = time.perf_counter()
        _quiet_transformers()
        import torch

        thread_count, threads_why = use_threads(options.threads)
        try:
            folder = local_folder(source, progress)
            device_name = resolve_device(options.device)
            quantize, quantize_why = choose_quantize(
                quantize, options.dtype, device_name, batch_rows=options.batch_rows
            )
            if quantize != "none" and device_name != "cpu":
                raise InvalidParams(
                    f"--quantize {quantize} runs on the CPU only (device {device_name}); use "
                    "--dtype bfloat16 on a GPU, or --device cpu",
                    field="quantize",
                )
            if quantize == "fp16":
                from llmkit.engine.fastpath import fp16_weights_supported

                if not fp16_weights_supported():
                    raise InvalidParams(
                        "--quantize fp16 needs torch's fbgemm kernel (x86 with AVX2), which this machine lacks; "
                        "use --quantize bf16",
                        field="quantize",
                    )
            if quantize == "int8":
                torch_dtype, dtype_why = torch.bfloat16, "int8 weight-only computes in bfloat16"
            elif quantize in ("bf16", "fp16"):
                torch_dtype, dtype_why = torch.float32, "16-bit weight-only keeps float32 activations"
            else:
                torch_dtype, dtype_why = choose_dtype(options.dtype, device_name)
            if progress:
                progress(f"loading {source.name}", 0, None)
            if folder is not None:
                model, tokenizer = _load_pretrained(str(folder), torch_dtype, local_only=True)
            else:
                model, tokenizer = _load_from_hub(source.location, torch_dtype)
            model.to(device_name).eval()
            parameters = sum(p.numel() for p in model.parameters())  # before int8 turns weights into buffers
            replaced = ""  # what --quantize replaced, for EngineInfo.choices
            if quantize == "int8":
                from llmkit.engine.fastpath import quantize_int8

                replaced = f"{quantize_int8(model)} Linear layers"
            elif quantize in ("bf16", "fp16"):
                from llmkit.engine.fastpath import CompactEmbedding, quantize_bf16, quantize_fp16

                count = (quantize_fp16 if quantize == "fp16" else quantize_bf16)(model)
                replaced = f"{count} Linear layers" + (
                    " and the input embedding" if isinstance(model.get_input_embeddings(), CompactEmbedding) else ""
                )
            from llmkit.engine.decode_step import lean_decoder_for

            lean, step_choices = lean_decoder_for(model)
        except (MemoryError, torch.OutOfMemoryError):
            raise OutOfMemory(
                f"not enough memory to load {source.name}; try a smaller model or --dtype bfloat16"
            ) from None
        info = EngineInfo(
            model=source.name,
            source_kind=source.kind,
            location=source.location,
            engine="transformers",
            device=device_name,
            dtype=str(torch_dtype).removeprefix("torch."),
            parameters=parameters,
            context_length=_context_length(model.config),
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            load_s=time.perf_counter() - started,
            quantize=quantize,
            threads=thread_count,
            choices={
                **_speed_choices(
                    device_name, (torch_dtype, dtype_why), (quantize, quantize_why), replaced, step_choices
                ),
                "threads": f"{thread_count} ({threads_why})",
            },
            capabilities=Capabilities(batching=True, decode_logprobs=True),
        )
        return cls(model, tokenizer, info, lean)

    def step_context(self, token_rows: int):
        """The kernel setting for one forward pass of `token_rows` rows (batch x new tokens)."""
        from llmkit.engine.fastpath import GEMV_MAX_ROWS, onednn_off

        if self._gemv_switch and token_rows <= GEMV_MAX_ROWS:
            return onednn_off()
        return contextlib.nullcontext()

    # --- the forward step (BatchingEngine) -------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_cache(self) -> Any:
        """A DynamicCache built without the model config: every layer a plain full-attention layer, even in
        models with sliding-window layers (Gemma 3), whose mask still comes from the config. Rows of one shape
        in every layer are what the batcher pads, concatenates and trims (memory beyond the window is the cost)."""
        from transformers import DynamicCache

        return DynamicCache()

    def forward_step(
        self,
        input_ids: torch.Tensor,
        cache: Any = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        with self.step_context(input_ids.numel()):
            lean = self._lean
            if (
                lean is not None
                and input_ids.shape[1] == 1
                and attention_mask is not None
                and position_ids is not None
                and lean.takes_batch(cache, attention_mask)
            ):  # the server's decode step: transformers' arithmetic without its per-step overhead (decode_step.py)
                return lean.step_batch(input_ids, cache, attention_mask, position_ids), cache
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: cache},
            )
        return out.logits[:, -1, :], out.get("cache", out.get("past_key_values"))

    def forward_mixed(self, running: BatchStep, prompts: BatchStep) -> tuple[torch.Tensor, Any, torch.Tensor, Any]:
        """One pass through the lean step (decode_step.LeanDecoder.step_mixed) where it applies, else two."""
        lean = self._lean
        if (
            lean is None
            or running.input_ids.shape[1] != 1
            or not lean.takes_batch(running.cache, running.attention_mask)
            or any(getattr(layer, "is_sliding", False) for layer in prompts.cache.layers)
        ):
            return super().forward_mixed(running, prompts)
        with self.step_context(running.input_ids.numel() + prompts.input_ids.numel()):
            logits, prompt_logits = lean.step_mixed(
                running.input_ids,
                running.cache,
                running.attention_mask,
                running.position_ids,
                prompts.input_ids,
                prompts.cache,
                prompts.attention_mask,
                prompts.position_ids,
            )
        return logits, running.cache, prompt_logits, prompts.cache

    # --- generation ------------------------------------------------------------------------------

    def _decode(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        seed: int | None,
        started: float,
        *,
        logprobs: int | None = None,
        cache: Any = None,
        cached: int = 0,
    ) -> Decode:
        """The decode loop; `logprobs` (None: not asked) puts each token's raw log p and its top `logprobs`
        alternatives on the Chunks, from the logits this step already computed (sampling.raw_logprobs).

        `cache` holding the KV of ids[:cached] (a session's, TransformersSession) makes the prefill compute only
        ids[cached:]; it is extended in place. None: the model starts its own."""
        import torch

        n = params.num_sequences
        device = self.device
        generators = None
        if seed is not None:
            generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]
        guides = guides_for(self, params.constraint, n)
        sequences = [
            SequenceState.start(i, self.tokenizer, ids, params, logprobs=logprobs is not None, guide=guides[i])
            for i in range(n)
        ]
        masks = None
        if params.constraint is not None:
            from llmkit.engine.constrain import MaskComputer

            masks = MaskComputer(self.vocab_size)
        seen = torch.tensor([ids] * n, device=device)
        input_ids = seen[:, cached:]  # cache None: the model starts its own (sliding-window layers where it has them)
        token_times: list[float] = []
        run = None  # the lean step's run, once the prompt is in the cache
        try:
            with torch.inference_mode():
                for _step in range(params.max_new_tokens):
                    if masks is not None:  # the next mask is computed on a thread while the model runs
                        masks.start([seq.guided for seq in sequences])
                    if run is not None:
                        with self.step_context(n):
                            logits = run.step(input_ids)
                    else:
                        logits, cache = self.forward_step(input_ids, cache)
                        if self._lean is not None and params.max_new_tokens > 1:
                            run = self._lean.begin(cache, len(ids) + params.max_new_tokens)
                    allowed = logits if masks is None else masks.apply(logits, [seq.guided for seq in sequences])
                    next_ids = pick_tokens(
                        allowed, params, generators, seen if needs_history(params) else None, len(ids)
                    )
                    scored = None if logprobs is None else raw_logprobs(logits, next_ids, logprobs)
                    token_times.append(time.perf_counter() - started)
                    seen = torch.cat([seen, next_ids[:, None]], dim=1)
                    input_ids = next_ids[:, None]
                    for i, (seq, token) in enumerate(zip(sequences, next_ids.tolist())):
                        chunk = seq.advance(token, self.eos_ids, None if scored is None else scored[i])
                        if chunk is not None:
                            yield chunk
                    if all(seq.finish_reason for seq in sequences):
                        break
        except (MemoryError, torch.OutOfMemoryError):
            raise OutOfMemory(
                "ran out of memory while generating; lower --max-new-tokens or --num-sequences, or use a smaller model"
            ) from None
        finally:
            if run is not None:
                run.end(cache)  # the caller's cache (a chat session's) holds every token fed
        return build_result(prompt, ids, params, seed, sequences, token_times, cached_tokens=cached)

    def session(self) -> TransformersSession:
        return TransformersSession(self)

    def next_token_logits(self, prompt: str, *, chat: bool = False, system: str | None = None) -> torch.Tensor:
        """Raw logits (1-D float32, on the CPU) for the token after the prompt, under the unmodified model."""
        import torch

        ids = self.prompt_ids(prompt, chat=chat, system=system)
        self.check_length(len(ids), "the prompt")
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([ids], device=self.model.device), use_cache=False, logits_to_keep=1
                )
        except (MemoryError, torch.OutOfMemoryError):
            raise OutOfMemory("ran out of memory scoring the prompt; shorten it or use a smaller model") from None
        return out.logits[0, -1].float().cpu()

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1..n-1 (n-1 values) from one forward pass of the unmodified model.

        No sampling knob touches these (no temperature, no penalty): they are the model's own
        float32 log-softmax, the basis of perplexity. The log-softmax is taken a block of positions
        at a time, so a long text does not hold a float32 copy of all its logits at once.
        """
        return [entry.logprob for entry in self.score_tokens(ids, 0)]

    def score_tokens(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """token_logprobs with the `top` most likely tokens at each position (the server's echo with logprobs): one
        TokenLogprob for each of ids[1:], from the same forward pass and the same formula, so the log p are
        token_logprobs' to the bit."""
        import torch

        block_size = 256  # positions per log-softmax block
        ids = [int(i) for i in ids]
        self.check_length(len(ids), "the text to score")
        if len(ids) < 2:
            return []
        entries: list[TokenLogprob] = []
        try:
            with torch.inference_mode():
                input_ids = torch.tensor([ids], device=self.model.device)
                logits = self.model(input_ids=input_ids, use_cache=False).logits[0, :-1]
                targets = input_ids[0, 1:]
                for start in range(0, logits.shape[0], block_size):
                    block = logits[start : start + block_size].float()
                    picked = block.gather(1, targets[start : start + block_size, None]).squeeze(1)
                    lse = torch.logsumexp(block, dim=-1)
                    values = (picked - lse).tolist()
                    tops: list[tuple[tuple[int, float], ...]] = [()] * len(values)
                    if top > 0:
                        best, best_ids = torch.topk(block, min(top, block.shape[-1]), dim=-1)
                        tops = [
                            tuple(zip(row_ids, row_values))
                            for row_ids, row_values in zip(best_ids.tolist(), (best - lse[:, None]).tolist())
                        ]
                    chosen = ids[start + 1 : start + 1 + len(values)]
                    entries.extend(TokenLogprob(t, v, alternatives) for t, v, alternatives in zip(chosen, values, tops))
        except (MemoryError, torch.OutOfMemoryError):
            raise OutOfMemory(
                f"ran out of memory scoring {len(ids)} tokens; score a shorter text or use a smaller model"
            ) from None
        return entries

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores: its config's vocabulary, the width of its logits (the tokenizer may name
        fewer)."""
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text_config, "vocab_size", None)
        return int(size) if isinstance(size, int) and size > 0 else len(self.tokenizer)  # type: ignore[arg-type]


class TransformersSession(Session):
    """A conversation that keeps its KV cache: the next turn crops it to the longest prefix its prompt shares with
    what the cache holds, and the prefill computes only the rest (at least the last prompt token, whose logits
    the first new token needs).

    The cache is engine.new_cache(): full-length layers everywhere, so cropping is exact even for models with
    sliding-window layers (Gemma 3), whose mask still comes from the config; memory beyond the window is the cost.
    A turn with num_sequences > 1 recomputes (its rows would need one cache each) and forgets the kept one."""

    engine: TransformersEngine

    def __init__(self, engine: TransformersEngine):
        super().__init__(engine)
        self._cache: Any = None
        self._kept: list[int] = []  # the ids whose KV the cache holds, in order

    def reset(self) -> None:
        self._cache, self._kept = None, []

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
        if params.num_sequences > 1:
            self.reset()
            return super().stream_ids(prompt, ids, params, seed=seed, started=started, logprobs=logprobs)
        cache, kept = self._cache, self._kept
        self.reset()  # until the turn ends, the cache holds tokens not yet known here (a stopped stream)
        reused = min(common_prefix(kept, ids), len(ids) - 1)
        if cache is None or reused == 0:
            cache, reused = self.engine.new_cache(), 0
        elif cache.get_seq_length() > reused:
            cache.crop(reused - cache.get_seq_length())  # transformers 5: a negative count of tokens to drop
        return Generation(self._turn(prompt, ids, params, seed, started, logprobs, cache, reused))

    def _turn(
        self,
        prompt: str,
        ids: list[int],
        params: GenerationParams,
        seed: int | None,
        started: float,
        logprobs: int | None,
        cache: Any,
        reused: int,
    ) -> Decode:
        result = yield from self.engine._decode(
            prompt, ids, params, seed, started, logprobs=logprobs, cache=cache, cached=reused
        )
        fed = [*ids, *result.completions[0].token_ids][: cache.get_seq_length()]  # the last token is never fed
        self._cache, self._kept = cache, fed
        return result


# --- loading helpers --------------------------------------------------------------------------


def _speed_choices(
    device: str, dtype: tuple[Any, str], quantize: tuple[str, str], replaced: str, step_choices: dict[str, str]
) -> dict[str, str]:
    """How decoding will run and why, for EngineInfo.choices (monitor, --json, /health); `replaced`: what
    `quantize` replaced; `step_choices` are the decode step's (decode_step.lean_decoder_for)."""
    from llmkit.engine.fastpath import BF16_GEMV_MAX_ROWS, GEMV_MAX_ROWS, uses_gemv_switch

    (torch_dtype, dtype_why), (method, quantize_why) = dtype, quantize
    choices = {"dtype": f"{str(torch_dtype).removeprefix('torch.')} ({dtype_why})"}
    if method == "int8":
        choices["quantize"] = f"int8 weight-only, one scale per output channel, {replaced} ({quantize_why})"
        choices["decode_matmul"] = "torch _weight_int8pack_mm (int8 weights x bfloat16 activations)"
    elif method == "fp16":
        choices["quantize"] = f"float16 weight-only, {replaced} ({quantize_why})"
        choices["decode_matmul"] = "fbgemm float16-weight GEMM, float32 activations and accumulation"
    elif method == "bf16":
        choices["quantize"] = f"bfloat16 weight-only, {replaced} ({quantize_why})"
        choices["decode_matmul"] = (
            f"torch gemv on bfloat16 rows for calls of <= {BF16_GEMV_MAX_ROWS} rows (oneDNN off), "
            "float32 with the weights upcast for prefill and larger batches"
        )
    else:
        choices["quantize"] = f"none ({quantize_why})"
        choices["decode_matmul"] = (
            f"torch gemv for steps of <= {GEMV_MAX_ROWS} token rows (oneDNN off), oneDNN for prefill and larger batches"
            if uses_gemv_switch(device, torch_dtype)
            else f"torch default ({'oneDNN/MKL' if device == 'cpu' else device})"
        )
    choices["decode_step"] = step_choices["decode_step"]
    choices["kv_cache"] = step_choices.get(
        "kv_cache", "dynamic (static cache + torch.compile did not pay off on the CPU; see docs/performance.md)"
    )
    return choices


def _quiet_transformers() -> None:
    """transformers' progress bars and advice would land on our stderr between our own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_pretrained(location: str, torch_dtype, *, local_only: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, local_files_only=local_only)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except OSError:
        if not local_only:
            raise
        raise ModelLoadError(
            f"could not read the model files in {location}; the folder may be incomplete "
            "(save it again with save_pretrained)"
        ) from None
    except ValueError as exc:
        raise ModelLoadError(
            f"transformers cannot load {location} as a causal language model: {one_line(exc)}"
        ) from None
    return model, tokenizer


def _load_from_hub(repo_id: str, torch_dtype):
    """A Hub id: the local Hub cache first (works offline), then the network."""
    try:
        return _load_pretrained(repo_id, torch_dtype, local_only=True)
    except ModelLoadError:
        pass
    _check_hub_reachable(repo_id)
    try:
        return _load_pretrained(repo_id, torch_dtype, local_only=False)
    except OSError as exc:
        raise ModelLoadError(f"could not download {repo_id} from the Hugging Face Hub: {one_line(exc)}") from None


def _check_hub_reachable(repo_id: str) -> None:
    """Ask the Hub once, without retries, so offline and unknown ids fail in a second, not 30."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    offline_aliases = ", ".join(available_aliases()) or "none installed"
    try:
        model_info(repo_id)
    except (RepositoryNotFoundError, HFValidationError):
        raise UnknownModel(
            f"model '{repo_id}' is not an alias, a local folder or .gguf file, or a "
            f"Hugging Face Hub model; offline aliases: {offline_aliases}"
        ) from None
    except Exception:
        raise ModelUnavailableOffline(
            f"model '{repo_id}' is not in the local Hugging Face cache and the Hub "
            f"cannot be reached; connect to the network, or use an alias that "
            f"works offline: {offline_aliases}"
        ) from None


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _context_length(config) -> int | None:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
