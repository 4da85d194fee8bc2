"""Structured pruning: a smaller model of the same family, with fewer decoder layers, attention heads, MLP neurons or
hidden (embedding) channels, chosen by their importance on calibration data.

The result is a plain model of a uniform, smaller shape (every layer keeps the same number of heads and neurons), so
that transformers, vLLM and llama.cpp load it unchanged. It follows NVIDIA's Minitron (Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation"): importance from activations on calibration data,
one shot, then recovery by distillation from the unpruned teacher (``almak distill``). Importances, on the same
translation-formatted ALMA samples as GPTQ:

- attention head h of a layer: the mean squared norm of its contribution to the residual stream,
  ``E ||W_o[:, h] a_h||^2`` (``a_h`` its attention output); a key/value head (grouped-query attention) counts the
  sum of the query heads that read it;
- MLP neuron i: ``E[a_i^2] ||W_down[:, i]||^2``, ``a`` the input of ``down_proj``;
- hidden channel c: ``sum over every RMSNorm output (two per layer and the final one) of E[y_c^2]``;
- decoder layer l: how much the calibration loss rises when the layer is skipped (ShortGPT and "Shortened LLaMA"
  rank layers by the output change or the loss; the loss is what the model is judged by).

The pruned model computes exactly what the teacher computes with those layers skipped and those heads, neurons and
channels zeroed (tested): the kept weights are sliced out unchanged, and where hidden channels go, every RMSNorm's
scale is multiplied by ``sqrt(d / d')`` and ``rms_norm_eps`` by ``d / d'`` so that the root mean square is still
taken over the teacher's ``d`` channels (the removed ones contributing zeros).

Under grouped-query attention every key/value group keeps the same number of query heads (``heads / kv_heads``);
removing key/value heads removes their whole groups, the least important first. The head dimension is unchanged
and written into the config (``head_dim``), since ``hidden / heads`` no longer gives it.

>>> shape = Shape.of(model.config)._replace(layers=20, mlp=1280)           # doctest: +SKIP
>>> imp = importance(model, calibration_samples(tokenizer, nsamples=64))   # doctest: +SKIP
>>> small = prune_to_shape(model, shape, imp).model                       # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from almak.errors import AlmakError
from almak.files import check_new_output
from almak.modeling.architecture import decoder_layers
from almak.modeling.checkpoint import save_structured
from almak.modeling.devices import calibration_device, peak_memory
from almak.modeling.load import DEFAULT_MODEL, load_model
from almak.modeling.pipelines.calibrate import calibration_samples
from almak.modeling.text.prompts import guess_family

# Model types whose layers this module knows how to slice (LLaMA's layout: q/k/v/o, gate/up/down, two RMSNorms).
STRUCTURED_TYPES = ("llama", "mistral", "qwen2")
CHANNEL_STEP = 64  # hidden sizes and MLP widths the search considers: multiples of 64 (int4 groups, 2:4 tiles)


class Shape(NamedTuple):
    """The dimensions structured pruning chooses: decoder layers, query and key/value heads per layer, MLP width,
    hidden size; ``head_dim`` stays the model's."""

    layers: int
    heads: int
    kv_heads: int
    mlp: int
    hidden: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Shape":
        heads = config.num_attention_heads
        return cls(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads,
                   config.intermediate_size, config.hidden_size,
                   getattr(config, "head_dim", None) or config.hidden_size // heads)

    def decoder_params(self, bias: bool = False) -> int:
        """Parameters of the decoder layers (projections and norms; embeddings and lm_head not counted)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if bias else 0)
        return self.layers * (attn + 3 * self.hidden * self.mlp + 2 * self.hidden)

    def describe(self) -> str:
        return (f"{self.layers} layers, {self.heads} heads / {self.kv_heads} kv heads, mlp {self.mlp}, "
                f"hidden {self.hidden}")


@dataclass
class StructuredRecipe:
    """What ``almak prune --method structured`` does: a budget (``target_params``: keep at most this fraction of the
    decoder layers' parameters, the shape chosen by search) or an explicit shape (any of ``layers``, ``heads``,
    ``kv_heads``, ``mlp``, ``hidden``; the others stay), importance measured on ``nsamples`` calibration samples.

    ``search_candidates``: shapes within 3% under the budget whose calibration loss is compared (on
    ``search_samples`` of the samples) to choose one. Layer importance (a forward pass per layer skipped) is measured
    on ``search_samples`` too; heads, neurons and channels on all ``nsamples``.
    """

    target_params: float | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    mlp: int | None = None
    hidden: int | None = None
    calib: str = "alma"
    nsamples: int = 64
    seqlen: int = 256
    seed: int = 0
    search_candidates: int = 12
    search_samples: int | None = None  # None: 16, or nsamples if fewer

    def __post_init__(self):
        explicit = {k: getattr(self, k) for k in ("layers", "heads", "kv_heads", "mlp", "hidden")}
        given = {k: v for k, v in explicit.items() if v is not None}
        if self.target_params is None and not given:
            raise AlmakError("structured pruning needs a budget (--target-params F) or a shape (--layers, --heads, "
                             "--kv-heads, --mlp, --hidden)")
        if self.target_params is not None:
            t = self.target_params
            if given:
                raise AlmakError(f"give --target-params or an explicit shape, not both (got {', '.join(given)})")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
                raise AlmakError(f"--target-params is the fraction of the decoder layers' parameters to keep, "
                                 f"strictly between 0 and 1, got {t!r}")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AlmakError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.search_samples is None:
            self.search_samples = min(16, self.nsamples)
        for name in ("nsamples", "seqlen", "search_candidates", "search_samples"):
            if getattr(self, name) < 1:
                raise AlmakError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.search_samples > self.nsamples:
            raise AlmakError(f"search_samples ({self.search_samples}) cannot exceed nsamples ({self.nsamples})")

    def shape_for(self, source: Shape) -> Shape:
        """The explicit shape against the source's, checked (a budget has no shape of its own: see choose_shape)."""
        for name, value, limit in (("layers", self.layers, source.layers), ("heads", self.heads, source.heads),
                                   ("kv-heads", self.kv_heads, source.kv_heads), ("mlp", self.mlp, source.mlp),
                                   ("hidden", self.hidden, source.hidden)):
            if value is not None and value > limit:
                raise AlmakError(f"--{name} {value}: the model has {limit}; give 1 to {limit}")
        heads, kv = self.heads or source.heads, self.kv_heads
        if kv is None:
            kv = source.kv_heads if heads % source.kv_heads == 0 else None
            if kv is None:
                fits = sorted({k * g for k in range(1, source.kv_heads + 1)
                               for g in range(1, source.heads // source.kv_heads + 1)})
                raise AlmakError(f"--heads {heads} does not split over the model's {source.kv_heads} key/value heads "
                                 f"(grouped-query attention keeps the same number of query heads per group): use a "
                                 f"multiple of {source.kv_heads}, or give --kv-heads; possible --heads: "
                                 f"{', '.join(map(str, fits))}")
        shape = Shape(self.layers or source.layers, heads, kv, self.mlp or source.mlp, self.hidden or source.hidden,
                      source.head_dim)
        check_shape(shape, source)
        return shape

    def to_json(self) -> dict:
        return {"method": "structured", "target_params": self.target_params, "layers": self.layers,
                "heads": self.heads, "kv_heads": self.kv_heads, "mlp": self.mlp, "hidden": self.hidden,
                "calib": self.calib, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "search_candidates": self.search_candidates, "search_samples": self.search_samples}


def check_shape(shape: Shape, source: Shape) -> None:
    """Refuse a shape that is not a uniform sub-shape of ``source`` (with the message a user can act on)."""
    for name, value, limit in (("layers", shape.layers, source.layers), ("heads", shape.heads, source.heads),
                               ("kv-heads", shape.kv_heads, source.kv_heads), ("mlp", shape.mlp, source.mlp),
                               ("hidden", shape.hidden, source.hidden)):
        if not 1 <= value <= limit:
            raise AlmakError(f"--{name} {value}: the model has {limit}; give 1 to {limit}")
    group = source.heads // source.kv_heads
    if shape.heads % shape.kv_heads or shape.heads // shape.kv_heads > group:
        raise AlmakError(f"--heads {shape.heads} over --kv-heads {shape.kv_heads}: grouped-query attention needs the "
                         f"same number of query heads in every key/value group, at most the model's {group} per group; "
                         f"use a multiple of {shape.kv_heads} up to {shape.kv_heads * group}")
    if shape.hidden % shape.heads:
        fits = [h for h in range(shape.heads, 0, -1) if shape.hidden % h == 0 and h % shape.kv_heads == 0]
        raise AlmakError(f"--hidden {shape.hidden} is not a multiple of --heads {shape.heads}: transformers (5.x) "
                         f"refuses such a LLaMA config; give a --hidden that {shape.heads} divides"
                         + (f", or --heads {fits[0]}" if fits else ""))
    if shape == source:
        raise AlmakError(f"the shape asked for is the model's own ({source.describe()}): nothing to prune")


# ---------------------------------------------------------------------------------------------- importance


@dataclass
class Importance:
    """Per decoder layer: ``heads`` (L, H), ``neurons`` (L, I); ``channels`` (hidden,); ``layers`` (L,): the
    calibration loss's rise when the layer is skipped; ``loss``: the model's own calibration loss."""

    heads: torch.Tensor
    neurons: torch.Tensor
    channels: torch.Tensor
    layers: torch.Tensor
    loss: float

    def kv_groups(self, kv_heads: int) -> torch.Tensor:
        """(L, KV) importance of each key/value group: the sum over the query heads that read it."""
        L, H = self.heads.shape
        return self.heads.reshape(L, kv_heads, H // kv_heads).sum(-1)

    def to_json(self) -> dict:
        return {"heads": self.heads.tolist(), "neurons_mean": self.neurons.mean(1).tolist(),
                "channels_top": self.channels.topk(min(16, len(self.channels))).indices.tolist(),
                "layers": self.layers.tolist(), "loss": self.loss}


def check_structurable(model: nn.Module) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in STRUCTURED_TYPES:
        raise AlmakError(f"structured pruning slices LLaMA-layout models ({', '.join(STRUCTURED_TYPES)}), not "
                         f"{kind!r}")
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "down_proj") and type(module) is not nn.Linear:
            raise AlmakError(f"{name} is {type(module).__name__}: structured pruning takes a float model (prune it "
                             "first, then quantize the result)")


def _batches(samples: list[torch.Tensor], batch_size: int = 8):
    """(input_ids, attention_mask) of ``samples`` (each (1, T)) right-padded in batches, longest first."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i].shape[1])
    for b in range(0, len(order), batch_size):
        rows = [samples[i][0] for i in order[b : b + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        yield ids, mask


def _lm_loss(model: nn.Module, samples: list[torch.Tensor], device, on_batch=None) -> float:
    """Mean next-token NLL over every token of ``samples`` (the calibration loss). ``on_batch(mask)`` is called
    before each batch's forward pass with its attention mask (1 = a real token)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask in _batches(samples):
            ids, mask = ids.to(device), mask.to(device)
            if on_batch:
                on_batch(mask)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum",
                                           ignore_index=-100))
            count += int((target != -100).sum())
    return total / count


@contextlib.contextmanager
def _skipping(model: nn.Module, skip: set[int]):
    """The model with decoder layers ``skip`` left out (identity), restored on exit."""
    inner = model.model
    layers = inner.layers
    inner.layers = nn.ModuleList([layer for i, layer in enumerate(layers) if i not in skip])
    try:
        yield model
    finally:
        inner.layers = layers


def importance(model: nn.Module, samples: list[torch.Tensor], device=None,
               progress: Callable[[int], None] | None = None, layer_samples: int | None = None) -> Importance:
    """Measure every importance of the module docstring on ``samples`` (from :func:`calibration_samples`); the
    layers' on the first ``layer_samples`` of them (all when None). ``progress(1)`` per forward pass: one with hooks,
    then one per decoder layer skipped."""
    check_structurable(model)
    device = device or next(model.parameters()).device
    layers = decoder_layers(model)
    cfg = Shape.of(model.config)
    L = len(layers)
    heads = torch.zeros(L, cfg.heads, dtype=torch.float64)
    neurons = torch.zeros(L, cfg.mlp, dtype=torch.float64)
    channels = torch.zeros(cfg.hidden, dtype=torch.float64)
    tokens = [0]
    real = [None]  # the current batch's real-token positions, flattened: padding is not measured
    hooks = []

    def flat(x: torch.Tensor, width: int) -> torch.Tensor:
        return x.detach().float().reshape(-1, width)[real[0]]

    def on_o_proj(layer_index):
        def hook(module, args):
            a = flat(args[0], cfg.heads * cfg.head_dim).reshape(-1, cfg.heads, cfg.head_dim)  # (tokens, H, hd)
            W = module.weight.detach().float().reshape(module.out_features, cfg.heads, cfg.head_dim)
            for h in range(cfg.heads):  # each head's part of the output, one head at a time (memory)
                heads[layer_index, h] += float((a[:, h] @ W[:, h].T).pow(2).sum())
        return hook

    def on_down_proj(layer_index):
        def hook(module, args):
            a = flat(args[0], cfg.mlp)
            col = module.weight.detach().float().pow(2).sum(0)  # ||W_down[:, i]||^2
            neurons[layer_index] += (a.pow(2).sum(0) * col).double()
        return hook

    def on_norm(module, args, out):
        channels.add_(flat(out, cfg.hidden).pow(2).sum(0).double())

    def on_batch(mask: torch.Tensor) -> None:
        real[0] = mask.reshape(-1).bool()
        tokens[0] += int(mask.sum())

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        hooks.append(layer.input_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    was_training = model.training
    model.eval()
    try:
        base = _lm_loss(model, samples, device, on_batch)
    finally:
        for h in hooks:
            h.remove()
    if progress:
        progress(1)
    n = max(tokens[0], 1)
    subset = samples[:layer_samples] if layer_samples else samples
    sub_base = base if len(subset) == len(samples) else _lm_loss(model, subset, device)
    layer_rise = torch.zeros(L, dtype=torch.float64)
    for i in range(L):
        with _skipping(model, {i}):
            layer_rise[i] = _lm_loss(model, subset, device) - sub_base
        if progress:
            progress(1)
    model.train(was_training)
    return Importance(heads / n, neurons / n, channels / n, layer_rise, base)


# ------------------------------------------------------------------------------------------------- pruning


@dataclass
class Kept:
    """What a pruned model kept of its source: decoder layer indices; per kept layer, query heads and MLP neurons
    (source indices, in the pruned model's order) and key/value heads; hidden channels (shared by all layers)."""

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]
    channels: list[int]

    def to_json(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
                "neurons_kept": [len(n) for n in self.neurons], "channels": self.channels}


def choose_kept(shape: Shape, source: Shape, imp: Importance) -> Kept:
    """The most important parts that fit ``shape``, in the source's order."""
    check_shape(shape, source)
    layers = sorted(imp.layers.argsort(descending=True)[: shape.layers].tolist())
    group, new_group = source.heads // source.kv_heads, shape.heads // shape.kv_heads
    channels = sorted(imp.channels.argsort(descending=True)[: shape.hidden].tolist())
    heads, kv_heads, neurons = [], [], []
    groups = imp.kv_groups(source.kv_heads)
    for layer in layers:
        kv = sorted(groups[layer].argsort(descending=True)[: shape.kv_heads].tolist())
        q = []
        for g in kv:  # the group's best query heads, so that new head j reads new kv head j // new_group
            members = torch.arange(g * group, (g + 1) * group)
            best = members[imp.heads[layer, members].argsort(descending=True)[:new_group]]
            q += sorted(best.tolist())
        heads.append(q)
        kv_heads.append(kv)
        neurons.append(sorted(imp.neurons[layer].argsort(descending=True)[: shape.mlp].tolist()))
    return Kept(layers, heads, kv_heads, neurons, channels)


def _rows(W: torch.Tensor, index: list[int], size: int) -> torch.Tensor:
    """The rows of ``W`` (or entries of a bias) of the blocks ``index``, each block ``size`` rows."""
    rows = torch.tensor([b * size + r for b in index for r in range(size)], dtype=torch.long)
    return W.index_select(0, rows)


@dataclass
class Pruned:
    model: nn.Module
    shape: Shape
    kept: Kept


@torch.no_grad()
def prune_to_shape(model: nn.Module, shape: Shape, imp: Importance) -> Pruned:
    """A new model of ``shape`` made of the most important parts of ``model`` (which is left as it is)."""
    check_structurable(model)
    source = Shape.of(model.config)
    kept = choose_kept(shape, source, imp)
    ch = torch.tensor(kept.channels, dtype=torch.long)
    scale = math.sqrt(source.hidden / shape.hidden)  # RMS over the teacher's d channels, removed ones at zero
    config = copy.deepcopy(model.config)
    config.num_hidden_layers, config.num_attention_heads = shape.layers, shape.heads
    config.num_key_value_heads, config.intermediate_size = shape.kv_heads, shape.mlp
    config.hidden_size, config.head_dim = shape.hidden, shape.head_dim
    config.rms_norm_eps = model.config.rms_norm_eps * source.hidden / shape.hidden
    if getattr(config, "layer_types", None):
        config.layer_types = [model.config.layer_types[i] for i in kept.layers]
    if hasattr(config, "max_window_layers") and config.max_window_layers is not None:  # qwen2: layers < N use windows
        config.max_window_layers = sum(1 for i in kept.layers if i < model.config.max_window_layers)
    src = model.state_dict()
    out = {}
    hd = shape.head_dim
    for new, old in enumerate(kept.layers):
        p, q = f"model.layers.{old}.", f"model.layers.{new}."
        heads, kv, neurons = kept.heads[new], kept.kv_heads[new], torch.tensor(kept.neurons[new], dtype=torch.long)
        for proj, blocks in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
            out[q + f"self_attn.{proj}.weight"] = _rows(src[p + f"self_attn.{proj}.weight"], blocks, hd)[:, ch]
            if p + f"self_attn.{proj}.bias" in src:
                out[q + f"self_attn.{proj}.bias"] = _rows(src[p + f"self_attn.{proj}.bias"], blocks, hd)
        o_cols = torch.tensor([h * hd + r for h in heads for r in range(hd)], dtype=torch.long)
        out[q + "self_attn.o_proj.weight"] = src[p + "self_attn.o_proj.weight"][ch][:, o_cols]
        if p + "self_attn.o_proj.bias" in src:
            out[q + "self_attn.o_proj.bias"] = src[p + "self_attn.o_proj.bias"][ch]
        for proj in ("gate_proj", "up_proj"):
            out[q + f"mlp.{proj}.weight"] = src[p + f"mlp.{proj}.weight"][neurons][:, ch]
        out[q + "mlp.down_proj.weight"] = src[p + "mlp.down_proj.weight"][ch][:, neurons]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[q + f"{norm}.weight"] = src[p + f"{norm}.weight"][ch] * scale
    out["model.embed_tokens.weight"] = src["model.embed_tokens.weight"][:, ch]
    out["model.norm.weight"] = src["model.norm.weight"][ch] * scale
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not tied and "lm_head.weight" in src:
        out["lm_head.weight"] = src["lm_head.weight"][:, ch]
    dtype = next(model.parameters()).dtype
    small = type(model)(config).to(dtype)
    missing, unexpected = small.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight") and "rotary_emb" not in k]
    if missing or unexpected:
        raise AlmakError(f"structured pruning built a state dict that does not fit the smaller model: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}; this is a bug in almak")
    if tied:
        small.tie_weights()
    small.generation_config = copy.deepcopy(model.generation_config)
    small.eval()
    return Pruned(small, shape, kept)


# -------------------------------------------------------------------------------------------------- search


def _widths(full: int) -> list[int]:
    """The widths a search tries for a dimension of ``full``: down to half, in steps of CHANNEL_STEP (an eighth of
    the dimension, a multiple of 8, for small ones)."""
    step = CHANNEL_STEP if full >= 8 * CHANNEL_STEP else max(8, full // 8 // 8 * 8)
    return sorted({full, *range(full - full % step, (full + 1) // 2 - 1, -step)} - {0}, reverse=True)


def candidate_shapes(source: Shape, fraction: float, slack: float = 0.03, least: int = 1) -> list[Shape]:
    """The uniform sub-shapes (each dimension at least half the source's, the hidden size a multiple of the heads,
    as transformers 5 requires) whose decoder parameters are within
    ``slack`` under ``fraction`` of the source's; at least ``least`` of them (the largest under the budget) where the
    band holds fewer."""
    budget = fraction * source.decoder_params()
    group = source.heads // source.kv_heads
    attn = sorted({(kv * g, kv) for kv in range(1, source.kv_heads + 1) for g in range(1, group + 1)
                   if kv * g * 2 >= source.heads})
    under = []
    for layers in range(source.layers, (source.layers + 1) // 2 - 1, -1):
        for heads, kv in attn:
            for mlp in _widths(source.mlp):
                for hidden in _widths(source.hidden):
                    shape = Shape(layers, heads, kv, mlp, hidden, source.head_dim)
                    if shape.decoder_params() <= budget and shape != source and hidden % heads == 0:
                        under.append(shape)
    under.sort(key=lambda s: -s.decoder_params())
    band = [s for s in under if s.decoder_params() >= (1 - slack) * budget]
    return band if len(band) >= least else under[:least]


def spread(shapes: list[Shape], n: int) -> list[Shape]:
    """``n`` of ``shapes`` spread over their depth: the most layers first, to the fewest; within a depth, the one
    that keeps the most hidden channels, then MLP, then heads (width is cheaper to lose than depth at equal size
    is what the search then tests)."""
    by_depth: dict[int, list[Shape]] = {}
    for s in shapes:
        by_depth.setdefault(s.layers, []).append(s)
    ranked = [sorted(v, key=lambda s: (-s.hidden, -s.mlp, -s.heads)) for _, v in sorted(by_depth.items(), reverse=True)]
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in ranked):  # round-robin over depths
        for v in ranked:
            if i < len(v) and len(out) < n:
                out.append(v[i])
        i += 1
    return out


@dataclass
class Choice:
    shape: Shape
    losses: list[tuple[Shape, float]]  # every candidate tried, with its calibration loss


def choose_shape(model: nn.Module, imp: Importance, recipe: StructuredRecipe, samples: list[torch.Tensor],
                 device=None, progress: Callable[[int], None] | None = None) -> Choice:
    """The shape of ``recipe`` (explicit), or, for a budget, the candidate with the lowest calibration loss after
    one-shot pruning (no training), among ``recipe.search_candidates`` spread over the depths that fit."""
    source = Shape.of(model.config)
    if recipe.target_params is None:
        return Choice(recipe.shape_for(source), [])
    shapes = spread(candidate_shapes(source, recipe.target_params, least=recipe.search_candidates),
                    recipe.search_candidates)
    if not shapes:
        raise AlmakError(f"no uniform shape keeps at most {recipe.target_params:.0%} of the decoder parameters with at "
                         f"least half of each dimension; give a larger --target-params or an explicit shape")
    device = device or next(model.parameters()).device
    losses = []
    for shape in shapes:
        small = prune_to_shape(model, shape, imp).model.to(device)
        losses.append((shape, _lm_loss(small, samples[: recipe.search_samples], device)))
        del small
        if progress:
            progress(1)
    best = min(losses, key=lambda sl: sl[1])[0]
    return Choice(best, losses)


# --------------------------------------------------------------------------------------- the command's call


@dataclass
class StructuredResult:
    """What :func:`prune_structured` did: the smaller model's folder, its shape and the source's, the parameters
    kept, the candidates compared (for a budget), and timings."""

    out: Path
    model: str
    recipe: StructuredRecipe
    source_shape: Shape
    shape: Shape
    kept: Kept
    candidates: list[tuple[Shape, float]]
    base_loss: float  # the source's calibration loss
    loss: float  # the pruned model's, before any training
    params_before: int  # all parameters, embeddings included
    params_after: int
    seconds: float
    peak_memory: tuple[int, str]


def prune_structured(model: str | None, recipe: StructuredRecipe, out: str | Path, *, device: str = "auto",
                     dtype: str = "auto", prompt: str | None = None, overwrite: bool = False,
                     progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> StructuredResult:
    """``almak prune --method structured``: measure ``model``'s importances on calibration data, choose the shape
    (``recipe``'s, or the best candidate under its budget), slice the smaller model out and write it to ``out`` with
    ``structure_report.json``. ``progress(stage, total)`` may return a callback for the stages "importance" (one
    tick per forward pass) and "search"."""
    out = Path(out)
    check_new_output(out, overwrite, inputs=(model, recipe.calib))
    device, dtype = calibration_device(device, dtype)
    lm = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
    check_structurable(lm.model)
    source = Shape.of(lm.model.config)
    if recipe.target_params is None:
        recipe.shape_for(source)  # a bad shape is refused before any work
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    family = prompt or guess_family(lm.ref, lm.tokenizer)
    samples = calibration_samples(lm.tokenizer, recipe.calib, recipe.nsamples, recipe.seqlen, recipe.seed, family)
    start = time.perf_counter()
    tick = progress("importance", 1 + source.layers) if progress else None
    imp = importance(lm.model, samples, device, tick, layer_samples=recipe.search_samples)
    search = progress("search", recipe.search_candidates) if progress and recipe.target_params else None
    choice = choose_shape(lm.model, imp, recipe, samples, device, search)
    pruned = prune_to_shape(lm.model, choice.shape, imp)
    loss = _lm_loss(pruned.model, samples[: recipe.search_samples], device)
    seconds = time.perf_counter() - start
    params_before = sum(p.numel() for p in lm.model.parameters())
    params_after = sum(p.numel() for p in pruned.model.parameters())
    fields = {"command": "prune", **recipe.to_json(), "model": lm.ref, "prompt": family,
              "source_shape": source._asdict(), "shape": choice.shape._asdict(),
              "decoder_params": [source.decoder_params(), choice.shape.decoder_params()]}
    report = {"source_shape": source._asdict(), "shape": choice.shape._asdict(), "kept": pruned.kept.to_json(),
              "importance": imp.to_json(), "calibration_loss": {"source": imp.loss, "pruned": loss},
              "candidates": [{"shape": s._asdict(), "decoder_params": s.decoder_params(), "loss": v}
                             for s, v in choice.losses]}
    save_structured(pruned.model.to("cpu"), lm.tokenizer, out, fields, report, overwrite=overwrite)
    return StructuredResult(out, lm.ref, recipe, source, choice.shape, pruned.kept, choice.losses, imp.loss, loss,
                            params_before, params_after, seconds, peak_memory(device))
