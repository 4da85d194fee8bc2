"""Mixed precision: each projection's format (int4 at a group size, int4 per channel, int8 per channel) chosen
by its sensitivity, so that the model's average bits per weight, scales and zeros included, meets a budget.

Sensitivity is the second-order estimate of the calibration loss increase when one projection alone is
rounded: ``ΔL ≈ ½ Σ F_ij (W_ij − Q(W)_ij)²``, with ``F`` the diagonal of the empirical Fisher information
(the mean of the squared gradients of the calibration loss over the samples; LeCun et al., "Optimal Brain
Damage", 1990; HAWQ-V2, Dong et al. 2020, uses the Hessian trace the same way). One backward pass per
sample gives ``F`` for every projection at once, so the cost is a few calibration forwards, not one
evaluation per layer and format. ``Q`` is round-to-nearest in each candidate format; GPTQ then quantizes
each projection in the format chosen here.

The projections that read one input (q/k/v, gate/up: :data:`~almak.modeling.pipelines.calibrate.SHARED_INPUTS`) get
one format: GPTQ solves them together and vLLM fuses them into one layer.

The choice is a multiple-choice knapsack (minimize the summed ΔL, bits at or under the budget), solved by
dynamic programming (:func:`choose_formats`).

Bits are counted as the checkpoint stores them (compressed-tensors pack-quantized): ``bits`` per code, one
scale of the model's dtype per group (16 bits for fp16/bf16 models, 32 for fp32), and for asymmetric formats
one ``bits``-wide zero point per group.

>>> plan = allocate_bits(model, samples, target_bits=4.5, group_size=128, sym=False)   # doctest: +SKIP
>>> plan.average_bits                                                                   # doctest: +SKIP
4.49
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.architecture import PROJECTIONS, SHARED_INPUTS, decoder_layers
from almak.quant.pack import dequantize_groupwise, quantize_rtn_groupwise

__all__ = ["Format", "Allocation", "candidate_formats", "projection_groups", "fisher_diagonal", "sensitivities",
           "choose_formats", "allocate_bits"]

log = logging.getLogger(__name__)



@dataclass(frozen=True, order=True)
class Format:
    """One stored format: ``bits`` (4 or 8) and ``group_size`` (-1: one scale per output channel)."""

    bits: int
    group_size: int

    def __str__(self) -> str:
        return f"int{self.bits} " + ("per-channel" if self.group_size == -1 else f"g{self.group_size}")

    def stored_bits(self, out_features: int, in_features: int, sym: bool, scale_bits: int) -> int:
        """Bits the checkpoint spends on an out × in projection in this format: codes, scales, zeros."""
        groups = 1 if self.group_size == -1 else in_features // self.group_size
        per_group = scale_bits + (0 if sym else self.bits)
        return out_features * (in_features * self.bits + groups * per_group)


def candidate_formats(group_size: int) -> list[Format]:
    """int4 per channel, int4 at ``group_size`` (when it is not -1) and int8 per channel."""
    formats = [Format(4, -1)] + ([Format(4, group_size)] if group_size != -1 else []) + [Format(8, -1)]
    return formats


def projection_groups(model: nn.Module) -> list[list[str]]:
    """The decoder projections by shared input: per layer [q, k, v], [o], [gate, up], [down] (full names)."""
    groups = []
    for i, layer in enumerate(decoder_layers(model)):
        names = [n for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
        taken: set[str] = set()
        for name in names:
            if name in taken:
                continue
            leaf = name.rsplit(".", 1)[-1]
            shared = next((s for s in SHARED_INPUTS if leaf in s), (leaf,))
            parent = name.rpartition(".")[0]
            members = [n for n in names if n.rpartition(".")[0] == parent and n.rsplit(".", 1)[-1] in shared]
            taken.update(members)
            groups.append([f"model.layers.{i}.{n}" for n in members])
    return groups


def fisher_diagonal(model: nn.Module, samples: list[torch.Tensor], names: list[str],
                    progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """The mean over ``samples`` of each named projection's squared weight gradient of the LM loss (fp32)."""
    params = {n: model.get_submodule(n).weight for n in names}
    for n, w in params.items():
        if not isinstance(model.get_submodule(n), nn.Linear) or not w.is_floating_point():
            raise AlmakError(f"{n} is not a float nn.Linear; mixed precision starts from the float model")
    before = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in params.values():
        w.requires_grad_(True)
    fisher = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in params.items()}
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        for ids in samples:
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise AlmakError("the calibration loss is NaN or inf; the model cannot be measured")
            grads = torch.autograd.grad(loss, list(params.values()))
            for (n, _), g in zip(params.items(), grads):
                fisher[n].add_(g.float().square())
            if progress:
                progress(1)
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
        model.train(training)
    for f in fisher.values():
        f.div_(len(samples))
    return fisher


@torch.no_grad()
def sensitivities(model: nn.Module, fisher: dict[str, torch.Tensor], formats: list[Format],
                  sym: bool) -> dict[str, dict[Format, float]]:
    """``½ Σ F (W − RTN(W))²`` of each named projection in each format (an estimate of the loss increase)."""
    out = {}
    for name, F in fisher.items():
        W = model.get_submodule(name).weight.detach().float()
        out[name] = {}
        for fmt in formats:
            q, s, z = quantize_rtn_groupwise(W, fmt.bits, fmt.group_size, sym)
            err = W - dequantize_groupwise(q, s, z, fmt.group_size).float()
            out[name][fmt] = 0.5 * float((F * err.square()).sum())
    return out


