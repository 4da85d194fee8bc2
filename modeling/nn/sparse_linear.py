"""``Sparse24Linear`` and ``Sparse24QuantLinear``: 2:4-sparse linear layers on almak's sparse kernels.

Buffers (the layout of :mod:`almak.kernels.sparse24`):

- ``Sparse24Linear``: ``values`` (N, K // 2) float, the two kept weights of every group of four along K, and
  ``meta`` (N, K // 32) int32, their positions (4 bits a group, nibble order of int4 codes).
- ``Sparse24QuantLinear`` (2:4 + INT4): ``qvalues`` (N, K // 16) int32, the 4-bit codes of the kept weights;
  ``meta``; ``weight_scale`` / ``weight_zero_point`` (N, ceil(K / group_size)) on the original columns, as
  in :class:`~almak.modeling.nn.quant_linear.QuantLinear` (symmetric layers store no zero point: 8 is implied).

Where the matmul runs: on CUDA the Triton kernels (``sparse24_matmul`` / ``sparse24_w4a16_matmul``, which
read half, or an eighth, of the fp16 weight bytes). On the CPU there is no sparse kernel that beats dense:
``Sparse24Linear`` keeps the decompressed float weight (built on first use) and calls ``F.linear``;
``Sparse24QuantLinear`` rebuilds the dense int4 codes (zero-point codes at the pruned positions) once and runs
:class:`QuantLinear`'s measured CPU paths (PyTorch's native int4 kernel in decode). So on the CPU these layers
run at the dense (or int4) layer's speed and do not save memory; the checkpoint and the GPU do.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from almak.kernels.sparse24 import (
    compress_24,
    decompress_24,
    dequantize_sparse24_w4,
    meta_positions,
    sparse24_matmul,
    sparse24_w4a16_matmul,
)
from almak.modeling.nn.quant_linear import QuantLinear, check_quant_args
from almak.quant.pack import pack_int4, unpack_int4
from almak.sparse import check_nm

__all__ = ["Sparse24Linear", "Sparse24QuantLinear", "is_24_sparse"]


def is_24_sparse(W: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along each row of ``W`` has at most 2 non-zeros and K is
    a multiple of 32 (what the sparse kernels take)."""
    return W.shape[1] % 32 == 0 and check_nm(W, 2, 4)


