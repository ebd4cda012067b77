"""A lean one-token decode step for Llama-family models: transformers' own arithmetic, less around it.

Why: at one token per step a small model's time is not all in its weights. transformers' forward builds a causal
mask, position ids and output records on every step, goes through four module wrappers per layer, and grows its
KV cache by concatenation (every cached key and value copied again on every step, so a long generation pays
more per token). This step calls the same modules and ops on the same values in the same order, and writes each
new key and value into a buffer sized for the whole generation, attention reading a view of it. Figures:
docs/performance.md (benchmarks/generate_speed.py, configuration `forward` beside `default`).

What stays the same: every number; tests/test_decode_step.py compares each step's logits with transformers'
forward bit for bit, in float32, bfloat16 and int8. (Fusing q/k/v and gate/up into one product each was measured
too: about 3% more here, but the fused copy of weights that transformers maps from the file added 280 MB of
resident memory on SmolLM2, and this machine's float32 kernel gives other bits for differently aligned weights.)

Used by the engine's own decode loop (generate, explore, monitor, compare, chat turns) for the steps after the
prompt, and by the server's batcher for its decode steps (`step_batch`: rows of their own lengths, left-padded,
with transformers' padding and sliding-window masks; the cache is the batcher's, which pads, merges and trims it
between steps, grown into spare columns) and for its mixed steps (`step_mixed`: newcomers' prompts in the same
pass). LLMKIT_DECODE_STEP=forward turns all of them off (every step through transformers' forward).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

DECODE_STEP_ENV = "LLMKIT_DECODE_STEP"  # "forward": every step through transformers' forward
SUPPORTED_MODEL_TYPES = ("llama", "gemma3_text")  # the architectures it reproduces (tested bit for bit)


def lean_decoder_for(model: Any) -> tuple[LeanDecoder | None, dict[str, str]]:
    """(a LeanDecoder for `model` or None, the choices it makes for EngineInfo.choices: decode_step, and kv_cache
    where it changes it)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    forward = "transformers' forward"
    if os.environ.get(DECODE_STEP_ENV, "auto") == "forward":
        return None, {"decode_step": f"{forward} ({DECODE_STEP_ENV}=forward)"}
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        return None, {"decode_step": f"{forward} (the lean step is for {supported}, not {model_type})"}
    attention = getattr(config, "_attn_implementation", "sdpa")
    if attention != "sdpa":
        return None, {"decode_step": f"{forward} (attention {attention}; the lean step reproduces sdpa)"}
    if getattr(config, "pretraining_tp", 1) != 1:
        return None, {"decode_step": f"{forward} (pretraining_tp {config.pretraining_tp})"}
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "attn_logit_softcapping", None):
        return None, {"decode_step": f"{forward} (bidirectional or soft-capped attention)"}
    return LeanDecoder(model), {
        "decode_step": f"llmkit's one-token step ({model_type}): transformers' ops without its per-step overhead",
        "kv_cache": "written in place into buffers sized for the generation (transformers' dynamic cache for the "
        "prompt and for the server's batches)",
    }


