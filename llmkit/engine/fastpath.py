"""CPU decode speed: which matmul kernel small steps use, and int8, bfloat16 and float16 weight-only layers.

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

float16 weight-only (`--quantize fp16`, what `auto` picks for serve's batches of more than
`BF16_GEMV_MAX_ROWS` rows when torch's fbgemm runs: x86 with AVX2): the weights are packed as float16 for
fbgemm's GEMM, which converts them to float32 in registers and multiplies float32 activations, accumulating
in float32. Faster than both at every row count, and float16 keeps 3 more bits of each weight than bfloat16
(SmolLM2's and Gemma 3's 64 greedy tokens equal float32's, against 6 and 45 of 64 with bf16). The same 211
layers on a quieter day, ms: rows 1: float32 59, bf16 26, fp16 21; rows 4: 126 / 67 / 26; rows 16: 113 /
235 / 45; rows 64: 201 / 254 / 138; a 512-row prompt runs at float32's speed. What it costs: fbgemm packs
the inner dimension in blocks of 512, so 576 or 640 inputs (SmolLM2's, Gemma 3's) take the room of 1024,
and a head tied to the embedding needs its own packed copy: Gemma 3 holds 1,700 MiB after load against 1,112
with bf16 (float32: 1,660 during inference); and packing takes about 80 M weights/s per thread (load 0.6 s
longer on SmolLM2, 2.0 s on Gemma 3). Hence bf16 for one sequence at a time, fp16 for batches.
"""

from __future__ import annotations

import contextlib
import functools
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
        model.set_submodule(name, Int8WeightOnlyLinear(linear))
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


class CompactEmbedding(torch.nn.Module):
    """An input embedding kept in a 16-bit type (bfloat16 or float16) that returns float32 rows, scaled as the
    original scales them.

    Made only for nn.Embedding itself and for the scaled embeddings of Gemma-style models (an `embed_scale`
    multiplied in after the lookup); other embedding classes are left as they are."""

    table: torch.Tensor

    def __init__(self, embedding: torch.nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("table", embedding.weight.detach().to(dtype))
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
        rows = F.embedding(ids, self.table, self.padding_idx).to(self.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        kind = str(self.table.dtype).removeprefix("torch.")
        return f"{self.num_embeddings}, {self.embedding_dim}, {kind} weight-only"


def quantize_bf16(model: torch.nn.Module) -> int:
    """Keep every nn.Linear's weight (and the input embedding's, where supported) in bfloat16, in place;
    returns how many Linear layers were replaced. Activations stay in the model's float32."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    shared: torch.Tensor | None = None
    replacement = _compact_embedding(model, torch.bfloat16)
    if replacement is not None:
        shared = replacement.table
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, linear in targets:
        tied = shared is not None and linear.weight is embedding.weight
        model.set_submodule(name, Bf16WeightLinear(linear, shared if tied else None))
    _copy_out_of_the_checkpoint(model)
    return len(targets)


FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504; fbgemm saturates weights beyond it


@functools.cache
def fp16_weights_supported() -> bool:
    """Whether torch's fbgemm float16-weight kernel runs here (x86 builds on CPUs with AVX2; not on ARM)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 3), None)
        out = torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 3), packed)
    except (RuntimeError, AttributeError):
        return False
    return torch.equal(out, torch.full((1, 2), 3.0))


FP16_PACK_ROWS = 8192  # output rows per packed block: a large head packs in pieces, in parallel, with a small scratch


