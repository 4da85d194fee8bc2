"""Compressed checkpoints: write compressed-tensors ``pack-quantized`` and ``sparse-24-bitmask`` folders, read
them and GPTQ folders back.

This package is the folder (config.json, recipe, one safetensors file, tokenizer; written atomically, read
with no float copy of a compressed weight); each format is a module: :mod:`.pack_quantized`,
:mod:`.sparse24_bitmask`, :mod:`.gptq` (read only), with :mod:`.common` under them and :mod:`.vllm` naming what
vLLM will not run or runs differently.

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

  and, per 2:4 float linear (``Sparse24Linear``), by default (``sparse_format="dense"``, as llm-compressor writes
  2:4 models since compressed-tensors dropped its sparse formats) the plain ``<name>.weight`` with its zeros,
  which transformers with any compressed-tensors, and vLLM, load as an ordinary dense layer; or, opt-in
  (``sparse_format="sparse-24-bitmask"``; the layout checked against compressed-tensors 0.14.0.1, the last
  release that reads it, and which current vLLM refuses):

  - ``<name>.compressed``: (N, K / 2) the kept weights, row-major in order of position;
  - ``<name>.bitmask``: (N, K / 8) uint8, the keep-mask (2 bits per group of 4) packed little-endian
    (``numpy.packbits(mask, axis=-1, bitorder="little")``);
  - ``<name>.shape``: (2, 1) int64 ``[[N], [K]]``.

  A 2:4 + int4 linear (``Sparse24QuantLinear``) is written as ``pack-quantized`` with its dense codes (the
  zero point at pruned positions), as compressed-tensors itself stores sparse quantized layers.

  With the dense format the 2:4 layers are named in config.json's top-level ``almak_sparsity``
  (``{"format": "dense", "sparsity_structure": "2:4", "targets": [...]}``), outside ``quantization_config``:
  vLLM refuses any ``sparsity_config`` that names layers. almak reads it back and swaps its 2:4 layers in.

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
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.files import write_dir_atomic
from almak.modeling.checkpoint import gptq, pack_quantized, sparse24_bitmask
from almak.modeling.checkpoint.common import (  # noqa: F401 (check_model_folder: read from here)
    TOKENIZER_FILES,
    Tensors,
    check_model_folder,
    pack_rows,
    quant_config,
    quant_layers,
    read_config,
    sparse_layers,
    unpack_rows,
)
from almak.modeling.checkpoint.gptq import is_gptq_checkpoint
from almak.modeling.checkpoint.pack_quantized import (
    CT_FORMAT,
    CT_LAYOUT_VERSION,
    ct_quantization_config,
    is_compressed_checkpoint,
)
from almak.modeling.checkpoint.sparse24_bitmask import CT_SPARSE_FORMAT, CT_SPARSE_LAYOUT_VERSION, ct_sparsity_config
from almak.modeling.checkpoint.vllm import vllm_limits, vllm_notes, vllm_refusals, vllm_summary
from almak.modeling.devices import check_device, release_freed_memory, resolve_dtype
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear
from almak.modeling.nn.surgery import QuantConfig, check_finite, kept_reason, set_module, sparsify_, target_linears
from almak.version import __version__

__all__ = [
    "save_quantized", "save_pruned", "load_quantized", "read_recipe", "is_compressed_checkpoint",
    "is_gptq_checkpoint", "vllm_limits", "vllm_notes", "vllm_refusals", "vllm_summary", "checkpoint_quantization_config", "ct_quantization_config",
    "ct_sparsity_config", "pack_rows", "unpack_rows", "WEIGHTS_FILE", "RECIPE_FILE", "SPARSITY_REPORT_FILE",
    "STRUCTURE_REPORT_FILE", "save_structured", "save_float",
    "CT_FORMAT", "CT_LAYOUT_VERSION", "CT_SPARSE_FORMAT", "CT_SPARSE_LAYOUT_VERSION", "SPARSE_FORMATS",
    "SPARSITY_KEY", "declared_24", "swap_declared_24", "load_quantizing",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "almak_recipe.json"
SPARSITY_REPORT_FILE = "sparsity_report.json"
STRUCTURE_REPORT_FILE = "structure_report.json"  # what structured pruning kept of the source, and why
# Bytes allowed beyond the tensors when checking free space: config, tokenizer (a Llama-3 tokenizer.json is
# about 9 MB) and the safetensors header.
SPACE_MARGIN = 64 * 2**20
# How 2:4 float layers are stored: dense weights (the default; what current transformers, compressed-tensors and
# vLLM load) or compressed-tensors' sparse-24-bitmask (compressed-tensors <= 0.14 only).
SPARSE_FORMATS = ("dense", CT_SPARSE_FORMAT)
SPARSITY_KEY = "almak_sparsity"  # config.json's record of the 2:4 layers of a dense-format folder


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


def checkpoint_quantization_config(model: nn.Module, act_order: bool = False,
                                   sparse_format: str = "dense") -> dict | None:
    """config.json's ``quantization_config`` for ``model``: pack-quantized groups for its quantized layers, and
    with ``sparse_format="sparse-24-bitmask"`` a ``sparsity_config`` for its 2:4 layers; None when there is
    nothing to say (a plain float folder, 2:4 dense-stored layers included)."""
    _check_sparse_format(sparse_format)
    quant, sparse = quant_layers(model), sparse_layers(model) if sparse_format == CT_SPARSE_FORMAT else {}
    if not quant and not sparse:
        return None
    if quant:
        qc = ct_quantization_config(model, act_order)
    else:
        qc = {"quant_method": "compressed-tensors", "transform_config": {}, "version": CT_SPARSE_LAYOUT_VERSION}
    if sparse:
        qc["sparsity_config"] = ct_sparsity_config(model)
    return qc


def _check_sparse_format(sparse_format: str) -> None:
    if sparse_format not in SPARSE_FORMATS:
        raise AlmakError(f"unknown 2:4 storage format {sparse_format!r}; choose {' or '.join(SPARSE_FORMATS)}")


def declared_24(folder) -> list[str]:
    """The layers a dense-format folder declares 2:4 (config.json's ``almak_sparsity``); [] when none."""
    declared = read_config(Path(folder)).get(SPARSITY_KEY) or {}
    if declared.get("sparsity_structure") != "2:4":
        return []
    return list(declared.get("targets") or [])


def _tensors_to_write(model: nn.Module, sparse_format: str = "dense") -> dict[str, torch.Tensor]:
    layers = {**quant_layers(model), **sparse_layers(model)}
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
        if isinstance(layer, Sparse24Linear) and sparse_format == "dense":
            out[f"{name}.weight"] = layer.dense_weight()
            if layer.bias is not None:
                out[f"{name}.bias"] = layer.bias
        elif isinstance(layer, Sparse24Linear):
            out.update(sparse24_bitmask.layer_tensors(name, layer))
        else:
            out.update(pack_quantized.layer_tensors(name, layer))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _write_config(model: nn.Module, folder: Path, quant_config: dict | None, sparse_format: str) -> None:
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
    sparse = sparse_layers(model)
    if sparse and sparse_format == "dense":
        data[SPARSITY_KEY] = {"format": "dense", "sparsity_structure": "2:4", "targets": sorted(sparse)}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_quantized(model: nn.Module, tokenizer, out_dir, recipe: dict, overwrite: bool = False,
                   sparse_format: str = "dense") -> Path:
    """Write ``model`` (with QuantLinear layers) as a compressed-tensors ``pack-quantized`` checkpoint.

    ``recipe`` (method, bits, group size, calibration set and size, damping, ...) is stored as
    ``almak_recipe.json`` with almak's version added. The folder is written beside ``out_dir`` under a
    temporary name and renamed when complete; an existing ``out_dir`` is refused unless ``overwrite``.
    ``Sparse24QuantLinear`` layers (2:4 + int4) are written as pack-quantized too, named in config.json's
    ``almak_sparsity`` (``sparse_format="sparse-24-bitmask"``: in a compressed-tensors ``sparsity_config``,
    which current vLLM refuses).

    >>> quantize_(model, QuantConfig(bits=4, group_size=64))                       # doctest: +SKIP
    >>> save_quantized(model, tok, "out/smollm-w4", {"method": "rtn", "bits": 4})  # doctest: +SKIP
    PosixPath('out/smollm-w4')
    """
    layers = quant_layers(model)
    if not layers:
        raise AlmakError("the model has no quantized (QuantLinear) layers to save; quantize it first "
                         "(almak.modeling.nn.surgery.quantize_ or GPTQ)")
    for name, layer in layers.items():
        pack_quantized.check_writable(name, layer, layers)
    return _write_checkpoint(model, tokenizer, out_dir, recipe, overwrite, sparse_format)


def save_pruned(model: nn.Module, tokenizer, out_dir, recipe: dict, report: dict, overwrite: bool = False,
                sparse_format: str = "dense") -> Path:
    """Write a pruned ``model``: its ``Sparse24Linear`` layers as dense weights named 2:4 in config.json's
    ``almak_sparsity`` (``sparse_format="sparse-24-bitmask"``: compressed-tensors' compressed layout, with a
    ``sparsity_config``), everything else dense (unstructured pruning: dense tensors with zeros), plus
    ``sparsity_report.json`` (``report``: per-layer sparsity) and the recipe. Same temporary-folder and
    ``overwrite`` rules as :func:`save_quantized`.
    """
    return _write_checkpoint(model, tokenizer, out_dir, recipe, overwrite, sparse_format,
                             {SPARSITY_REPORT_FILE: report})


def save_structured(model: nn.Module, tokenizer, out_dir, recipe: dict, report: dict, overwrite: bool = False) -> Path:
    """Write a structured-pruned ``model``: a plain float model folder of its (smaller) shape, which transformers,
    vLLM and llama.cpp load as they load the source, plus ``structure_report.json`` (``report``: what was kept, the
    importances, the shapes compared) and the recipe. Same temporary-folder and ``overwrite`` rules as
    :func:`save_quantized`."""
    if quant_layers(model) or sparse_layers(model):
        raise AlmakError("a structured-pruned model is a float model; this one has quantized or 2:4 layers")
    return _write_checkpoint(model, tokenizer, out_dir, recipe, overwrite, "dense", {STRUCTURE_REPORT_FILE: report})


def save_float(model: nn.Module, tokenizer, out_dir, recipe: dict, overwrite: bool = False,
               extra_json: dict[str, dict] | None = None) -> Path:
    """Write a float ``model`` as a plain model folder with almak's recipe (and ``extra_json`` files beside it)."""
    return _write_checkpoint(model, tokenizer, out_dir, recipe, overwrite, "dense", extra_json)


def _write_checkpoint(model: nn.Module, tokenizer, out_dir, recipe: dict, overwrite: bool, sparse_format: str,
                      extra_json: dict[str, dict] | None = None) -> Path:
    from safetensors.torch import save_file

    _check_sparse_format(sparse_format)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise AlmakError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    recipe = {**recipe, "almak_version": recipe.get("almak_version", __version__)}
    texts = {}
    try:
        for fname, obj in {RECIPE_FILE: recipe, **(extra_json or {})}.items():
            texts[fname] = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    except TypeError as e:
        raise AlmakError(f"the recipe cannot be written as JSON: {e}") from None
    quant_config = checkpoint_quantization_config(model, bool(recipe.get("act_order")), sparse_format)

    tensors = _tensors_to_write(model, sparse_format)
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + SPACE_MARGIN
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise AlmakError(f"not enough disk space in {out.parent}: the checkpoint needs about "
                         f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free")

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_config(model, tmp, quant_config, sparse_format)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            log.warning("no tokenizer given: %s will hold none", out)
        for fname, text in texts.items():
            (tmp / fname).write_text(text, encoding="utf-8")

    write_dir_atomic(out, fill)
    log.info("wrote %s: %d quantized and %d 2:4 linears, %.1f MiB of tensors", out, len(quant_layers(model)),
             len(sparse_layers(model)), (need - SPACE_MARGIN) / 2**20)
    return out


def _skeleton(folder: Path):
    """The model of ``folder``'s config with its parameters on the meta device and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def swap_declared_24(model: nn.Module, names: list[str], folder: Path) -> None:
    """Swap the layers ``almak_sparsity`` declares 2:4 for almak's 2:4 layers; one that is not 2:4 after all stays
    as it is (it still computes the right thing), with a warning."""
    present = {n for n, _ in model.named_modules()}
    unknown = [n for n in names if n not in present]
    if unknown:
        raise AlmakError(f"{folder}: config.json's {SPARSITY_KEY} names {unknown[0]}, which the model has no "
                         "module for")
    done = set(sparsify_(model, names))
    left = [n for n in names if n not in done]
    if left:
        log.warning("%s: %d layers declared 2:4 are not 2:4 (%s, ...); loading them dense", folder, len(left), left[0])


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _fill_skeleton(model: nn.Module, tensors: Tensors, used: set | list, folder: Path, dev: torch.device,
                   dtype: torch.dtype):
    """The rest of a :func:`_skeleton` model's tensors from ``tensors`` (those not in ``used``), tied, 2:4 layers
    swapped in where config.json declares them, on ``dev`` in ``dtype``; and the folder's tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig

    rest_keys = [k for k in tensors if k not in used]
    # Older transformers saved the rotary frequencies; the model computes its own.
    unknown = [k for k in rest_keys if not k.endswith("rotary_emb.inv_freq")]
    expected = set(model.state_dict())
    extra = [k for k in unknown if k not in expected]
    if extra:
        raise AlmakError(f"{folder}: tensors the model has no place for: {', '.join(extra[:5])}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    # each tensor cast as it is read: never the whole float32 model beside its ``dtype`` copy
    model.load_state_dict({k: _cast(tensors.get(k), dtype) for k in unknown}, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    missing += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    if missing:
        raise AlmakError(f"{folder}: the checkpoint lacks {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if declared_24(folder):
        swap_declared_24(model, declared_24(folder), folder)
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
    return model, tokenizer


@torch.no_grad()
def load_quantizing(folder, config: QuantConfig, device: str = "cpu", dtype: torch.dtype | str = torch.float32):
    """Load a float safetensors folder with its decoder-layer projections quantized round-to-nearest as they are
    read, one at a time, so that the peak memory is the quantized model's plus one float projection (loading
    the float model and then :func:`~almak.modeling.nn.surgery.quantize_` holds all of it first). The result is
    :func:`~almak.modeling.nn.surgery.quantize_`'s on the model loaded in ``dtype``, bit for bit.

    Returns ``(model, tokenizer, summary)``; the summary as :func:`~almak.modeling.nn.surgery.quantize_` returns it.
    """
    folder = Path(folder).expanduser()
    dev = check_device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    tensors = Tensors(folder)
    model = _skeleton(folder)
    tied = getattr(model.config, "tie_word_embeddings", False)
    sparse = set(declared_24(folder))  # become 2:4 layers, which quantize_ keeps as they are
    used, done, skipped = [], [], {}
    for name, module in target_linears(model, config.include_lm_head):
        key = f"{name}.weight"
        if name in sparse:
            skipped[name] = "Sparse24Linear is not an nn.Linear"
            continue
        if not isinstance(module, nn.Linear) or key not in tensors:
            continue  # filled, or refused, with the rest
        reason = kept_reason(module, config.bits, name == "lm_head" and tied)
        if reason:
            skipped[name] = reason
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(tensors.get(key).to(dtype), requires_grad=False)
        check_finite(name, linear.weight)
        used.append(key)
        if module.bias is not None and f"{name}.bias" in tensors:
            linear.bias = nn.Parameter(tensors.get(f"{name}.bias").to(dtype), requires_grad=False)
            used.append(f"{name}.bias")
        set_module(model, name, QuantLinear.from_float(linear, config.bits, config.group_size, config.sym))
        done.append(name)
        del linear
        release_freed_memory()  # the float projection's and its quantization's temporaries
    if not done:
        raise AlmakError("the model has no decoder-layer projections (q/k/v/o/gate/up/down_proj) to quantize")
    model, tokenizer = _fill_skeleton(model, tensors, used, folder, dev, dtype)
    return model, tokenizer, {"quantized": done, "skipped": skipped}


def load_quantized(folder, device: str = "cpu", dtype: torch.dtype | str = torch.float32):
    """Load a compressed-tensors ``pack-quantized`` / ``sparse-24-bitmask`` or a GPTQ checkpoint into
    QuantLinear, Sparse24Linear and Sparse24QuantLinear layers (never through a float copy of their weights).

    Returns ``(model, tokenizer)``: the model in eval mode on ``device``, its float tensors (and the layers'
    scales) in ``dtype``; the tokenizer padded on the left, as :func:`almak.modeling.load.load_model` does
    (None, with a warning, for a folder saved without one).

    >>> model, tok = load_quantized("out/smollm-w4")     # doctest: +SKIP
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AlmakError(f"{folder} is not a folder")
    read_config(folder)
    dev = check_device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    qc = quant_config(folder)
    if is_compressed_checkpoint(folder):
        loader = pack_quantized.load_layers
    elif is_gptq_checkpoint(folder):
        loader = gptq.load_layers
    else:
        method = qc.get("quant_method")
        what = f"its quantization_config is {method!r}" if method else "it has no quantization_config"
        raise AlmakError(f"{folder} is not a compressed-tensors pack-quantized / sparse-24-bitmask or GPTQ "
                         f"checkpoint ({what}); "
                         "load float models with almak.modeling.load.load_model")
    tensors = Tensors(folder)
    model = _skeleton(folder)
    used = loader(model, tensors, qc, folder)
    model, tokenizer = _fill_skeleton(model, tensors, used, folder, dev, dtype)
    log.info("loaded %s: %d quantized and %d 2:4 linears (%s)", folder, len(quant_layers(model)),
             len(sparse_layers(model)), "compressed-tensors" if loader is pack_quantized.load_layers else "GPTQ")
    return model, tokenizer