def choose_formats(loss: list[dict[Format, float]], bits: list[dict[Format, int]], budget: float,
                   resolution: int = 20000) -> list[Format]:
    """Per group, the format minimizing the summed loss with the summed bits at or under ``budget``.

    ``loss[i][f]`` and ``bits[i][f]`` are group i's loss increase and stored bits in format f. A multiple-choice
    knapsack solved by dynamic programming over the bits above the all-cheapest choice, in ``resolution`` steps
    of the budget left above it (each group's extra bits rounded up, so the choice always fits; what the rounding
    leaves is then spent greedily, best loss saved per bit first). Raises AlmakError when even the cheapest
    format of every group exceeds the budget.
    """
    cheapest = [min(b, key=lambda f: (b[f], loss_i[f])) for loss_i, b in zip(loss, bits)]
    floor = sum(b[f] for b, f in zip(bits, cheapest))
    if floor > budget:
        raise AlmakError("budget below the cheapest format of every projection")
    spare = budget - floor
    unit = spare / resolution if spare > 0 else 1.0
    inf = float("inf")
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []  # per group, the format index chosen at each spent amount
    for loss_i, b, base in zip(loss, bits, cheapest):
        formats = list(b)
        new = torch.full_like(best, inf)
        pick = torch.zeros(resolution + 1, dtype=torch.int64)
        for k, f in enumerate(formats):
            extra = b[f] - b[base]
            steps = 0 if extra <= 0 else int(-(-extra // unit)) if spare > 0 else resolution + 1
            if steps > resolution:
                continue
            shifted = torch.full_like(best, inf)
            shifted[steps:] = best[: resolution + 1 - steps] + loss_i[f]
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick[better] = k
        best = new
        picks.append((formats, pick))
    spent = int(torch.argmin(best))
    choice = []
    for (formats, pick), b, base in zip(reversed(picks), reversed(bits), reversed(cheapest)):
        f = formats[int(pick[spent])]
        extra = b[f] - b[base]
        spent -= 0 if extra <= 0 else int(-(-extra // unit))
        choice.append(f)
    choice.reverse()

    def used(c):
        return sum(b[f] for b, f in zip(bits, c))

    while True:  # spend what the rounding left: the upgrade saving the most loss per extra bit, while one fits
        left = budget - used(choice)
        upgrade = None
        for i, (loss_i, b) in enumerate(zip(loss, bits)):
            for f in b:
                extra, saved = b[f] - b[choice[i]], loss_i[choice[i]] - loss_i[f]
                if 0 < extra <= left and saved > 0 and (upgrade is None or saved / extra > upgrade[0]):
                    upgrade = (saved / extra, i, f)
        if upgrade is None:
            return choice
        choice[upgrade[1]] = upgrade[2]


@dataclass
class Allocation:
    """The chosen format of every projection, the budget, and what it costs."""

    formats: dict[str, Format]
    target_bits: float
    average_bits: float
    estimated_loss: float

    def counts(self) -> dict[str, int]:
        """Projections per format, e.g. {'int4 g128': 180, 'int8 per-channel': 30}."""
        out: dict[str, int] = {}
        for f in sorted(set(self.formats.values())):
            out[str(f)] = sum(1 for g in self.formats.values() if g == f)
        return out

    def record(self) -> dict:
        """The allocation as the checkpoint's recipe stores it."""
        return {"target_bits": self.target_bits, "average_bits": round(self.average_bits, 4),
                "counts": self.counts(), "formats": {n: str(f) for n, f in self.formats.items()}}


def allocate_bits(model: nn.Module, samples: list[torch.Tensor], target_bits: float, group_size: int = 128,
                  sym: bool = True, progress: Callable[[int], None] | None = None) -> Allocation:
    """Measure each projection's sensitivity on ``samples`` and choose its format under ``target_bits``
    average bits per weight over the decoder projections (see the module docstring)."""
    groups = projection_groups(model)
    names = [n for g in groups for n in g]
    if not names:
        raise AlmakError("the model has no decoder-layer projections (q/k/v/o/gate/up/down_proj) to allocate")
    formats = candidate_formats(group_size)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    for n, (out_f, in_f) in shapes.items():
        if group_size != -1 and in_f % group_size:
            raise AlmakError(f"group size {group_size} does not divide in_features={in_f} of {n}")
    scale_bits = model.get_submodule(names[0]).weight.element_size() * 8
    params = sum(o * i for o, i in shapes.values())
    cost = {n: {f: f.stored_bits(*shapes[n], sym, scale_bits) for f in formats} for n in names}
    floor = min(sum(cost[n][f] for n in names) for f in formats) / params
    if target_bits < floor:
        raise AlmakError(f"--target-bits {target_bits:g} is below the smallest model these formats make "
                         f"({floor:.3f} bits per weight: {formats[0]} everywhere, {scale_bits}-bit scales)")
    fisher = fisher_diagonal(model, samples, names, progress)
    sens = sensitivities(model, fisher, formats, sym)
    del fisher
    loss = [{f: sum(sens[n][f] for n in g) for f in formats} for g in groups]
    bits = [{f: sum(cost[n][f] for n in g) for f in formats} for g in groups]
    choice = choose_formats(loss, bits, target_bits * params)
    chosen = {n: f for g, f in zip(groups, choice) for n in g}
    total = sum(cost[n][chosen[n]] for n in names)
    estimate = sum(sens[n][chosen[n]] for n in names)
    plan = Allocation(chosen, target_bits, total / params, estimate)
    log.info("mixed precision at %.3f bits per weight (target %g): %s", plan.average_bits, target_bits,
             ", ".join(f"{c} {f}" for f, c in plan.counts().items()))
    return plan
