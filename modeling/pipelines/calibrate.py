"""Calibration: translation-formatted samples, and the layer-by-layer pass GPTQ (and the pruners) run on.

The pass (:func:`run_layerwise`) follows GPTQ's sequential recipe: capture the inputs of the first decoder
layer, then for each layer in turn observe its linear inputs on every sample, let the caller compress the
layer, and feed the compressed layer's outputs to the next one. Only one decoder layer and the samples'
hidden states need be on ``device`` at a time, so a 13B model calibrates on one 24 GB GPU.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.architecture import decoder_layers
from almak.modeling.text.data import DATA_DIR, read_json_records, read_lines
from almak.modeling.text.languages import parse_lang_pair
from almak.modeling.text.prompts import Prompt

log = logging.getLogger(__name__)

ALMA_CALIB_LANGS = ("cs", "de", "is", "ru", "zh")


def _alma_pairs(directions: list[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """(src, tgt, source text, target text) for each direction, from the bundled sample of ALMA's training pairs."""
    out = []
    for src, tgt in directions:
        xx = tgt if src == "en" else src
        path = DATA_DIR / "calib" / f"train.{xx}-en.jsonl"
        if xx not in ALMA_CALIB_LANGS or "en" not in (src, tgt):
            raise AlmakError(f"no bundled ALMA calibration pairs for {src}-{tgt}; bundled: "
                             + ", ".join(f"{x}-en, en-{x}" for x in ALMA_CALIB_LANGS))
        out += [(src, tgt, r["translation"][src], r["translation"][tgt]) for r in read_json_records(path)]
    return out


def calibration_samples(tokenizer, calib: str = "alma", nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                        prompt_family: str = "alma") -> list[torch.Tensor]:
    """Token id tensors (1, T<=seqlen) to calibrate on.

    ``calib`` is ``alma`` (the bundled ALMA training pairs, cs/de/is/ru/zh <-> en, every direction both ways,
    drawn in turn), ``alma:de-en,en-de`` (chosen directions), a JSON/JSONL file of ``{"translation": ...}``
    records named ``*.xx-yy.*`` (both ways), or a plain text file (its lines joined and cut into ``seqlen``
    token windows). Translation samples are the model's prompt followed by the reference.
    """
    if nsamples < 1 or seqlen < 8:
        raise AlmakError(f"need nsamples >= 1 and seqlen >= 8, got {nsamples} and {seqlen}")
    rng = random.Random(seed)
    if calib == "alma" or calib.startswith("alma:"):
        spec = calib.split(":", 1)[1] if ":" in calib else ""
        if spec:
            directions = [parse_lang_pair(p) for p in spec.split(",")]
        else:
            directions = [d for xx in ALMA_CALIB_LANGS for d in ((xx, "en"), ("en", xx))]
        pairs = _alma_pairs(directions)
    else:
        path = Path(calib)
        if not path.is_file():
            raise AlmakError(f"calibration set {calib!r} is neither 'alma', 'alma:xx-yy' nor an existing file")
        if path.suffix in (".json", ".jsonl"):
            records = read_json_records(path)
            import re

            m = re.search(r"([a-z]{2})-([a-z]{2})", path.name)
            if not m or not records or "translation" not in records[0]:
                raise AlmakError(f"{calib}: expected 'translation' records in a file named like train.de-en.jsonl")
            a, b = m.groups()
            pairs = [(s, t, r["translation"][s], r["translation"][t]) for r in records for s, t in ((a, b), (b, a))]
        else:
            return _text_windows(tokenizer, "\n".join(read_lines(path, "calibration file")), nsamples, seqlen, rng)
    if nsamples > len(pairs):  # more would repeat pairs: the same statistics, counted twice
        raise AlmakError(f"--nsamples {nsamples} is more than the {len(pairs)} pairs of the calibration set "
                         f"{calib!r}; lower it")
    # Round-robin over directions so that every direction is represented whatever nsamples is.
    by_dir: dict[tuple[str, str], list] = {}
    for p in pairs:
        by_dir.setdefault(p[:2], []).append(p)
    for v in by_dir.values():
        rng.shuffle(v)
    order = sorted(by_dir)
    samples = []
    for i in range(nsamples):  # one prompt + reference per sample, as the model sees them at test time
        bucket = by_dir[order[i % len(order)]]
        src, tgt, s, t = bucket[(i // len(order)) % len(bucket)]
        prompt_ids, target_ids = Prompt(prompt_family, src, tgt).encode(s, t, tokenizer)
        samples.append(torch.tensor([(prompt_ids + target_ids)[:seqlen]]))
    return samples


def _text_windows(tokenizer, text: str, nsamples: int, seqlen: int, rng: random.Random) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seqlen:
        raise AlmakError(f"the calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    if nsamples > len(ids) - seqlen + 1:
        raise AlmakError(f"--nsamples {nsamples} windows of {seqlen} tokens: the calibration text ({len(ids)} tokens) "
                         f"has only {len(ids) - seqlen + 1} distinct ones; lower --nsamples or --seqlen")
    starts = [rng.randrange(0, len(ids) - seqlen + 1) for _ in range(nsamples)]
    return [torch.tensor([ids[s : s + seqlen]]) for s in starts]


# Projections of a LLaMA decoder layer that read the same tensor: GPTQ accumulates one Hessian for them and
# solves their stacked rows in one sweep (the result each layer gets is the same as solving it alone); mixed
# precision gives them one format (vLLM fuses them into one layer).
class Observer(Protocol):
    def add_batch(self, x: torch.Tensor) -> None: ...


class _Captured(Exception):
    pass


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) that the first decoder layer receives for each sample."""
    layers = decoder_layers(model)
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "cache")}
        kwargs["use_cache"] = False
        captured.append((hidden, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    samples: list[torch.Tensor],
    make_observer: Callable[[str, nn.Linear], Observer],
    finish_layer: Callable[[int, nn.Module, dict[str, Observer]], None],
    targets: Callable[[str, nn.Module], bool],
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Observe, compress and propagate, one decoder layer at a time.

    For layer i: every submodule ``name`` with ``targets(name, module)`` gets ``make_observer(name, module)``,
    fed the module's input on every sample; then ``finish_layer(i, layer, observers)`` compresses the layer
    in place; then the samples go through the compressed layer to become layer i+1's inputs.
    NaN or inf in a layer's outputs stops the pass with an AlmakError.
    """
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    inputs = capture_layer_inputs(model, samples)
    states = [h.to(device) for h, _ in inputs]
    kwargs = [{k: _to(v, device) for k, v in kw.items()} for _, kw in inputs]
    del inputs

    def forward(layer, i):
        out = layer(states[i], **kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    for index, layer in enumerate(layers):
        layer.to(device)
        observers = {name: make_observer(name, m) for name, m in layer.named_modules() if name and targets(name, m)}
        handles = [layer.get_submodule(name).register_forward_hook(
            lambda mod, args, out, obs=obs: obs.add_batch(args[0])) for name, obs in observers.items()]
        try:
            for i in range(len(states)):
                forward(layer, i)
        finally:
            for h in handles:
                h.remove()
        finish_layer(index, layer, observers)
        del observers
        for i in range(len(states)):
            states[i] = forward(layer, i)
            if not torch.isfinite(states[i]).all():
                raise AlmakError(f"NaN or inf in the outputs of decoder layer {index} during calibration")
        layer.to(home)
        if progress:
            progress(1)