class LeanDecoder:
    """The step for one loaded model; `begin` starts one generation's run of it.

    Llama: norm, attention, residual; norm, MLP, residual. Gemma 3 adds a norm after attention and around the MLP
    ("sandwich"), normalizes q and k per head, has its own rotary table per layer type, and sliding-window layers
    that attend to the last `sliding_window` tokens only (what its own cache holds for them)."""

    def __init__(self, model: Any):
        self.model = model
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = list(model.model.layers[: config.num_hidden_layers])
        self.layer_types: list[str | None] = list(getattr(config, "layer_types", None) or [None] * len(self.layers))
        self.windows = [getattr(block.self_attn, "sliding_window", None) for block in self.layers]
        self.sandwich = hasattr(self.layers[0], "pre_feedforward_layernorm")
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def begin(self, cache: Any, capacity: int) -> LeanRun:
        """A run that continues from the cache's KV (every row at the same length), room for `capacity` tokens."""
        return LeanRun(self, cache, capacity)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str | None, tuple[Any, Any]]:
        """(cos, sin) for each layer type, shaped to broadcast over heads."""
        tables = {}
        for layer_type in set(self.layer_types):
            if layer_type is None:
                cos, sin = self.model.model.rotary_emb(hidden, position_ids=position_ids)
            else:
                cos, sin = self.model.model.rotary_emb(hidden, position_ids, layer_type)
            tables[layer_type] = (cos.unsqueeze(1), sin.unsqueeze(1))
        return tables

    def run_layers(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, attend: Any, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (rows, vocab) for one token per row at `position_ids` ((1, 1) or (rows, 1)); `attend(index,
        attention module, q, k, v)` stores the layer's new key and value and returns sdpa's output for q. `keep`:
        the rows whose logits are wanted (all when None), the others only feed the cache."""
        model = self.model
        hidden = model.model.embed_tokens(tokens)
        tables = self.rotary(hidden, position_ids)
        rows = tokens.shape[0]
        head_dim = self.head_dim
        half = head_dim // 2
        for index, block in enumerate(self.layers):
            attention = block.self_attn
            cos, sin = tables[self.layer_types[index]]
            residual = hidden
            hidden = block.input_layernorm(hidden)
            q = attention.q_proj(hidden).view(rows, 1, -1, head_dim).transpose(1, 2)
            k = attention.k_proj(hidden).view(rows, 1, -1, head_dim).transpose(1, 2)
            v = attention.v_proj(hidden).view(rows, 1, -1, head_dim).transpose(1, 2)
            if self.qk_norm:
                q, k = attention.q_norm(q), attention.k_norm(k)
            q = (q * cos) + (torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin)
            k = (k * cos) + (torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin)
            out = attend(index, attention, q, k, v)
            hidden = attention.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            if self.sandwich:
                hidden = block.post_attention_layernorm(hidden)
                hidden = residual + hidden
                residual = hidden
                hidden = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(hidden)))
            else:
                hidden = residual + hidden
                residual = hidden
                hidden = block.mlp(block.post_attention_layernorm(hidden))
            hidden = residual + hidden
        if keep is not None:
            hidden = hidden.index_select(0, keep)
        logits = model.lm_head(model.model.norm(hidden))[:, -1, :]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def takes_batch(self, cache: Any, attention_mask: torch.Tensor) -> bool:
        """Whether `cache` is the server's kind (a full-length layer for every layer: no sliding-window layer
        keeping only its window) and `attention_mask` covers it plus one new column."""
        layers = getattr(cache, "layers", None)
        return (
            layers is not None
            and len(layers) == len(self.layers)
            and not any(getattr(layer, "is_sliding", False) for layer in layers)
            and cache.get_seq_length() + 1 == attention_mask.shape[1]
        )

    def step_batch(
        self, tokens: torch.Tensor, cache: Any, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The server's batched step: logits (rows, vocab) for `tokens` (rows, 1) at `position_ids` (rows, 1), rows
        left-padded to one length in a config-less DynamicCache (every layer full length) that grows by one column
        (_append), `attention_mask` (rows, cached + 1) marking the real tokens."""
        return self.run_layers(tokens, position_ids, self._batch_attention(cache, attention_mask))

    def step_mixed(
        self,
        tokens: torch.Tensor,
        cache: Any,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_cache: Any,
        prompt_mask: torch.Tensor,
        prompt_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """step_batch for the running rows and the prefill of newcomers' prompts in one pass: (the running rows'
        logits, the last prompt position's logits per newcomer row).

        Why: a small model's pass over a few dozen tokens costs little more than over one token per row (the
        weights are read once), so newcomers no longer stop the running rows for a pass of their own; llama-server
        schedules its batches the same way. The tokens of both go through the layers' products together, one row
        each; only attention is per part: the running rows' as in step_batch, the prompts' over `prompt_cache` (a
        config-less DynamicCache, empty or holding a restored prefix) with transformers' causal, padding and
        sliding-window masks. `prompt_ids` / `prompt_positions` (newcomers, S) left-padded; `prompt_mask`
        (newcomers, cached + S). Both caches grow by the new tokens' keys and values."""
        rows = tokens.shape[0]
        newcomers, width = prompt_ids.shape
        decode_attention = self._batch_attention(cache, attention_mask)
        prompt_masks = self._prompt_masks(prompt_mask, width)

        def attend(index: int, attention: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            running = decode_attention(index, attention, q[:rows], k[:rows], v[:rows])
            heads, head_dim = q.shape[1], q.shape[3]
            q_prompt = q[rows:].reshape(newcomers, width, heads, head_dim).transpose(1, 2)
            k_prompt = k[rows:].reshape(newcomers, width, -1, head_dim).transpose(1, 2)
            v_prompt = v[rows:].reshape(newcomers, width, -1, head_dim).transpose(1, 2)
            keys, values = prompt_cache.update(k_prompt, v_prompt, index)
            out = F.scaled_dot_product_attention(
                q_prompt,
                keys,
                values,
                attn_mask=prompt_masks[self.windows[index]],
                scale=attention.scaling,
                enable_gqa=heads != keys.shape[1],
            )
            prompts = out.transpose(1, 2).reshape(newcomers * width, heads, 1, head_dim)
            return torch.cat([running, prompts])

        packed_tokens = torch.cat([tokens, prompt_ids.reshape(-1, 1)])
        packed_positions = torch.cat([position_ids, prompt_positions.reshape(-1, 1)])
        last = rows + torch.arange(1, newcomers + 1, device=tokens.device) * width - 1  # each prompt's last token
        keep = torch.cat([torch.arange(rows, device=tokens.device), last])
        logits = self.run_layers(packed_tokens, packed_positions, attend, keep)
        return logits[:rows], logits[rows:]

    def _batch_attention(self, cache: Any, attention_mask: torch.Tensor) -> Any:
        """step_batch's `attend`. The masks are transformers' own for one query token: none while no row is padded
        (and a sliding window still holds every key), else the padding, and for sliding-window layers the window,
        by cache column."""
        length = attention_mask.shape[1]
        padding = attention_mask.bool()
        unpadded = bool(padding.all())
        columns = torch.arange(length, device=attention_mask.device)
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(self.windows):
            if unpadded and (window is None or length < window):
                masks[window] = None
            else:
                keep = padding if window is None else padding & (columns > length - 1 - window)
                masks[window] = keep[:, None, None, :]

        def attend(index: int, attention: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer = cache.layers[index]
            _append(layer, k, v)
            mask = masks[self.windows[index]]
            if mask is None:
                return F.scaled_dot_product_attention(
                    q, layer.keys, layer.values, scale=attention.scaling, enable_gqa=q.shape[1] != k.shape[1]
                )
            return _packed_attention(attention, q, layer.keys, layer.values, mask)

        return attend

    def _prompt_masks(self, prompt_mask: torch.Tensor, width: int) -> dict[int | None, torch.Tensor]:
        """Per window size, which keys each prompt position sees (newcomers, 1, width, columns): the real ones at
        or before it, within the window, as transformers masks a left-padded prefill by cache column. A padding
        position sees itself only (its output is never used; a row of nothing would be NaN, and NaN values
        poison the real rows' attention even where masked)."""
        columns = prompt_mask.shape[1]
        key = torch.arange(columns, device=prompt_mask.device)
        query = key[columns - width :, None]
        real = prompt_mask.bool()[:, None, None, :]
        masks: dict[int | None, torch.Tensor] = {}
        for window in set(self.windows):
            seen = key <= query if window is None else (key <= query) & (key > query - window)
            masks[window] = (real & seen) | (key == query)
        return masks


class LeanRun:
    """One generation's KV buffers; `step` feeds one token per row, `end` hands the KV back to the transformers
    cache it came from (views of the buffers), so a chat session goes on with it.

    Every layer's buffer is indexed by position; a sliding-window layer of the model's own cache holds only its
    last tokens, which land at their positions (earlier ones are never read again)."""

    def __init__(self, decoder: LeanDecoder, cache: Any, capacity: int):
        self.decoder = decoder
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = cache.get_seq_length()
        # which layers the cache keeps to their window (the model's own cache) rather than whole (a session's)
        self.window_held = [getattr(layer, "is_sliding", False) for layer in cache.layers]
        for layer in cache.layers:
            keys, values = layer.keys, layer.values
            shape = (*keys.shape[:2], capacity, keys.shape[3])
            self.keys.append(keys.new_empty(shape))
            self.values.append(values.new_empty(shape))
            held = keys.shape[2]
            self.keys[-1][:, :, self.length - held : self.length] = keys
            self.values[-1][:, :, self.length - held : self.length] = values

    def end(self, cache: Any) -> None:
        length = self.length
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            start = 0
            if getattr(layer, "is_sliding", False):  # it keeps the last window - 1 tokens (DynamicSlidingWindowLayer)
                start = max(0, length - layer.sliding_window + 1)
                layer.cumulative_length = length
            layer.keys, layer.values = keys[:, :, start:length], values[:, :, start:length]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) for `tokens` (rows, 1), each at the next position; writes their KV."""
        decoder = self.decoder
        position = self.length
        if position >= self.keys[0].shape[2]:
            raise RuntimeError(f"the KV buffers hold {position} tokens, all they were sized for")
        position_ids = torch.full((1, 1), position, dtype=torch.long, device=tokens.device)
        rows = tokens.shape[0]

        def attend(index: int, attention: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.keys[index], self.values[index]
            keys[:, :, position : position + 1] = k
            values[:, :, position : position + 1] = v
            window = decoder.windows[index]
            if window is None or position + 1 < window:  # transformers skips the mask while the window holds all
                return F.scaled_dot_product_attention(
                    q,
                    keys[:, :, : position + 1],
                    values[:, :, : position + 1],
                    scale=attention.scaling,
                    enable_gqa=q.shape[1] != k.shape[1],
                )
            # as transformers runs it then: q packed per KV head, a mask that keeps the window's keys
            start = max(0, position + 1 - window)
            first = start if self.window_held[index] else 0  # a full-length cache layer is masked instead
            mask = torch.arange(first, position + 1, device=q.device) >= start
            return _packed_attention(
                attention,
                q,
                keys[:, :, first : position + 1],
                values[:, :, first : position + 1],
                mask.expand(rows, 1, 1, -1),
            )

        logits = decoder.run_layers(tokens, position_ids, attend)
        self.length = position + 1
        return logits


BATCH_KV_HEADROOM = 32  # columns a batch's key and value buffers are allocated ahead (docs/performance.md)


def _append(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put one new column of keys and values (rows, heads, 1, head_dim) after a batch cache layer's last.

    Why not torch.cat: that copies every cached key and value on every step (a seventh of a 16-row step of
    SmolLM2). Here the copy goes into buffers with BATCH_KV_HEADROOM spare columns, kept on the layer, and later
    steps write into them and set the layer's tensors to longer views of them, until they are full or the batcher
    replaces the tensors (it merges and drops rows by making new ones; a view it trims leading columns off stays
    in the buffer and keeps its spare columns)."""
    buffers = getattr(layer, "llmkit_kv_buffers", (None, None))
    layer.keys, key_buffer = _grown(layer.keys, keys, buffers[0])
    layer.values, value_buffer = _grown(layer.values, values, buffers[1])
    layer.llmkit_kv_buffers = (key_buffer, value_buffer)


def _grown(held: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`held` with `new` after its last column, the buffer that is a view of): in place when `held` is a view of
    `buffer` with a spare column after it, else copied into a new buffer."""
    rows, heads, columns, head_dim = held.shape
    if (
        buffer is not None
        and held.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        and held.stride() == buffer.stride()
        and held.shape[:2] == buffer.shape[:2]
    ):
        start, within = divmod(int(held.storage_offset()) - int(buffer.storage_offset()), head_dim)
        if within == 0 and 0 <= start and start + columns < buffer.shape[2]:
            grown = buffer[:, :, start : start + columns + 1]
            grown[:, :, columns:] = new
            return grown, buffer
    buffer = held.new_empty((rows, heads, columns + 1 + BATCH_KV_HEADROOM, head_dim))
    buffer[:, :, :columns] = held
    buffer[:, :, columns : columns + 1] = new
    return buffer[:, :, : columns + 1], buffer


def _packed_attention(attention: Any, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """sdpa with a mask, as transformers runs it for one query token: q packed per KV head (no repeated keys)."""
    rows, heads, _, head_dim = q.shape
    out = F.scaled_dot_product_attention(
        q.reshape(rows, keys.shape[1], -1, head_dim), keys, values, attn_mask=mask, scale=attention.scaling
    )
    return out.reshape(rows, heads, 1, head_dim)
