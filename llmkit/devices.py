"""Device and dtype names: checked without torch, resolved with it.

`auto` picks CUDA (bfloat16) when present, then Apple MPS (float16), else the CPU.
On the CPU `auto` means bfloat16 where the CPU computes BF16 natively (AVX512-BF16 or
AMX): measured on such a CPU, bfloat16 decodes SmolLM2-135M 2.9x faster than float32
(73 vs 25 tok/s) with torch's gemv path (see engine/fastpath.py). Elsewhere float32,
since bfloat16 there has not been measured to win. float16 is never chosen on the CPU:
it was as fast, but Gemma 3's activations overflow it (empty output).
"""

from __future__ import annotations

import os
import re

from llmkit.errors import InvalidParams

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "int8", "bf16", "fp16")
DTYPE_ENV = "LLMKIT_DTYPE"  # what `auto` means when set (e.g. float32 for bit-exact runs)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with BF16 arithmetic


def check_device(name: str) -> str:
    if not DEVICE_PATTERN.match(name):
        raise InvalidParams(f"device must be auto, cpu, cuda, cuda:N or mps (got {name!r})", field="device")
    return name


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise InvalidParams(f"dtype must be one of {', '.join(DTYPES)} (got {name!r})", field="dtype")
    return name


def check_quantize(name: str) -> str:
    if name not in QUANTIZE:
        raise InvalidParams(f"quantize must be one of {', '.join(QUANTIZE)} (got {name!r})", field="quantize")
    return name


def cpuinfo_field(name: str, cpuinfo: str | None = None) -> str | None:
    """The first `name : value` of /proc/cpuinfo (Linux; None elsewhere or when absent)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def native_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The CPU flag that makes bfloat16 fast here (Linux), or None."""
    flags = set((cpuinfo_field("flags", cpuinfo) or "").split())
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def cuda_index(name: str) -> int:
    """The GPU number of a device name: cuda -> 0, cuda:1 -> 1."""
    return int(name.partition(":")[2] or 0)


def resolve_device(name: str) -> str:
    import torch

    check_device(name)
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidParams(
                "device cuda was asked for but torch sees no CUDA GPU; use --device cpu", field="device"
            )
        index = cuda_index(name)
        if index >= torch.cuda.device_count():
            raise InvalidParams(
                f"device {name} does not exist (this machine has {torch.cuda.device_count()} CUDA device(s))",
                field="device",
            )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidParams("device mps was asked for but is not available; use --device cpu", field="device")
    return name


BF16_GEMV_MAX_ROWS = 4  # rows per call at or below which bf16 weight-only takes the gemv (engine/fastpath.py)


def quantize_asked(name: str) -> bool:
    """Whether --quantize asks for a quantization (int8, bf16, fp16), rather than leaving the weights to the engine."""
    return name not in ("auto", "none")


def choose_quantize(name: str, dtype: str, device: str, *, batch_rows: int = 1) -> tuple[str, str]:
    """(quantize, why) for a --quantize name, the --dtype name and a resolved device. `auto` keeps 16-bit weights
    where `auto` would otherwise compute in float32 for want of native bfloat16 (a CPU without
    avx512_bf16/amx_bf16), activations staying float32. One sequence at a time (`batch_rows` up to
    BF16_GEMV_MAX_ROWS): bfloat16 weights, half float32's memory, each token reading half the bytes (1.7x the
    decode speed of float32 on SmolLM2 on a 2-core AMD EPYC). Batches of more rows (`batch_rows`: serve's
    --max-batch-size): float16 weights through fbgemm where it runs (x86 with AVX2), 2.5x float32's speed at 16
    rows where bfloat16 weights would be upcast, slower than float32; without fbgemm, float32 weights."""
    check_quantize(name)
    if name != "auto":
        return name, "set by --quantize"
    if device != "cpu":
        return "none", f"auto: device {device}"
    if dtype != "auto" or os.environ.get(DTYPE_ENV, "auto") != "auto":
        return "none", f"auto: a dtype was set (--dtype or ${DTYPE_ENV})"
    flag = native_bf16_flag()
    if flag:
        return "none", f"auto: this CPU computes bfloat16 natively, flag {flag}"
    if batch_rows <= BF16_GEMV_MAX_ROWS:
        return "bf16", "auto: this CPU has no native bfloat16; bfloat16 weights halve what each token reads"
    from llmkit.engine.fastpath import fp16_weights_supported

    if fp16_weights_supported():
        return "fp16", f"auto: batches of up to {batch_rows} rows and no native bfloat16; fbgemm's float16 weights"
    return "none", f"auto: batches of more than {BF16_GEMV_MAX_ROWS} rows run faster on float32 weights"


def choose_dtype(name: str, device: str):
    """(torch dtype, why) for a dtype name on a resolved device; the why is shown in --json and monitor."""
    import torch

    check_dtype(name)
    if name == "auto" and os.environ.get(DTYPE_ENV, "auto") != "auto":
        chosen = os.environ[DTYPE_ENV]
        if chosen not in DTYPES:
            raise InvalidParams(f"{DTYPE_ENV} must be one of {', '.join(DTYPES)} (got {chosen!r})", field="dtype")
        return getattr(torch, chosen), f"{DTYPE_ENV}={chosen}"
    if name != "auto":
        return getattr(torch, name), "set by --dtype"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA with bfloat16 support"
        return torch.float16, "auto: CUDA without bfloat16 support"
    if device == "mps":
        return torch.float16, "auto: Apple MPS"
    flag = native_bf16_flag()
    if flag:
        return torch.bfloat16, f"auto: this CPU computes bfloat16 natively, flag {flag}"
    return torch.float32, "auto: this CPU has no native bfloat16 (avx512_bf16/amx_bf16)"


# --- compute threads ---------------------------------------------------------------------------

THREADS_ENV = "LLMKIT_THREADS"  # what the default means when set (e.g. 1 on a busy shared machine)
MAX_THREADS = 1024
TORCH_THREAD_ENVS = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")  # torch's own default reads these, MKL's first


def requested_threads(threads: int | None) -> tuple[int | None, str]:
    """(threads asked for, where from): --threads, else $LLMKIT_THREADS, else (None, "") for the engine's
    default. A bad value is InvalidParams (exit 2), found before anything is imported or loaded."""
    source = "set by --threads"
    if threads is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        if not raw:
            return None, ""
        try:
            threads = int(raw)
        except ValueError:
            raise InvalidParams(
                f"{THREADS_ENV} must be a whole number of threads, e.g. 1 (got {raw!r})", field="threads"
            ) from None
        source = f"{THREADS_ENV}={raw}"
    if not 1 <= threads <= MAX_THREADS:
        name = "--threads" if source == "set by --threads" else THREADS_ENV
        raise InvalidParams(f"{name} must be between 1 and {MAX_THREADS} (got {threads})", field="threads")
    return threads, source


def use_threads(threads: int | None) -> tuple[int, str]:
    """Set torch's intra-op threads when asked (--threads or $LLMKIT_THREADS); (threads that compute, why).

    torch.set_num_threads holds for the calling thread and for threads that first run torch after it;
    a thread that ran torch before keeps its count. So the engines call this on the thread that will run
    the model (serve loads on its inference thread). Not asked: torch's default, unchanged."""
    import torch

    asked, source = requested_threads(threads)
    if asked is not None:
        torch.set_num_threads(asked)
        return torch.get_num_threads(), source
    env = next((f"{name}={os.environ[name]}" for name in TORCH_THREAD_ENVS if os.environ.get(name)), None)
    why = f"torch's default, from {env}" if env else "torch's default: one per physical core"
    return torch.get_num_threads(), why
