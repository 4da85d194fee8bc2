"""Calibrated quantization of a whole model: GPTQ layer by layer on translation prompts (or RTN), with the
optional Hadamard rotations and mixed precision first.

>>> quantize_model(model, tokenizer, QuantizeRecipe(method="gptq", bits=4, group_size=64))   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.files import check_new_output
from almak.modeling.architecture import PROJECTIONS, SHARED_INPUTS, decoder_layers
from almak.modeling.checkpoint import SPARSE_FORMATS, read_recipe, save_quantized, vllm_summary
from almak.modeling.devices import calibration_device, peak_memory
from almak.modeling.load import DEFAULT_MODEL, load_model, weight_bytes
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.surgery import QuantConfig, check_group_size, densify_, quantize_, set_module, sparsify_
from almak.modeling.pipelines.allocate import allocate_bits
from almak.modeling.pipelines.calibrate import calibration_samples, run_layerwise
from almak.modeling.pipelines.rotate import check_rotatable, rotate_
from almak.modeling.text.prompts import guess_family
from almak.quant.gptq import GPTQ, GPTQConfig

log = logging.getLogger(__name__)


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
    if progress:
        progress(0)  # the layers start now
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


@dataclass
class QuantizeResult:
    """What :func:`quantize` did: the checkpoint folder and the numbers ``almak quantize`` prints."""

    out: Path
    model: str  # the source, resolved
    recipe: QuantizeRecipe
    prompt: str | None  # the calibration prompt family (None for RTN without mixed precision)
    quantized: list[str]  # the projections quantized
    skipped: dict[str, str]  # projection -> why it stays as it was
    sparse24: list[str]  # the quantized projections stored 2:4 + int4 (from a 2:4 source)
    pruned_source: dict | None  # the recipe of the almak prune checkpoint quantized, if it was one
    rotation: dict | None  # what the Hadamard rotation did (recipe.rotate)
    allocation: dict | None  # the mixed-precision plan (recipe.target_bits)
    bytes_before: int
    bytes_after: int
    seconds: float  # calibration and quantization, loading and writing not counted
    peak_memory: tuple[int, str]  # as almak.modeling.devices.peak_memory measures it
    vllm: str  # whether vLLM runs the checkpoint, and how


def quantize(model: str | None, recipe: QuantizeRecipe, out: str | Path, *, device: str = "auto",
             dtype: str = "auto", prompt: str | None = None, sparse_format: str = "dense", overwrite: bool = False,
             progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> QuantizeResult:
    """``almak quantize``: load ``model``, quantize its decoder-layer projections by ``recipe`` and write the
    checkpoint ``out`` (compressed-tensors ``pack-quantized``; transformers and vLLM load it too).

    A pruned source (an ``almak prune`` checkpoint) keeps its zeros: GPTQ compensates around them, and its 2:4
    layers come back 2:4 + int4. Calibration runs on ``device`` (the model waits on the CPU) in ``dtype``; ``prompt``
    is the calibration prompt family (guessed from the model when None). ``progress(stage, total)`` may return a
    callback fed per calibration sample (stage "sensitivity", mixed precision) and per decoder layer (stage
    ``recipe.method``). Everything that can be refused is refused before the model loads, except what needs it.

    >>> quantize("smollm2-135m", QuantizeRecipe(method="rtn", bits=8, group_size=-1), "smollm-w8")  # doctest: +SKIP
    """
    out = Path(out)
    check_new_output(out, overwrite, inputs=(model, recipe.calib))
    if sparse_format not in SPARSE_FORMATS:
        raise AlmakError(f"unknown sparse format {sparse_format!r}; choose from {', '.join(SPARSE_FORMATS)}")
    device, dtype = calibration_device(device, dtype)
    lm = load_model(model or DEFAULT_MODEL, device="cpu", dtype=dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    check_group_size(lm.model, recipe.group_size)
    family = prompt or guess_family(lm.ref, lm.tokenizer)
    before = weight_bytes(lm.model)
    # A pruned source (almak prune's output): GPTQ keeps its zeros, and 2:4 layers come back 2:4 + int-N.
    source = read_recipe(lm.ref) if Path(lm.ref).is_dir() else None
    sparse24 = densify_(lm.model)
    pruned = source if source and source.get("command") == "prune" else None

    def stage(name: str, total: int):
        return progress(name, total) if progress else None

    start = time.perf_counter()
    measure = stage("sensitivity", recipe.nsamples) if recipe.target_bits is not None else None
    summary = quantize_model(lm.model, lm.tokenizer, recipe, device=device, prompt_family=family,
                             progress=_staged(stage, recipe.method, len(decoder_layers(lm.model))),
                             keep_zeros=bool(pruned or sparse24), sensitivity_progress=measure)
    # int4 layers that were 2:4 become 2:4 + int4 (int8 ones stay dense-coded, their zeros kept).
    sparse24_quant = sparsify_(lm.model, names=sparse24) if sparse24 else []
    seconds = time.perf_counter() - start
    calibrated = recipe.method == "gptq" or recipe.target_bits is not None
    save_quantized(lm.model, lm.tokenizer, out, recipe_record(recipe, lm.ref, family if calibrated else None, summary,
                                                              pruned, sparse24, sparse24_quant),
                   overwrite=overwrite, sparse_format=sparse_format)
    return QuantizeResult(out, lm.ref, recipe, family if calibrated else None, summary["quantized"],
                          summary["skipped"], sparse24_quant, pruned, summary.get("rotation"),
                          summary.get("allocation"), before, weight_bytes(lm.model), seconds, peak_memory(device),
                          vllm_summary(lm.model, sparse_format))


def _staged(stage, name: str, total: int):
    """The callback of a stage opened at its first call (quantize_model's ``progress(0)`` as the layers start, after
    the sensitivity stage of mixed precision)."""
    tick = None

    def advance(n: int = 1) -> None:
        nonlocal tick
        if tick is None:
            tick = stage(name, total) or (lambda n: None)
        tick(n)

    return advance


def recipe_record(recipe: QuantizeRecipe, model: str, prompt: str | None, summary: dict, pruned: dict | None,
                  sparse24: list[str], sparse24_quant: list[str]) -> dict:
    """``almak_recipe.json`` of a quantized checkpoint: what was done, from what, with which data. Nothing that
    differs between two runs of the same recipe (no timings), so that the same recipe writes the same bytes."""
    fields = dataclasses.asdict(recipe)
    if recipe.method == "rtn":
        keep = ("method", "bits", "group_size", "sym", "rotate", "target_bits")
        keep += ("calib", "nsamples", "seqlen", "seed") if recipe.target_bits is not None else ()
        fields = {k: v for k, v in fields.items() if k in keep}
    fields.update(model=model, prompt=prompt, quantized=len(summary["quantized"]), skipped=summary["skipped"])
    for key in ("rotation", "allocation"):
        if key in summary:
            fields[key] = summary[key]
    if pruned or sparse24:
        fields.update(pruned_source=pruned, sparse24_layers=len(sparse24_quant))
    return fields
