"""Model surgery: swap the projections of LLaMA / Mistral / Qwen2-style decoder layers for QuantLinear.

>>> quantize_(model, QuantConfig(bits=4, group_size=128))     # doctest: +SKIP
INFO almak.modeling.nn.surgery: quantized 210/210 linears to int4 sym g128; kept lm_head
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.architecture import PROJECTIONS
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear, is_24_sparse
from almak.quant.pack import GROUP_SIZES

log = logging.getLogger(__name__)

@dataclass
class QuantConfig:
    """Weight-only quantization: 4 or 8 bits, ``group_size`` columns per scale (-1: one per output row)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    include_lm_head: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise AlmakError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise AlmakError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {'sym' if self.sym else 'asym'} {g}"


def target_linears(model: nn.Module, include_lm_head: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every projection in the decoder layers, plus lm_head when asked."""
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in PROJECTIONS or (include_lm_head and leaf == "lm_head"):
            found.append((name, module))
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def kept_reason(module: nn.Module, bits: int, tied: bool) -> str | None:
    """Why :func:`quantize_` keeps ``module`` as it is (``tied``: its weight is the input embeddings'), or None."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    if bits == 4 and module.in_features % 8:
        return f"in_features={module.in_features} is not a multiple of 8"
    if tied:
        return "its weight is tied to the input embeddings"
    return None


def check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise AlmakError(f"{name} has NaN or inf weights")


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: Callable[[str, nn.Module], bool] | None = None
              ) -> dict:
    """Replace, in place, each targeted ``nn.Linear`` with a round-to-nearest ``QuantLinear``.

    ``filter_fn(name, module)`` narrows the targets. A layer that cannot be converted is kept with one
    logged reason. Returns ``{"quantized": [...], "skipped": {name: reason}}``.
    """
    targets = [(n, m) for n, m in target_linears(model, config.include_lm_head) if filter_fn is None or filter_fn(n, m)]
    if not targets:
        raise AlmakError("the model has no decoder-layer projections (q/k/v/o/gate/up/down_proj) to quantize")
    tied = {id(p) for n, p in model.named_parameters() if "embed" in n}
    done, skipped = [], {}
    for name, module in targets:
        reason = kept_reason(module, config.bits, id(getattr(module, "weight", None)) in tied)
        if reason is None:
            check_finite(name, module.weight)
        if reason:
            log.info("kept %s: %s", name, reason)
            skipped[name] = reason
            continue
        set_module(model, name, QuantLinear.from_float(module, config.bits, config.group_size, config.sym))
        done.append(name)
    kept = "" if config.include_lm_head else "; kept lm_head"
    log.info("quantized %d/%d linears to %s%s", len(done), len(targets), config.describe(), kept)
    return {"quantized": done, "skipped": skipped}


def sparsify_(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Swap each 2:4-sparse projection (``nn.Linear`` with at most 2 non-zeros in every 4 along K, K a
    multiple of 32) for a ``Sparse24Linear``, and each int4 ``QuantLinear`` whose codes are 2:4 for a
    ``Sparse24QuantLinear``; ``names`` limits the candidates. Returns the names swapped; others stay as they are.
    """

    done = []
    for name, module in target_linears(model):
        if names is not None and name not in names:
            continue
        if isinstance(module, nn.Linear) and is_24_sparse(module.weight):
            set_module(model, name, Sparse24Linear.from_linear(module))
        elif isinstance(module, QuantLinear) and module.bits == 4 and module.in_features % 32 == 0:
            try:
                set_module(model, name, Sparse24QuantLinear.from_quant_linear(module))
            except ValueError:
                continue
        else:
            continue
        done.append(name)
    log.info("stored %d projections as 2:4", len(done))
    return done


def densify_(model: nn.Module) -> list[str]:
    """Swap every ``Sparse24Linear`` back for the equivalent dense ``nn.Linear`` (zeros included), so that
    algorithms that need the float weight (GPTQ) can run. Returns the names swapped."""

    done = [n for n, m in model.named_modules() if isinstance(m, Sparse24Linear)]
    for name in done:
        set_module(model, name, model.get_submodule(name).to_linear())
    return done


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Refuse, before any work, a group size that does not divide a projection's in_features.

    compressed-tensors (and so transformers and vLLM) cannot dequantize a ragged last group.
    """
    if group_size == -1:
        return
    for name, module in target_linears(model):
        k = getattr(module, "in_features", None)
        if k and k % group_size:
            fits = [g for g in (256, 128, 64, 32) if all(m.in_features % g == 0 for _, m in target_linears(model))]
            hint = f"use --group-size {fits[0]}" if fits else "use --group-size -1 (per channel)"
            raise AlmakError(f"group size {group_size} does not divide in_features={k} of {name}: checkpoints in "
                             f"the compressed-tensors layout need it to; {hint}")
