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

How it holds the rows (left padding, one thread; admission, sampling, log-probabilities and leaving
are RowScheduler's, rows.py): newcomers are prefilled together, left-padded, with attention_mask
and per-row position_ids; their KV cache is merged into the running batch by left-padding the
shorter side. A decode step feeds every row its last token; while rows are running, newcomers are
prefilled in the same pass as the running rows' next step (engine.forward_mixed: one pass through the
weights for both, where the engine can), so they do not stop the batch. When requests leave, their rows
are dropped from every layer, and columns that are padding for every remaining row are trimmed away.

Every forward pass is the engine's `forward_step` (the one its single-sequence loop runs
too). The KV cache comes from `engine.new_cache()`: for transformers a `DynamicCache()` built
without the model config, so every layer is
a plain full-attention layer, even for models with sliding-window layers (Gemma 3):
the model still applies its sliding-window mask from its config, while the cache
keeps whole rows that can be padded, concatenated and trimmed uniformly. That costs
memory beyond the window (irrelevant at the context lengths served here) and keeps
one code path for Llama and Gemma.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from llmkit.engine.base import BatchingEngine, BatchStep
from llmkit.engine.prefix_cache import MIN_PREFIX_TOKENS, common_prefix
from llmkit.engine.rows import RowScheduler, _Active
from llmkit.engine.scheduling import BatchRequest

log = logging.getLogger("llmkit.server")


class BatchScheduler(RowScheduler):
    """Continuous batching over one loaded BatchingEngine (engine/base.py); see the module docstring."""

    def __init__(self, engine: BatchingEngine, **options: Any):
        """options: RowScheduler's (max_batch_size, max_queue, step_delay_s, on_step, prefix_cache)."""
        super().__init__(engine, device=engine.device, **options)
        # The running rows' KV, touched only by the loop thread.
        self._cache: Any = None  # the engine's KV cache of the running rows (new_cache())
        self._mask: torch.Tensor | None = None  # [rows, columns] 1 = real token in the cache
        self._pending: torch.Tensor | None = None  # [rows] sampled, not yet fed to the model

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
        """One forward pass over the rows of `actives`, each starting after its cached prefix, and the running
        rows' next decode step in the same pass (engine.forward_mixed) when there are any.

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
        input_ids, mask, positions = left_padded(
            [a.request.prompt_ids[kept:] for a, kept in zip(rows, reused)], reused, self._pad_id, self._device
        )
        cache = self._restored_cache(rows, reused, past)
        if self._active:  # running rows take their decode step in this pass rather than wait for it
            running = self._decode_inputs()
            prompts = BatchStep(input_ids, cache, mask, positions)
            running_logits, self._cache, logits, cache = self.engine.forward_mixed(running, prompts)
            step_rows = len(rows) + running.input_ids.shape[0]
            self._decoded(running_logits)
        else:
            step_rows = 0
            logits, cache = self.engine.forward_step(input_ids, cache, attention_mask=mask, position_ids=positions)

        tokens = self._sample(actives, logits)
        scores = self._score(actives, logits, tokens)
        self._store_prompts(actives, cache, mask)
        self._merge(actives, cache, mask, tokens)
        if self.on_step:  # a pass that also decoded is "mixed", counted once
            self.on_step("mixed" if step_rows else "prefill", step_rows or len(rows), time.perf_counter() - started)
        self._dispatch(tokens, actives, scores)

    def _decode(self) -> None:
        started = time.perf_counter()
        running = self._decode_inputs()
        logits, self._cache = self.engine.forward_step(
            running.input_ids, running.cache, attention_mask=running.attention_mask, position_ids=running.position_ids
        )
        self._decoded(logits, started)

    def _decode_inputs(self) -> BatchStep:
        """The running rows' next step: each row's pending token, one more mask column. Constrained rows' masks
        start computing on a thread while the model runs."""
        assert self._mask is not None and self._pending is not None
        ones = torch.ones((self._mask.shape[0], 1), dtype=self._mask.dtype, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = self._mask.sum(-1, keepdim=True) - 1
        guides = self._guides(self._active)
        if any(guides):
            self._mask_computer().start(guides)
        return BatchStep(self._pending[:, None], self._cache, self._mask, positions)

    def _decoded(self, logits: torch.Tensor, started: float | None = None) -> None:
        """Sample the running rows' next tokens from their step's logits and hand them out; `started`: the step
        was a decode step of its own, timed from then (a mixed pass is reported by its prefill)."""
        tokens = self._sample(self._active, logits)
        scores = self._score(self._active, logits, tokens)
        self._pending = tokens
        if self.on_step and started is not None:
            self.on_step("decode", len(tokens), time.perf_counter() - started)
        self._dispatch(tokens, list(self._active), scores)

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

    def _drop_rows(self, keep_rows: list[bool]) -> None:
        """Drop the rows not kept, then trim columns that are padding in every remaining row."""
        assert self._cache is not None and self._mask is not None and self._pending is not None  # rows are running
        index = torch.tensor([i for i, k in enumerate(keep_rows) if k], device=self._device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self._pending = self._pending.index_select(0, index)
        unused = int(self._mask.any(dim=0).int().argmax())  # leading columns that hold no real token
        if unused > 0:
            for layer in _layers(self._cache):
                layer.keys = layer.keys[:, :, unused:, :]
                layer.values = layer.values[:, :, unused:, :]
            self._mask = self._mask[:, unused:]

    def _clear_rows(self) -> None:
        self._cache, self._mask, self._pending = None, None, None


def left_padded(
    rows: Sequence[Sequence[int]],
    cached: Sequence[int] | None = None,
    pad_id: int = 0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch layout of new tokens after `cached[i]` tokens a row holds already (none when None): (input_ids
    [rows, width] right-aligned, left-padded with `pad_id`; attention_mask [rows, past + width] marking each row's
    cached and new tokens, right-aligned, past being the most any row holds; position_ids [rows, width])."""
    held = list(cached) if cached is not None else [0] * len(rows)
    width, past = max(map(len, rows)), max(held)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), past + width), dtype=torch.long)
    for i, (ids, kept) in enumerate(zip(rows, held)):
        input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[i, past + width - kept - len(ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]


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
