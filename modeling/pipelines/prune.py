"""Prune a whole model: magnitude, Wanda or SparseGPT on every decoder-layer projection, one layer at a time.

>>> report = prune_model(model, tokenizer, PruneRecipe(method="sparsegpt", pattern="2:4",
...                                                    skip=("layers.0", "layers.29")))   # doctest: +SKIP
>>> report["layers"]["model.layers.1.mlp.up_proj"]                                        # doctest: +SKIP
0.5

Wanda and SparseGPT calibrate on the same translation-formatted samples as GPTQ, through the same pass
(:func:`almak.modeling.pipelines.calibrate.run_layerwise`): each layer is pruned on the outputs of the layers already
pruned before it. Pruned layers stay ``nn.Linear`` with zeros; compressing 2:4 layers is the checkpoint's job.
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.files import check_new_output
from almak.modeling.architecture import PROJECTIONS, decoder_layers
from almak.modeling.checkpoint import SPARSE_FORMATS, save_pruned, vllm_summary
from almak.modeling.devices import calibration_device, peak_memory
from almak.modeling.load import DEFAULT_MODEL, load_model, weight_bytes
from almak.modeling.nn.surgery import sparsify_
from almak.modeling.pipelines.calibrate import calibration_samples, run_layerwise
from almak.modeling.pipelines.structured import StructuredRecipe, StructuredResult, prune_structured
from almak.modeling.text.prompts import guess_family
from almak.sparse import SparseGPT, Sparsity, Wanda, apply_mask_, magnitude_mask, sparsity_of

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneRecipe:
    """What ``almak prune`` does.

    - ``pattern``: ``"2:4"``, ``"4:8"`` (keep N of every M along the input dimension) or None for
      unstructured pruning of a ``sparsity`` fraction of each output row (per 128-column block for SparseGPT,
      whose adaptive selection lets rows differ).
    - ``skip``: layers left dense: full names (``model.layers.0.mlp.down_proj``), dotted fragments matched on
      whole components (``layers.0`` is the first decoder layer, ``self_attn`` every attention projection),
      or globs (``*.layers.2?.mlp.*``).
    """

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str | None = None
    skip: tuple[str, ...] = ()
    calib: str = "alma"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        if self.method not in METHODS:
            raise AlmakError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.skip = tuple(s.strip() for entry in self.skip for s in str(entry).split(",") if s.strip())
        self.target()  # validates pattern / sparsity
        if not 0 < self.damp < 1:
            raise AlmakError(f"damp must be strictly between 0 and 1, got {self.damp}")

    def target(self) -> Sparsity:
        if self.pattern:
            p = Sparsity.parse(self.pattern)
            if not p.structured:
                raise AlmakError(f"--pattern takes N:M (2:4, 4:8), got {self.pattern!r}; use --sparsity for a fraction")
            return p
        return Sparsity(self.sparsity)

    def to_json(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.target().sparsity,
                "skip": list(self.skip), "calib": None if self.method == "magnitude" else self.calib,
                "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed, "damp": self.damp,
                "block_size": self.block_size}


def skip_matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` (a glob, or a dotted fragment matched on whole components) names module ``name``.

    >>> skip_matches("model.layers.1.self_attn.q_proj", "self_attn"), skip_matches("model.layers.10.mlp.up_proj", "layers.1")
    (True, False)
    """
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


def prunable_linears(model: nn.Module) -> list[str]:
    """Names of the decoder-layer projections, in model order."""
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(m, nn.Linear)]


def _select(model: nn.Module, recipe: PruneRecipe, pattern: Sparsity) -> tuple[set[str], dict[str, str]]:
    names = prunable_linears(model)
    if not names:
        raise AlmakError("the model has no decoder-layer projections (q/k/v/o/gate/up/down_proj) to prune")
    unused = [p for p in recipe.skip if not any(skip_matches(n, p) for n in names)]
    if unused:
        raise AlmakError(f"--skip {', '.join(unused)} matches no prunable layer (names look like {names[0]})")
    chosen, skipped = set(), {}
    for name in names:
        linear = model.get_submodule(name)
        hit = next((p for p in recipe.skip if skip_matches(name, p)), None)
        if hit:
            skipped[name] = f"--skip {hit}"
        elif pattern.structured and linear.in_features % pattern.m:
            skipped[name] = f"in_features={linear.in_features} is not divisible by {pattern.m}"
        else:
            chosen.add(name)
    if not chosen:
        reasons = sorted(set(skipped.values()))
        raise AlmakError(f"every prunable layer is skipped ({'; '.join(reasons[:3])}); nothing to prune")
    return chosen, skipped


