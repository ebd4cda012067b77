"""CPU decode speed: which matmul kernel small steps use, and int8 weight-only Linear layers.

Decoding one token multiplies a single row by every weight matrix, so the time goes into
reading weights (matrix-vector products), not arithmetic. Measured on a 2-core AMD EPYC
with AVX-512 BF16 (torch 2.13), the 210 Linear layers of SmolLM2-135M at bfloat16:

- rows 1: oneDNN 13.9 ms, torch's own gemv 6.1 ms; rows 2: 14.2 vs 10.4 ms;
  rows 4: 15.5 vs 18.3 ms; rows 16: 17.2 vs 72.7 ms.

So steps of at most `GEMV_MAX_ROWS` token rows run with oneDNN switched off (torch then
takes its reduced-precision gemv path); prefill and batched steps keep oneDNN. float32
is unaffected either way (MKL), so only bfloat16/float16 on the CPU use the switch.

int8 weight-only: each Linear's weight becomes int8 with one scale per output channel
(symmetric, absmax/127), multiplied by `torch.ops.aten._weight_int8pack_mm`, torch's own
CPU kernel for bfloat16 activations and int8 weights. The same layers took 4.5-5 ms
(vs 5.6-6.1 ms bf16 gemv). torchao's Int8WeightOnlyConfig was measured too: 25 tok/s vs
72 for plain bfloat16 here, because without torch.compile it de-quantizes every call.

bfloat16 weight-only (`--quantize bf16`), for CPUs without native bfloat16, where `auto` computes in
float32: the weights are kept in bfloat16 (half the bytes to read per token) and activations stay
float32. Steps of at most `BF16_GEMV_MAX_ROWS` rows cast their rows to bfloat16 and take torch's gemv
(which accumulates in float32); larger steps (prefill, batches) upcast the weight and multiply in
float32, so prompt processing keeps float32's kernel instead of oneDNN's emulated bfloat16 (5x slower
for a 512-token prompt on the AMD EPYC without AVX-512 BF16). The 211 Linear layers of SmolLM2-135M
there, in ms: rows 1: float32 87, bf16 gemv 34; rows 4: 192 vs 84; rows 16: float32 216, upcast 219,
bf16 gemv 360. The input embedding is kept in bfloat16 too (an output head tied to it shares it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from llmkit.devices import BF16_GEMV_MAX_ROWS  # rows per call at or below which bf16 weight-only takes the gemv

GEMV_MAX_ROWS = 2  # token rows per step at or below which torch's gemv beats oneDNN (measured above)


def uses_gemv_switch(device: str, dtype: torch.dtype) -> bool:
    return device == "cpu" and dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """oneDNN off for one forward pass (set directly: torch.backends.mkldnn.flags warns about TF32)."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


QUANTIZE_BLOCK_ROWS = 1024  # rows converted at a time, so the float32 scratch stays small


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bfloat16 scale per row): symmetric, scale = max |w| / 127, rounded to nearest."""
    rows = weight.shape[0]
    weight_int8 = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + QUANTIZE_BLOCK_ROWS].to(torch.float32, copy=True)  # never in place
        scale = torch.maximum(block.amax(dim=1), -block.amin(dim=1)).div_(127.0)
        scale.clamp_(min=torch.finfo(torch.float32).tiny)
        block.div_(scale[:, None]).round_().clamp_(-127, 127)
        weight_int8[start : start + QUANTIZE_BLOCK_ROWS] = block.to(torch.int8)
        scales[start : start + QUANTIZE_BLOCK_ROWS] = scale
    return weight_int8.to(weight.device), scales.to(device=weight.device, dtype=torch.bfloat16)


class Int8WeightOnlyLinear(torch.nn.Module):
    """A Linear whose weight is int8 with a per-output-channel scale; activations stay bfloat16."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight_int8, scales = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.bias = (
            None
            if linear.bias is None
            else torch.nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        )
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8(model: torch.nn.Module) -> int:
    """Replace every nn.Linear (the output head included) in place; returns how many were replaced.

    A tied output head gets its own int8 copy, so the input embeddings stay exact.
    """
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8WeightOnlyLinear(linear))
    return len(targets)


