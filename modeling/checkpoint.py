"""Compressed checkpoints: write compressed-tensors ``pack-quantized`` and ``sparse-24-bitmask`` folders, read
them and GPTQ folders back.

>>> save_quantized(model, tokenizer, "alma-w4", recipe={"method": "gptq", "bits": 4})   # doctest: +SKIP
>>> model, tokenizer = load_quantized("alma-w4")                                         # doctest: +SKIP

What a written folder holds (so that transformers with the ``compressed-tensors`` package, and vLLM, load it
as it is; the layout was checked against compressed-tensors 0.20.0, ``compressors/pack_quantized/``):

- ``model.safetensors``: the float tensors as the model holds them (tied tensors once, as transformers writes
  them) and, per quantized linear ``<name>``:

  - ``<name>.weight_packed``: (N, ceil(K * bits / 32)) int32. Codes are signed (int4 [-8, 7], int8
    [-128, 127]) stored offset by ``2**(bits-1)``, ``32 // bits`` per word along K, lowest bits first. For
    int4 that is byte for byte almak's own ``QuantLinear.weight_packed``; int8 codes are packed 4 a word.
  - ``<name>.weight_scale``: (N, G) in the layer's float dtype; G = K / group_size (strategy ``group``,
    which needs group_size to divide K) or 1 (strategy ``channel``).
  - ``<name>.weight_zero_point``: asymmetric only: the signed zero points packed like the codes but along
    dim 0 (the output channels): (ceil(N * bits / 32), G) int32. Symmetric schemes store none (zero 0).
  - ``<name>.weight_shape``: int64 ``[N, K]``.

  and, per 2:4 float linear (``Sparse24Linear``; compressed-tensors' ``sparse-24-bitmask``, whose layout was
  checked against compressed-tensors 0.14.0.1, the last release that reads it):

  - ``<name>.compressed``: (N, K / 2) the kept weights, row-major in order of position;
  - ``<name>.bitmask``: (N, K / 8) uint8, the keep-mask (2 bits per group of 4) packed little-endian
    (``numpy.packbits(mask, axis=-1, bitorder="little")``);
  - ``<name>.shape``: (2, 1) int64 ``[[N], [K]]``.

  A 2:4 + int4 linear (``Sparse24QuantLinear``) is written as ``pack-quantized`` with its dense codes (the
  zero point at pruned positions), as compressed-tensors itself stores sparse quantized layers.

- ``config.json`` with ``quantization_config`` (``quant_method: compressed-tensors``, ``format:
  pack-quantized``, ``quantization_status: compressed``, one ``config_groups`` entry per scheme targeting
  ``Linear`` and ``ignore`` naming the linears left in float, such as ``lm_head``; a ``sparsity_config`` of
  format ``sparse-24-bitmask`` naming the 2:4 layers; a 2:4-only folder has just the latter) and
  ``almak_recipe`` naming the recipe file; ``generation_config.json``; the tokenizer files;
  ``almak_recipe.json``; for pruned models ``sparsity_report.json``. An unstructured pruned model is a plain
  dense folder (no ``quantization_config``).

Reading: :func:`load_quantized` builds the model with its float parameters on the meta device (buffers such
as the rotary frequencies are computed as usual), swaps every quantized linear for a ``QuantLinear`` (a
``Sparse24QuantLinear`` where the sparsity_config declares it 2:4) and every bitmask one for a
``Sparse24Linear``, and assigns the stored tensors, so no float copy of a compressed weight is ever made. It reads the folders
above, those llm-compressor writes (same layout; older ones with unpacked int8 zero points too), and
GPTQ folders as AutoGPTQ / GPTQModel publish them (see :func:`is_gptq_checkpoint`). A ``g_idx`` /
``weight_g_idx`` that permutes whole groups of columns (act-order without static groups: GPTQ ``desc_act``,
older compressed-tensors' ``actorder: group``) becomes the layer's ``input_perm``: its codes are stored group
by group and the input is gathered in that order. Such layers are not written back: compressed-tensors
removed ``actorder: group``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

import almak
from almak.errors import AlmakError
from almak.files import write_dir_atomic
from almak.kernels.sparse24 import from_bitmask_24, to_bitmask_24
from almak.modeling.devices import check_device, resolve_dtype
from almak.modeling.quant_linear import QuantLinear
from almak.modeling.sparse_linear import Sparse24Linear, Sparse24QuantLinear
from almak.modeling.surgery import set_module
from almak.quant.pack import GROUP_SIZES, pack_int4, unpack_int4

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "almak_recipe.json"
CT_FORMAT = "pack-quantized"
# The compressed-tensors release whose pack-quantized layout this file was checked against (written into
# quantization_config.version, as compressed-tensors itself does).
CT_LAYOUT_VERSION = "0.20.0"
# sparse-24-bitmask was last read by compressed-tensors 0.14 (0.15 dropped it); its layout was checked there.
CT_SPARSE_FORMAT = "sparse-24-bitmask"
CT_SPARSE_LAYOUT_VERSION = "0.14.0.1"
SPARSITY_REPORT_FILE = "sparsity_report.json"
# Bytes allowed beyond the tensors when checking free space: config, tokenizer (a Llama-3 tokenizer.json is
# about 9 MB) and the safetensors header.
SPACE_MARGIN = 64 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ------------------------------------------------------------------------------------------------ packing

def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values (R, C) into (R, ceil(C * bits / 32)) int32, lowest bits first.

    >>> pack_rows(torch.tensor([[1, 2, 3, 4]]), 8)
    tensor([[67305985]], dtype=torch.int32)
    """
    per = 32 // bits
    v = values.to(torch.int64)
    R, C = v.shape
    if (-C) % per:
        v = torch.nn.functional.pad(v, (0, (-C) % per))
    shifts = torch.arange(0, 32, bits, device=v.device, dtype=torch.int64)
    words = (v.reshape(R, -1, per) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: (R, W) int32 -> (R, cols) int64 unsigned values."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int64)
    u = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return u.reshape(words.shape[0], -1)[:, :cols]


# ------------------------------------------------------------------------------------------------ helpers

def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise AlmakError(f"{folder} has no config.json: not a model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AlmakError(f"{path} is not valid JSON: {e}") from None


def _quant_config(folder: Path) -> dict:
    """``quantization_config`` of config.json, or AutoGPTQ's ``quantize_config.json``, or {}."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return {}
    qc = _read_config(folder).get("quantization_config") or {}
    autogptq = folder / "quantize_config.json"
    if autogptq.is_file() and qc.get("quant_method", "gptq") == "gptq":
        # AutoGPTQ's own file; GPTQModel keeps e.g. checkpoint_format there. config.json wins where both say.
        qc = {"quant_method": "gptq", **json.loads(autogptq.read_text(encoding="utf-8")), **qc}
    return qc


def is_compressed_checkpoint(folder) -> bool:
    """Whether ``folder`` is a compressed-tensors ``pack-quantized`` and/or ``sparse-24-bitmask`` checkpoint
    (almak's or llm-compressor's).

    Other compressed-tensors formats (fp8, W8A8) answer False: transformers loads those itself.
    """
    qc = _quant_config(Path(folder))
    if qc.get("quant_method") != "compressed-tensors":
        return False
    formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()}
    return CT_FORMAT in formats or (qc.get("sparsity_config") or {}).get("format") == CT_SPARSE_FORMAT


def is_gptq_checkpoint(folder) -> bool:
    """Whether ``folder`` holds a GPTQ checkpoint (AutoGPTQ / GPTQModel: ``qweight``, ``qzeros``, ``scales``)."""
    return str(_quant_config(Path(folder)).get("quant_method", "")).lower() == "gptq"


def read_recipe(folder) -> dict | None:
    """The recipe almak recorded in a checkpoint it wrote (None for checkpoints written by others)."""
    path = Path(folder) / RECIPE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _json_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear | Sparse24QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, Sparse24QuantLinear))}


def _sparse_layers(model: nn.Module) -> dict[str, Sparse24Linear | Sparse24QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (Sparse24Linear, Sparse24QuantLinear))}


def vllm_limits(model: nn.Module) -> list[str]:
    """What in ``model``'s compressed layers vLLM's kernels will not run as almak wrote it, read from vLLM's
    compressed-tensors code (2026-11; almak has not run vLLM): empty when nothing stands out."""
    notes = []
    if _sparse_layers(model):
        notes.append("current vLLM does not load 2:4 (sparse) compressed-tensors checkpoints")
    quant = _quant_layers(model).values()
    schemes = {_scheme_key(m) for m in quant}
    groups = sorted({g for _, g, _ in schemes if g not in (-1, 32, 64, 128)})
    if groups:
        notes.append(f"vLLM's int4/int8 kernels take group size -1, 32, 64 or 128, not {groups[0]}")
    if any(bits == 8 and not sym for bits, _, sym in schemes):
        notes.append("asymmetric int8 has a vLLM kernel on Hopper GPUs only (Machete)")
    if any(m.weight_scale.dtype == torch.float32 for m in quant):
        notes.append("float32 scales: vLLM rounds them to its fp16/bf16 (quantize on a GPU to avoid)")
    return notes


# ------------------------------------------------------------------------------------------------ writing

def _check_writable(name: str, layer: QuantLinear, layers: dict[str, QuantLinear]) -> None:
    K, g = layer.in_features, layer.group_size
    if g != -1 and K % g:
        ks = sorted({m.in_features for m in layers.values()})
        fits = [str(s) for s in GROUP_SIZES if s != -1 and all(k % s == 0 for k in ks)]
        hint = f"group size {' or '.join(fits)}" if fits else "a group size that divides every in_features"
        raise AlmakError(
            f"{name}: group size {g} does not divide in_features={K}; compressed-tensors (and so transformers "
            f"and vLLM) cannot load ragged groups. Quantize with {hint} (or per channel, -1) instead")


def _scheme_key(layer: QuantLinear) -> tuple:
    return (layer.bits, layer.group_size, layer.sym)


def _ct_weights_args(bits: int, group_size: int, sym: bool, actorder: str | None) -> dict:
    args = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
            "strategy": "channel" if group_size == -1 else "group",
            "group_size": None if group_size == -1 else group_size}
    if actorder:
        args["actorder"] = actorder
    return args


def ct_quantization_config(model: nn.Module, act_order: bool = False) -> dict:
    """The compressed-tensors ``quantization_config`` describing the QuantLinear layers of ``model``."""
    layers = _quant_layers(model)
    schemes: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        schemes.setdefault(_scheme_key(layer), []).append(name)
    # Static act-order ("weight") changes how GPTQ visited columns, not the stored format.
    actorder = "weight" if act_order else None
    groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(schemes.items(), key=lambda kv: -len(kv[1]))):
        # One scheme targets every Linear; several name their layers (compressed-tensors matches exact names).
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": _ct_weights_args(bits, g, sym, actorder),
                                "input_activations": None, "output_activations": None, "format": CT_FORMAT}
    # The linears left in float (lm_head, 2:4 float layers, ...): quantized layers are no nn.Linear.
    ignore = sorted(name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Sparse24Linear)))
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": CT_LAYOUT_VERSION}


def ct_sparsity_config(model: nn.Module) -> dict:
    """compressed-tensors' ``sparsity_config`` naming the 2:4 layers of ``model`` (as 0.14 writes it)."""
    sparse = _sparse_layers(model)
    pruned = sum(m.out_features * m.in_features // 2 for m in sparse.values())
    # Over every weight of the model, the compressed layers counted at their dense size.
    total = sum(p.numel() for p in model.parameters()) + 2 * pruned
    return {"format": CT_SPARSE_FORMAT, "global_sparsity": pruned / max(total, 1), "ignore": [],
            "registry_requires_subclass": False, "sparsity_structure": "2:4", "targets": sorted(sparse)}


def checkpoint_quantization_config(model: nn.Module, act_order: bool = False) -> dict | None:
    """config.json's ``quantization_config`` for ``model``: pack-quantized groups for its quantized layers,
    a ``sparsity_config`` for its 2:4 layers; None when it has neither (a plain float folder)."""
    quant, sparse = _quant_layers(model), _sparse_layers(model)
    if not quant and not sparse:
        return None
    if quant:
        qc = ct_quantization_config(model, act_order)
    else:
        qc = {"quant_method": "compressed-tensors", "transform_config": {}, "version": CT_SPARSE_LAYOUT_VERSION}
    if sparse:
        qc["sparsity_config"] = ct_sparsity_config(model)
    return qc


def _ct_sparse_tensors(name: str, layer: Sparse24Linear) -> dict[str, torch.Tensor]:
    """The sparse-24-bitmask tensors of one Sparse24Linear: compressed (N, K/2), bitmask, shape (2, 1)."""
    compressed, bitmask = to_bitmask_24(layer.values, layer.meta)
    out = {f"{name}.compressed": compressed, f"{name}.bitmask": bitmask,
           f"{name}.shape": torch.tensor([[layer.out_features], [layer.in_features]], dtype=torch.int64)}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias
    return out


def _ct_layer_tensors(name: str, layer: QuantLinear | Sparse24QuantLinear) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized layer (see the module docstring); a 2:4 one is stored
    with its dense codes (the pruned positions hold the zero point), as compressed-tensors does."""
    if isinstance(layer, Sparse24QuantLinear):
        layer = layer.to_quant_linear()
    N, K, bits = layer.out_features, layer.in_features, layer.bits
    if layer.input_perm is not None:
        raise AlmakError(f"{name} has a permuted input order (act-order with non-static groups, as read from a GPTQ "
                         "desc_act folder), which compressed-tensors no longer stores (its actorder 'group' was "
                         "removed): keep the GPTQ folder, or quantize the float model with almak quantize, whose "
                         "act-order keeps static groups")
    if bits == 4:
        packed = layer.weight_packed  # already the pack-quantized int4 layout
    else:
        packed = pack_rows(layer.weight_packed.to(torch.int64) + 128, 8)
    out = {f"{name}.weight_packed": packed, f"{name}.weight_scale": layer.weight_scale,
           f"{name}.weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if not layer.sym:
        # almak's int4 zeros are unsigned [0, 15], compressed-tensors' signed [-8, 7]; int8 zeros are signed
        # in both. Either way the stored value is zero + 2**(bits-1), packed along the output channels.
        z = layer.weight_zero_point.float().round().to(torch.int64) + (0 if bits == 4 else 128)
        if z.numel() and (z.min() < 0 or z.max() >= 2**bits):
            raise AlmakError(f"{name}: zero points outside the int{bits} code range cannot be stored")
        out[f"{name}.weight_zero_point"] = pack_rows(z.t(), bits).t()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias
    return out


def _tensors_to_write(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = {**_quant_layers(model), **_sparse_layers(model)}
    state = model.state_dict()
    tied_targets = set(getattr(model, "_tied_weights_keys", None) or {})
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    # Aliases of one tensor (tied embeddings) are stored once, under the name transformers keeps: the source,
    # never a key of ``_tied_weights_keys``.
    names = sorted(state, key=lambda n: n in tied_targets)
    for key in names:
        prefix = key.rpartition(".")[0]
        if prefix in layers:
            continue
        t = state[key]
        alias = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if alias is not None and alias in seen:
            continue
        if alias is not None:
            seen[alias] = key
        out[key] = t
    for name, layer in layers.items():
        if isinstance(layer, Sparse24Linear):
            out.update(_ct_sparse_tensors(name, layer))
        else:
            out.update(_ct_layer_tensors(name, layer))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _write_config(model: nn.Module, folder: Path, quant_config: dict | None) -> None:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if floats:
        config.dtype = floats[0]
    config.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if quant_config is not None:
        data["quantization_config"] = quant_config
    # Top-level, not inside quantization_config: loaders read that one by its schema.
    data["almak_recipe"] = RECIPE_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_quantized(model: nn.Module, tokenizer, out_dir, recipe: dict, overwrite: bool = False) -> Path:
    """Write ``model`` (with QuantLinear layers) as a compressed-tensors ``pack-quantized`` checkpoint.

    ``recipe`` (method, bits, group size, calibration set and size, damping, ...) is stored as
    ``almak_recipe.json`` with almak's version added. The folder is written beside ``out_dir`` under a
    temporary name and renamed when complete; an existing ``out_dir`` is refused unless ``overwrite``.
    ``Sparse24QuantLinear`` layers (2:4 + int4) are written as pack-quantized too, named in a
    ``sparsity_config``.

    >>> quantize_(model, QuantConfig(bits=4, group_size=64))                       # doctest: +SKIP
    >>> save_quantized(model, tok, "out/smollm-w4", {"method": "rtn", "bits": 4})  # doctest: +SKIP
    PosixPath('out/smollm-w4')
    """
    layers = _quant_layers(model)
    if not layers:
        raise AlmakError("the model has no quantized (QuantLinear) layers to save; quantize it first "
                         "(almak.modeling.surgery.quantize_ or GPTQ)")
    for name, layer in layers.items():
        _check_writable(name, layer, layers)
    return _write_checkpoint(model, tokenizer, out_dir, recipe, overwrite)


def save_pruned(model: nn.Module, tokenizer, out_dir, recipe: dict, report: dict, overwrite: bool = False) -> Path:
    """Write a pruned ``model``: its ``Sparse24Linear`` layers in compressed-tensors' ``sparse-24-bitmask``
    layout (with a ``sparsity_config``), everything else dense (unstructured pruning: dense tensors with
    zeros, no ``quantization_config``), plus ``sparsity_report.json`` (``report``: per-layer sparsity) and the
    recipe. Same temporary-folder and ``overwrite`` rules as :func:`save_quantized`.
    """
    return _write_checkpoint(model, tokenizer, out_dir, recipe, overwrite, {SPARSITY_REPORT_FILE: report})


def _write_checkpoint(model: nn.Module, tokenizer, out_dir, recipe: dict, overwrite: bool,
                      extra_json: dict[str, dict] | None = None) -> Path:
    from safetensors.torch import save_file


    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise AlmakError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    recipe = {**recipe, "almak_version": recipe.get("almak_version", almak.__version__)}
    texts = {}
    try:
        for fname, obj in {RECIPE_FILE: recipe, **(extra_json or {})}.items():
            texts[fname] = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    except TypeError as e:
        raise AlmakError(f"the recipe cannot be written as JSON: {e}") from None
    quant_config = checkpoint_quantization_config(model, act_order=bool(recipe.get("act_order")))

    tensors = _tensors_to_write(model)
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + SPACE_MARGIN
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise AlmakError(f"not enough disk space in {out.parent}: the checkpoint needs about "
                         f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free")

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_config(model, tmp, quant_config)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            log.warning("no tokenizer given: %s will hold none", out)
        for fname, text in texts.items():
            (tmp / fname).write_text(text, encoding="utf-8")

    write_dir_atomic(out, fill)
    log.info("wrote %s: %d quantized and %d 2:4 linears, %.1f MiB of tensors", out, len(_quant_layers(model)),
             len(_sparse_layers(model)), (need - SPACE_MARGIN) / 2**20)
    return out


# ------------------------------------------------------------------------------------------------ reading

class _Tensors:
    """Lazy access to the tensors of a folder's safetensors file(s), by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            extra = f" (it has {', '.join(pickled)}: pickle files are not read, convert them to safetensors)" \
                if pickled else ""
            raise AlmakError(f"{folder} has no .safetensors weights{extra}")
        self.handles = [safe_open(str(folder / f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}  # noqa: SIM118 (a safe_open handle)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __iter__(self):
        return iter(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def _skeleton(folder: Path):
    """The model of ``folder``'s config with its parameters on the meta device and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _linear_at(model: nn.Module, name: str, folder: Path) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AlmakError(f"{folder}: quantized tensors for {name}, which the model has no module for") from None
    if not isinstance(module, nn.Linear):
        raise AlmakError(f"{folder}: {name} is a {type(module).__name__}, not a Linear, yet has quantized tensors")
    return module


def _new_quant_linear(folder: Path, name: str, linear: nn.Linear, bits: int, group_size: int, sym: bool,
                      bias: bool, dtype: torch.dtype) -> QuantLinear:
    try:
        return QuantLinear(linear.in_features, linear.out_features, bits, group_size, sym, bias, dtype=dtype,
                           device="meta")
    except ValueError as e:
        raise AlmakError(f"{folder}: {name} cannot be loaded by almak: {e}") from None


def _fill(layer: QuantLinear, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
          bias: torch.Tensor | None, perm: torch.Tensor | None = None) -> None:
    layer.weight_packed = packed.contiguous()
    layer.weight_scale = scale.contiguous()
    if zero is not None:
        layer.weight_zero_point = zero.to(scale.dtype).contiguous()
    if bias is not None:
        layer.bias = bias.contiguous()
    layer.set_input_perm(perm)  # also drops the CPU-side cache


def _match(name: str, target: str) -> bool:
    """compressed-tensors' rule: ``re:`` regex (re.match), an exact name, or the class name Linear."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


def _ct_scheme(qc: dict, name: str, folder: Path) -> dict:
    if any(_match(name, t) for t in qc.get("ignore") or []):
        raise AlmakError(f"{folder}: {name} has quantized tensors but quantization_config ignores it")
    for gname, group in (qc.get("config_groups") or {}).items():
        if any(_match(name, t) for t in group.get("targets") or []):
            fmt = group.get("format") or qc.get("format")
            w = group.get("weights") or {}
            problem = None
            if fmt != CT_FORMAT:
                problem = f"format {fmt!r} (almak reads {CT_FORMAT})"
            elif group.get("input_activations"):
                problem = "quantized activations (almak runs weight-only schemes)"
            elif w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
                problem = f"{w.get('type', 'int')}{w.get('num_bits')} weights (almak reads int4 and int8)"
            elif w.get("strategy") not in ("group", "channel"):
                problem = f"strategy {w.get('strategy')!r} (almak reads group and channel)"
            if problem:
                raise AlmakError(f"{folder}: config group {gname} ({name}) uses {problem}")
            return w
    raise AlmakError(f"{folder}: {name} has quantized tensors but no config group targets it")


def _load_ct_layers(model: nn.Module, tensors: _Tensors, qc: dict, folder: Path) -> set[str]:
    sparse = _sparse_targets(model, qc)
    used = _load_sparse24_layers(model, tensors, qc, folder)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        w = _ct_scheme(qc, name, folder)
        bits, sym = w["num_bits"], bool(w.get("symmetric", True))
        g = -1 if w["strategy"] == "channel" else int(w["group_size"])
        linear = _linear_at(model, name, folder)
        N, K = linear.out_features, linear.in_features
        if f"{name}.weight_shape" in tensors:
            shape = tuple(int(v) for v in tensors.get(f"{name}.weight_shape").tolist())
            if shape != (N, K):
                raise AlmakError(f"{folder}: {name}.weight_shape is {list(shape)}, the model's layer is {[N, K]}")
        packed, scale = tensors.get(key), tensors.get(f"{name}.weight_scale")
        G = 1 if g == -1 else K // g
        if g != -1 and K % g:
            raise AlmakError(f"{folder}: {name}: group size {g} does not divide in_features={K}")
        if packed.shape != (N, math.ceil(K * bits / 32)) or scale.shape != (N, G):
            raise AlmakError(f"{folder}: {name}: weight_packed {list(packed.shape)} / weight_scale "
                             f"{list(scale.shape)} do not fit int{bits} {N}x{K} with {G} groups")
        zero = None
        if not sym:
            zkey = f"{name}.weight_zero_point"
            if zkey not in tensors:
                raise AlmakError(f"{folder}: {name} is asymmetric but has no weight_zero_point")
            zp = tensors.get(zkey)
            if zp.dtype == torch.int32:  # packed along the output channels
                z = unpack_rows(zp.t().contiguous(), bits, N).t() - 2 ** (bits - 1)
            else:  # older writers: one signed value per (channel, group)
                z = zp.to(torch.int64).reshape(N, G)
            zero = (z + (8 if bits == 4 else 0)).to(scale.dtype)
            used.add(zkey)
        if bits == 8:
            packed = (unpack_rows(packed, 8, K) - 128).to(torch.int8)
        perm = None
        if f"{name}.weight_g_idx" in tensors:  # actorder "group": stored in input order, each column's group
            perm = _group_order(tensors.get(f"{name}.weight_g_idx"), K, g, f"{folder}: {name}")
            used.add(f"{name}.weight_g_idx")
            if perm is not None:
                packed = pack_int4(unpack_int4(packed)[:, perm]) if bits == 4 else packed[:, perm]
        elif w.get("actorder") in ("group", "dynamic"):
            raise AlmakError(f"{folder}: {name} is quantized with actorder {w['actorder']!r} but has no weight_g_idx")
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        layer = _new_quant_linear(folder, name, linear, bits, g, sym, bias is not None, scale.dtype)
        _fill(layer, packed, scale, zero, bias, perm)
        if bits == 4 and K % 32 == 0 and name in sparse:
            layer = _to_sparse_quant(layer, name, folder)
        set_module(model, name, layer)
        used |= {key, f"{name}.weight_scale", f"{name}.weight_shape", f"{name}.bias"}
    return used


def _sparse_targets(model: nn.Module, qc: dict) -> set[str]:
    """Names of the linears that the checkpoint's ``sparsity_config`` declares 2:4."""
    sc = qc.get("sparsity_config") or {}
    if sc.get("format") != CT_SPARSE_FORMAT:
        return set()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {n for n in names if any(_match(n, t) for t in sc.get("targets") or [])
            and not any(_match(n, t) for t in sc.get("ignore") or [])}


def _to_sparse_quant(layer: QuantLinear, name: str, folder: Path) -> nn.Module:
    """A 2:4-declared int4 layer as Sparse24QuantLinear; left a QuantLinear (with a warning) if its codes are not
    2:4 after all, since it still computes the right thing."""
    try:
        return Sparse24QuantLinear.from_quant_linear(layer)
    except ValueError as e:
        log.warning("%s: %s is declared 2:4 but its codes are not (%s); loading it as a dense int4 layer",
                    folder, name, e)
        return layer


def _load_sparse24_layers(model: nn.Module, tensors: _Tensors, qc: dict, folder: Path) -> set[str]:
    """Layers stored as sparse-24-bitmask (compressed, bitmask, shape) -> Sparse24Linear, kept compressed."""
    used = set()
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        linear = _linear_at(model, name, folder)
        N, K = linear.out_features, linear.in_features
        missing = [f"{name}.{t}" for t in ("compressed", "shape") if f"{name}.{t}" not in tensors]
        if missing:
            raise AlmakError(f"{folder}: {name} has a bitmask but no {', '.join(missing)}")
        shape = tuple(int(v) for v in tensors.get(f"{name}.shape").flatten().tolist())
        if shape != (N, K):
            raise AlmakError(f"{folder}: {name}.shape is {list(shape)}, the model's layer is {[N, K]}")
        try:
            values, meta = from_bitmask_24(tensors.get(f"{name}.compressed"), tensors.get(key), shape)
            layer = Sparse24Linear(K, N, f"{name}.bias" in tensors, dtype=values.dtype, device="meta")
        except ValueError as e:
            raise AlmakError(f"{folder}: {name} cannot be loaded as 2:4: {e}") from None
        layer.values, layer.meta = values.contiguous(), meta
        if f"{name}.bias" in tensors:
            layer.bias = tensors.get(f"{name}.bias").contiguous()
        set_module(model, name, layer)
        used |= {key, f"{name}.compressed", f"{name}.shape", f"{name}.bias"}
    return used


def _load_gptq_layers(model: nn.Module, tensors: _Tensors, qc: dict, folder: Path) -> set[str]:
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise AlmakError(f"{folder}: GPTQ with {bits} bits; almak reads 4- and 8-bit GPTQ checkpoints")
    g_cfg = int(qc.get("group_size", -1))
    # GPTQ v1 (AutoGPTQ, and what the hub mostly holds) stores zero - 1; GPTQModel's v2 stores the zero.
    v1 = str(qc.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    used = set()
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        linear = _linear_at(model, name, folder)
        N, K = linear.out_features, linear.in_features
        g = -1 if g_cfg in (-1, K) else g_cfg
        G = 1 if g == -1 else math.ceil(K / g)
        qweight, qzeros = tensors.get(key), tensors.get(f"{name}.qzeros")
        scales = tensors.get(f"{name}.scales")
        if (qweight.shape != (K * bits // 32, N) or scales.shape != (G, N)
                or qzeros.shape != (G, math.ceil(N * bits / 32))):
            raise AlmakError(f"{folder}: {name}: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                             f"scales {list(scales.shape)} do not fit {bits}-bit GPTQ {N}x{K}, group size {g_cfg}")
        codes = unpack_rows(qweight.t().contiguous(), bits, K)  # (N, K) unsigned codes
        perm = None
        if f"{name}.g_idx" in tensors:
            perm = _group_order(tensors.get(f"{name}.g_idx"), K, g, f"{folder}: {name}")
            used.add(f"{name}.g_idx")
            if perm is not None:
                codes = codes[:, perm]
        zeros = unpack_rows(qzeros, bits, N)  # (G, N) stored zeros
        if v1:
            # AutoGPTQ packs zero - 1 and wraps a zero of 0 to 2**bits - 1; mod restores the zero it meant.
            zeros = (zeros + 1) % 2**bits
        mid = 2 ** (bits - 1)
        sym = bool((zeros == mid).all())
        scale = scales.t().contiguous()
        if bits == 4:
            packed, zero = pack_int4(codes), None if sym else zeros.t().to(scale.dtype)
        else:
            packed, zero = (codes - 128).to(torch.int8), None if sym else (zeros.t() - 128).to(scale.dtype)
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        layer = _new_quant_linear(folder, name, linear, bits, g, sym, bias is not None, scale.dtype)
        _fill(layer, packed, scale, zero, bias, perm)
        set_module(model, name, layer)
        used |= {key, f"{name}.qzeros", f"{name}.scales", f"{name}.bias"}
    return used


def _group_order(g_idx: torch.Tensor, K: int, group_size: int, who: str) -> torch.Tensor | None:
    """None for a ``g_idx`` (group of each input column) that is ``arange(K) // group_size``; else the column
    order (stable sort by group) that makes every group a run of ``group_size`` stored columns, which is how
    act-order with non-static groups (GPTQ ``desc_act``, compressed-tensors ``actorder: group``) lays them out."""
    g_idx = g_idx.to(torch.int64).flatten()
    G = K if group_size == -1 else group_size
    trivial = torch.arange(K, dtype=torch.int64) // G
    if g_idx.shape != (K,):
        raise AlmakError(f"{who}: g_idx has {g_idx.numel()} entries for {K} input columns")
    if torch.equal(g_idx, trivial):
        return None
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], trivial):
        raise AlmakError(f"{who}: g_idx does not give every group {G} columns; almak reads g_idx that permute "
                         "whole groups of columns (act-order)")
    return perm


def load_quantized(folder, device: str = "cpu", dtype: torch.dtype | str = torch.float32):
    """Load a compressed-tensors ``pack-quantized`` / ``sparse-24-bitmask`` or a GPTQ checkpoint into
    QuantLinear, Sparse24Linear and Sparse24QuantLinear layers (never through a float copy of their weights).

    Returns ``(model, tokenizer)``: the model in eval mode on ``device``, its float tensors (and the layers'
    scales) in ``dtype``; the tokenizer padded on the left, as :func:`almak.modeling.load.load_model` does
    (None, with a warning, for a folder saved without one).

    >>> model, tok = load_quantized("out/smollm-w4")     # doctest: +SKIP
    """
    from transformers import AutoTokenizer, GenerationConfig

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AlmakError(f"{folder} is not a folder")
    _read_config(folder)
    dev = check_device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    qc = _quant_config(folder)
    if is_compressed_checkpoint(folder):
        loader = _load_ct_layers
    elif is_gptq_checkpoint(folder):
        loader = _load_gptq_layers
    else:
        method = qc.get("quant_method")
        what = f"its quantization_config is {method!r}" if method else "it has no quantization_config"
        raise AlmakError(f"{folder} is not a compressed-tensors pack-quantized / sparse-24-bitmask or GPTQ "
                         f"checkpoint ({what}); "
                         "load float models with almak.modeling.load.load_model")
    tensors = _Tensors(folder)
    model = _skeleton(folder)
    used = loader(model, tensors, qc, folder)
    rest_keys = [k for k in tensors if k not in used]
    # Older transformers saved the rotary frequencies; the model computes its own.
    unknown = [k for k in rest_keys if not k.endswith("rotary_emb.inv_freq")]
    expected = set(model.state_dict())
    extra = [k for k in unknown if k not in expected]
    if extra:
        raise AlmakError(f"{folder}: tensors the model has no place for: {', '.join(extra[:5])}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    model.load_state_dict({k: tensors.get(k) for k in unknown}, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    missing += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if missing:
        raise AlmakError(f"{folder}: the checkpoint lacks {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.to(device=dev, dtype=dtype).eval()
    tokenizer = None
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise AlmakError(f"{folder}: its tokenizer does not load ({str(e).splitlines()[0]})") from None
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        log.warning("%s holds no tokenizer; returning None for it", folder)
    log.info("loaded %s: %d quantized and %d 2:4 linears (%s)", folder, len(_quant_layers(model)),
             len(_sparse_layers(model)), "compressed-tensors" if loader is _load_ct_layers else "GPTQ")
    return model, tokenizer