def prune_model(model: nn.Module, tokenizer, recipe: PruneRecipe, device=None, prompt_family: str = "alma",
                progress=None) -> dict:
    """Prune ``model`` in place by ``recipe``; ``progress(1)`` per decoder layer.

    Returns a report: ``layers`` (name -> fraction of zeros after pruning, for every projection, skipped
    ones included), ``pruned`` (names), ``skipped`` (name -> reason), ``sparsity`` (zeros over all
    projection weights) and ``pruned_sparsity`` (zeros over the pruned ones).
    """

    pattern = recipe.target()
    chosen, skipped = _select(model, recipe, pattern)
    for name in chosen:
        if not torch.isfinite(model.get_submodule(name).weight).all():
            raise AlmakError(f"{name} has NaN or inf weights")

    if recipe.method == "magnitude":
        for name in sorted(chosen):
            linear = model.get_submodule(name)
            apply_mask_(linear, magnitude_mask(linear.weight, pattern))
        if progress:
            progress(len(decoder_layers(model)))
    else:
        # run_layerwise names submodules relative to their decoder layer; the chosen ones are known by identity.
        chosen_ids = {id(model.get_submodule(n)) for n in chosen}

        def make_observer(name, module):
            return Wanda(module) if recipe.method == "wanda" else SparseGPT(module)

        def finish_layer(index, layer, observers):
            for name, obs in observers.items():
                linear = layer.get_submodule(name)
                if recipe.method == "wanda":
                    apply_mask_(linear, obs.mask(pattern))
                else:
                    W, mask = obs.prune(pattern, recipe.damp, recipe.block_size)
                    apply_mask_(linear, mask, W.to(linear.weight.dtype))

        samples = calibration_samples(tokenizer, recipe.calib, recipe.nsamples, recipe.seqlen, recipe.seed,
                                      prompt_family)
        run_layerwise(model, samples, make_observer, finish_layer, lambda name, m: id(m) in chosen_ids, device,
                      progress)

    report_layers = {n: sparsity_of(model.get_submodule(n).weight) for n in prunable_linears(model)}
    total = sum(model.get_submodule(n).weight.numel() for n in report_layers)
    zeros = sum(report_layers[n] * model.get_submodule(n).weight.numel() for n in report_layers)
    pruned_total = sum(model.get_submodule(n).weight.numel() for n in chosen)
    pruned_zeros = sum(report_layers[n] * model.get_submodule(n).weight.numel() for n in chosen)
    log.info("%s-pruned %d/%d projections to %s; %d left dense", recipe.method, len(chosen), len(report_layers),
             pattern, len(skipped))
    return {"layers": report_layers, "pruned": sorted(chosen, key=list(report_layers).index), "skipped": skipped,
            "sparsity": zeros / total, "pruned_sparsity": pruned_zeros / pruned_total, "pattern": str(pattern)}


@dataclass
class PruneResult:
    """What :func:`prune` did: the checkpoint folder and the numbers ``almak prune`` prints."""

    out: Path
    model: str  # the source, resolved
    recipe: PruneRecipe
    report: dict  # prune_model's report (per-layer sparsity, pruned, skipped, totals); sparsity_report.json
    stored_24: list[str]  # the projections stored as 2:4 layers
    bytes_before: int
    bytes_after: int  # in memory (2:4 layers hold their kept half)
    seconds: float  # pruning, loading and writing not counted
    peak_memory: tuple[int, str]
    vllm: str | None  # for 2:4 checkpoints: whether vLLM runs them, and how


def prune(model: str | None, recipe: PruneRecipe | StructuredRecipe, out: str | Path, *, device: str = "auto",
          dtype: str = "auto", prompt: str | None = None, sparse_format: str = "dense", overwrite: bool = False,
          progress: Callable[[str, int], Callable[[int], None] | None] | None = None
          ) -> PruneResult | StructuredResult:
    """``almak prune``: load ``model``, prune its decoder-layer projections by ``recipe`` and write the checkpoint
    ``out`` with ``sparsity_report.json`` and the recipe. 2:4 layers are stored as ``sparse_format`` says. A
    :class:`~almak.modeling.pipelines.structured.StructuredRecipe` makes a smaller model instead
    (:func:`~almak.modeling.pipelines.structured.prune_structured`).

    Calibration (Wanda, SparseGPT) runs on ``device`` in ``dtype``, on ``prompt``-family samples (guessed from the
    model when None); ``progress(recipe.method, layers)`` may return a callback fed per decoder layer.

    >>> prune("smollm2-135m", PruneRecipe(method="wanda", sparsity=0.5), "smollm-wanda50")   # doctest: +SKIP
    """
    if isinstance(recipe, StructuredRecipe):
        if sparse_format != "dense":
            raise AlmakError("--sparse-format is for 2:4 layers; structured pruning writes a plain, smaller model")
        return prune_structured(model, recipe, out, device=device, dtype=dtype, prompt=prompt, overwrite=overwrite,
                                progress=progress)
    out = Path(out)
    check_new_output(out, overwrite, inputs=(model, recipe.calib))
    if sparse_format not in SPARSE_FORMATS:
        raise AlmakError(f"unknown sparse format {sparse_format!r}; choose from {', '.join(SPARSE_FORMATS)}")
    device, dtype = calibration_device(device, dtype)
    lm = load_model(model or DEFAULT_MODEL, device="cpu", dtype=dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if any(not isinstance(m, nn.Linear) for n, m in lm.model.named_modules()
           if n.rsplit(".", 1)[-1] in ("q_proj", "down_proj")):
        raise AlmakError(f"{lm.ref} is already compressed; prune a float model (then almak quantize the result)")
    family = prompt or guess_family(lm.ref, lm.tokenizer)
    before = weight_bytes(lm.model)
    tick = progress(recipe.method, len(decoder_layers(lm.model))) if progress else None
    start = time.perf_counter()
    report = prune_model(lm.model, lm.tokenizer, recipe, device=device, prompt_family=family, progress=tick)
    seconds = time.perf_counter() - start
    target = recipe.target()
    stored_24 = sparsify_(lm.model, names=report["pruned"]) if (target.n, target.m) == (2, 4) else []
    fields = {"command": "prune", **recipe.to_json(), "model": lm.ref,
              "prompt": None if recipe.method == "magnitude" else family}
    save_pruned(lm.model, lm.tokenizer, out, fields, report, overwrite=overwrite, sparse_format=sparse_format)
    return PruneResult(out, lm.ref, recipe, report, stored_24, before, weight_bytes(lm.model), seconds,
                       peak_memory(device), vllm_summary(lm.model, sparse_format) if stored_24 else None)
