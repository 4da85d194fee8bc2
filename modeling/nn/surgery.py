"""Model surgery: swap the projections of LLaMA / Mistral / Qwen2-style decoder layers for QuantLinear.

>>> quantize_(model, QuantConfig(bits=4, group_size=128))     # doctest: +SKIP
INFO almak.modeling.nn.surgery: quantized 210/210 linears to int4 sym g128; kept lm_head
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear, is_24_sparse
from almak.modeling.pipelines.allocate import allocate_bits
from almak.modeling.pipelines.calibrate import SHARED_INPUTS, calibration_samples, decoder_layers, run_layerwise
from almak.modeling.pipelines.rotate import check_rotatable, rotate_
from almak.quant.gptq import GPTQ, GPTQConfig
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


class _SharedInput:
    """The GPTQ observer of the projections in ``names`` that read one input: each forward adds it once.

    Each member's hook calls :meth:`add_batch` once per forward, in the same order; the n-th call of every
    member must pass the very tensor the first member passed, else the layers do not share their input and
    the pass stops (one Hessian for them would be wrong).
    """

    def __init__(self):
        self.names: list[str] = []
        self.modules: list[nn.Linear] = []
        self.gptq = None
        self._seen: dict[str, int] = {}
        self._added, self._last = 0, None

    def member(self, name: str, module: nn.Linear) -> "_Member":
        self.names.append(name)
        self.modules.append(module)
        self._seen[name] = 0
        return _Member(self, name)

    def add(self, name: str, x: torch.Tensor) -> None:
        if self.gptq is None:
            self.gptq = GPTQ(self.modules)
        self._seen[name] += 1
        if self._seen[name] > self._added:
            self._added += 1
            self._last = x
            self.gptq.add_batch(x)
        elif x is not self._last:
            raise AlmakError(f"{' and '.join(self.names)} do not read the same input; GPTQ cannot share their "
                             "Hessian")


class _Member:
    def __init__(self, group: _SharedInput, name: str):
        self.group, self.name = group, name

    def add_batch(self, x: torch.Tensor) -> None:
        self.group.add(self.name, x)


def gptq_quantize_(model: nn.Module, samples: list, config, device=None, filter_fn=None, progress=None,
                   keep_zeros: bool = False, formats: dict | None = None) -> dict:
    """GPTQ every decoder-layer projection, layer by layer on calibration ``samples``, in place.

    ``config`` is a :class:`almak.quant.gptq.GPTQConfig`; ``samples`` come from
    :func:`almak.modeling.pipelines.calibrate.calibration_samples`. Returns ``{"quantized": [...], "skipped": {...}}``
    like :func:`quantize_`; ``progress(1)`` is called per decoder layer. ``keep_zeros`` (for a pruned model)
    keeps every weight that is exactly 0 at 0, so a 2:4 layer stays 2:4. The projections that read one input
    (:data:`SHARED_INPUTS`) share a Hessian and a solve. ``formats`` (mixed precision: full name ->
    :class:`almak.modeling.pipelines.allocate.Format`) overrides ``config``'s bits and group size per projection.
    """

    layers = decoder_layers(model)
    prefix = {id(layer): f"model.layers.{i}." for i, layer in enumerate(layers)}
    done, skipped = [], {}
    groups: dict[str, _SharedInput] = {}  # of the decoder layer being calibrated

    def targets(name, module):
        if name.rsplit(".", 1)[-1] not in PROJECTIONS or (filter_fn and not filter_fn(name, module)):
            return False
        if not isinstance(module, nn.Linear) or (config.bits == 4 and module.in_features % 8):
            skipped[name] = "not an nn.Linear with in_features divisible by 8"
            return False
        return True

    def make_observer(name, module):
        parent, _, leaf = name.rpartition(".")
        shared = next((m for m in SHARED_INPUTS if leaf in m), None)
        key = f"{parent}.{'/'.join(shared)}" if shared else name
        return groups.setdefault(key, _SharedInput()).member(name, module)

    def finish_layer(index, layer, observers):
        for group in {id(o.group): o.group for o in observers.values()}.values():
            linears = group.modules  # the layer's own projections, still float
            for name, linear in zip(group.names, linears):
                if not torch.isfinite(linear.weight).all():
                    raise AlmakError(f"model.layers.{index}.{name} has NaN or inf weights")
            keep = torch.cat([linear.weight == 0 for linear in linears]) if keep_zeros else None
            if group.gptq is None:
                raise AlmakError(f"model.layers.{index}: {', '.join(group.names)} saw no calibration input")
            fmt = formats.get(prefix[id(layer)] + group.names[0]) if formats else None
            solve = dataclasses.replace(config, bits=fmt.bits, group_size=fmt.group_size) if fmt else config
            q, scales, zeros = group.gptq.quantize(solve, keep_zero=keep)
            sizes = [linear.out_features for linear in linears]
            parts = zip(q.split(sizes), scales.split(sizes),
                        [None] * len(sizes) if zeros is None else zeros.split(sizes))
            for name, linear, (q_i, s_i, z_i) in zip(group.names, linears, parts):
                new = QuantLinear(linear.in_features, linear.out_features, solve.bits, solve.group_size,
                                  solve.sym, linear.bias is not None, dtype=linear.weight.dtype,
                                  device=linear.weight.device)
                new.set_quantized(q_i, s_i, z_i)
                if linear.bias is not None:
                    new.bias.copy_(linear.bias)
                set_module(layer, name, new)
                done.append(prefix[id(layer)] + name)
        groups.clear()

    run_layerwise(model, samples, make_observer, finish_layer, targets, device, progress)
    if not done:
        raise AlmakError("the model has no decoder-layer projections (q/k/v/o/gate/up/down_proj) to quantize")
    log.info("GPTQ-quantized %d linears to int%d %s g%d; kept lm_head", len(done), config.bits,
             "sym" if config.sym else "asym", config.group_size)
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


@dataclass
class QuantizeRecipe:
    """What ``almak quantize`` does: the method, the scheme, and (for GPTQ) the calibration."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    damp: float = 0.01
    calib: str = "alma"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    clip_search: bool | None = None  # GPTQ's group ranges by H-weighted error search; None: on for GPTQ
    # Randomized Hadamard rotations fused into the float weights first (almak.modeling.pipelines.rotate); tied embeddings
    # are untied.
    rotate: bool = False
    # Mixed precision: average bits per weight (codes, scales, zeros) over the decoder projections; each
    # projection int4 per channel, int4 at group_size or int8 per channel by sensitivity (almak.modeling.pipelines.allocate).
    # None: every projection at ``bits``.
    target_bits: float | None = None

    def __post_init__(self):
        if self.method not in ("rtn", "gptq"):
            raise AlmakError(f"method must be rtn or gptq, got {self.method!r}")
        if self.target_bits is not None:
            t = self.target_bits
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 4 <= t <= 9:
                raise AlmakError(f"target bits must be a number of bits per weight between 4 and 9 (int4 with its "
                                 f"scales costs a little over 4, int8 a little over 8), got {t!r}")
            if self.bits != 4:
                raise AlmakError(f"target_bits chooses each projection's bits (int4 or int8); leave bits at 4, "
                                 f"got bits={self.bits!r}")
        if self.clip_search is None:
            self.clip_search = self.method == "gptq"
        if self.clip_search and self.method != "gptq":
            raise AlmakError("--clip-search weighs each input column by its calibration activations: use it with "
                             "--method gptq")
        self.gptq_config()  # validates bits, group size, damping

    def gptq_config(self):
        return GPTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, damp=self.damp,
                          act_order=self.act_order, clip_search=self.clip_search)


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


