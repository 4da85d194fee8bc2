"""Devices and dtypes as almak's commands name them (``auto``, ``cuda:1``, ``bfloat16``)."""

from __future__ import annotations

import torch

from almak.errors import AlmakError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is fp32 on the CPU (fast there and exact) and fp16 on accelerators (as ALMA runs)."""
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise AlmakError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AlmakError(f"unknown device {device!r} (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlmakError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return dev