class Bf16WeightLinear(torch.nn.Module):
    """A Linear whose weight is bfloat16 while activations (and the bias) stay float32."""

    weight_bf16: torch.Tensor

    def __init__(self, linear: torch.nn.Linear, weight: torch.Tensor | None = None):
        super().__init__()
        # `weight`: an already converted tensor to share (an output head tied to the input embedding)
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16) if weight is None else weight)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= BF16_GEMV_MAX_ROWS * self.in_features:
            with onednn_off():  # torch's gemv, not oneDNN (see the module docstring)
                out = F.linear(x.to(torch.bfloat16), self.weight_bf16).to(x.dtype)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight_bf16.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16 weight-only"


class Bf16WeightEmbedding(torch.nn.Module):
    """An input embedding kept in bfloat16 that returns float32 rows, scaled as the original scales them.

    Made only for nn.Embedding itself and for the scaled embeddings of Gemma-style models (an `embed_scale`
    multiplied in after the lookup); other embedding classes are left as they are."""

    weight_bf16: torch.Tensor

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.register_buffer("weight_bf16", embedding.weight.detach().to(torch.bfloat16))
        self.padding_idx = embedding.padding_idx
        scale = getattr(embedding, "embed_scale", None)
        self.embed_scale = None if scale is None else torch.as_tensor(scale, dtype=embedding.weight.dtype)
        self.dtype = embedding.weight.dtype
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    @staticmethod
    def supports(embedding: torch.nn.Module) -> bool:
        if type(embedding) is torch.nn.Embedding:
            return True
        # Gemma's ScaledWordEmbedding: nn.Embedding's lookup times embed_scale, nothing else
        return (
            isinstance(embedding, torch.nn.Embedding)
            and type(embedding).__name__.endswith("ScaledWordEmbedding")
            and hasattr(embedding, "embed_scale")
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_bf16, self.padding_idx).to(self.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bfloat16 weight-only"


def quantize_bf16(model: torch.nn.Module) -> int:
    """Keep every nn.Linear's weight (and the input embedding's, where supported) in bfloat16, in place;
    returns how many Linear layers were replaced. Activations stay in the model's float32."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    shared: torch.Tensor | None = None
    if Bf16WeightEmbedding.supports(embedding):
        replacement = Bf16WeightEmbedding(embedding)
        if _same_rows(embedding, replacement):
            model.set_input_embeddings(replacement)  # type: ignore[operator]
            shared = replacement.weight_bf16
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        tied = shared is not None and linear.weight is embedding.weight
        setattr(parent, child, Bf16WeightLinear(linear, shared if tied else None))
    _copy_out_of_the_checkpoint(model)
    return len(targets)


def _copy_out_of_the_checkpoint(model: torch.nn.Module) -> None:
    """Copy the float32 tensors left (norms, biases: small) into memory of their own. transformers maps a
    safetensors checkpoint into memory and its tensors point into that mapping; while any of them does, the
    whole file stays mapped, and every page the bfloat16 conversion read stays in the process's memory
    (Gemma 3 270M: 2.1 GiB resident after load instead of 1.1)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype == torch.float32:
                tensor.data = tensor.data.clone()


def _same_rows(embedding: torch.nn.Module, replacement: Bf16WeightEmbedding) -> bool:
    """Whether the replacement returns the original's rows, up to bfloat16's rounding, on a sample of ids
    (a check that its forward is the lookup it is assumed to be)."""
    ids = torch.arange(0, replacement.num_embeddings, max(1, replacement.num_embeddings // 64))
    with torch.no_grad():
        expected, got = embedding(ids), replacement(ids)
    return expected.shape == got.shape and expected.dtype == got.dtype and torch.allclose(got, expected, rtol=2**-8)
