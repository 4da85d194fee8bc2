"""W4A16: ``y = x @ W.T`` with W stored as 4-bit codes plus group-wise scales and zeros.

Operands (the public, stable layout; it is compressed-tensors' ``pack-quantized``):

- ``x``: (..., K) float16, bfloat16 or float32, any strides.
- ``qweight``: (N, K // 8) int32. Nibble j (bits 4j..4j+3) of ``qweight[n, i]`` is the unsigned 4-bit
  code of ``W[n, 8 * i + j]``: 8 nibbles along K, lowest first. Symmetric int4 stores codes offset by +8.
- ``scales``, ``zeros``: (N, ceil(K / group_size)) floating point (zeros may also be integer);
  ``W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]`` with ``g = k // group_size``. ``group_size`` is one of
  32, 64, 128, 256 (the last group may be ragged when it does not divide K), or -1 for one group per output
  channel, where scales/zeros may be (N,) or (N, 1).
- ``y``: (..., N) in x's dtype, accumulated in float32.

Paths (decode / prefill / dense), thresholds and configs: :mod:`almak.kernels.common`.

How a tile is dequantized (the kernels' inner loop; the reasoning is counted in SASS by
``benchmarks/kernel_report.py``): each thread loads its packed words with 128-bit loads, once. A word's 8
codes become four pairs, each pair one 32-bit register holding two 16-bit floats: ``(w & 0x00F000F0) |
0x64006400`` is the pair (1024 + 16 q1, 1024 + 16 q5) as float16 bits (the "magic number" conversion: the
code lands in the mantissa of 1024, so no int-to-float instruction runs), and ``* 1/16 - 64`` (one packed
HFMA2) leaves the exact codes (q1, q5). The other pairs come from the word shifted by -4, 4 and 8 bits. The
tile is therefore laid out along K in the order the pairs come out (k = 8i + [0, 4, 1, 5, 2, 6, 3, 7]: see
``_pair_tree``), and x is loaded in that same order, which leaves the product unchanged. bfloat16 has too few
mantissa bits for 16 q, so its pairs are (128 + q) with 0x43004300 and four shifts; float32 activations
use the float32 magic number per code. The zero point and the scale are applied per tile on the float32
result of ``tl.dot`` (``s * (x @ q - z * sum(x))``: exact for any zero) when the tile lies inside one
quantization group, and per weight in the dot's dtype otherwise (group smaller than the K tile).

Under ``TRITON_INTERPRET=1`` the Triton paths also run on CPU tensors (slowly; for tests), with one fixed
config instead of autotuning.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .common import (
    DECODE_MAX_M,
    DENSE_MIN_M,
    INTERPRET,  # noqa: F401 (the tests read it from here)
    SUPPORTED_GROUP_SIZES,
    Launch,
    apply_groups_,
    autotuned,
    check_activation,
    check_scales,
    choose_path,
    dot_setup,
    grid_for,
    output_buffer,
)

__all__ = [
    "DECODE_MAX_M",
    "DENSE_MIN_M",
    "SUPPORTED_GROUP_SIZES",
    "w4a16_matmul",
    "w4a16_reference",
    "dequantize_w4",
    "pack_int4",
    "unpack_int4",
]

# int4 codes per int32 word.
PACK_FACTOR = 8
# The unpacking constants, passed to the kernel as run-time arguments rather than written as literals:
# as literals, ptxas re-materializes each mask in a register before every use (an IMAD.MOV per pair, ~60 a
# tile per thread, counted in SASS); as arguments they sit in the constant bank that LOP3 reads directly.
# (mask, magic) per dot dtype: float16 takes the (1024 + 16 q) pairs, bfloat16 the (128 + q) pairs.
_UNPACK = {torch.float16: (0x00F000F0, 0x64006400), torch.bfloat16: (0x000F000F, 0x43004300),
           torch.float32: (0xF, 0x4B000000)}


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _halves(r, DTYPE: tl.constexpr):
    """int32 -> its low and high 16 bits, each reinterpreted as DTYPE (float16 or bfloat16)."""
    lo = r.to(tl.int16).to(DTYPE, bitcast=True)
    hi = (r.to(tl.uint32, bitcast=True) >> 16).to(tl.int16).to(DTYPE, bitcast=True)
    return lo, hi


@triton.jit
def _pair_tree(l0, h0, l1, h1, l2, h2, l3, h3):
    """Eight (BN, BW) tensors -> (BN, BW, 2, 2, 2), each (l_a, h_a) pair innermost, so that the two halves of
    one 32-bit register stay adjacent all the way to tl.dot.

    Position ``t = 4 E1 + 2 E2 + E3`` of word i holds pair ``a = 2 E1 + E2``, half E3: code ``j = a + 4 E3``,
    the K order [0, 4, 1, 5, 2, 6, 3, 7] (the callers permute x's tile to match).
    """
    return tl.join(tl.join(tl.join(l0, l2), tl.join(l1, l3)), tl.join(tl.join(h0, h2), tl.join(h1, h3)))


@triton.jit
def _unpack_w4(w, zc, UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT, DTYPE: tl.constexpr):
    """(BN, BW) int32 words -> (BN, BW, 2, 2, 2) values ``q - z`` in DTYPE, in ``_pair_tree``'s order.

    ``zc`` is the zero point plus the magic offset (float16: 64 + z, bfloat16: 128 + z, float32: 2**23 + z),
    broadcastable to the result, so that one packed FMA per pair removes both. ``w >> ZERO_SHIFT`` (a
    run-time 0) keeps LLVM from narrowing the one unshifted pair to 16-bit scalar ops, which cost a PRMT to
    repack per pair (counted in SASS).
    """
    if DTYPE == tl.float16:
        # (1024 + 16 q) pairs: codes a, a + 4 at bits 4..7 and 20..23.
        l0, h0 = _halves(((w << 4) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        l1, h1 = _halves(((w >> ZERO_SHIFT) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        l2, h2 = _halves(((w >> 4) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        l3, h3 = _halves(((w >> 8) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        return _pair_tree(l0, h0, l1, h1, l2, h2, l3, h3) * 0.0625 - zc
    elif DTYPE == tl.bfloat16:
        # (128 + q) pairs: codes a, a + 4 at bits 0..3 and 16..19.
        l0, h0 = _halves(((w >> ZERO_SHIFT) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        l1, h1 = _halves(((w >> 4) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        l2, h2 = _halves(((w >> 8) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        l3, h3 = _halves(((w >> 12) & UNPACK_MASK) | UNPACK_MAGIC, DTYPE)
        return _pair_tree(l0, h0, l1, h1, l2, h2, l3, h3) - zc
    else:
        # float32: 2**23 + q per code.
        c0 = (((w >> ZERO_SHIFT) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c1 = (((w >> 4) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c2 = (((w >> 8) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c3 = (((w >> 12) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c4 = (((w >> 16) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c5 = (((w >> 20) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c6 = (((w >> 24) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c7 = (((w >> 28) & UNPACK_MASK) | UNPACK_MAGIC).to(tl.float32, bitcast=True)
        return _pair_tree(c0, c4, c1, c5, c2, c6, c3, c7) - zc


@triton.jit
def _zero_offset(z, DTYPE: tl.constexpr):
    """float32 zero points -> the constant ``_unpack_w4`` subtracts, in DTYPE."""
    if DTYPE == tl.float16:
        return (64.0 + z).to(DTYPE)
    elif DTYPE == tl.bfloat16:
        return (128.0 + z).to(DTYPE)
    else:
        return 8388608.0 + z


@triton.jit
def _w4_tile(
    a_ptr, b_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
    UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT,
    QUANT_GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    SCALE_PER_WEIGHT: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """float32 (BLOCK_SIZE_M, BLOCK_SIZE_N) product of x's rows offs_m with K tile ``k_tile`` of W's rows offs_n.

    The scale multiplies tl.dot's float32 result once per tile when the tile lies inside one quantization
    group and SCALE_PER_WEIGHT is off (decode: 16 rows of output per tile cost less than a multiply per
    weight), and multiplies each dequantized weight otherwise (prefill, whose output tile is larger than its
    weight tile, and groups smaller than the K tile).
    """
    BLOCK_W: tl.constexpr = BLOCK_SIZE_K // 8
    dtype = a_ptr.dtype.element_ty
    offs_w = k_tile * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_k = k_tile * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_w[None, :] * stride_bk
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    if EVEN_K:
        w = tl.load(b_ptrs, mask=mask_n[:, None], other=0)
        x = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
    else:
        w = tl.load(b_ptrs, mask=mask_n[:, None] & (offs_w < K // 8)[None, :], other=0)
        x = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    # x in the tile's K order (_k_order): per word, natural code j = 4 E3 + 2 E1 + E2 -> position (E1, E2, E3).
    BLOCK_M: tl.constexpr = x.shape[0]
    x = tl.reshape(tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_W, 2, 2, 2)), (0, 1, 3, 4, 2)), (BLOCK_M, BLOCK_SIZE_K))
    if QUANT_GROUP_SIZE == 0 or QUANT_GROUP_SIZE >= BLOCK_SIZE_K:
        # The tile lies inside one group (both are powers of two): one scale and zero per output column.
        if QUANT_GROUP_SIZE == 0:
            g = 0
        else:
            g = k_tile * BLOCK_SIZE_K // QUANT_GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
        q = _unpack_w4(w, _zero_offset(z, dtype)[:, None, None, None, None], UNPACK_MASK, UNPACK_MAGIC,
                       ZERO_SHIFT, dtype)
        if SCALE_PER_WEIGHT:
            q = q * s.to(dtype)[:, None, None, None, None]
        part = tl.dot(x, tl.trans(tl.reshape(q, (BLOCK_SIZE_N, BLOCK_SIZE_K))), input_precision=DOT_PRECISION)
        if not SCALE_PER_WEIGHT:
            part = part * s[None, :]
        return part
    else:
        # Several groups per tile: each word's group (a word's 8 codes never straddle two).
        g = (k_tile * BLOCK_SIZE_K + 8 * tl.arange(0, BLOCK_W)) // QUANT_GROUP_SIZE
        sz_mask = mask_n[:, None] & (g < tl.cdiv(K, QUANT_GROUP_SIZE))[None, :]
        s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=sz_mask, other=0.0)
        z = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg, mask=sz_mask, other=0.0)
        q = _unpack_w4(w, _zero_offset(z.to(tl.float32), dtype)[:, :, None, None, None], UNPACK_MASK,
                       UNPACK_MAGIC, ZERO_SHIFT, dtype)
        q = q * s.to(dtype)[:, :, None, None, None]
        return tl.dot(x, tl.trans(tl.reshape(q, (BLOCK_SIZE_N, BLOCK_SIZE_K))), input_precision=DOT_PRECISION)


@triton.jit
def _w4a16_decode_kernel(
    # pointers: x (M, K), qweight (N, K // 8), scales/zeros (N, groups), float32 output (M, N), zero-filled
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    # unpacking constants (see _UNPACK) and the autotune key
    UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT, M_BUCKET,
    # meta-parameters
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Split-K decode: program (pid_n, pid_k) reduces K tiles pid_k, pid_k + SPLIT_K, ... for x padded to 16 rows
    and atomically adds its (16, BLOCK_SIZE_N) partial sum into c."""
    pid_n = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    # M <= 16 (the launcher splits larger x): with M == 1, which the JIT specializes as a constant, the masks
    # of rows 1..15 are known false and their loads vanish.
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    acc = tl.zeros((16, BLOCK_SIZE_N), dtype=tl.float32)
    for k_tile in range(pid_k, tl.cdiv(K, BLOCK_SIZE_K), SPLIT_K):
        acc += _w4_tile(a_ptr, b_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                        UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT,
                        QUANT_GROUP_SIZE, DOT_PRECISION, EVEN_K, False, BLOCK_SIZE_N, BLOCK_SIZE_K)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")


@triton.jit
def _w4a16_prefill_kernel(
    # pointers: x (M, K), qweight (N, K // 8), scales/zeros (N, groups), output (M, N) in x's dtype
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    # unpacking constants (see _UNPACK) and the autotune key
    UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT, M_BUCKET,
    # meta-parameters
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Tiled matmul (Triton tutorial 03) with the weight tile dequantized in registers."""
    # Grouped ordering: GROUP_SIZE_M row blocks walk the N blocks together so their weight tiles stay in L2.
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k_tile in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        acc += _w4_tile(a_ptr, b_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                        UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT,
                        QUANT_GROUP_SIZE, DOT_PRECISION, EVEN_K, False, BLOCK_SIZE_N, BLOCK_SIZE_K)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_KEY = ["M_BUCKET", "N", "K", "QUANT_GROUP_SIZE"]
_w4a16_decode = autotuned(_w4a16_decode_kernel, "decode", "w4a16", _KEY)
_w4a16_prefill = autotuned(_w4a16_prefill_kernel, "prefill", "w4a16", _KEY)


def plan_w4a16(path: str, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int) -> Launch:
    """The kernel call for 2-D x (at most 16 rows on the decode path) on the "decode" or "prefill" path, with
    the arguments the JIT will see."""
    M, K = x2.shape
    assert path == "prefill" or M <= DECODE_MAX_M, "the decode kernel takes at most 16 rows"
    N = qweight.shape[0]
    x2, precision = dot_setup(x2)
    mask, magic = _UNPACK[x2.dtype]
    c = output_buffer(path, M, N, x2)
    args = (x2, qweight, scales, zeros, c, M, N, K, *x2.stride(), *qweight.stride(), *scales.stride(),
            *zeros.stride(), *c.stride(), mask, magic, 0, triton.next_power_of_2(M))
    kwargs = dict(QUANT_GROUP_SIZE=0 if group_size == -1 else group_size, DOT_PRECISION=precision)
    kernel = _w4a16_decode if path == "decode" else _w4a16_prefill
    return Launch(kernel, args, kwargs, grid_for(path, M, N), c)


# -------------------------------------------------------------------------------------- public functions


def _check_w4(x, qweight, scales, zeros, group_size, name):
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        desc = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight)
        raise ValueError(f"{name}: qweight must be a 2-D int32 tensor (N, K // 8), got {desc}")
    N, K = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if x is not None:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] % PACK_FACTOR != 0:
            raise ValueError(f"{name}: int4 weights pack 8 values of K per int32, so K must be a multiple of 8; "
                             f"got x of shape {tuple(x.shape)} (K={x.shape[-1]})")
        check_activation(x, K, name)
        if x.device != qweight.device:
            raise ValueError(f"{name}: x is on {x.device} but qweight is on {qweight.device}")
    if zeros is None:
        raise ValueError(f"{name}: zeros is required for int4 (symmetric int4 stores zeros of 8)")
    scales, zeros = check_scales(scales, zeros, N, K, group_size, qweight.device, name)
    return N, K, scales, zeros


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, *, path: str = "auto") -> torch.Tensor:
    """``x @ W.T`` for int4 weights, without materializing W on the Triton paths.

    Args:
        x: (..., K) float16 / bfloat16 / float32, any strides.
        qweight: (N, K // 8) int32, nibble j of ``qweight[n, i]`` = code of ``W[n, 8i + j]``.
        scales, zeros: (N, ceil(K / group_size)); (N,) or (N, 1) when ``group_size == -1``.
        group_size: 32, 64, 128, 256, or -1 for one group per output channel.
        path: "auto" (by device and M, see the module docstring), or force "decode", "prefill", "dense".

    Returns:
        (..., N) tensor in x's dtype.

    Example:
        >>> from almak.quant.pack import quantize_rtn_groupwise
        >>> q, s, z = quantize_rtn_groupwise(W, bits=4, group_size=128, sym=True)
        >>> y = w4a16_matmul(x, pack_int4(q), s, z, 128)   # ~= x @ W.T
    """
    name = "w4a16_matmul"
    N, K, scales, zeros = _check_w4(x, qweight, scales, zeros, group_size, name)
    x2 = x.reshape(-1, K)  # a view when x's leading dims allow it; the kernels take any (M, K) strides
    path = choose_path(x2, path, name)
    if x2.shape[0] == 0:
        y = x2.new_empty((0, N))
    elif path == "dense":
        y = F.linear(x2, dequantize_w4(qweight, scales, zeros, group_size, dtype=x.dtype))
    else:
        y = torch.cat([plan_w4a16(path, rows, qweight, scales, zeros, group_size).run().to(x.dtype)
                       for rows in _row_chunks(x2, path)])
    return y.reshape(*x.shape[:-1], N)


def _nibble_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, 4, device=device, dtype=torch.int64)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack (N, K) 4-bit codes in [0, 15] into (N, K // 8) int32, ``W[n, 8i + j]`` in bits 4j..4j+3.

    Example:
        >>> pack_int4(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]))
        tensor([[-144358623]], dtype=torch.int32)
    """
    if q.dim() != 2 or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"pack_int4: expected 2-D integer codes (N, K), got {q.dtype} of shape {tuple(q.shape)}")
    N, K = q.shape
    if K % PACK_FACTOR != 0:
        raise ValueError(f"pack_int4: K must be a multiple of 8 to pack 8 codes per int32, got shape {tuple(q.shape)}")
    q64 = q.to(torch.int64)
    if q64.numel() and (q64.min() < 0 or q64.max() > 15):
        raise ValueError(f"pack_int4: codes must lie in [0, 15], got [{q64.min().item()}, {q64.max().item()}]")
    # Sum of disjoint nibbles in int64 is in [0, 2**32); nibble 7 lands on int32's sign bit, so wrap to
    # the int32 with the same bits explicitly instead of relying on an out-of-range cast.
    words = (q64.reshape(N, K // PACK_FACTOR, PACK_FACTOR) << _nibble_shifts(q.device)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (N, K // 8) int32 -> (N, K) uint8 codes in [0, 15].

    Example:
        >>> unpack_int4(torch.tensor([[-144358623]], dtype=torch.int32))
        tensor([[ 1,  2,  3,  4,  5,  6,  7, 15]], dtype=torch.uint8)
    """
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"unpack_int4: expected a 2-D int32 tensor, got {qweight.dtype} of shape {tuple(qweight.shape)}")
    N, Kp = qweight.shape
    # Reinterpret as unsigned 32-bit (in int64) so the shifts are logical: nibble 7 must not sign-extend.
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (words.unsqueeze(-1) >> _nibble_shifts(qweight.device)) & 0xF
    return codes.reshape(N, Kp * PACK_FACTOR).to(torch.uint8)


def _row_chunks(x2: torch.Tensor, path: str) -> list[torch.Tensor]:
    """x2 as the launches take it: whole, or in 16-row pieces on the decode path (when forced beyond 16 rows)."""
    return list(x2.split(DECODE_MAX_M)) if path == "decode" else [x2]


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Materialize W (N, K) from the W4A16 operands: ``(q - zeros[g]) * scales[g]`` computed in float32.

    Example:
        >>> W = dequantize_w4(qweight, scales, zeros, 128)   # (N, K) float32
    """
    N, K, scales, zeros = _check_w4(None, qweight, scales, zeros, group_size, "dequantize_w4")
    W = torch.empty((N, K // 2, 2), device=qweight.device, dtype=torch.float32)
    if sys.byteorder == "little":
        # Byte b of a little-endian word holds nibbles 2b (low half) and 2b + 1 (high half); uint8 ops
        # touch 4x less memory than int32 shifts (4096x4096: 360 -> 100 ms on a 2-core CPU, measured).
        b = qweight.contiguous().view(torch.uint8)
        W[..., 0] = b & 0xF
        W[..., 1] = b >> 4
    else:
        shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
        W.view(N, K).copy_(((qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(N, K))
    return apply_groups_(W.view(N, K), scales, zeros, group_size).to(dtype)


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Pure-torch W4A16: dequantize to float32, ``F.linear`` in float32, cast to x's dtype.

    Example:
        >>> torch.testing.assert_close(w4a16_matmul(x, qw, s, z, 64), w4a16_reference(x, qw, s, z, 64))
    """
    _check_w4(x, qweight, scales, zeros, group_size, "w4a16_reference")
    return F.linear(x.float(), dequantize_w4(qweight, scales, zeros, group_size)).to(x.dtype)
