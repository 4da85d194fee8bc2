"""compressed-tensors' ``sparse-24-bitmask``: 2:4 float linears as ``compressed`` (N, K / 2), ``bitmask``
(N, K / 8) uint8 and ``shape``, named by a ``sparsity_config`` (layout checked against compressed-tensors
0.14.0.1, the last release that reads it)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.kernels.sparse24 import from_bitmask_24, to_bitmask_24
from almak.modeling.checkpoint.common import Tensors, linear_at, matches, sparse_layers
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear
from almak.modeling.nn.surgery import set_module

log = logging.getLogger(__name__)

CT_SPARSE_FORMAT = "sparse-24-bitmask"
# sparse-24-bitmask was last read by compressed-tensors 0.14 (0.15 dropped it); its layout was checked there.
CT_SPARSE_LAYOUT_VERSION = "0.14.0.1"


def ct_sparsity_config(model: nn.Module) -> dict:
    """compressed-tensors' ``sparsity_config`` naming the 2:4 layers of ``model`` (as 0.14 writes it)."""
    sparse = sparse_layers(model)
    pruned = sum(m.out_features * m.in_features // 2 for m in sparse.values())
    # Over every weight of the model, the compressed layers counted at their dense size.
    total = sum(p.numel() for p in model.parameters()) + 2 * pruned
    return {"format": CT_SPARSE_FORMAT, "global_sparsity": pruned / max(total, 1), "ignore": [],
            "registry_requires_subclass": False, "sparsity_structure": "2:4", "targets": sorted(sparse)}


def layer_tensors(name: str, layer: Sparse24Linear) -> dict[str, torch.Tensor]:
    """The sparse-24-bitmask tensors of one Sparse24Linear: compressed (N, K/2), bitmask, shape (2, 1)."""
    compressed, bitmask = to_bitmask_24(layer.values, layer.meta)
    out = {f"{name}.compressed": compressed, f"{name}.bitmask": bitmask,
           f"{name}.shape": torch.tensor([[layer.out_features], [layer.in_features]], dtype=torch.int64)}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias
    return out


def sparse_targets(model: nn.Module, qc: dict) -> set[str]:
    """Names of the linears that the checkpoint's ``sparsity_config`` declares 2:4."""
    sc = qc.get("sparsity_config") or {}
    if sc.get("format") != CT_SPARSE_FORMAT:
        return set()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {n for n in names if any(matches(n, t) for t in sc.get("targets") or [])
            and not any(matches(n, t) for t in sc.get("ignore") or [])}


def to_sparse_quant(layer: QuantLinear, name: str, folder: Path) -> nn.Module:
    """A 2:4-declared int4 layer as Sparse24QuantLinear; left a QuantLinear (with a warning) if its codes are not
    2:4 after all, since it still computes the right thing."""
    try:
        return Sparse24QuantLinear.from_quant_linear(layer)
    except ValueError as e:
        log.warning("%s: %s is declared 2:4 but its codes are not (%s); loading it as a dense int4 layer",
                    folder, name, e)
        return layer


def load_layers(model: nn.Module, tensors: Tensors, qc: dict, folder: Path) -> set[str]:
    """Layers stored as sparse-24-bitmask (compressed, bitmask, shape) -> Sparse24Linear, kept compressed."""
    used = set()
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        linear = linear_at(model, name, folder)
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
