"""GPTQ folders as AutoGPTQ and GPTQModel publish them (``qweight``, ``qzeros``, ``scales``, ``g_idx``; read
only)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.checkpoint.common import (
    Tensors,
    fill_layer,
    group_order,
    linear_at,
    new_quant_linear,
    quant_config,
    unpack_rows,
)
from almak.modeling.nn.surgery import set_module
from almak.quant.pack import pack_int4


def is_gptq_checkpoint(folder) -> bool:
    """Whether ``folder`` holds a GPTQ checkpoint (AutoGPTQ / GPTQModel: ``qweight``, ``qzeros``, ``scales``)."""
    return str(quant_config(Path(folder)).get("quant_method", "")).lower() == "gptq"


def load_layers(model: nn.Module, tensors: Tensors, qc: dict, folder: Path) -> set[str]:
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise AlmakError(f"{folder}: GPTQ with {bits} bits; almak reads 4- and 8-bit GPTQ checkpoints")
    g_cfg = int(qc.get("group_size", -1))
    # GPTQ v1 (AutoGPTQ, and what the hub mostly holds) stores zero - 1; GPTQModel's v2 stores the zero.
    v1 = str(qc.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    used = set()
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        linear = linear_at(model, name, folder)
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
            perm = group_order(tensors.get(f"{name}.g_idx"), K, g, f"{folder}: {name}")
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
        layer = new_quant_linear(folder, name, linear, bits, g, sym, bias is not None, scale.dtype)
        fill_layer(layer, packed, scale, zero, bias, perm)
        set_module(model, name, layer)
        used |= {key, f"{name}.qzeros", f"{name}.scales", f"{name}.bias"}
    return used
