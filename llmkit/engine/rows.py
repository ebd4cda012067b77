"""Continuous batching, whatever holds the KV cache: what the server's two batching schedulers share.

A request arrives with its prompt ids and validated GenerationParams and waits in the bounded FIFO
queue (scheduling.py). At every step boundary the loop admits waiting requests while their rows
(num_sequences each) fit in `max_batch_size` and prefills the newcomers; otherwise it runs one
decode step for every running row. Nobody waits for a whole batch to drain; running requests either
pause for a prefill (the llama.cpp scheduler) or take their decode step in the same pass (batch.py).
A request leaves the moment all its rows are finished (EOS, stop string, length), is cancelled, or
passes its deadline.

Everything after the logits lives here, so it is one code for both engines: each row keeps its own
seeded `torch.Generator` (seed + i for sequence i, as the engines' own `stream` seeds them) and goes
through the same `pick_tokens` and `SequenceState` as the CLI, so a seeded request gives the same text
alone, batched, or from `llmkit generate --seed`. Rows with equal sampling settings share one
pick_tokens call; constrained rows get their masks (engine/constrain.py); the requests that asked for
log-probabilities get them from the logits the step already has (`raw_logprobs`, no forward pass);
one whose prompt must be scored first (the server's echo) has it scored when admitted.

What holds the rows' KV is the subclass's: BatchScheduler (batch.py) pads, concatenates and trims
the transformers engine's cache tensors; LlamaCppBatchScheduler (llamacpp_batch.py) gives every row
a sequence of one llama.cpp context. A subclass provides `_prefill(newcomers)`, `_decode()`,
`_drop_rows(keep)` and `_clear_rows()`; the loop never touches asyncio (results leave through each
request's `sink`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.engine.constrain import MaskComputer, guides_for
from llmkit.engine.prefix_cache import PrefixCache, PrefixEntry
from llmkit.engine.sampling import needs_history, pick_tokens, raw_logprobs
from llmkit.engine.scheduling import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    BatchRequest,
    Failed,
    Finished,
    Scheduler,
    StepHook,
    answer_prompt_only,
)
from llmkit.engine.sequence import Scored, SequenceState, build_result
from llmkit.errors import GenerationFailed, LlmkitError, OutOfMemory
from llmkit.params import GenerationParams, sampling_key

log = logging.getLogger("llmkit.server")


@dataclass
class _Active:
    request: BatchRequest
    sequences: list[SequenceState]
    generators: list[torch.Generator] | None
    seen: torch.Tensor | None  # prompt + generated ids per row, only when sampling.needs_history
    admitted: float  # perf_counter when its prefill began
    token_times: list[float] = field(default_factory=list)
    failed: bool = False  # its own work raised; it has been told and leaves the batch
    prefix: PrefixEntry | None = None  # the prefix cache's entry its prefill starts from
    cached: int = 0  # leading prompt tokens whose KV came from `prefix`
    seq_ids: list[int] = field(default_factory=list)  # llama.cpp: the context sequence each row decodes in

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason for seq in self.sequences)

    @property
    def leaving(self) -> bool:
        return self.failed or self.finished


def _sampling_key(params: GenerationParams) -> tuple:
    """Rows whose requests share this key can be sampled in one pick_tokens call: the value of every sampling
    knob in llmkit/params.py's table (derived there, so a knob added later cannot be left out of it)."""
    return sampling_key(params)


