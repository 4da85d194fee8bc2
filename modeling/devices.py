"""Devices and dtypes as almak's commands name them (``auto``, ``cuda:1``, ``bfloat16``)."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

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


@functools.cache
def cpu_bf16_support() -> str | None:
    """The CPU feature that gives this machine native bfloat16 arithmetic, or None: ``amx_bf16`` or
    ``avx512_bf16`` (x86, from /proc/cpuinfo's flags), ``bf16`` (Arm: Linux's Features, macOS's FEAT_BF16).
    Without one, PyTorch emulates bfloat16 through float32 and runs it slower than float32."""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return "bf16" if out == "1" else None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return next((f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags), None)


def inference_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(dtype, why) for translation and evaluation: ``auto`` is bfloat16 on a CPU with native bfloat16
    arithmetic (:func:`cpu_bf16_support`), float32 on other CPUs, float16 on GPUs; other values stay."""
    if dtype != "auto":
        return dtype, "asked for"
    if torch.device(device).type != "cpu":
        return "float16", "auto on a GPU"
    feature = cpu_bf16_support()
    if feature:
        return "bfloat16", f"auto: this CPU has {feature}"
    return "float32", "auto: this CPU has no native bfloat16"


@functools.cache
def _libc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Hand the C heap's freed memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). PyTorch's CPU
    temporaries of a few MB come from the heap, which keeps them after they are freed: while a model is built
    projection by projection, that retention grows the process by hundreds of MB over the model it holds."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AlmakError(f"unknown device {device!r} (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlmakError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return dev


def peak_memory(device: str | torch.device) -> tuple[int, str]:
    """(bytes, what was measured) of this process's peak so far: CUDA's max allocated on a GPU (since its last
    ``torch.cuda.reset_peak_memory_stats``), the max RSS on the CPU."""
    import resource

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def describe_memory(peak: tuple[int, str]) -> str:
    """``1344 MiB (cpu max rss)``, as the commands print :func:`peak_memory`."""
    size, kind = peak
    return f"{size / 2**20:.0f} MiB ({'cuda' if kind.startswith('cuda') else 'cpu max rss'})"


def calibration_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """Where calibration runs and the model's dtype, ``auto`` resolved: cuda if torch sees one; float32 on the CPU,
    float16 on a GPU (quantization scales are stored in this dtype)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if torch.device(device).type == "cpu" else "float16"
    return device, dtype


def training_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """Where training runs and in which dtype, ``auto`` resolved: cuda if torch sees one; bfloat16 on a GPU that has
    it, float32 otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype
