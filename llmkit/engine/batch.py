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

Log-probabilities, for the requests that ask (`BatchRequest.logprobs`): after a step samples, one
`raw_logprobs` call over the rows that want them (the logits the step already has; no forward pass)
gives each token's log p and the top N, which its SequenceState puts on the Chunks. A request that
asks for its prompt's (`prompt_logprobs`, the server's echo) has its prompt scored in one forward
pass of its own when it is admitted; one that generates nothing (`prompt_only`) ends there.

Every forward pass is the engine's `forward_step` (the one its single-sequence loop runs
too). The KV cache comes from `engine.new_cache()`: for transformers a `DynamicCache()` built
without the model config, so every layer is
a plain full-attention layer, even for models with sliding-window layers (Gemma 3):
the model still applies its sliding-window mask from its config, while the cache
keeps whole rows that can be padded, concatenated and trimmed uniformly. That costs
memory beyond the window (irrelevant at the context lengths served here) and keeps
one code path for Llama and Gemma.

The loop never touches asyncio: results leave through each request's `sink`
callable (the server wraps `loop.call_soon_threadsafe`). The request record, its
events and errors, the bounded queue and the loop itself are shared with the
one-at-a-time SerialScheduler and live in scheduling.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.engine.base import BatchingEngine
from llmkit.engine.constrain import MaskComputer, guides_for
from llmkit.engine.prefix_cache import MIN_PREFIX_TOKENS, PrefixCache, PrefixEntry, common_prefix
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


