"""The server's batched decode loop: many requests share each forward pass.

Why our own scheduler rather than transformers' continuous batching
(`model.generate_batch` / `init_continuous_batching`): its sampler draws every row
from one process-wide RNG (`torch.multinomial` without a generator, one seed for the
whole manager), so a request's `seed` would give different text depending on what it
was batched with; and it has no stop strings or incremental detokenizing. Here every
row keeps its own seeded `torch.Generator` (seed + i for sequence i, exactly as
`TransformersEngine.stream` seeds them) and goes through the same `pick_tokens` and
`SequenceState` as the CLI, so a seeded request gives the same text alone, batched,
or from `llmkit generate --seed`. It was also faster here: 16 prompts x 64 new tokens,
SmolLM2-135M float32 on 2 CPU cores, sampling: transformers' generate_batch gave 15-29
tok/s (paged|eager) and 23-42 tok/s (sdpa); this loop 105 tok/s (221 in bfloat16).

How it batches (continuous batching with left padding, one thread):

- A request arrives with its prompt ids and validated GenerationParams and waits in a
  bounded FIFO queue (`submit` raises QueueFull past `max_queue`).
- At every step boundary the loop admits waiting requests while their rows
  (num_sequences each) fit in `max_batch_size`, prefills the newcomers together
  (left-padded, with attention_mask and per-row position_ids), samples their first
  token and merges their KV cache into the running batch by left-padding the shorter
  one. Running requests pause for that one prefill; nobody waits for a whole batch
  to drain.
- Otherwise it runs one decode step for all running rows and hands each request's
  tokens to its SequenceStates; a request leaves the batch the moment all its rows
  are finished (EOS, stop string, length), is cancelled, or passes its deadline.
  Columns that are padding for every remaining row are trimmed away.

The KV cache is a `DynamicCache()` built without the model config, so every layer is
a plain full-attention layer, even for models with sliding-window layers (Gemma 3):
the model still applies its sliding-window mask from its config, while the cache
keeps whole rows that can be padded, concatenated and trimmed uniformly. That costs
memory beyond the window (irrelevant at the context lengths served here) and keeps
one code path for Llama and Gemma.

The loop never touches asyncio: results leave through each request's `sink`
callable (the server wraps `loop.call_soon_threadsafe`). Everything here runs on the
single inference thread that owns the model; `submit`, `cancel` and the read-only
properties are the only thread-safe entry points.

LLMKIT_TEST_STEP_DELAY (seconds, test-only): sleeps before every step so the test
suite can make a tiny model slow enough to exercise timeouts, queue overflow and
shutdown. Never set it in production.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from llmkit.engine.sampling import pick_tokens
from llmkit.engine.sequence import SequenceState, build_result, choose_seed
from llmkit.engine.types import Chunk, Result
from llmkit.errors import LlmkitError, OutOfMemory
from llmkit.params import GenerationParams

STEP_DELAY_ENV = "LLMKIT_TEST_STEP_DELAY"
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_QUEUE = 64
IDLE_WAKE_S = 0.5  # an idle loop still wakes this often, so its heartbeat stays fresh

log = logging.getLogger("llmkit.server")


# --- errors a request can end with ------------------------------------------------------------


class QueueFull(LlmkitError):
    http_status = 503
    kind = "queue_full"


class ShuttingDown(LlmkitError):
    http_status = 503
    kind = "shutting_down"


class RequestTimeout(LlmkitError):
    http_status = 504
    kind = "timeout"


class Cancelled(LlmkitError):
    """The client went away; nobody reads this error, it only closes the request."""

    http_status = 499
    kind = "cancelled"


class GenerationFailed(LlmkitError):
    """An unexpected error inside the model's forward pass (a bug); logged with its traceback."""

    kind = "server_error"


# --- what flows to a request's sink -----------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """The last event of a successful request."""

    result: Result
    queue_s: float  # arrival to admission into the batch
    prefill_s: float  # admission to the first token


@dataclass(frozen=True)
class Failed:
    """The last event of a request that did not complete."""

    error: LlmkitError


Event = Chunk | Finished | Failed
Sink = Callable[[Event], None]


@dataclass
class BatchRequest:
    """One request for the loop. `started` and `deadline` are time.perf_counter() values."""

    prompt: str
    prompt_ids: list[int]
    params: GenerationParams
    sink: Sink
    seed: int | None = None
    started: float = field(default_factory=time.perf_counter)
    deadline: float | None = None
    request_id: str = ""
    cancel_reason: str | None = None  # set from any thread; the loop drops the request at its next step

    def __post_init__(self) -> None:
        self.seed = None if self.params.is_greedy else (self.seed if self.seed is not None
                                                        else choose_seed(self.params))

    @property
    def rows(self) -> int:
        return self.params.num_sequences

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancel_reason = reason


@dataclass
class _Active:
    request: BatchRequest
    sequences: list[SequenceState]
    generators: list[torch.Generator] | None
    seen: torch.Tensor | None  # prompt + generated ids per row, only with a repetition penalty
    admitted: float  # perf_counter when its prefill began
    token_times: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason for seq in self.sequences)


def _sampling_key(params: GenerationParams) -> tuple:
    """Rows whose requests share this key can be sampled in one pick_tokens call."""
    if params.is_greedy:
        return ("greedy",)
    return (params.temperature, params.top_k, params.top_p, params.min_p)


class BatchScheduler:
    """Continuous batching over one loaded TransformersEngine; see the module docstring."""

    def __init__(self, engine, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue: int = DEFAULT_MAX_QUEUE, step_delay_s: float | None = None,
                 on_step: Callable[[str, int, float], None] | None = None):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.eos_ids = engine.eos_ids
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.step_delay_s = float(os.environ.get(STEP_DELAY_ENV) or 0) if step_delay_s is None else step_delay_s
        self.on_step = on_step  # (kind "prefill"|"decode", rows, seconds): metrics hook
        self._cache_arg = getattr(engine, "_cache_arg", "past_key_values")
        self._pad_id = self._pick_pad_id()
        self._device = self.model.device

        self._cv = threading.Condition()
        self._waiting: collections.deque[BatchRequest] = collections.deque()
        self._closing = False  # no new requests; finish what is there
        self._abort = False  # drop everything and exit
        self._thread: threading.Thread | None = None
        self._exited = False

        # Batch state, touched only by the loop thread. Rows of one request are contiguous.
        self._active: list[_Active] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [rows, columns] 1 = real token in the cache
        self._pending: torch.Tensor | None = None  # [rows] sampled, not yet fed to the model

        self.heartbeat = time.monotonic()
        self.steps = 0

    # --- thread-safe API ----------------------------------------------------------------------

    def submit(self, request: BatchRequest) -> None:
        with self._cv:
            if self._closing or self._abort:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is at capacity ({len(self._waiting)} requests waiting); "
                                "retry shortly")
            self._waiting.append(request)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return sum(a.request.rows for a in list(self._active))

    @property
    def running_requests(self) -> int:
        return len(self._active)

    @property
    def alive(self) -> bool:
        """False once the loop has exited (or its thread died); True while it runs or is about to."""
        return not self._exited and (self._thread is None or self._thread.is_alive())

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    def start(self) -> "BatchScheduler":
        self._thread = threading.Thread(target=self.run_forever, name="llmkit-inference", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop admitting new requests; the loop exits once the queue and the batch are empty."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def abort(self) -> None:
        """Fail everything still waiting or running with ShuttingDown and exit the loop."""
        with self._cv:
            self._closing = self._abort = True
            self._cv.notify()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self.alive

    # --- the loop -----------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Run on the inference thread until close() drains it or abort() stops it."""
        self._thread = threading.current_thread()
        try:
            with torch.inference_mode():
                while True:
                    self.heartbeat = time.monotonic()
                    with self._cv:
                        if self._abort:
                            break
                        if not self._waiting and not self._active:
                            if self._closing:
                                break
                            self._cv.wait(timeout=IDLE_WAKE_S)
                            continue
                    if self.step_delay_s:
                        time.sleep(self.step_delay_s)
                    self.step()
        finally:
            self._exited = True
            self._fail_all(ShuttingDown("the server shut down before this request finished"))

    def step(self) -> bool:
        """One scheduling step: drop cancelled/expired requests, admit and prefill, or decode. True if work was done."""
        self._reap()
        newcomers = self._admit()
        try:
            if newcomers:
                self._prefill(newcomers)
            elif self._active:
                self._decode()
            else:
                return False
        except (MemoryError, torch.OutOfMemoryError):
            self._fail_batch(newcomers, OutOfMemory(
                "ran out of memory while generating; lower max_tokens or n, or send fewer requests at once"))
        except Exception:  # a bug in the forward pass: fail this batch, keep serving
            log.exception("generation step failed")
            self._fail_batch(newcomers, GenerationFailed("generation failed inside the model (see the server log)"))
        self.steps += 1
        return True

    # --- scheduling ---------------------------------------------------------------------------

    def _reap(self) -> None:
        now = time.perf_counter()

        def verdict(request: BatchRequest) -> LlmkitError | None:
            if request.cancel_reason is not None:
                return Cancelled(f"request {request.cancel_reason}")
            if request.deadline is not None and now >= request.deadline:
                return RequestTimeout("the request took longer than the server's --request-timeout; "
                                      "lower max_tokens or retry later")
            return None

        with self._cv:
            kept: collections.deque[BatchRequest] = collections.deque()
            for request in self._waiting:
                error = verdict(request)
                if error is None:
                    kept.append(request)
                else:
                    request.sink(Failed(error))
            self._waiting = kept
        if not self._active:
            return
        errors = [verdict(a.request) for a in self._active]
        if any(errors):
            for active, error in zip(self._active, errors):
                if error is not None:
                    active.request.sink(Failed(error))
            self._keep([e is None for e in errors])

    def _admit(self) -> list[BatchRequest]:
        rows = self.running_rows
        admitted: list[BatchRequest] = []
        with self._cv:
            while self._waiting and self._waiting[0].cancel_reason is None:
                request = self._waiting[0]
                if rows + request.rows > self.max_batch_size and (rows or admitted):
                    break  # FIFO: the head waits for room rather than being overtaken
                admitted.append(self._waiting.popleft())
                rows += request.rows
        return admitted

    # --- model steps --------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :]

    def _prefill(self, newcomers: list[BatchRequest]) -> None:
        from transformers import DynamicCache

        started = time.perf_counter()
        rows = [r.prompt_ids for r in newcomers for _ in range(r.rows)]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(input_ids, mask, positions, cache)

        actives = [self._activate(r, started) for r in newcomers]
        tokens = self._sample(actives, logits)
        self._merge(actives, cache, mask, tokens)
        if self.on_step:
            self.on_step("prefill", len(rows), time.perf_counter() - started)
        self._dispatch(tokens, actives)

    def _decode(self) -> None:
        started = time.perf_counter()
        assert self._mask is not None and self._pending is not None
        ones = torch.ones((self._mask.shape[0], 1), dtype=self._mask.dtype, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = (self._mask.sum(-1, keepdim=True) - 1)
        logits = self._forward(self._pending[:, None], self._mask, positions, self._cache)
        tokens = self._sample(self._active, logits)
        self._pending = tokens
        if self.on_step:
            self.on_step("decode", len(tokens), time.perf_counter() - started)
        self._dispatch(tokens, list(self._active))

    def _activate(self, request: BatchRequest, admitted_at: float) -> _Active:
        params = request.params
        generators = None
        if request.seed is not None:
            generators = [torch.Generator(device=self._device).manual_seed(request.seed + i)
                          for i in range(request.rows)]
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.tensor([request.prompt_ids] * request.rows, device=self._device)
        sequences = [SequenceState.start(i, self.tokenizer, request.prompt_ids, params) for i in range(request.rows)]
        return _Active(request, sequences, generators, seen, admitted_at)

    def _sample(self, actives: Sequence[_Active], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row: rows with equal sampling settings share one pick_tokens call.

        pick_tokens works row by row (each row draws from its own generator), so grouping gives
        the same tokens as one call per request; requests with a repetition penalty need their
        own `seen` history and are sampled alone.
        """
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[tuple[int, _Active]]] = {}
        row = 0
        for active in actives:
            key = ("alone", id(active)) if active.seen is not None else _sampling_key(active.request.params)
            groups.setdefault(key, []).append((row, active))
            row += active.request.rows
        for members in groups.values():
            params = members[0][1].request.params
            generators = None
            if not params.is_greedy:
                generators = [g for _, a in members for g in (a.generators or [])]
            seen = members[0][1].seen if len(members) == 1 else None
            if len(groups) == 1:  # the common case: every row samples alike, no gather/scatter needed
                return pick_tokens(logits, params, generators, seen)
            index = torch.cat([torch.arange(r, r + a.request.rows) for r, a in members]).to(logits.device)
            tokens[index] = pick_tokens(logits.index_select(0, index), params, generators, seen)
        return tokens

    def _dispatch(self, tokens: torch.Tensor, actives: Sequence[_Active]) -> None:
        """Feed each request its rows' tokens (`tokens` holds exactly the rows of `actives`, in order)."""
        now = time.perf_counter()
        values = tokens.tolist()
        row = 0
        for active in actives:
            request = active.request
            active.token_times.append(now - request.started)
            picked = values[row:row + request.rows]
            if active.seen is not None:
                active.seen = torch.cat([active.seen, tokens[row:row + request.rows, None]], dim=1)
            row += request.rows
            for seq, token in zip(active.sequences, picked):
                chunk = seq.advance(token, self.eos_ids)
                if chunk is not None:
                    request.sink(chunk)
            if active.finished:
                result = build_result(request.prompt, request.prompt_ids, request.params, request.seed,
                                      active.sequences, active.token_times)
                queue_s = active.admitted - request.started
                request.sink(Finished(result, queue_s=queue_s, prefill_s=active.token_times[0] - queue_s))
        done = [a.finished for a in self._active]
        if any(done):
            self._keep([not d for d in done])

    # --- batch state surgery ------------------------------------------------------------------

    def _merge(self, actives: list[_Active], cache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append prefilled newcomers to the running batch, left-padding whichever side is shorter."""
        if not self._active:
            self._active, self._cache, self._mask, self._pending = list(actives), cache, mask, tokens
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(_layers(self._cache), _layers(cache)):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)], dim=0)
        self._pending = torch.cat([self._pending, tokens])
        self._active.extend(actives)

    def _keep(self, keep_requests: list[bool]) -> None:
        """Drop the rows of requests not kept, then trim columns that are padding in every remaining row."""
        if all(keep_requests):
            return
        kept_actives = [a for a, k in zip(self._active, keep_requests) if k]
        if not kept_actives:
            self._active, self._cache, self._mask, self._pending = [], None, None, None
            return
        rows = [k for a, k in zip(self._active, keep_requests) for _ in range(a.request.rows)]
        index = torch.tensor([i for i, k in enumerate(rows) if k], device=self._device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self._pending = self._pending.index_select(0, index)
        self._active = kept_actives
        unused = int(self._mask.any(dim=0).int().argmax())  # leading columns that hold no real token
        if unused > 0:
            for layer in _layers(self._cache):
                layer.keys = layer.keys[:, :, unused:, :]
                layer.values = layer.values[:, :, unused:, :]
            self._mask = self._mask[:, unused:]

    def _fail_batch(self, newcomers: list[BatchRequest], error: LlmkitError) -> None:
        running = {id(a.request) for a in self._active}
        for active in self._active:
            active.request.sink(Failed(error))
        for request in newcomers:
            if id(request) not in running:
                request.sink(Failed(error))
        self._active, self._cache, self._mask, self._pending = [], None, None, None

    def _fail_all(self, error: LlmkitError) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._closing = True
        for request in waiting:
            request.sink(Failed(error))
        self._fail_batch([], error)

    def _pick_pad_id(self) -> int:
        for candidate in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(candidate, int):
                return candidate
        return 0


def _layers(cache) -> list[Any]:
    """The cache's per-layer records with `.keys` / `.values` tensors [batch, heads, columns, head_dim]."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers version's cache has no .layers; llmkit serve needs transformers >= 4.56")
    return list(layers)


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