def quantize_model(model: nn.Module, tokenizer, recipe: QuantizeRecipe, device=None, prompt_family: str = "alma",
                   progress=None, keep_zeros: bool = False, sensitivity_progress=None) -> dict:
    """Quantize ``model`` in place by ``recipe`` (RTN, or GPTQ on translation-formatted calibration data).

    ``keep_zeros``: the model is pruned; GPTQ keeps its zeros (RTN always maps 0 to the zero point exactly).
    ``recipe.rotate`` fuses the rotations of :func:`almak.modeling.pipelines.rotate.rotate_` into the float weights first;
    ``recipe.target_bits`` chooses each projection's format by :func:`almak.modeling.pipelines.allocate.allocate_bits`.
    ``progress(1)`` is called per decoder layer quantized, ``sensitivity_progress(1)`` per calibration sample
    measured for the allocation. Returns the summary of :func:`quantize_` / :func:`gptq_quantize_`, with what ``rotate_`` returned under
    ``"rotation"`` and :meth:`Allocation.record` under ``"allocation"`` when they ran.
    """
    check_group_size(model, recipe.group_size)
    if recipe.rotate:
        if keep_zeros:
            raise AlmakError("--rotate mixes every weight with all the others, so a pruned model's zeros would not "
                             "survive it; rotate and quantize the float model, or prune after")
        check_rotatable(model)
    samples = None
    if recipe.method == "gptq" or recipe.target_bits is not None:
        samples = calibration_samples(tokenizer, recipe.calib, recipe.nsamples, recipe.seqlen, recipe.seed,
                                      prompt_family)
    extra = {}
    if recipe.rotate:
        extra["rotation"] = rotate_(model, seed=recipe.seed)
    formats = None
    if recipe.target_bits is not None:
        plan = allocate_bits(model, samples, recipe.target_bits, recipe.group_size, recipe.sym,
                             progress=sensitivity_progress)
        formats, extra["allocation"] = plan.formats, plan.record()
    if recipe.method == "rtn":
        summary: dict = {"quantized": [], "skipped": {}}
        by_format = {}
        for name, fmt in (formats or {}).items():
            by_format.setdefault(fmt, set()).add(name)
        schemes = [(f.bits, f.group_size, names) for f, names in by_format.items()] or \
            [(recipe.bits, recipe.group_size, None)]
        for bits, group_size, names in schemes:
            part = quantize_(model, QuantConfig(bits, group_size, recipe.sym),
                             None if names is None else lambda n, m, names=names: n in names)
            summary["quantized"] += part["quantized"]
            summary["skipped"].update(part["skipped"])
        if progress:
            progress(len(getattr(getattr(model, "model", model), "layers", [])))
        return {**summary, **extra}

    summary = gptq_quantize_(model, samples, recipe.gptq_config(), device=device, progress=progress,
                             keep_zeros=keep_zeros, formats=formats)
    return {**summary, **extra}
