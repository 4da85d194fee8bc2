"""W8A16: ``y = x @ W.T`` with W stored as int8 codes plus group-wise (or per-channel) scales.

Operands (public, stable layout):

- ``x``: (..., K) float16, bfloat16 or float32, any strides.
- ``qweight``: (N, K) int8, one code per weight, any strides.
- ``scales``: (N, ceil(K / group_size)) floating point; (N,) or (N, 1) when ``group_size == -1`` (the default:
  one scale per output channel).
- ``zeros``: None for symmetric weights, ``W = q * s``; otherwise shaped like ``scales`` (floating point or
  integer) and ``W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]``, ``g = k // group_size``.
- ``y``: (..., N) in x's dtype, accumulated in float32.

Same three paths (decode / prefill / dense), thresholds, autotuning space and CPU behaviour as
:mod:`almak.kernels.w4a16`, whose launcher helpers this module shares; only the weight load differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .w4a16 import (
    SUPPORTED_GROUP_SIZES,
    _apply_groups_,
    check_activation,
    check_scales,
    choose_path,
    kernel_configs,
    launch,
)

__all__ = ["SUPPORTED_GROUP_SIZES", "w8a16_matmul", "w8a16_reference", "dequantize_w8"]


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _w8_dequant_tile(
    b_ptr, scales_ptr, zeros_ptr,
    offs_k, offs_n, k_start, K, N,
    stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
    HAS_ZEROS: tl.constexpr, QUANT_GROUP_SIZE: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Load a (BLOCK_SIZE_K, BLOCK_SIZE_N) tile of W.T and dequantize it in registers.

    Returns ``(w, s)`` as in ``_w4_dequant_tile``: ``w = q - z`` (integers within +-255, exact even in
    bfloat16) with the tile's (BLOCK_SIZE_N,) scale ``s`` when the tile lies inside one group, else the
    dequantized ``w`` and None.
    """
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    q = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk, mask=mask, other=0)
    q = q.to(tl.float32)
    if QUANT_GROUP_SIZE == 0 or QUANT_GROUP_SIZE >= BLOCK_SIZE_K:
        if QUANT_GROUP_SIZE == 0:
            g = 0
        else:
            g = k_start // QUANT_GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
            q = q - z[None, :]
        return q.to(DOT_DTYPE), s
    else:
        g = offs_k // QUANT_GROUP_SIZE
        s = tl.load(scales_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=mask, other=0.0)
        if HAS_ZEROS:
            z = tl.load(zeros_ptr + offs_n[None, :] * stride_zn + g[:, None] * stride_zg, mask=mask, other=0.0)
            q = q - z.to(tl.float32)
        return (q * s.to(tl.float32)).to(DOT_DTYPE), None


@triton.jit
def _w8a16_decode_kernel(
    # pointers: x (M, K), qweight (N, K) int8, scales/zeros (N, groups), float32 output (M, N), zero-filled
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    M_BUCKET,  # autotune key only: next power of two of M
    # meta-parameters
    HAS_ZEROS: tl.constexpr,
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,  # 1 (GEMV in registers) or 16 (tl.dot on a padded tile)
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Split-K decode, as ``_w4a16_decode_kernel``: K tiles pid_k, pid_k + SPLIT_K, ... then atomics."""
    pid_mn = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    pid_m = pid_mn // num_pid_n
    pid_n = pid_mn % num_pid_n
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_m = offs_m < M
    dot_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k_tile in range(pid_k, tl.cdiv(K, BLOCK_SIZE_K), SPLIT_K):
        k_start = k_tile * BLOCK_SIZE_K
        offs_k = k_start + tl.arange(0, BLOCK_SIZE_K)
        mask_k = offs_k < K
        if BLOCK_SIZE_M == 1:
            a = tl.load(a_ptr + offs_m[None, :] * stride_am + offs_k[:, None] * stride_ak,
                        mask=mask_k[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
            w, s = _w8_dequant_tile(b_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k_start, K, N,
                                    stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                                    HAS_ZEROS, QUANT_GROUP_SIZE, BLOCK_SIZE_K, tl.float32)
            part = tl.sum(a * w, axis=0)[None, :]
        else:
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w, s = _w8_dequant_tile(b_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k_start, K, N,
                                    stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                                    HAS_ZEROS, QUANT_GROUP_SIZE, BLOCK_SIZE_K, dot_dtype)
            part = tl.dot(a, w, input_precision=DOT_PRECISION)
        if s is not None:
            part = part * s[None, :]
        acc += part
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = mask_m[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")


@triton.jit
def _w8a16_prefill_kernel(
    # pointers: x (M, K), qweight (N, K) int8, scales/zeros (N, groups), output (M, N) in x's dtype
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    M_BUCKET,  # autotune key only
    # meta-parameters
    HAS_ZEROS: tl.constexpr,
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Tiled matmul (Triton tutorial 03) with the int8 B tile dequantized in registers."""
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
    mask_m = offs_m < M
    dot_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k_tile in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_start = k_tile * BLOCK_SIZE_K
        offs_k = k_start + tl.arange(0, BLOCK_SIZE_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w, s = _w8_dequant_tile(b_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k_start, K, N,
                                stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                                HAS_ZEROS, QUANT_GROUP_SIZE, BLOCK_SIZE_K, dot_dtype)
        if s is not None:
            acc += tl.dot(a, w, input_precision=DOT_PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))


_KEY = ["M_BUCKET", "N", "K", "QUANT_GROUP_SIZE", "HAS_ZEROS"]
# The decode kernel accumulates with atomics, so every autotuning trial must start from a zeroed output.
_w8a16_decode = triton.autotune(configs=kernel_configs("decode"), key=_KEY, reset_to_zero=["c_ptr"])(
    _w8a16_decode_kernel)
_w8a16_prefill = triton.autotune(configs=kernel_configs("prefill"), key=_KEY)(_w8a16_prefill_kernel)


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
    path = choose_path(x2, path, name)
    if x2.shape[0] == 0:
        y = x2.new_empty((0, N))
    elif path == "dense":
        y = F.linear(x2, dequantize_w8(qweight, scales, zeros, group_size, dtype=x.dtype))
    else:
        y = launch(_w8a16_decode, _w8a16_prefill, path, x2, qweight, scales, zeros, N,
                   0 if group_size == -1 else group_size, HAS_ZEROS=zeros is not None)
    return y.reshape(*x.shape[:-1], N)


def dequantize_w8(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  group_size: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Materialize W (N, K) from the W8A16 operands: ``(q - zeros[g]) * scales[g]`` computed in float32.

    Example:
        >>> W = dequantize_w8(qweight, scales)   # (N, K) float32, per-channel symmetric
    """
    _, _, scales, zeros = _check_w8(None, qweight, scales, zeros, group_size, "dequantize_w8")
    return _apply_groups_(qweight.to(torch.float32), scales, zeros, group_size).to(dtype)


def w8a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None = None, group_size: int = -1) -> torch.Tensor:
    """Pure-torch W8A16: dequantize to float32, ``F.linear`` in float32, cast to x's dtype.

    Example:
        >>> torch.testing.assert_close(w8a16_matmul(x, q, s), w8a16_reference(x, q, s))
    """
    _check_w8(x, qweight, scales, zeros, group_size, "w8a16_reference")
    return F.linear(x.float(), dequantize_w8(qweight, scales, zeros, group_size)).to(x.dtype)
