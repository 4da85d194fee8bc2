"""``QuantLinear``: a linear layer with INT4/INT8 weights, group-wise scales and zeros, on almak's kernels.

Buffers (the compressed-tensors ``pack-quantized`` layout, what checkpoints store):

- ``weight_packed``: bits=4: (N, K // 8) int32, 8 nibbles along K, lowest first (symmetric codes offset by
  +8); bits=8: (N, K) int8 codes in [-128, 127] (asymmetric int8 has float zeros in that range).
- ``weight_scale``: (N, G) with G = ceil(K / group_size), or (N, 1) per output channel.
- ``weight_zero_point``: (N, G) floats, only when asymmetric (symmetric zeros are implied: 8 for int4, 0 for int8).
- ``input_perm``: None, or (K,) int64 for a layer quantized with act-order and non-static groups (a permuted
  ``g_idx``): stored column j holds input column ``input_perm[j]``, so that groups are runs of stored columns.
  The input is gathered in that order before the kernels run (as exllama and vLLM do); :meth:`dequantize`
  returns the weight in the input's own order.

Where the matmul runs:

- CUDA: the Triton kernels of :mod:`almak.kernels` (they pick decode / prefill / cuBLAS by M themselves).
- CPU, up to ``CPU_NATIVE_MAX_M`` rows of x (decode): PyTorch's native weight-only kernels where they apply:
  ``_weight_int8pack_mm`` for per-channel int8 (an asymmetric zero point is subtracted on the output:
  ``s * (x @ q) - s * z * sum(x)``), ``_weight_int4pack_mm_for_cpu`` for int4 with groups of 32 to 256 that
  divide K (per-channel int4 as groups of the largest of 256, 128, 64, 32 that divides K, each with the
  channel's scale). Both want bf16 activations, so x is rounded to bf16 there. The int4 kernel reads its own
  packing of the codes, built on first use and kept (as large as ``weight_packed``).
- CPU, more rows (prefill), and schemes the native kernels do not cover (grouped int8, int4 groups that do
  not divide K): the weight is dequantized ``CPU_CHUNK_ELEMS`` at a time, straight into x's dtype, and each
  chunk multiplied and dropped, so no dense copy of the weight outlives the call; a quantized model is as
  small in memory as on disk. ``extra_repr`` names the paths a layer takes.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from almak.kernels import w4a16_matmul, w8a16_matmul
from almak.kernels.common import apply_groups_
from almak.kernels.w4a16 import dequantize_w4
from almak.kernels.w8a16 import dequantize_w8
from almak.quant.pack import GROUP_SIZES, pack_int4, quantize_rtn_groupwise, unpack_int4

# Rows of x up to which the native CPU kernels run; above it the weight is dequantized chunk by chunk. Measured
# on a 2-core x86_64 VM (2026-11-25, ms per call, dense fp32 / native int4 / native int8): 4096x11008 M=1
# 7.6 / 3.2 / 1.9, M=8 19.8 / 8.6 / 8.4, M=40 37.7 / 43.1 / 41.2; 1536x576 M=8 0.37 / 0.19 / 0.18,
# M=40 0.57 / 0.88 / 0.85.
CPU_NATIVE_MAX_M = 16
# Weights dequantized per chunk on the CPU's chunked path: 1M elements (2 MB in bf16, 4 MB in fp32), a slice that
# stays in cache between its dequantization and its matmul. Measured on the 2-core VM (2026-12-02, bf16
# activations, ms per call, a kept dense bf16 weight / chunked with 256K, 1M, 4M, 16M-element chunks):
# 4096x11008 int4 g64 M=512 121 / 213, 172, 185, 264, M=64 18 / 102, 56, 63, 162; int8 per channel M=512
# 117 / 188, 166, 147, 225, M=64 18 / 51, 40, 50, 110; 576x1536 int4 g64 M=512 2.5 / -, 3.5. Prefill costs
# ~1.4x the kept dense weight at M=512; the kept weight would cost 2 (bf16) or 4 (fp32) bytes per weight.
CPU_CHUNK_ELEMS = 1 << 20
# inner K tiles of PyTorch's CPU int4 packing (its accepted values are 2, 4, 8).
INT4_INNER_K_TILES = 2
# Group sizes PyTorch's CPU int4 kernel takes.
NATIVE_INT4_GROUPS = (256, 128, 64, 32)


def check_quant_args(bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W stored in 4 or 8 bits.

    >>> layer = QuantLinear.from_float(nn.Linear(576, 1536), bits=4, group_size=64)
    >>> layer(torch.randn(2, 576)).shape
    torch.Size([2, 1536])
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 sym: bool = True, bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        check_quant_args(bits, group_size)
        if bits == 4 and in_features % 8:
            raise ValueError(f"int4 needs in_features divisible by 8 (8 codes per int32), got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        if bits == 4:
            packed = torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device)
        else:
            packed = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        zeros = None if sym else torch.zeros(out_features, groups, dtype=dtype, device=device)
        self.register_buffer("weight_zero_point", zeros)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_perm", None)
        self._cpu_cache: dict[str, tuple] = {}  # CPU path -> its operands, built on first use
        # "auto": Triton on CUDA tensors, the CPU path otherwise; "triton" forces the Triton launcher (on CPU
        # tensors that needs TRITON_INTERPRET=1, which is how the tests exercise it).
        self.backend = "auto"

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True) -> "QuantLinear":
        """Round-to-nearest quantization of ``linear`` (scales in the layer's dtype)."""
        W = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size, sym, linear.bias is not None,
                    dtype=W.dtype, device=W.device)
        # Row by row is the same rounding (each row has its own scales); in blocks of rows, the float32
        # temporaries stay the size of a block, not of the weight.
        rows = max(1, CPU_CHUNK_ELEMS * 4 // linear.in_features)
        codes, scales, zeros = [], [], []
        for r in range(0, linear.out_features, rows):
            q, s, z = quantize_rtn_groupwise(W[r:r + rows].float(), bits, group_size, sym, scale_dtype=W.dtype)
            codes.append(pack_int4(q) if bits == 4 else q)  # packing goes through int64: a block at a time too
            scales.append(s)
            zeros.append(z)
        layer.weight_packed.copy_(torch.cat(codes))
        layer.weight_scale.copy_(torch.cat(scales).reshape(layer.weight_scale.shape))
        if not sym:
            layer.weight_zero_point.copy_(torch.cat(zeros).reshape(layer.weight_zero_point.shape))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> None:
        """Store codes (N, K) and their scales/zeros as ``quantize_rtn_groupwise`` returns them."""
        self.weight_packed.copy_(pack_int4(q) if self.bits == 4 else q)
        self.weight_scale.copy_(scales.reshape(self.weight_scale.shape))
        if not self.sym:
            self.weight_zero_point.copy_(zeros.reshape(self.weight_zero_point.shape))
        self._cpu_cache = {}

    def set_input_perm(self, perm: torch.Tensor | None) -> None:
        """Declare that stored column j holds input column ``perm[j]`` (see the module docstring)."""
        if perm is not None:
            perm = perm.to(device=self.weight_packed.device, dtype=torch.int64)
            identity = torch.arange(self.in_features, device=perm.device)
            if perm.shape != (self.in_features,) or not torch.equal(perm.sort().values, identity):
                raise ValueError(f"input_perm must be a permutation of the {self.in_features} input columns")
        self.input_perm = perm
        self._cpu_cache = {}

    def codes(self) -> torch.Tensor:
        """The integer codes (N, K) in stored column order: uint8 in [0, 15] for int4, int8 for int8."""
        return unpack_int4(self.weight_packed) if self.bits == 4 else self.weight_packed

    def zeros(self) -> torch.Tensor | None:
        if not self.sym:
            return self.weight_zero_point
        if self.bits == 4:
            return torch.full_like(self.weight_scale, 8)
        return None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (N, K) these codes stand for."""

        fn = dequantize_w4 if self.bits == 4 else dequantize_w8
        W = fn(self.weight_packed, self.weight_scale, self.zeros(), self.group_size)
        if self.input_perm is not None:
            W = torch.empty_like(W).index_copy_(1, self.input_perm, W)
        return W.to(dtype or self.weight_scale.dtype)

    # ------------------------------------------------------------------------------------------ forward

    def native_int4_group(self) -> int | None:
        """The group size PyTorch's CPU int4 kernel runs this layer with, or None where it cannot."""
        if self.bits != 4 or self.in_features % (16 * INT4_INNER_K_TILES) or self.out_features % 16:
            return None
        if self.group_size == -1:  # per channel: any group that divides K, every group with the channel's scale
            return next((g for g in NATIVE_INT4_GROUPS if self.in_features % g == 0), None)
        return self.group_size if self.group_size in NATIVE_INT4_GROUPS and self.in_features % self.group_size == 0 \
            else None

    def cpu_path(self) -> str:
        """The decode-size CPU path: ``native-int8``, ``native-int4`` or ``chunked`` (see the module docstring)."""
        if self.bits == 8 and self.group_size == -1:
            return "native-int8"
        if self.native_int4_group() is not None:
            return "native-int4"
        return "chunked"

    def _native_operands(self, path: str) -> tuple:
        """What a native CPU kernel multiplies with, built on first use and kept (dropped by ``.to()``)."""
        if path not in self._cpu_cache:
            s = self.weight_scale.float()
            if path == "native-int8":
                # asymmetric: s * (x @ q - z * sum(x)); the second operand is s * z per output channel
                sz = None if self.sym else (s * self.weight_zero_point.float()).reshape(-1).to(torch.bfloat16)
                ops = (self.weight_packed, s.reshape(-1).to(torch.bfloat16), sz)
            else:
                group = self.native_int4_group()
                # PyTorch packs blocks of 64 rows on their own: convert a block range at a time, so that the
                # int32 codes it takes are never the whole weight's (4 bytes per weight).
                step = max(64, CPU_CHUNK_ELEMS // self.in_features // 64 * 64) if self.out_features % 64 == 0 \
                    else self.out_features
                packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    unpack_int4(self.weight_packed[r:r + step]).to(torch.int32), INT4_INNER_K_TILES)
                    for r in range(0, self.out_features, step)])
                z = self.zeros().float()
                if self.group_size == -1:  # the channel's scale and zero for each of its native groups
                    s, z = s.expand(-1, self.in_features // group), z.expand(-1, self.in_features // group)
                # PyTorch's int4 kernel computes (q - 8) * scale + offset; ours is (q - z) * scale.
                offset = (8 - z) * s
                ops = (packed, torch.stack([s, offset], -1).transpose(0, 1).contiguous().to(torch.bfloat16), group)
            self._cpu_cache[path] = ops
        return self._cpu_cache[path]

    def _dequantized_rows(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows n0:n1 of the weight (stored column order) in ``dtype``: (q - z) * s computed in float32 and
        rounded once to ``dtype``, as :meth:`dequantize` does."""
        rows, K = n1 - n0, self.in_features
        if self.bits == 4 and sys.byteorder == "little":
            b = self.weight_packed[n0:n1].view(torch.uint8)  # byte j: nibbles 2j (low) and 2j + 1 (high)
            W = torch.empty(rows, K // 2, 2)
            W[..., 0] = b & 0xF
            W[..., 1] = b >> 4
            W = W.view(rows, K)
        elif self.bits == 4:
            W = unpack_int4(self.weight_packed[n0:n1]).float()
        else:
            W = self.weight_packed[n0:n1].float()
        G = K if self.group_size == -1 else self.group_size
        if K % G:  # a ragged last group
            zeros = self.zeros()
            return apply_groups_(W, self.weight_scale[n0:n1], None if zeros is None else zeros[n0:n1],
                                 self.group_size).to(dtype)
        grouped = W.view(rows, K // G, G)
        if not self.sym:
            grouped.sub_(self.weight_zero_point[n0:n1].float().unsqueeze(-1))
        elif self.bits == 4:
            grouped.sub_(8)
        grouped.mul_(self.weight_scale[n0:n1].float().unsqueeze(-1))
        return W.to(dtype)

    def _chunked(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) in stored column order @ the dequantized weight, ``CPU_CHUNK_ELEMS`` weights at a time."""
        rows = max(16, CPU_CHUNK_ELEMS // self.in_features)
        y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype)
        for n0 in range(0, self.out_features, rows):
            n1 = min(self.out_features, n0 + rows)
            y[:, n0:n1] = F.linear(x2, self._dequantized_rows(n0, n1, x2.dtype))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or self.backend == "triton":
            y = self._triton(x if self.input_perm is None else x.index_select(-1, self.input_perm))
        else:
            x2 = x.reshape(-1, self.in_features)
            if self.input_perm is not None:
                x2 = x2.index_select(-1, self.input_perm)
            path = self.cpu_path() if x2.shape[0] <= CPU_NATIVE_MAX_M else "chunked"
            if path == "chunked":
                y = self._chunked(x2)
            elif path == "native-int8":
                q, s, sz = self._native_operands(path)
                xb = x2.to(torch.bfloat16)
                y = torch.ops.aten._weight_int8pack_mm(xb, q, s)
                if sz is not None:
                    y = y.float() - xb.float().sum(-1, keepdim=True) * sz.float()
            else:
                packed, scales, group = self._native_operands(path)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, group, scales)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return w4a16_matmul(x, self.weight_packed, self.weight_scale, self.zeros(), self.group_size)
        return w8a16_matmul(x, self.weight_packed, self.weight_scale, self.zeros(), self.group_size)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() invalidate the CPU-side cache
        self._cpu_cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        scheme = f"int{self.bits} {'sym' if self.sym else 'asym'}, group_size={self.group_size}"
        where = ("triton (cuda)" if self.weight_packed.is_cuda
                 else f"cpu path={self.cpu_path()} (M<={CPU_NATIVE_MAX_M}), chunked above")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {scheme}, "
                f"bias={self.bias is not None}, {where}" + (", input permuted (act-order g_idx)"
                                                            if self.input_perm is not None else ""))
