"""The server's batching for the llama.cpp engine: every row is a sequence of one llama.cpp context.

llama.cpp decodes many sequences in one `llama_decode` call (a `llama_batch` whose tokens carry
sequence ids), which is how llama-server serves many clients at once. The engine's own `Llama`
context holds one sequence, so the server opens a second context over the same loaded weights
(`BatchContext`): one KV stream per row (`n_seq_max` streams, `kv_unified` off), each as long as
the engine's context, so every request that fits the model fits its row. Admission, sampling,
stop strings, log-probabilities and leaving are RowScheduler's (rows.py), the same code the
transformers batcher runs: every row is sampled by llmkit with its own seeded generator.

Exactness. With one KV stream per sequence, a row's logits are bit-for-bit those it gets alone,
whatever else is in the batch: the weights' matrix products are computed row by row, and
attention reads only the row's own stream (a shared, unified cache would sum over other rows'
masked cells, and it changed a row's logits when prompts were evaluated together). A prompt is
evaluated as the engine's `Llama.eval` evaluates it (chunks of n_batch tokens, alone in its
`llama_decode` calls), so a seeded request gives the text of `llmkit generate --engine llama.cpp
--seed N`; tests/test_server_llamacpp.py checks both. Newcomers' prompts are therefore evaluated
one request after another, then join the running rows' decode steps. Flash attention stays off, as
in the engine's own context (llama-server turns it on, for 10-20% more decode speed here): its CPU
kernel takes another path for one query against a long cache when one sequence is in the batch,
and another for many queries of one sequence, so a row's text would depend on its batch-mates and a
reused prefix would change the tokens after it. `llmkit serve --flash-attn` turns it on, for an
operator who wants the speed more than that guarantee.

A request with n > 1 evaluates its prompt once and copies that sequence's state to its other rows.
The prefix cache (prefix_cache.py) keeps prompt states only: a row's state is saved with
`llama_state_seq_get_data` once its prompt is evaluated, and restored into a newcomer's sequence
with `llama_state_seq_set_data`. Never a reply's: llama.cpp computes a generated token alone,
by its one-token kernel, whose rounding differs from the batch kernel that evaluates the same token as
part of the next prompt, and with quantized weights that is enough to change a seeded (or greedy) token
now and then. The part after a reused prefix ends in a batch of the size the whole prompt's would
(`same_batches`).
"""

from __future__ import annotations

import ctypes
import heapq
import logging
import time
import weakref
from typing import Any

import torch

from llmkit.engine.rows import RowScheduler, _Active
from llmkit.engine.scheduling import BatchRequest
from llmkit.errors import InvalidParams
from llmkit.params import MAX_SEQUENCES

log = logging.getLogger("llmkit.server")


