"""W8A16: ``y = x @ W.T`` with W stored as int8 codes plus group-wise (or per-channel) scales.

Operands (public, stable layout):

- ``x``: (..., K) float16, bfloat16 or float32, any strides.
- ``qweight``: (N, K) int8, one code per weight. The Triton paths read it as int32 words (four codes each) and
  so want it contiguous along K with K a multiple of 4: other strides are copied on every call (slow), and
  ``path="auto"`` takes the dense path when K % 4 != 0.
- ``scales``: (N, ceil(K / group_size)) floating point; (N,) or (N, 1) when ``group_size == -1`` (the default:
  one scale per output channel).
- ``zeros``: None for symmetric weights, ``W = q * s``; otherwise shaped like ``scales`` (floating point or
  integer) and ``W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]``, ``g = k // group_size``.
- ``y``: (..., N) in x's dtype, accumulated in float32.

Paths, thresholds and configs: :mod:`almak.kernels.common`. Dequantization, as in
:mod:`almak.kernels.w4a16`: 128-bit loads of the codes, once; each word's four codes become two registers of
two float16 each, ``((w << 2) & 0x03FC03FC) ^ 0x66006600`` = (1024 + 4 u0, 1024 + 4 u2) with u = q + 128 (the
XOR flips the sign bit into the offset), then ``* 0.25 - 384`` (one packed HFMA2) = (q0, q2) exactly; ``w >> 6``
gives (q1, q3). K is laid out in the order [0, 2, 1, 3] per word and x's tile is permuted to match.
bfloat16 and float32 activations use the float32 magic number per code (eight bits do not fit bfloat16's
mantissa). Scales and zeros as in W4A16: per tile on tl.dot's float32 result, or per weight when the group is
smaller than the K tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .common import (
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
from .w4a16 import _halves, _row_chunks

__all__ = ["SUPPORTED_GROUP_SIZES", "w8a16_matmul", "w8a16_reference", "dequantize_w8"]

# int8 codes per int32 word.
CODES_PER_WORD = 4
# (mask, magic) per dot dtype, passed at run time (see w4a16._UNPACK for why): float16 takes the
# (1024 + 4 u) pairs; bfloat16 and float32 take 2**23 + u per code.
_UNPACK = {torch.float16: (0x03FC03FC, 0x66006600), torch.bfloat16: (0xFF, 0x4B000080),
           torch.float32: (0xFF, 0x4B000080)}


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _unpack_w8(w, zc, UNPACK_MASK, UNPACK_MAGIC, DTYPE: tl.constexpr):
    """(BN, BW) int32 words of four int8 codes -> (BN, BW, 2, 2) values ``q - z`` in DTYPE, K order per word
    [0, 2, 1, 3] (position ``2 E1 + E2`` holds code ``E1 + 2 E2``; the callers permute x to match).

    ``zc`` is the zero point plus the magic offset (float16: 384 + z; otherwise 2**23 + 128 + z), broadcastable
    to the result.
    """
    if DTYPE == tl.float16:
        l0, h0 = _halves(((w << 2) & UNPACK_MASK) ^ UNPACK_MAGIC, DTYPE)
        l1, h1 = _halves(((w >> 6) & UNPACK_MASK) ^ UNPACK_MAGIC, DTYPE)
        return tl.join(tl.join(l0, l1), tl.join(h0, h1)) * 0.25 - zc
    else:
        c0 = ((w & UNPACK_MASK) ^ UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c1 = (((w >> 8) & UNPACK_MASK) ^ UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c2 = (((w >> 16) & UNPACK_MASK) ^ UNPACK_MAGIC).to(tl.float32, bitcast=True)
        c3 = (((w >> 24) & UNPACK_MASK) ^ UNPACK_MAGIC).to(tl.float32, bitcast=True)
        return (tl.join(tl.join(c0, c1), tl.join(c2, c3)) - zc).to(DTYPE)


@triton.jit
def _zero_offset(z, DTYPE: tl.constexpr):
    """float32 zero points -> the constant ``_unpack_w8`` subtracts (float32 for bfloat16 and float32)."""
    if DTYPE == tl.float16:
        return (384.0 + z).to(DTYPE)
    else:
        return 8388736.0 + z  # 2**23 + 128


@triton.jit
def _w8_tile(
    a_ptr, b_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
    stride_am, stride_ak, stride_bn, stride_sn, stride_sg, stride_zn, stride_zg,
    UNPACK_MASK, UNPACK_MAGIC,
    HAS_ZEROS: tl.constexpr, QUANT_GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """float32 (BLOCK_SIZE_M, BLOCK_SIZE_N) product of x's rows offs_m with K tile ``k_tile`` of W's rows
    offs_n; scales as in ``w4a16._w4_tile`` (per tile on the float32 result when the tile lies in one group)."""
    BLOCK_W: tl.constexpr = BLOCK_SIZE_K // 4
    dtype = a_ptr.dtype.element_ty
    offs_w = k_tile * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_k = k_tile * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_w[None, :]  # int32 words, contiguous along K
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    if EVEN_K:
        w = tl.load(b_ptrs, mask=mask_n[:, None], other=0)
        x = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
    else:
        w = tl.load(b_ptrs, mask=mask_n[:, None] & (offs_w < K // 4)[None, :], other=0)
        x = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    # x in the tile's K order: natural code j = 2 E2 + E1 of each word -> position (E1, E2).
    BLOCK_M: tl.constexpr = x.shape[0]
    x = tl.reshape(tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_W, 2, 2)), (0, 1, 3, 2)), (BLOCK_M, BLOCK_SIZE_K))
    if QUANT_GROUP_SIZE == 0 or QUANT_GROUP_SIZE >= BLOCK_SIZE_K:
        if QUANT_GROUP_SIZE == 0:
            g = 0
        else:
            g = k_tile * BLOCK_SIZE_K // QUANT_GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
        else:
            z = tl.zeros_like(s)
        q = _unpack_w8(w, _zero_offset(z, dtype)[:, None, None, None], UNPACK_MASK, UNPACK_MAGIC, dtype)
        part = tl.dot(x, tl.trans(tl.reshape(q, (BLOCK_SIZE_N, BLOCK_SIZE_K))), input_precision=DOT_PRECISION)
        return part * s[None, :]
    else:
        g = (k_tile * BLOCK_SIZE_K + 4 * tl.arange(0, BLOCK_W)) // QUANT_GROUP_SIZE
        sz_mask = mask_n[:, None] & (g < tl.cdiv(K, QUANT_GROUP_SIZE))[None, :]
        s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=sz_mask, other=0.0)
        if HAS_ZEROS:
            z = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg, mask=sz_mask, other=0.0)
            z = z.to(tl.float32)
        else:
            z = tl.zeros_like(s.to(tl.float32))
        q = _unpack_w8(w, _zero_offset(z, dtype)[:, :, None, None], UNPACK_MASK, UNPACK_MAGIC, dtype)
        q = q * s.to(dtype)[:, :, None, None]
        return tl.dot(x, tl.trans(tl.reshape(q, (BLOCK_SIZE_N, BLOCK_SIZE_K))), input_precision=DOT_PRECISION)


@triton.jit
def _w8a16_decode_kernel(
    # pointers: x (M, K), qweight as int32 words (N, K // 4), scales/zeros (N, groups), float32 output (M, N),
    # zero-filled
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides (the words are contiguous along K)
    stride_am, stride_ak, stride_bn, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    # unpacking constants (see _UNPACK) and the autotune key
    UNPACK_MASK, UNPACK_MAGIC, M_BUCKET,
    # meta-parameters
    HAS_ZEROS: tl.constexpr,
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Split-K decode, as ``_w4a16_decode_kernel``: K tiles pid_k, pid_k + SPLIT_K, ... then atomics."""
    pid_n = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    offs_m = tl.arange(0, 16)  # M <= 16, as in _w4a16_decode_kernel
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    acc = tl.zeros((16, BLOCK_SIZE_N), dtype=tl.float32)
    for k_tile in range(pid_k, tl.cdiv(K, BLOCK_SIZE_K), SPLIT_K):
        acc += _w8_tile(a_ptr, b_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
                        stride_am, stride_ak, stride_bn, stride_sn, stride_sg, stride_zn, stride_zg,
                        UNPACK_MASK, UNPACK_MAGIC,
                        HAS_ZEROS, QUANT_GROUP_SIZE, DOT_PRECISION, EVEN_K, BLOCK_SIZE_N, BLOCK_SIZE_K)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")