class Sparse24Linear(nn.Module):
    """``y = x @ W.T + b`` with a 2:4-sparse W stored compressed.

    >>> layer = Sparse24Linear.from_linear(pruned_linear)      # doctest: +SKIP
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float16,
                 device=None):
        super().__init__()
        if in_features % 32:
            raise ValueError(f"2:4 layers need in_features divisible by 32 (8 groups a meta word), got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.zeros(out_features, in_features // 32, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._cpu_weight: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Sparse24Linear":
        """Compress a 2:4-sparse ``nn.Linear`` (ValueError names the first group with more than 2 non-zeros)."""

        W = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, W.dtype, W.device)
        layer.values, layer.meta = compress_24(W.detach())
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return decompress_24(self.values, self.meta, dtype or self.values.dtype)

    def to_linear(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (dense, with the zeros)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device,
                           dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = sparse24_matmul(x, self.values, self.meta)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self._cpu_weight is None:
            self._cpu_weight = self.dense_weight()
        return F.linear(x, self._cpu_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):  # .to() / .cuda() invalidate the CPU-side weight
        self._cpu_weight = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        where = "triton sparse24 (cuda)" if self.values.is_cuda else "cpu: dense F.linear on the expanded weight"
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 {self.values.dtype}, "
                f"bias={self.bias is not None}, {where}")


class Sparse24QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with W 2:4-sparse and its kept weights in 4 bits (group-wise scales and zeros).

    >>> layer = Sparse24QuantLinear.from_quant_linear(quant_linear)   # a QuantLinear whose codes are 2:4
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, sym: bool = True,
                 bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        check_quant_args(4, group_size)
        if in_features % 32:
            raise ValueError(f"2:4 layers need in_features divisible by 32 (8 groups a meta word), got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        self.register_buffer("qvalues", torch.zeros(out_features, in_features // 16, dtype=torch.int32, device=device))
        self.register_buffer("meta", torch.zeros(out_features, in_features // 32, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        zeros = None if sym else torch.zeros(out_features, groups, dtype=dtype, device=device)
        self.register_buffer("weight_zero_point", zeros)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # The CPU path's dense-coded QuantLinear, built on first use; in a dict so that it is no submodule
        # (it must not show in state_dict or follow .to()).
        self._cpu_cache: dict[str, QuantLinear] = {}

    def zeros(self) -> torch.Tensor:
        return self.weight_zero_point if not self.sym else torch.full_like(self.weight_scale, 8)

    def _zero_codes(self) -> torch.Tensor:
        """The zero point of every column (N, K), as codes."""
        z = self.zeros().float()
        g = torch.zeros(self.in_features, dtype=torch.long, device=z.device) if self.group_size == -1 else \
            torch.arange(self.in_features, device=z.device) // self.group_size
        return z[:, g]

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer: QuantLinear) -> "Sparse24QuantLinear":
        """Compress an int4 ``QuantLinear`` whose weight is 2:4 sparse (codes equal to the zero point at
        pruned positions). ValueError names the first group with more than 2 weights off the zero point."""

        if layer.bits != 4:
            raise ValueError(f"2:4 + quantized layers are int4 only, got int{layer.bits}")
        if layer.input_perm is not None:
            raise ValueError("a layer with a permuted input order (act-order g_idx) cannot be stored 2:4")
        out = cls(layer.in_features, layer.out_features, layer.group_size, layer.sym, layer.bias is not None,
                  layer.weight_scale.dtype, layer.weight_scale.device)
        out.weight_scale.copy_(layer.weight_scale.reshape(out.weight_scale.shape))
        if not layer.sym:
            out.weight_zero_point.copy_(layer.weight_zero_point.reshape(out.weight_zero_point.shape))
        codes = layer.codes().float()
        z = out._zero_codes()
        # Non-zero surrogate at kept positions (code + 1 >= 1), so compress_24 finds exactly the kept ones;
        # its padding slots come back as 0 and get the zero-point code (they dequantize to 0).
        surrogate = torch.where(codes != z.round(), codes + 1, torch.zeros_like(codes))
        kept, meta = compress_24(surrogate)

        pos = meta_positions(meta, "Sparse24QuantLinear")
        cols = (torch.arange(layer.in_features // 4, device=pos.device) * 4).view(1, -1, 1) + pos
        z_kept = z.gather(1, cols.reshape(layer.out_features, -1))
        q = torch.where(kept > 0, kept - 1, z_kept)
        out.qvalues, out.meta = pack_int4(q.round().to(torch.uint8)), meta
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
        return out

    def dense_codes(self) -> torch.Tensor:
        """The dense int4 codes (N, K) uint8, the zero-point code at pruned positions."""

        pos = meta_positions(self.meta, "Sparse24QuantLinear")
        codes = self._zero_codes().round()
        N, G = pos.shape[:2]
        grid = codes.view(N, G, 4)
        grid.scatter_(2, pos, unpack_int4(self.qvalues).float().view(N, G, 2))
        return grid.view(N, -1).to(torch.uint8)

    def to_quant_linear(self) -> QuantLinear:
        """The equivalent dense-coded ``QuantLinear``."""
        q = QuantLinear(self.in_features, self.out_features, 4, self.group_size, self.sym, self.bias is not None,
                        dtype=self.weight_scale.dtype, device=self.weight_scale.device)
        q.set_quantized(self.dense_codes(), self.weight_scale, None if self.sym else self.weight_zero_point)
        if self.bias is not None:
            q.bias.copy_(self.bias)
        return q

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        W = dequantize_sparse24_w4(self.qvalues, self.meta, self.weight_scale, self.zeros(), self.group_size)
        return W.to(dtype or self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = sparse24_w4a16_matmul(x, self.qvalues, self.meta, self.weight_scale, self.zeros(), self.group_size)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if "layer" not in self._cpu_cache:
            self._cpu_cache["layer"] = self.to_quant_linear()
        return self._cpu_cache["layer"](x)

    def _apply(self, fn, recurse=True):
        self._cpu_cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        scheme = f"2:4 + int4 {'sym' if self.sym else 'asym'}, group_size={self.group_size}"
        where = ("triton sparse24_w4a16 (cuda)" if self.qvalues.is_cuda
                 else "cpu: QuantLinear's int4 paths on the dense codes")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {scheme}, "
                f"bias={self.bias is not None}, {where}")