class BatchContext:
    """A llama.cpp context over `llm`'s loaded model with `rows` sequences of `per_row` tokens each, set up as
    `llm`'s own context otherwise (threads, batch sizes, sliding-window cache), so a prompt evaluates the same."""

    def __init__(self, llm: Any, rows: int, per_row: int, *, flash_attn: bool = False):
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = rows
        params.n_ctx = rows * per_row
        params.kv_unified = False  # one KV stream per row: see the module docstring (exactness)
        params.flash_attn_type = 1 if flash_attn else 0  # off as in `llm` unless asked: see the module docstring
        params.n_batch = max(params.n_batch, rows)  # a decode step holds a token per row
        params.n_ubatch = max(params.n_ubatch, rows)
        self._api = llama_cpp
        self.rows, self.per_row = rows, per_row
        self.n_batch = int(llm.n_batch)  # a prompt's chunk, as Llama.eval cuts it
        self.vocab = int(llm.n_vocab())
        self._context = LlamaContext(model=llm._model, params=params, verbose=False)
        self.ctx = self._context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, rows), 0, 1)  # reused by every decode
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)  # the context frees itself the same way

    def decode(self, tokens: list[int], positions: list[int], seqs: list[int], logits: list[bool]) -> torch.Tensor:
        """One llama_decode of these tokens (at most n_batch); the logits of those flagged, [flagged, vocab]."""
        batch, count = self._batch, len(tokens)
        for i in range(count):
            batch.token[i] = tokens[i]
            batch.pos[i] = positions[i]
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seqs[i]
            batch.logits[i] = logits[i]
        batch.n_tokens = count
        code = self._api.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        wanted = sum(logits)
        pointer = self._api.llama_get_logits(self.ctx)
        import numpy as np

        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(wanted, self.vocab)).copy())

    def evaluate(self, ids: list[int], seq: int, start: int) -> torch.Tensor:
        """Evaluate ids (the tokens at positions start, start + 1, ...) into sequence `seq`, in chunks of n_batch as
        Llama.eval does; the last token's logits [1, vocab]."""
        logits = None
        for first in range(0, len(ids), self.n_batch):
            chunk = ids[first : first + self.n_batch]
            last = first + len(chunk) == len(ids)
            flags = [last and i == len(chunk) - 1 for i in range(len(chunk))]
            positions = list(range(start + first, start + first + len(chunk)))
            logits = self.decode(chunk, positions, [seq] * len(chunk), flags)
        assert logits is not None  # ids is never empty
        return logits

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence `seq`'s tokens from position `start` on."""
        self._api.llama_memory_seq_rm(self.memory, seq, start, -1)

    def copy(self, source: int, target: int) -> None:
        """Sequence `target` holds what `source` holds (n > 1: the prompt, evaluated once). Through a saved state:
        llama_memory_seq_cp between streams copies the whole stream at the next llama_decode, after a state loaded
        into `target` meanwhile (a newcomer's prefix, if the request failed at once) and over it."""
        self.load(self.save(source), target)

    def clear(self) -> None:
        self._api.llama_memory_clear(self.memory, True)

    def save(self, seq: int) -> bytes:
        """Sequence `seq`'s KV, as llama.cpp serializes it."""
        size = self._api.llama_state_seq_get_size(self.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = self._api.llama_state_seq_get_data(self.ctx, buffer, size, seq)
        return bytes(buffer)[:written]

    def load(self, state: bytes, seq: int) -> None:
        """Replace sequence `seq` with a saved state."""
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not self._api.llama_state_seq_set_data(self.ctx, buffer, len(state), seq):
            raise RuntimeError("llama.cpp could not load a saved prefix state")


class LlamaCppBatchScheduler(RowScheduler):
    """Continuous batching over the llama.cpp engine: a row per context sequence; see the module docstring."""

    def __init__(self, engine: Any, *, flash_attn: bool = False, **options: Any):
        """options: RowScheduler's (max_batch_size, max_queue, step_delay_s, on_step, prefix_cache). flash_attn: the
        decode runs llama.cpp's flash attention (faster, but a row's text may then depend on its batch-mates)."""
        super().__init__(engine, device=torch.device("cpu"), **options)
        # A request bigger than the batch runs alone (RowScheduler._admit), so there are sequences for its n too.
        rows = max(self.max_batch_size, MAX_SEQUENCES)
        per_row = int(engine.llm.n_ctx())  # what the engine's own context holds (llmkit serve checks the model's)
        self.context = BatchContext(engine.llm, rows, per_row, flash_attn=flash_attn)
        log.info(
            "llama.cpp batch context: %d sequences of %d tokens%s",
            rows,
            per_row,
            ", flash attention on (--flash-attn)" if flash_attn else "",
        )
        self._free = list(range(rows))  # a heap of the sequence ids no row holds: a newcomer takes the lowest
        # Per running row, in _active's row order (touched only by the loop thread):
        self._seqs: list[int] = []  # its sequence in the context
        self._positions: list[int] = []  # tokens its sequence holds: the position of the next one fed
        self._pending: list[int] = []  # its last sampled token, not yet fed

    def _prefill(self, newcomers: list[BatchRequest]) -> None:
        """Evaluate each newcomer's prompt (after what the prefix cache has of it) in its first row's sequence, copy
        it to its other rows, sample every row's first token, and add the rows to the running batch."""
        started = time.perf_counter()
        actives = [active for active in (self._activate_alone(r, started) for r in newcomers) if active is not None]
        newcomers[:] = [a.request for a in actives]  # a failure from here on is the batch's, told to these
        if not actives:
            return
        firsts: list[torch.Tensor] = []
        for active in actives:
            active.seq_ids = [heapq.heappop(self._free) for _ in range(active.request.rows)]
            self._seqs += active.seq_ids  # from here on, _clear_rows / _drop_rows give them back
            self._positions += [len(active.request.prompt_ids)] * active.request.rows
            self._pending += [self._pad_id] * active.request.rows
            self._active.append(active)
            try:
                needed = len(active.request.prompt_ids) + active.request.params.max_new_tokens
                if needed > self.context.per_row:  # llmkit serve refuses it before; a row must never overflow
                    raise InvalidParams(
                        f"prompt plus max_new_tokens ({needed} tokens) exceeds the {self.context.per_row} tokens "
                        "of a sequence; shorten the prompt or lower max_new_tokens",
                        field="max_new_tokens",
                    )
                logits = self._evaluate_prompt(active)
                for seq in active.seq_ids[1:]:
                    self.context.copy(active.seq_ids[0], seq)
            except Exception as exc:  # its prompt alone: it fails, its rows leave at _dispatch, the others go on
                self._fail_one(active, exc)
                logits = torch.zeros((1, self.context.vocab))
            firsts.append(logits.expand(active.request.rows, -1))
        logits = torch.cat(firsts)
        tokens = self._sample(actives, logits)
        scores = self._score(actives, logits, tokens)
        first_row = len(self._pending) - logits.shape[0]
        self._pending[first_row:] = tokens.tolist()
        if self.on_step:
            self.on_step("prefill", logits.shape[0], time.perf_counter() - started)
        self._dispatch(tokens, actives, scores)

    def _evaluate_prompt(self, active: _Active) -> torch.Tensor:
        """The prompt's last logits [1, vocab], its KV in the request's first sequence; the prefix cache's best entry
        is restored there first, and the prompt's state kept once evaluated."""
        from llmkit.engine.llamacpp import same_batches

        ids, seq = active.request.prompt_ids, active.seq_ids[0]
        reused = 0
        cache = self.prefix_cache
        if cache is not None:
            entry, reused = cache.lookup(ids)
            if entry is not None:
                reused = same_batches(reused, len(ids), self.context.n_batch)
                self.context.load(entry.payload, seq)
                self.context.forget(seq, reused)
            cache.record(len(ids), reused)
        active.cached = reused
        logits = self.context.evaluate(ids[reused:], seq, reused)
        if cache is not None and cache.worth_storing(ids):
            try:
                state = self.context.save(seq)
                cache.store(ids, state, len(state))
            except Exception:  # MemoryError included: the cache loses an entry, nothing more
                log.warning("could not keep a prefix in the prefix cache", exc_info=True)
        return logits

    def _decode(self) -> None:
        started = time.perf_counter()
        guides = self._guides(self._active)
        if any(guides):  # the constrained rows' masks are computed on a thread while llama.cpp runs
            self._mask_computer().start(guides)
        rows = len(self._seqs)
        # In sequence order: llama.cpp computes a run of consecutive sequence ids in one pass over the weights and
        # starts another pass at every gap or step back (a step of 16 rows took 1.4x as long in a shuffled order,
        # 1.7x with every other id), which is also why newcomers take the lowest free ids.
        order = sorted(range(rows), key=self._seqs.__getitem__)
        logits = self.context.decode(
            [self._pending[i] for i in order], [self._positions[i] for i in order], sorted(self._seqs), [True] * rows
        )
        if order != list(range(rows)):
            back = torch.empty(rows, dtype=torch.long)
            back[torch.tensor(order)] = torch.arange(rows)
            logits = logits.index_select(0, back)
        self._positions = [position + 1 for position in self._positions]
        tokens = self._sample(self._active, logits)
        scores = self._score(self._active, logits, tokens)
        self._pending = tokens.tolist()
        if self.on_step:
            self.on_step("decode", rows, time.perf_counter() - started)
        self._dispatch(tokens, list(self._active), scores)

    def _drop_rows(self, keep_rows: list[bool]) -> None:
        for seq, keep in zip(self._seqs, keep_rows):
            if not keep:
                self.context.forget(seq)
                heapq.heappush(self._free, seq)
        self._seqs = [s for s, k in zip(self._seqs, keep_rows) if k]
        self._positions = [p for p, k in zip(self._positions, keep_rows) if k]
        self._pending = [t for t, k in zip(self._pending, keep_rows) if k]

    def _clear_rows(self) -> None:
        self.context.clear()
        self._free = list(range(self.context.rows))
        self._seqs, self._positions, self._pending = [], [], []
