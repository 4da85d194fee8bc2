"""Model surgery: swap the projections of LLaMA / Mistral / Qwen2-style decoder layers for QuantLinear.

>>> quantize_(model, QuantConfig(bits=4, group_size=128))     # doctest: +SKIP
INFO almak.modeling.surgery: quantized 210/210 linears to int4 sym g128; kept lm_head
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.quant_linear import QuantLinear
from almak.quant.pack import GROUP_SIZES

log = logging.getLogger(__name__)

# The decoder-layer projections of LLaMA, Mistral and Qwen2 (all name them alike).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


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
        reason = None
        if not isinstance(module, nn.Linear):
            reason = f"{type(module).__name__} is not an nn.Linear"
        elif config.bits == 4 and module.in_features % 8:
            reason = f"in_features={module.in_features} is not a multiple of 8"
        elif id(module.weight) in tied:
            reason = "its weight is tied to the input embeddings"
        if reason:
            log.info("kept %s: %s", name, reason)
            skipped[name] = reason
            continue
        _set_module(model, name, QuantLinear.from_float(module, config.bits, config.group_size, config.sym))
        done.append(name)
    kept = "" if config.include_lm_head else "; kept lm_head"
    log.info("quantized %d/%d linears to %s%s", len(done), len(targets), config.describe(), kept)
    return {"quantized": done, "skipped": skipped}