def _pack_fp16(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """fbgemm's packed float16 copy of a float32 weight block. Rounded to float16 here first: the same bits,
    and fbgemm's own per-element conversion is 1.4x slower. Releases the GIL, so blocks pack on several threads."""
    rounded = weight.to(torch.float16).to(torch.float32)
    return torch.ops.quantized.linear_prepack_fp16(rounded, None if bias is None else bias.to(torch.float32).clone())


class Fp16WeightLinear(torch.nn.Module):
    """A Linear whose weight is float16, packed for fbgemm's kernel (in blocks of FP16_PACK_ROWS output rows),
    while activations, the bias and the accumulation stay float32 (each weight becomes float32 in registers)."""

    def __init__(self, linear: torch.nn.Linear, blocks: list[torch.ScriptObject] | None = None):
        super().__init__()
        # `blocks`: already packed by quantize_fp16's threads, in row order
        self.blocks = blocks if blocks is not None else [_pack_fp16(*job) for job in self.pack_jobs(linear)]
        self.kernel = torch.ops.quantized.linear_dynamic_fp16.default  # the overload itself: no dispatch on arguments
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def pack_jobs(linear: torch.nn.Linear) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight rows, bias rows) of each block to pack."""
        weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        return [
            (weight[start : start + FP16_PACK_ROWS], None if bias is None else bias[start : start + FP16_PACK_ROWS])
            for start in range(0, linear.out_features, FP16_PACK_ROWS)
        ]

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        """Whether every weight is within float16's range (fbgemm would clamp the others)."""
        low, high = torch.aminmax(linear.weight.detach())
        return bool(-low <= FLOAT16_MAX and high <= FLOAT16_MAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as little as possible around the kernel: at one row per step this wrapper's own time adds up over
        # 200 layers (the kernel takes any leading dimensions and strides itself)
        rows = x if x.dtype == torch.float32 else x.to(torch.float32)
        if len(self.blocks) == 1:
            out = self.kernel(rows, self.blocks[0])
        else:
            out = torch.cat([self.kernel(rows, block) for block in self.blocks], dim=-1)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 weight-only (fbgemm)"


def quantize_fp16(model: torch.nn.Module) -> int:
    """Keep every nn.Linear's weight in float16 for fbgemm (and the input embedding in float16, where
    supported), in place; returns how many Linear layers were replaced. A layer with a weight beyond
    float16's range stays float32. A head tied to the embedding gets its own packed copy (fbgemm's layout
    cannot serve a lookup). The blocks pack on torch's thread count (the packing is most of the conversion's
    time)."""
    from concurrent.futures import ThreadPoolExecutor

    _compact_embedding(model, torch.float16)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and Fp16WeightLinear.fits(module)
    ]
    jobs = [(name, job) for name, linear in targets for job in Fp16WeightLinear.pack_jobs(linear)]
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        packed = list(pool.map(lambda named_job: _pack_fp16(*named_job[1]), jobs))
    blocks: dict[str, list[torch.ScriptObject]] = {}
    for (name, _), block in zip(jobs, packed):
        blocks.setdefault(name, []).append(block)
    for name, linear in targets:
        model.set_submodule(name, Fp16WeightLinear(linear, blocks[name]))
    _copy_out_of_the_checkpoint(model)
    _return_freed_memory()
    return len(targets)


def _return_freed_memory() -> None:
    """Hand the heap the conversion freed back to the system (glibc keeps it otherwise: the packing's float32
    scratch left Gemma 3 at 2,253 MiB resident instead of 1,700). Nothing where malloc_trim is missing."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _copy_out_of_the_checkpoint(model: torch.nn.Module) -> None:
    """Copy the float32 tensors left (norms, biases: small) into memory of their own. transformers maps a
    safetensors checkpoint into memory and its tensors point into that mapping; while any of them does, the
    whole file stays mapped, and every page the bfloat16 conversion read stays in the process's memory
    (Gemma 3 270M: 2.1 GiB resident after load instead of 1.1)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype == torch.float32:
                tensor.data = tensor.data.clone()


def _compact_embedding(model: torch.nn.Module, dtype: torch.dtype) -> CompactEmbedding | None:
    """Put the input embedding in `dtype` where its class is known and the copy returns its rows; the new one."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    if not CompactEmbedding.supports(embedding):
        return None
    replacement = CompactEmbedding(embedding, dtype)
    if not _same_rows(embedding, replacement):
        return None
    model.set_input_embeddings(replacement)  # type: ignore[operator]
    return replacement


def _same_rows(embedding: torch.nn.Module, replacement: CompactEmbedding) -> bool:
    """Whether the replacement returns the original's rows, up to its 16-bit rounding, on a sample of ids
    (a check that its forward is the lookup it is assumed to be)."""
    ids = torch.arange(0, replacement.num_embeddings, max(1, replacement.num_embeddings // 64))
    with torch.no_grad():
        expected, got = embedding(ids), replacement(ids)
    return expected.shape == got.shape and expected.dtype == got.dtype and torch.allclose(got, expected, rtol=2**-8)
