"""Device and dtype names: checked without torch, resolved with it.

`auto` picks CUDA (bfloat16) when present, then Apple MPS (float16), else the CPU
(float32).
"""

from __future__ import annotations

import re

from llmkit.errors import InvalidParams

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_device(name: str) -> str:
    if not DEVICE_PATTERN.match(name):
        raise InvalidParams(f"device must be auto, cpu, cuda, cuda:N or mps (got {name!r})", field="device")
    return name


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise InvalidParams(f"dtype must be one of {', '.join(DTYPES)} (got {name!r})", field="dtype")
    return name


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
            raise InvalidParams("device cuda was asked for but torch sees no CUDA GPU; use --device cpu",
                                field="device")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InvalidParams(f"device {name} does not exist (this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s))", field="device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidParams("device mps was asked for but is not available; use --device cpu", field="device")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    check_dtype(name)
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.float32
    return getattr(torch, name)
