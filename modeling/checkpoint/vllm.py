"""What vLLM will not run of a checkpoint almak writes, read from vLLM's compressed-tensors code."""

from __future__ import annotations

import torch
import torch.nn as nn

from almak.modeling.checkpoint.common import quant_layers, scheme_key, sparse_layers


def vllm_limits(model: nn.Module, sparse_format: str = "dense") -> list[str]:
    """What in ``model``'s compressed layers vLLM's kernels will not run as almak wrote it (``sparse_format``: how
    its 2:4 layers are stored), read from vLLM's compressed-tensors code: empty when nothing stands out."""
    notes = []
    if sparse_layers(model) and sparse_format == "dense":
        notes.append("vLLM runs the 2:4 layers as dense weights (it has no 2:4 kernels for them)")
    elif sparse_layers(model):
        notes.append("current vLLM does not load 2:4 (sparse) compressed-tensors checkpoints")
    quant = quant_layers(model).values()
    schemes = {scheme_key(m) for m in quant}
    groups = sorted({g for _, g, _ in schemes if g not in (-1, 32, 64, 128)})
    if groups:
        notes.append(f"vLLM's int4/int8 kernels take group size -1, 32, 64 or 128, not {groups[0]}")
    if any(bits == 8 and not sym for bits, _, sym in schemes):
        notes.append("asymmetric int8 has a vLLM kernel on Hopper GPUs only (Machete)")
    if any(m.weight_scale.dtype == torch.float32 for m in quant):
        notes.append("float32 scales: vLLM rounds them to its fp16/bf16 (quantize on a GPU to avoid)")
    return notes