class RowScheduler(Scheduler):
    """Continuous batching over an engine's rows; see the module docstring. Subclasses hold the KV."""

    def __init__(
        self,
        engine: Any,
        *,
        device: torch.device,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        step_delay_s: float | None = None,
        on_step: StepHook | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        super().__init__(max_queue=max_queue, step_delay_s=step_delay_s, on_step=on_step)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.eos_ids = engine.eos_ids
        self.max_batch_size = max_batch_size
        self.prefix_cache = prefix_cache  # None: every prompt is computed whole (serve --prefix-cache-mb 0)
        self._pad_id = self._pick_pad_id()
        self._device = device

        # Batch state, touched only by the loop thread. Rows of one request are contiguous.
        self._active: list[_Active] = []
        self._admitting: list[BatchRequest] = []  # left the queue, not yet in _active (read by submit)
        self._masks: MaskComputer | None = None  # constraint masks of the rows that carry one (engine/constrain.py)

    # --- what a subclass provides ---------------------------------------------------------------

    def _prefill(self, newcomers: list[BatchRequest]) -> None:
        """Activate the newcomers (`_activate_alone`), compute their prompts, sample and `_dispatch` their first
        tokens, and append them to `_active`. Assign `newcomers[:]` the requests still in it before the shared
        work, so that a failure there is told to them."""
        raise NotImplementedError

    def _decode(self) -> None:
        """One step for every running row: feed each its last token, sample, `_dispatch`."""
        raise NotImplementedError

    def _drop_rows(self, keep_rows: list[bool]) -> None:
        """Forget the KV of the rows not kept (a flag per row of `_active`, in order; some are kept)."""
        raise NotImplementedError

    def _clear_rows(self) -> None:
        """Forget the KV of every row (the batch failed, or the last request left)."""
        raise NotImplementedError

    def _store_finished(self, active: _Active) -> None:
        """Called when a request has finished, before it leaves: a subclass may keep its KV for the prefix cache."""

    @property
    def running_rows(self) -> int:
        return sum(a.request.rows for a in list(self._active))

    @property
    def running_requests(self) -> int:
        return len(self._active) + len(self._admitting)

    def _slots_in_use(self) -> int:
        return sum(self._slots(a.request) for a in list(self._active)) + sum(map(self._slots, list(self._admitting)))

    def step(self) -> bool:
        """One scheduling step: drop cancelled/expired requests, admit and prefill, or decode. True if work was done.

        Only an error of the shared forward pass fails the whole batch (and is counted in `failures`);
        an error in one request's own sampling or bookkeeping fails that request alone (`_fail_one`).
        """
        self._reap()
        newcomers = self._admit()
        try:
            if newcomers:
                self._prefill(newcomers)
            elif self._active:
                self._decode()
            else:
                return False
            self.failures.step_worked()
        except (MemoryError, torch.OutOfMemoryError) as exc:
            self._fail_step(
                newcomers,
                exc,
                OutOfMemory(
                    "ran out of memory while generating; lower max_tokens or n, or send fewer requests at once"
                ),
            )
        except Exception as exc:  # a bug in the forward pass: fail this batch, keep serving
            log.exception("generation step failed for %d requests", len(self._active) + len(newcomers))
            self._fail_step(newcomers, exc, GenerationFailed("generation failed inside the model (see the server log)"))
        finally:
            self._admitting = []
        self.steps += 1
        return True

    def _reap(self) -> None:
        now = time.perf_counter()
        self._reap_waiting(now)
        if not self._active:
            return
        errors = [a.request.ending(now) for a in self._active]
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
            self._admitting = list(admitted)
        return admitted

    def _activate_alone(self, request: BatchRequest, admitted_at: float) -> _Active | None:
        """_activate, or None after failing this request alone."""
        try:
            return self._activate(request, admitted_at)
        except Exception as exc:
            self._fail_one(_Active(request, [], None, None, admitted_at), exc)
            return None

    def _activate(self, request: BatchRequest, admitted_at: float) -> _Active | None:
        """The request's rows, ready to prefill; None for one that was answered here (it generates nothing)."""
        if answer_prompt_only(self.engine, request, admitted_at):
            return None
        params = request.params
        generators = None
        if request.seed is not None:
            generators = [
                torch.Generator(device=self._device).manual_seed(request.seed + i) for i in range(request.rows)
            ]
        seen = None
        if needs_history(params):
            seen = torch.tensor([request.prompt_ids] * request.rows, device=self._device)
        guides = guides_for(self.engine, params.constraint, request.rows)  # each row's own matcher
        sequences = [
            SequenceState.start(
                i, self.tokenizer, request.prompt_ids, params, logprobs=request.logprobs is not None, guide=guides[i]
            )
            for i in range(request.rows)
        ]
        return _Active(request, sequences, generators, seen, admitted_at)

    def _sample(self, actives: Sequence[_Active], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row: rows with equal sampling settings share one pick_tokens call.

        pick_tokens works row by row (each row draws from its own generator), so grouping gives
        the same tokens as one call per request; requests with a penalty (sampling.needs_history)
        need their own `seen` history and are sampled alone. If a group's call raises, its requests are
        sampled one by one so that only the one whose sampling fails is failed (its rows keep
        the pad id and leave the batch at dispatch).
        """
        guides = self._guides(actives)
        if any(guides):  # constrained rows: disallowed tokens at -inf, before any sampling group picks
            logits = self._mask_computer().apply(logits, guides)
        groups: dict[tuple, list[tuple[int, _Active]]] = {}
        row = 0
        for active in actives:
            key = ("alone", id(active)) if active.seen is not None else _sampling_key(active.request.params)
            groups.setdefault(key, []).append((row, active))
            row += active.request.rows
        tokens = torch.full((logits.shape[0],), self._pad_id, dtype=torch.long, device=logits.device)
        for members in groups.values():
            try:
                self._pick_group(logits, members, tokens)
            except Exception:
                for start, active in members:
                    self._pick_alone(logits, start, active, tokens)
        return tokens

    def _mask_computer(self) -> MaskComputer:
        if self._masks is None:
            self._masks = MaskComputer(getattr(self.engine, "vocab_size", None))
        return self._masks

    @staticmethod
    def _guides(actives: Sequence[_Active]) -> list[Any]:
        """Each row's constraint matcher, in row order (None: unconstrained, finished or failed)."""
        return [g for a in actives for g in ([None] * a.request.rows if a.failed else [s.guided for s in a.sequences])]

    def _pick_group(self, logits: torch.Tensor, members: list[tuple[int, _Active]], tokens: torch.Tensor) -> None:
        params = members[0][1].request.params
        generators = None if params.is_greedy else [g for _, a in members for g in (a.generators or [])]
        seen = members[0][1].seen if len(members) == 1 else None
        prompt_len = len(members[0][1].request.prompt_ids)  # the leading columns of `seen`
        if sum(a.request.rows for _, a in members) == logits.shape[0]:  # the whole batch: no gather/scatter
            tokens.copy_(pick_tokens(logits, params, generators, seen, prompt_len))
            return
        index = torch.cat([torch.arange(r, r + a.request.rows) for r, a in members]).to(logits.device)
        tokens[index] = pick_tokens(logits.index_select(0, index), params, generators, seen, prompt_len)

    def _pick_alone(self, logits: torch.Tensor, start: int, active: _Active, tokens: torch.Tensor) -> torch.Tensor:
        """Sample one request's rows into `tokens`; a failure fails that request alone."""
        try:
            self._pick_group(logits, [(start, active)], tokens)
        except Exception as exc:
            self._fail_one(active, exc)
        return tokens

    def _score(
        self, actives: Sequence[_Active], logits: torch.Tensor, tokens: torch.Tensor
    ) -> list[Scored | None] | None:
        """Per row, the sampled token's raw log p and top alternatives for the requests that asked for logprobs
        (None for the others); None when none did. One raw_logprobs call over those rows; if it raises, the
        requests that asked fail alone."""
        wanted: list[tuple[int, _Active]] = []
        row = 0
        for active in actives:
            if active.request.logprobs is not None and not active.failed:
                wanted.append((row, active))
            row += active.request.rows
        if not wanted:
            return None
        scores: list[Scored | None] = [None] * logits.shape[0]
        try:
            top = max(active.request.logprobs or 0 for _, active in wanted)
            if sum(active.request.rows for _, active in wanted) == logits.shape[0]:
                rows = list(range(logits.shape[0]))
                scored = raw_logprobs(logits, tokens, top)
            else:
                rows = [r for start, active in wanted for r in range(start, start + active.request.rows)]
                index = torch.tensor(rows, device=logits.device)
                scored = raw_logprobs(logits.index_select(0, index), tokens.index_select(0, index), top)
        except Exception as exc:
            for _, active in wanted:
                self._fail_one(active, exc)
            return None
        for r, (value, alternatives) in zip(rows, scored):
            scores[r] = (value, alternatives)
        for start, active in wanted:
            keep = active.request.logprobs or 0
            if keep < top:
                for r in range(start, start + active.request.rows):
                    value, alternatives = scores[r] or (0.0, ())
                    scores[r] = (value, alternatives[:keep])
        return scores

    def _dispatch(
        self, tokens: torch.Tensor, actives: Sequence[_Active], scores: list[Scored | None] | None = None
    ) -> None:
        """Feed each request its rows' tokens (`tokens` holds exactly the rows of `actives`, in order) and, for those
        that asked, their log-probabilities (`scores`, by row)."""
        now = time.perf_counter()
        values = tokens.tolist()
        row = 0
        for active in actives:
            if not active.failed:
                try:
                    self._advance(active, tokens, values, row, now, scores)
                except Exception as exc:
                    self._fail_one(active, exc)
            row += active.request.rows
        leaving = [a.leaving for a in self._active]
        if any(leaving):
            self._keep([not gone for gone in leaving])

    def _advance(
        self,
        active: _Active,
        tokens: torch.Tensor,
        values: list[int],
        row: int,
        now: float,
        scores: list[Scored | None] | None = None,
    ) -> None:
        """One request's share of a step: its tokens become Chunks, and its Result once every row has finished."""
        request = active.request
        active.token_times.append(now - request.started)
        picked = values[row : row + request.rows]
        if active.seen is not None:
            active.seen = torch.cat([active.seen, tokens[row : row + request.rows, None]], dim=1)
        for i, (seq, token) in enumerate(zip(active.sequences, picked)):
            chunk = seq.advance(token, self.eos_ids, None if scores is None else scores[row + i])
            if chunk is not None:
                request.sink(chunk)
        if active.finished:
            self._store_finished(active)
            result = build_result(
                request.prompt,
                request.prompt_ids,
                request.params,
                request.seed,
                active.sequences,
                active.token_times,
                cached_tokens=active.cached,
            )
            queue_s = active.admitted - request.started
            request.sink(Finished(result, queue_s=queue_s, prefill_s=active.token_times[0] - queue_s))

    def _fail_one(self, active: _Active, exc: Exception) -> None:
        """End one request whose own work raised; the rest of the batch goes on."""
        if active.failed:
            return
        active.failed = True
        request = active.request
        log.error(
            "request %s failed alone: %s: %s",
            request.request_id or "?",
            type(exc).__name__,
            exc,
            exc_info=exc,
            extra={"request_id": request.request_id, "event": "request_failed"},
        )
        self.failures.request_failed(f"{type(exc).__name__}: {exc}")
        error = (
            exc
            if isinstance(exc, LlmkitError)  # its own words: out of memory scoring its prompt, say
            else GenerationFailed(
                "generation failed for this request (see the server log); other requests were not affected"
            )
        )
        try:
            request.sink(Failed(error))
        except Exception:  # its sink is gone too; nothing left to tell
            log.debug("could not deliver the failure of request %s", request.request_id, exc_info=True)

    def _keep(self, keep_requests: list[bool]) -> None:
        """Drop the requests not kept, and their rows' KV."""
        if all(keep_requests):
            return
        kept = [a for a, k in zip(self._active, keep_requests) if k]
        if not kept:
            self._active = []
            self._clear_rows()
            return
        self._drop_rows([k for a, k in zip(self._active, keep_requests) for _ in range(a.request.rows)])
        self._active = kept

    def _fail_step(self, newcomers: list[BatchRequest], exc: BaseException, error: LlmkitError) -> None:
        """The shared forward pass raised: everything in it fails, and /health hears of it."""
        self.failures.step_failed(f"{type(exc).__name__}: {exc}")
        self._fail_batch(newcomers, error)

    def _fail_batch(self, newcomers: list[BatchRequest], error: LlmkitError) -> None:
        running = {id(a.request) for a in self._active}
        told = [a.request for a in self._active if not a.failed] + [r for r in newcomers if id(r) not in running]
        self._active = []
        self._clear_rows()
        for request in told:
            request.sink(Failed(error))

    def _fail_running(self, error: LlmkitError) -> None:
        self._fail_batch([], error)

    def _pick_pad_id(self) -> int:
        for candidate in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(candidate, int):
                return candidate
        return 0
