"""compressed-tensors' ``pack-quantized``: int4/int8 linears as ``weight_packed``, ``weight_scale``,
``weight_zero_point`` and ``weight_shape`` with config groups in ``quantization_config`` (layout checked
against compressed-tensors 0.20.0, ``compressors/pack_quantized/``); almak's own and llm-compressor's."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.checkpoint import sparse24_bitmask
from almak.modeling.checkpoint.common import (
    Tensors,
    fill_layer,
    group_order,
    linear_at,
    matches,
    new_quant_linear,
    pack_rows,
    quant_config,
    quant_layers,
    scheme_key,
    unpack_rows,
)
from almak.modeling.checkpoint.sparse24_bitmask import CT_SPARSE_FORMAT
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear
from almak.modeling.nn.surgery import set_module
from almak.quant.pack import GROUP_SIZES, pack_int4, unpack_int4

CT_FORMAT = "pack-quantized"
# The compressed-tensors release whose pack-quantized layout this file was checked against (written into
# quantization_config.version, as compressed-tensors itself does).
CT_LAYOUT_VERSION = "0.20.0"


def is_compressed_checkpoint(folder) -> bool:
    """Whether ``folder`` is a compressed-tensors ``pack-quantized`` and/or ``sparse-24-bitmask`` checkpoint
    (almak's or llm-compressor's).

    Other compressed-tensors formats (fp8, W8A8) answer False: transformers loads those itself.
    """
    qc = quant_config(Path(folder))
    if qc.get("quant_method") != "compressed-tensors":
        return False
    formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()}
    return CT_FORMAT in formats or (qc.get("sparsity_config") or {}).get("format") == CT_SPARSE_FORMAT


def check_writable(name: str, layer: QuantLinear, layers: dict[str, QuantLinear]) -> None:
    K, g = layer.in_features, layer.group_size
    if g != -1 and K % g:
        ks = sorted({m.in_features for m in layers.values()})
        fits = [str(s) for s in GROUP_SIZES if s != -1 and all(k % s == 0 for k in ks)]
        hint = f"group size {' or '.join(fits)}" if fits else "a group size that divides every in_features"
        raise AlmakError(
            f"{name}: group size {g} does not divide in_features={K}; compressed-tensors (and so transformers "
            f"and vLLM) cannot load ragged groups. Quantize with {hint} (or per channel, -1) instead")


def weights_args(bits: int, group_size: int, sym: bool, actorder: str | None) -> dict:
    args = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
            "strategy": "channel" if group_size == -1 else "group",
            "group_size": None if group_size == -1 else group_size}
    if actorder:
        args["actorder"] = actorder
    return args


def ct_quantization_config(model: nn.Module, act_order: bool = False) -> dict:
    """The compressed-tensors ``quantization_config`` describing the QuantLinear layers of ``model``."""
    layers = quant_layers(model)
    schemes: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        schemes.setdefault(scheme_key(layer), []).append(name)
    # Static act-order ("weight") changes how GPTQ visited columns, not the stored format.
    actorder = "weight" if act_order else None
    groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(schemes.items(), key=lambda kv: -len(kv[1]))):
        # One scheme targets every Linear; several name their layers (compressed-tensors matches exact names).
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": weights_args(bits, g, sym, actorder),
                                "input_activations": None, "output_activations": None, "format": CT_FORMAT}
    # The linears left in float (lm_head, 2:4 float layers, ...): quantized layers are no nn.Linear.
    ignore = sorted(name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Sparse24Linear)))
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": CT_LAYOUT_VERSION}


def layer_tensors(name: str, layer: QuantLinear | Sparse24QuantLinear) -> dict[str, torch.Tensor]:
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


def layer_scheme(qc: dict, name: str, folder: Path) -> dict:
    if any(matches(name, t) for t in qc.get("ignore") or []):
        raise AlmakError(f"{folder}: {name} has quantized tensors but quantization_config ignores it")
    for gname, group in (qc.get("config_groups") or {}).items():
        if any(matches(name, t) for t in group.get("targets") or []):
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


def load_layers(model: nn.Module, tensors: Tensors, qc: dict, folder: Path) -> set[str]:
    sparse = sparse24_bitmask.sparse_targets(model, qc)
    used = sparse24_bitmask.load_layers(model, tensors, qc, folder)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        w = layer_scheme(qc, name, folder)
        bits, sym = w["num_bits"], bool(w.get("symmetric", True))
        g = -1 if w["strategy"] == "channel" else int(w["group_size"])
        linear = linear_at(model, name, folder)
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
            perm = group_order(tensors.get(f"{name}.weight_g_idx"), K, g, f"{folder}: {name}")
            used.add(f"{name}.weight_g_idx")
            if perm is not None:
                packed = pack_int4(unpack_int4(packed)[:, perm]) if bits == 4 else packed[:, perm]
        elif w.get("actorder") in ("group", "dynamic"):
            raise AlmakError(f"{folder}: {name} is quantized with actorder {w['actorder']!r} but has no weight_g_idx")
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        layer = new_quant_linear(folder, name, linear, bits, g, sym, bias is not None, scale.dtype)
        fill_layer(layer, packed, scale, zero, bias, perm)
        if bits == 4 and K % 32 == 0 and name in sparse:
            layer = sparse24_bitmask.to_sparse_quant(layer, name, folder)
        set_module(model, name, layer)
        used |= {key, f"{name}.weight_scale", f"{name}.weight_shape", f"{name}.bias"}
    return used