class BatchScheduler(Scheduler):
    """Continuous batching over one loaded BatchingEngine (engine/base.py); see the module docstring."""

    def __init__(
        self,
        engine: BatchingEngine,
        *,
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
        self._device = engine.device

        # Batch state, touched only by the loop thread. Rows of one request are contiguous.
        self._active: list[_Active] = []
        self._admitting: list[BatchRequest] = []  # left the queue, not yet in _active (read by submit)
        self._cache: Any = None  # the engine's KV cache of the running rows (new_cache())
        self._mask: torch.Tensor | None = None  # [rows, columns] 1 = real token in the cache
        self._pending: torch.Tensor | None = None  # [rows] sampled, not yet fed to the model
        self._masks: MaskComputer | None = None  # constraint masks of the rows that carry one (engine/constrain.py)

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

    # --- scheduling ---------------------------------------------------------------------------

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

    # --- model steps --------------------------------------------------------------------------

    def _prefill(self, newcomers: list[BatchRequest]) -> None:
        """Prefill the newcomers: those the prefix cache has a prefix for in one forward pass over their
        remaining tokens, the others in one over their whole prompts."""
        started = time.perf_counter()
        actives = [active for active in (self._activate_alone(r, started) for r in newcomers) if active is not None]
        newcomers[:] = [a.request for a in actives]  # a failure from here on is the batch's, told to these
        self._find_prefixes(actives)
        leaders, followers = self._leaders(actives)
        if followers:  # newcomers that share a prefix only with each other: one computes it, the others reuse it
            self._prefill_group(leaders, started)
            started = time.perf_counter()
            actives = followers
            self._find_prefixes(actives)
        for group in ([a for a in actives if a.prefix is None], [a for a in actives if a.prefix is not None]):
            if group:
                self._prefill_group(group, started)
                started = time.perf_counter()

    def _prefill_group(self, actives: list[_Active], started: float) -> None:
        """One forward pass over the rows of `actives`, each starting after its cached prefix.

        Every row stays contiguous and right-aligned: [padding | cached prefix | computed tokens], the computed
        part S columns wide for every row (S: the longest remainder). A row with a shorter remainder computes the
        last few tokens of its prefix again rather than leave a hole, so a column's distance is a position's
        distance, as sliding-window layers (Gemma 3) assume."""
        computed = max(len(a.request.prompt_ids) - a.cached for a in actives)
        for active in actives:
            active.cached = max(len(active.request.prompt_ids) - computed, 0)  # at most what the lookup found
            if self.prefix_cache is not None:
                self.prefix_cache.record(len(active.request.prompt_ids), active.cached)
        rows = [a for a in actives for _ in range(a.request.rows)]
        reused = [a.cached for a in rows]
        past = max(reused)
        input_ids = torch.full((len(rows), computed), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), past + computed), dtype=torch.long)
        for i, (active, kept) in enumerate(zip(rows, reused)):
            ids = active.request.prompt_ids[kept:]
            input_ids[i, computed - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, past + computed - kept - len(ids) :] = 1
        input_ids, mask = input_ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        cache = self._restored_cache(rows, reused, past)
        logits, cache = self.engine.forward_step(input_ids, cache, attention_mask=mask, position_ids=positions)

        tokens = self._sample(actives, logits)
        scores = self._score(actives, logits, tokens)
        self._store_prompts(actives, cache, mask)
        self._merge(actives, cache, mask, tokens)
        if self.on_step:
            self.on_step("prefill", len(rows), time.perf_counter() - started)
        self._dispatch(tokens, actives, scores)

    def _decode(self) -> None:
        started = time.perf_counter()
        assert self._mask is not None and self._pending is not None
        ones = torch.ones((self._mask.shape[0], 1), dtype=self._mask.dtype, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = self._mask.sum(-1, keepdim=True) - 1
        guides = self._guides(self._active)
        if any(guides):  # the constrained rows' masks are computed on a thread while the model runs
            self._mask_computer().start(guides)
        logits, self._cache = self.engine.forward_step(
            self._pending[:, None], self._cache, attention_mask=self._mask, position_ids=positions
        )
        tokens = self._sample(self._active, logits)
        scores = self._score(self._active, logits, tokens)
        self._pending = tokens
        if self.on_step:
            self.on_step("decode", len(tokens), time.perf_counter() - started)
        self._dispatch(tokens, list(self._active), scores)

    # --- the prefix cache (engine/prefix_cache.py) -----------------------------------------------

    def _find_prefixes(self, actives: list[_Active]) -> None:
        if self.prefix_cache is None:
            return
        for active in actives:
            active.prefix, active.cached = self.prefix_cache.lookup(active.request.prompt_ids)

    def _leaders(self, actives: list[_Active]) -> tuple[list[_Active], list[_Active]]:
        """Split the newcomers the cache has nothing for, when some of them share a prefix worth caching (a burst
        of requests with one system prompt): (those to prefill first, the others, which then find their prefix in
        the cache). ([], []) when there is nothing to gain."""
        if self.prefix_cache is None:
            return [], []
        leaders: list[tuple[_Active, tuple[int, ...]]] = []
        followers: list[_Active] = []
        for active in actives:
            if active.prefix is not None:
                followers.append(active)
                continue
            ids = tuple(active.request.prompt_ids)
            if any(common_prefix(ids, other) >= MIN_PREFIX_TOKENS for _, other in leaders):
                followers.append(active)
            else:
                leaders.append((active, ids))
        if len(followers) == sum(a.prefix is not None for a in actives):  # no newcomer waits for another
            return [], []
        return [a for a, _ in leaders], followers

    def _restored_cache(self, rows: list[_Active], reused: list[int], past: int) -> Any:
        """A new cache holding, for each row, the first `reused` tokens' KV from its prefix entry, left-padded to
        `past` columns (an empty one when no row reuses anything)."""
        cache = self.engine.new_cache()
        if past == 0:
            return cache
        layers = len(rows[0].prefix.payload)  # type: ignore[union-attr]  # past > 0: every row has an entry
        for layer in range(layers):
            keys, values = [], []
            for active, kept in zip(rows, reused):
                key, value = active.prefix.payload[layer]  # type: ignore[union-attr]
                keys.append(_pad_left(key[:, :, :kept], past))
                values.append(_pad_left(value[:, :, :kept], past))
            cache.update(torch.cat(keys), torch.cat(values), layer)
        return cache

    def _store_prompts(self, actives: list[_Active], cache: Any, mask: torch.Tensor) -> None:
        """Snapshot each newcomer's prompt KV (its first row) so that requests arriving while it runs can reuse it."""
        row = 0
        for active in actives:
            self._store_row(cache, mask, row, active.request.prompt_ids)
            row += active.request.rows

    def _store_finished(self, active: _Active) -> None:
        """Snapshot a finished request's prompt and reply (its first row: every token it fed the model), which is
        how the next turn of a conversation begins."""
        if self.prefix_cache is None or self._cache is None or self._mask is None:
            return
        row = 0
        for other in self._active:
            if other is active:
                fed = [*active.request.prompt_ids, *active.sequences[0].token_ids[:-1]]  # the last is never fed
                self._store_row(self._cache, self._mask, row, fed)
                return
            row += other.request.rows

    def _store_row(self, cache: Any, mask: torch.Tensor, row: int, ids: list[int]) -> None:
        """Copy the KV of `ids` out of `row` (its real columns, right-aligned; the first len(ids) of them) into the
        prefix cache, unless an entry holds them already. A failure here costs the cache an entry, nothing more."""
        if self.prefix_cache is None or not self.prefix_cache.worth_storing(ids):
            return
        try:
            self._copy_row(cache, mask, row, ids)
        except Exception:  # MemoryError and torch's OutOfMemoryError included
            log.warning("could not keep a prefix in the prefix cache", exc_info=True)

    def _copy_row(self, cache: Any, mask: torch.Tensor, row: int, ids: list[int]) -> None:
        assert self.prefix_cache is not None
        held = int(mask[row].sum())
        count = min(len(ids), held)
        first = mask.shape[1] - held
        payload = [
            (
                layer.keys[row : row + 1, :, first : first + count].clone(),
                layer.values[row : row + 1, :, first : first + count].clone(),
            )
            for layer in _layers(cache)
        ]
        nbytes = sum(key.nbytes + value.nbytes for key, value in payload)
        self.prefix_cache.store(ids[:count], payload, nbytes)

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

    # --- batch state surgery ------------------------------------------------------------------

    def _merge(self, actives: list[_Active], cache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append prefilled newcomers to the running batch, left-padding whichever side is shorter."""
        if not self._active:
            self._active, self._cache, self._mask, self._pending = list(actives), cache, mask, tokens
            return
        assert self._cache is not None and self._mask is not None and self._pending is not None  # rows are running
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
        assert self._cache is not None and self._mask is not None and self._pending is not None  # rows are running
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

    def _fail_step(self, newcomers: list[BatchRequest], exc: BaseException, error: LlmkitError) -> None:
        """The shared forward pass raised: everything in it fails, and /health hears of it."""
        self.failures.step_failed(f"{type(exc).__name__}: {exc}")
        self._fail_batch(newcomers, error)

    def _fail_batch(self, newcomers: list[BatchRequest], error: LlmkitError) -> None:
        running = {id(a.request) for a in self._active}
        told = [a.request for a in self._active if not a.failed] + [r for r in newcomers if id(r) not in running]
        self._active, self._cache, self._mask, self._pending = [], None, None, None
        for request in told:
            request.sink(Failed(error))

    def _fail_running(self, error: LlmkitError) -> None:
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