@triton.jit
def _w8a16_prefill_kernel(
    # pointers: x (M, K), qweight as int32 words (N, K // 4), scales/zeros (N, groups), output (M, N) in x's dtype
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides (the words are contiguous along K)
    stride_am, stride_ak, stride_bn, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    # unpacking constants (see _UNPACK) and the autotune key
    UNPACK_MASK, UNPACK_MAGIC, M_BUCKET,
    # meta-parameters
    HAS_ZEROS: tl.constexpr,
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Tiled matmul (Triton tutorial 03) with the int8 weight tile dequantized in registers."""
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
        acc += _w8_tile(a_ptr, b_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
                        stride_am, stride_ak, stride_bn, stride_sn, stride_sg, stride_zn, stride_zg,
                        UNPACK_MASK, UNPACK_MAGIC,
                        HAS_ZEROS, QUANT_GROUP_SIZE, DOT_PRECISION, EVEN_K, BLOCK_SIZE_N, BLOCK_SIZE_K)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_KEY = ["M_BUCKET", "N", "K", "QUANT_GROUP_SIZE", "HAS_ZEROS"]
_w8a16_decode = autotuned(_w8a16_decode_kernel, "decode", "w8a16", _KEY)
_w8a16_prefill = autotuned(_w8a16_prefill_kernel, "prefill", "w8a16", _KEY)


def plan_w8a16(path: str, x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, group_size: int) -> Launch:
    """The kernel call for 2-D x (at most 16 rows on the decode path) on the "decode" or "prefill" path, with
    the arguments the JIT will see."""
    M, K = x2.shape
    N = qweight.shape[0]
    assert path == "prefill" or M <= 16, "the decode kernel takes at most 16 rows"
    if qweight.stride(1) != 1 or qweight.stride(0) % CODES_PER_WORD or qweight.data_ptr() % 4:
        qweight = qweight.contiguous()
    words = qweight.view(torch.int32)  # (N, K // 4): little-endian, byte b of word i is code 4i + b
    x2, precision = dot_setup(x2)
    mask, magic = _UNPACK[x2.dtype]
    c = output_buffer(path, M, N, x2)
    z = scales if zeros is None else zeros  # never read without zeros; scales stands in for the pointer
    args = (x2, words, scales, z, c, M, N, K, *x2.stride(), words.stride(0), *scales.stride(), *z.stride(),
            *c.stride(), mask, magic, triton.next_power_of_2(M))
    kwargs = dict(HAS_ZEROS=zeros is not None, QUANT_GROUP_SIZE=0 if group_size == -1 else group_size,
                  DOT_PRECISION=precision)
    kernel = _w8a16_decode if path == "decode" else _w8a16_prefill
    return Launch(kernel, args, kwargs, grid_for(path, M, N), c)


# -------------------------------------------------------------------------------------- public functions


def _check_w8(x, qweight, scales, zeros, group_size, name):
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        desc = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight)
        raise ValueError(f"{name}: qweight must be a 2-D int8 tensor (N, K), got {desc}")
    N, K = qweight.shape
    if x is not None:
        check_activation(x, K, name)
        if x.device != qweight.device:
            raise ValueError(f"{name}: x is on {x.device} but qweight is on {qweight.device}")
    scales, zeros = check_scales(scales, zeros, N, K, group_size, qweight.device, name)
    return N, K, scales, zeros


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int = -1, *, path: str = "auto") -> torch.Tensor:
    """``x @ W.T`` for int8 weights, without materializing W on the Triton paths.

    Args:
        x: (..., K) float16 / bfloat16 / float32, any strides.
        qweight: (N, K) int8.
        scales: (N, ceil(K / group_size)); (N,) or (N, 1) when ``group_size == -1``.
        zeros: None (symmetric, ``W = q * s``) or shaped like scales.
        group_size: -1 (per output channel, the default), 32, 64, 128 or 256.
        path: "auto" (by device and M, see :mod:`almak.kernels.w4a16`), or force "decode", "prefill", "dense".

    Returns:
        (..., N) tensor in x's dtype.

    Example:
        >>> from almak.quant.pack import quantize_rtn_groupwise
        >>> q, s, _ = quantize_rtn_groupwise(W, bits=8, group_size=-1, sym=True)
        >>> y = w8a16_matmul(x, q, s)   # ~= x @ W.T
    """
    name = "w8a16_matmul"
    N, K, scales, zeros = _check_w8(x, qweight, scales, zeros, group_size, name)
    x2 = x.reshape(-1, K)  # a view when x's leading dims allow it; the kernels take any (M, K) strides
    forced = path
    path = choose_path(x2, path, name)
    if K % CODES_PER_WORD and path != "dense":
        if forced != "auto":
            raise ValueError(f"{name}: path={forced!r} reads the codes as int32 words, so K must be a multiple of "
                             f"{CODES_PER_WORD}; got K={K} (path='dense' takes any K)")
        path = "dense"  # same product, from the dequantized weight
    if x2.shape[0] == 0:
        y = x2.new_empty((0, N))
    elif path == "dense":
        y = F.linear(x2, dequantize_w8(qweight, scales, zeros, group_size, dtype=x.dtype))
    else:
        y = torch.cat([plan_w8a16(path, rows, qweight, scales, zeros, group_size).run().to(x.dtype)
                       for rows in _row_chunks(x2, path)])
    return y.reshape(*x.shape[:-1], N)


def dequantize_w8(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  group_size: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Materialize W (N, K) from the W8A16 operands: ``(q - zeros[g]) * scales[g]`` computed in float32.

    Example:
        >>> W = dequantize_w8(qweight, scales)   # (N, K) float32, per-channel symmetric
    """
    _, _, scales, zeros = _check_w8(None, qweight, scales, zeros, group_size, "dequantize_w8")
    return apply_groups_(qweight.to(torch.float32), scales, zeros, group_size).to(dtype)


def w8a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None = None, group_size: int = -1) -> torch.Tensor:
    """Pure-torch W8A16: dequantize to float32, ``F.linear`` in float32, cast to x's dtype.

    Example:
        >>> torch.testing.assert_close(w8a16_matmul(x, q, s), w8a16_reference(x, q, s))
    """
    _check_w8(x, qweight, scales, zeros, group_size, "w8a16_reference")
    return F.linear(x.float(), dequantize_w8(qweight, scales, zeros, group_size)).to(x.dtype)
