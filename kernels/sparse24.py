"""2:4 sparse weights: ``y = x @ W.T`` with W stored as its kept half plus 4-bit position metadata.

A weight W (N, K) is 2:4 sparse when every group of 4 consecutive weights along K (columns 4g..4g+3) holds
at most 2 non-zeros. Operands (the public, stable layout):

- ``x``: (..., K) float16, bfloat16 or float32, any strides. K must be a multiple of 32.
- ``values``: (N, K // 2) float16, bfloat16 or float32: the two kept weights of each group of four, in order
  of position; compressed column c belongs to group ``c // 2``. May differ in dtype from x (cast in
  registers).
- ``meta``: (N, K // 32) int32, 4 bits per group: nibble j (bits 4j..4j+3) of ``meta[n, i]`` describes group
  ``8i + j`` (the nibble order of int4 ``qweight``); its bits 0-1 are the position (0..3) of the first kept
  value and bits 2-3 that of the second, first < second. A group with fewer than 2 non-zeros is padded with
  its lowest unused positions, holding 0.
- 2:4 + INT4 (``sparse24_w4a16_matmul``): ``qvalues`` (N, K // 16) int32 packs the unsigned 4-bit codes of
  the K // 2 kept values, nibble j of ``qvalues[n, i]`` = code of compressed column ``8i + j``; ``scales``,
  ``zeros`` (N, ceil(K / group_size)) indexed by the group of the value's ORIGINAL column k:
  ``W[n, k] = (q - zeros[n, k // group_size]) * scales[n, k // group_size]`` at kept positions, 0 elsewhere.
  ``group_size`` is 32, 64, 128, 256 (the last group may be ragged) or -1 per output channel, where
  scales/zeros may be (N,) or (N, 1).
- ``y``: (..., N) in x's dtype, accumulated in float32.

compressed-tensors stores 2:4 weights as ``sparse-24-bitmask`` instead: ``compressed`` (N, K // 2), the kept
values in row-major order of a keep-mask, and ``bitmask`` (N, ceil(K / 8)) uint8, that mask packed as
``numpy.packbits(mask, axis=-1, bitorder="little")``. Its mask is the top-2 |w| of each group, so it always
has exactly 2 bits per group, even where fewer weights are non-zero; ``to_bitmask_24`` / ``from_bitmask_24``
convert both ways.

The Triton kernels load each tile's ``values`` (or ``qvalues``) and ``meta`` once, with wide loads, and
expand the (BLOCK_SIZE_N, BLOCK_SIZE_K) tile of W in registers before a dense ``tl.dot``: per weight they read
9 bits instead of fp16's 16 (8 of value, 1 of meta), 3 with int4 values; the arithmetic stays dense. 16-bit
values in x's dtype are read as one int32 per group holding (v0, v1), and each dense pair of the group is one
of six bit patterns of that register (R, R & 0xFFFF, R << 16, R >> 16, R & 0xFFFF0000, 0) picked by three
32-bit selects on the nibble's bits; other value dtypes and int4 values take 16-bit selects per weight, which
cost about twice the instructions (see benchmarks/results/static-report.json). Paths, thresholds and configs:
:mod:`almak.kernels.common` (split-K decode for M <= ``DECODE_MAX_M``, the tiled prefill kernel below
``DENSE_MIN_M``, decompress + ``F.linear`` from there and for CPU tensors unless ``TRITON_INTERPRET=1``).
Tested under the interpreter; not yet run or timed on a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .common import (
    INTERPRET,  # noqa: F401 (the tests read it from here)
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
from .w4a16 import _UNPACK as W4_UNPACK
from .w4a16 import _halves, _row_chunks, _unpack_w4, _zero_offset, pack_int4, unpack_int4

__all__ = [
    "compress_24",
    "decompress_24",
    "to_bitmask_24",
    "from_bitmask_24",
    "sparse24_matmul",
    "sparse24_reference",
    "sparse24_w4a16_matmul",
    "sparse24_w4a16_reference",
    "dequantize_sparse24_w4",
    "meta_positions",
]

# K must be a multiple of this: one int32 of meta describes 8 groups of 4 columns.
K_MULTIPLE = 32
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _nibbles8(m):
    """(BN, BW) int32 -> (BN, BW * 8) nibbles, nibble j of word i at column 8i + j."""
    u = m.to(tl.uint32, bitcast=True)
    n = tl.join(tl.join(tl.join(u & 0xF, (u >> 16) & 0xF), tl.join((u >> 8) & 0xF, (u >> 24) & 0xF)),
                tl.join(tl.join((u >> 4) & 0xF, (u >> 20) & 0xF), tl.join((u >> 12) & 0xF, (u >> 28) & 0xF)))
    return tl.reshape(n, (m.shape[0], m.shape[1] * 8))


@triton.jit
def _sparse24_tile(
    a_ptr, v_ptr, meta_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
    stride_am, stride_ak, stride_vn, stride_vk, stride_mn, stride_mk, stride_sn, stride_sg, stride_zn, stride_zg,
    UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT,
    IS_W4: tl.constexpr, PAIRS: tl.constexpr, QUANT_GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """float32 (BLOCK_SIZE_M, BLOCK_SIZE_N) product of x's rows offs_m with dense K tile ``k_tile`` of W's rows.

    The kept values (BLOCK_SIZE_K / 2 per row) and their metadata (BLOCK_SIZE_K / 32 words) are each loaded
    once with wide loads; the dense tile is then built in registers (each group of 4 holds its two kept
    values at the positions its nibble names, zeros elsewhere) and multiplied on the tensor cores.
    """
    BG: tl.constexpr = BLOCK_SIZE_K // 4  # groups of 4 in the tile
    dtype = a_ptr.dtype.element_ty
    mask_n = offs_n < N
    mask_m = offs_m < M
    offs_k = k_tile * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)
    offs_mw = k_tile * (BLOCK_SIZE_K // 32) + tl.arange(0, BLOCK_SIZE_K // 32)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    m_ptrs = meta_ptr + offs_n[:, None] * stride_mn + offs_mw[None, :] * stride_mk
    # Columns of v per dense K tile: int4 codes 8 per word, 16-bit pairs one per group, else one per value.
    V_PER_TILE: tl.constexpr = BLOCK_SIZE_K // 16 if IS_W4 else (BLOCK_SIZE_K // 4 if PAIRS else BLOCK_SIZE_K // 2)
    offs_v = k_tile * V_PER_TILE + tl.arange(0, V_PER_TILE)
    v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_v[None, :] * stride_vk
    if EVEN_K:
        x = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        meta = tl.load(m_ptrs, mask=mask_n[:, None], other=0)
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0)
    else:
        x = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        meta = tl.load(m_ptrs, mask=mask_n[:, None] & (offs_mw < K // 32)[None, :], other=0)
        v_len = K // (BLOCK_SIZE_K // V_PER_TILE)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & (offs_v < v_len)[None, :], other=0)
    nib = _nibbles8(meta)  # (BN, BG): kept positions of each group, bits 0-1 first, 2-3 second
    p0 = nib & 3
    p1 = nib >> 2
    if IS_W4:
        # A word holds 8 kept values = 4 groups; dequantize as W4A16 does, then regroup: _pair_tree position
        # (E1, E2, E3) holds value j = 2 E1 + E2 + 4 E3, i.e. group E1 + 2 E3 of the word, slot E2.
        ONE_GROUP: tl.constexpr = QUANT_GROUP_SIZE == 0 or QUANT_GROUP_SIZE >= BLOCK_SIZE_K
        if ONE_GROUP:
            if QUANT_GROUP_SIZE == 0:
                g = 0
            else:
                g = k_tile * BLOCK_SIZE_K // QUANT_GROUP_SIZE
            s = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
            q = _unpack_w4(v, _zero_offset(z, dtype)[:, None, None, None, None], UNPACK_MASK, UNPACK_MAGIC,
                           ZERO_SHIFT, dtype)
        else:
            # A word covers 16 dense columns, never two quantization groups (32 or more columns).
            g = (k_tile * BLOCK_SIZE_K + 16 * tl.arange(0, BLOCK_SIZE_K // 16)) // QUANT_GROUP_SIZE
            sz_mask = mask_n[:, None] & (g < tl.cdiv(K, QUANT_GROUP_SIZE))[None, :]
            s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=sz_mask, other=0.0)
            z = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg, mask=sz_mask, other=0.0)
            q = _unpack_w4(v, _zero_offset(z.to(tl.float32), dtype)[:, :, None, None, None], UNPACK_MASK,
                           UNPACK_MAGIC, ZERO_SHIFT, dtype)
            q = q * s.to(dtype)[:, :, None, None, None]
        v0, v1 = tl.split(tl.reshape(tl.permute(q, (0, 1, 4, 2, 3)), (BLOCK_SIZE_N, BG, 2)))
    elif PAIRS:
        # 16-bit values in x's dtype, read as int32 pairs R = (v0, v1): each dense pair of a group is one of
        # R, R & 0xFFFF, R << 16, R >> 16, R & 0xFFFF0000 or 0, picked by the nibble's bits with three 32-bit
        # selects, so the two halves never leave their register (no 16-bit selects, no repacking).
        R = v.to(tl.uint32, bitcast=True)
        b0 = (nib & 1) != 0  # first kept position: bit 0, bit 1
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0  # second kept position: bit 0, bit 1
        b3 = (nib & 8) != 0
        zero = tl.zeros_like(R)
        p01 = tl.where(b1, zero, tl.where(b0, R << 16, tl.where(b3, R & 0xFFFF, R)))
        p23 = tl.where(b1, R, tl.where(b3, tl.where(b2, R & 0xFFFF0000, R >> 16), zero))
        d0, d1 = _halves(p01.to(tl.int32, bitcast=True), dtype)
        d2, d3 = _halves(p23.to(tl.int32, bitcast=True), dtype)
    else:
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_SIZE_N, BG, 2)))
        v0 = v0.to(dtype)
        v1 = v1.to(dtype)
    if IS_W4 or not PAIRS:
        zero16 = tl.zeros_like(v0)
        d0 = tl.where(p0 == 0, v0, zero16)
        d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero16))
        d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero16))
        d3 = tl.where(p1 == 3, v1, zero16)
    # (BN, BG, E1, E2) holds position 2 E1 + E2 of each group: the natural K order, so x needs no permutation.
    w_tile = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_SIZE_N, BLOCK_SIZE_K))
    part = tl.dot(x, tl.trans(w_tile), input_precision=DOT_PRECISION)
    if IS_W4 and (QUANT_GROUP_SIZE == 0 or QUANT_GROUP_SIZE >= BLOCK_SIZE_K):
        part = part * s[None, :]
    return part


@triton.jit
def _sparse24_decode_kernel(
    # pointers: x (M, K), values (N, K // 2) or qvalues (N, K // 16), meta (N, K // 32),
    # scales/zeros (N, groups) (int4 only), float32 output (M, N), zero-filled
    a_ptr, v_ptr, meta_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_vn, stride_vk, stride_mn, stride_mk,
    stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    # int4 unpacking constants (see w4a16._UNPACK) and the autotune key
    UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT, M_BUCKET,
    # meta-parameters
    IS_W4: tl.constexpr,  # values are int4 codes with scales and zeros
    PAIRS: tl.constexpr,  # 16-bit values in x's dtype, read as one int32 (v0, v1) pair per group
    QUANT_GROUP_SIZE: tl.constexpr,  # int4 only; 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Split-K decode, as ``w4a16._w4a16_decode_kernel`` (M <= 16): K tiles pid_k, pid_k + SPLIT_K, ...
    then atomics."""
    pid_n = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    acc = tl.zeros((16, BLOCK_SIZE_N), dtype=tl.float32)
    for k_tile in range(pid_k, tl.cdiv(K, BLOCK_SIZE_K), SPLIT_K):
        acc += _sparse24_tile(a_ptr, v_ptr, meta_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
                              stride_am, stride_ak, stride_vn, stride_vk, stride_mn, stride_mk,
                              stride_sn, stride_sg, stride_zn, stride_zg, UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT,
                              IS_W4, PAIRS, QUANT_GROUP_SIZE, DOT_PRECISION, EVEN_K, BLOCK_SIZE_N, BLOCK_SIZE_K)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed")


@triton.jit
def _sparse24_prefill_kernel(
    # pointers: as the decode kernel; output (M, N) in x's dtype
    a_ptr, v_ptr, meta_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_vn, stride_vk, stride_mn, stride_mk,
    stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    # int4 unpacking constants and the autotune key
    UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT, M_BUCKET,
    # meta-parameters
    IS_W4: tl.constexpr,
    PAIRS: tl.constexpr,
    QUANT_GROUP_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Tiled matmul (Triton tutorial 03) with the weight tile expanded from 2:4 form in registers."""
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
        acc += _sparse24_tile(a_ptr, v_ptr, meta_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, k_tile, M, N, K,
                              stride_am, stride_ak, stride_vn, stride_vk, stride_mn, stride_mk,
                              stride_sn, stride_sg, stride_zn, stride_zg, UNPACK_MASK, UNPACK_MAGIC, ZERO_SHIFT,
                              IS_W4, PAIRS, QUANT_GROUP_SIZE, DOT_PRECISION, EVEN_K, BLOCK_SIZE_N, BLOCK_SIZE_K)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_KEY = ["M_BUCKET", "N", "K", "QUANT_GROUP_SIZE"]
# One autotuner per weight format, so that fp and int4 values keep separate best configs.
_decode = {is_w4: autotuned(_sparse24_decode_kernel, "decode", "sparse24_w4a16" if is_w4 else "sparse24", _KEY)
           for is_w4 in (False, True)}
_prefill = {is_w4: autotuned(_sparse24_prefill_kernel, "prefill", "sparse24_w4a16" if is_w4 else "sparse24", _KEY)
            for is_w4 in (False, True)}


def plan_sparse24(path: str, x2: torch.Tensor, v: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None,
                  zeros: torch.Tensor | None, group_size: int) -> Launch:
    """The kernel call for 2-D x (at most 16 rows on the decode path) on the "decode" or "prefill" path, with
    the arguments the JIT will see; int4 kept values when ``scales`` is given."""
    M, K = x2.shape
    N = v.shape[0]
    assert path == "prefill" or M <= 16, "the decode kernel takes at most 16 rows"
    x2, precision = dot_setup(x2)
    is_w4 = scales is not None
    mask, magic = W4_UNPACK[x2.dtype]
    c = output_buffer(path, M, N, x2)
    # 16-bit kept values in x's dtype are read as one int32 (v0, v1) pair per group (little-endian: v0 low).
    pairs = not is_w4 and v.dtype == x2.dtype and v.element_size() == 2 and v.stride(1) == 1 and v.stride(0) % 2 == 0
    if pairs:
        v = v.view(torch.int32)
    # Without int4, the scales/zeros pointers are never read; the values stand in for them.
    s = scales if is_w4 else v
    z = zeros if is_w4 else v
    args = (x2, v, meta, s, z, c, M, N, K, *x2.stride(), *v.stride(), *meta.stride(), *s.stride(), *z.stride(),
            *c.stride(), mask, magic, 0, triton.next_power_of_2(M))
    kwargs = dict(IS_W4=is_w4, PAIRS=pairs, QUANT_GROUP_SIZE=0 if group_size == -1 else group_size, DOT_PRECISION=precision)
    kernel = (_decode if path == "decode" else _prefill)[is_w4]
    return Launch(kernel, args, kwargs, grid_for(path, M, N), c)


# ---------------------------------------------------------------------------------------- checks, layout


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_k(K: int, what: str, name: str) -> None:
    if K % K_MULTIPLE != 0:
        raise ValueError(f"{name}: 2:4 metadata packs 8 groups of 4 columns per int32, so K must be a multiple "
                         f"of 32; got {what} (K={K})")


def _check_meta(meta, N: int, K: int, device: torch.device, name: str) -> None:
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int32 or meta.dim() != 2:
        raise ValueError(f"{name}: meta must be a 2-D int32 tensor (N, K // 32), got {_desc(meta)}")
    if tuple(meta.shape) != (N, K // K_MULTIPLE):
        raise ValueError(f"{name}: meta of shape {tuple(meta.shape)} should be ({N}, {K // K_MULTIPLE}) = "
                         f"(N, K // 32) for N={N}, K={K}")
    if meta.device != device:
        raise ValueError(f"{name}: meta is on {meta.device} but the values are on {device}")


def _check_x(x, K: int, device: torch.device, name: str) -> None:
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] % K_MULTIPLE != 0:
        _check_k(x.shape[-1], f"x of shape {tuple(x.shape)}", name)
    check_activation(x, K, name)
    if x.device != device:
        raise ValueError(f"{name}: x is on {x.device} but the values are on {device}")


def _check_sparse(x, values, meta, name: str) -> tuple[int, int]:
    """Validate (x,) values, meta; return (N, K)."""
    if not isinstance(values, torch.Tensor) or values.dtype not in _VALUE_DTYPES or values.dim() != 2:
        raise ValueError(f"{name}: values must be a 2-D float16, bfloat16 or float32 tensor (N, K // 2), "
                         f"got {_desc(values)}")
    N, K = values.shape[0], 2 * values.shape[1]
    if x is not None:
        _check_x(x, K, values.device, name)
    _check_k(K, f"values of shape {tuple(values.shape)}, K = 2 * {values.shape[1]}", name)
    _check_meta(meta, N, K, values.device, name)
    return N, K


def _check_sparse_w4(x, qvalues, meta, scales, zeros, group_size, name: str):
    """Validate the 2:4 + int4 operands; return (N, K, scales, zeros) with 2-D scales/zeros."""
    if not isinstance(qvalues, torch.Tensor) or qvalues.dtype != torch.int32 or qvalues.dim() != 2:
        raise ValueError(f"{name}: qvalues must be a 2-D int32 tensor (N, K // 16), got {_desc(qvalues)}")
    N, K = qvalues.shape[0], 16 * qvalues.shape[1]
    if x is not None:
        _check_x(x, K, qvalues.device, name)
    _check_k(K, f"qvalues of shape {tuple(qvalues.shape)}, K = 16 * {qvalues.shape[1]}", name)
    _check_meta(meta, N, K, qvalues.device, name)
    if zeros is None:
        raise ValueError(f"{name}: zeros is required for int4 (symmetric int4 stores zeros of 8)")
    scales, zeros = check_scales(scales, zeros, N, K, group_size, qvalues.device, name)
    return N, K, scales, zeros


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """(N, W) int32 -> (N, 8 W) uint8, nibble j of ``words[n, i]`` at column 8i + j (int4 code order)."""
    if sys.byteorder != "little":
        return unpack_int4(words)
    # Byte b of a little-endian word holds nibbles 2b (low half) and 2b + 1 (high half); uint8 ops instead
    # of unpack_int4's int64 shifts: 4096x4096 meta in 34 instead of 113 ms on one CPU core (measured).
    b = words.contiguous().view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).view(words.shape[0], 8 * words.shape[1])


def meta_positions(meta: torch.Tensor, name: str = "meta_positions") -> torch.Tensor:
    """meta (N, K // 32) int32 -> kept positions (N, K // 4, 2) int64, checked increasing (ValueError,
    prefixed with ``name``, names the first group that is not).

    Example:
        >>> meta_positions(compress_24(torch.tensor([[0.0, 1.5, 0.0, -2.0] * 8]))[1])[0, 0].tolist()
        [1, 3]
    """
    nib = _nibbles(meta)  # (N, K // 4): nibble g describes group g
    first, second = nib & 3, nib >> 2
    bad = first >= second
    if bad.any():
        n, g = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: meta row {n}, group {g} (columns {4 * g}..{4 * g + 3}) holds positions "
                         f"({first[n, g].item()}, {second[n, g].item()}); the first kept position must be "
                         f"below the second")
    return torch.stack((first, second), dim=-1).long()  # scatter_ wants int64 indices


def _pack_positions(pos: torch.Tensor) -> torch.Tensor:
    """Kept positions (N, K // 4, 2), increasing -> meta (N, K // 32) int32."""
    return pack_int4(pos[..., 0] | (pos[..., 1] << 2))


def _expand(kept: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Place (N, K // 2) kept entries at their positions of a zero (N, K) tensor."""
    N, G = pos.shape[:2]
    out = torch.zeros((N, G, 4), device=kept.device, dtype=dtype)
    out.scatter_(2, pos, kept.reshape(N, G, 2).to(dtype))
    return out.view(N, 4 * G)


def compress_24(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2:4-sparse W (N, K) into ``values`` (N, K // 2) in W's dtype and ``meta`` (N, K // 32) int32.

    Raises ValueError, naming the first offending row and group, if a group of 4 holds more than 2
    non-zeros. Groups with fewer keep their lowest unused positions (holding W's zeros).

    Example:
        >>> W = torch.tensor([[0.0, 1.5, 0.0, -2.0] * 8])
        >>> values, meta = compress_24(W)
        >>> values[0, :2].tolist(), hex(meta[0, 0].item() & 0xF)   # positions 1 and 3: 1 | 3 << 2
        ([1.5, -2.0], '0xd')
    """
    name = "compress_24"
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.dtype not in _VALUE_DTYPES:
        raise ValueError(f"{name}: W must be a 2-D float16, bfloat16 or float32 tensor (N, K), got {_desc(W)}")
    N, K = W.shape
    _check_k(K, f"W of shape {tuple(W.shape)}", name)
    groups = W.reshape(N, K // 4, 4)
    nonzero = groups != 0
    count = nonzero.sum(dim=-1)
    if (count > 2).any():
        n, g = (count > 2).nonzero()[0].tolist()
        raise ValueError(f"{name}: W is not 2:4 sparse: row {n}, group {g} (columns {4 * g}..{4 * g + 3}) has "
                         f"{count[n, g].item()} non-zeros, at most 2 allowed")
    # Rank non-zeros before zeros, each by position; the 2 lowest ranks are the kept slots. int8 keeps the
    # temporary at one byte per weight.
    slot = torch.arange(4, device=W.device, dtype=torch.int8)
    rank = torch.where(nonzero, slot, slot + 4)
    pos = (rank.sort(dim=-1).values[..., :2] & 3).long().sort(dim=-1).values
    values = groups.gather(2, pos).reshape(N, K // 2)
    return values, _pack_positions(pos)


def decompress_24(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense W (N, K) from ``values`` (N, K // 2) and ``meta`` (N, K // 32), in values' dtype (or ``dtype``).

    Example:
        >>> values, meta = compress_24(W)
        >>> torch.equal(decompress_24(values, meta), W)
        True
    """
    name = "decompress_24"
    _check_sparse(None, values, meta, name)
    return _expand(values, meta_positions(meta, name), dtype or values.dtype)


def to_bitmask_24(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert to compressed-tensors' ``sparse-24-bitmask``: ``(compressed, bitmask)``.

    ``compressed`` (N, K // 2) is values itself (made contiguous): the kept values in row-major order of
    the keep-mask are already in order of position. ``bitmask`` (N, K // 8) uint8 packs the mask (exactly
    2 bits per group: meta's positions) as ``numpy.packbits(mask, axis=-1, bitorder="little")``.

    Example:
        >>> compressed, bitmask = to_bitmask_24(*compress_24(W))   # the tensors a checkpoint stores
    """
    name = "to_bitmask_24"
    N, K = _check_sparse(None, values, meta, name)
    pos = meta_positions(meta, name)
    mask = torch.zeros((N, K // 4, 4), device=values.device, dtype=torch.uint8)
    mask.scatter_(2, pos, 1)
    # little bitorder: column 8b + j is bit j of byte b.
    shifts = torch.arange(8, device=values.device, dtype=torch.uint8)
    bitmask = (mask.view(N, K // 8, 8) << shifts).sum(dim=-1, dtype=torch.uint8)
    return values.contiguous(), bitmask


def from_bitmask_24(compressed: torch.Tensor, bitmask: torch.Tensor,
                    shape: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert compressed-tensors' ``sparse-24-bitmask`` (``compressed``, ``bitmask``, dense ``shape``) to
    ``(values, meta)``.

    The mask must set exactly 2 bits per group of 4 (compressed-tensors keeps the top-2 |w| of each group,
    zeros included); ValueError names the first group that does not. ``shape`` may be the (2, 1) tensor that
    checkpoints store.

    Example:
        >>> values, meta = from_bitmask_24(sd["q_proj.compressed"], sd["q_proj.bitmask"], sd["q_proj.shape"])
    """
    name = "from_bitmask_24"
    if isinstance(shape, torch.Tensor):
        shape = shape.flatten().tolist()
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2:
        raise ValueError(f"{name}: shape must be the dense (N, K), got {shape}")
    N, K = shape
    _check_k(K, f"shape {shape}", name)
    if not isinstance(compressed, torch.Tensor) or tuple(compressed.shape) != (N, K // 2):
        raise ValueError(f"{name}: compressed should be ({N}, {K // 2}) = (N, K // 2) for shape {shape}, "
                         f"got {_desc(compressed)}")
    nbytes = -(-K // 8)
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (N, nbytes):
        raise ValueError(f"{name}: bitmask should be uint8 ({N}, {nbytes}) = (N, ceil(K / 8)) for shape {shape}, "
                         f"got {_desc(bitmask)}")
    bitmask = bitmask.to(compressed.device)
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    keep = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(N, nbytes * 8)[:, :K].reshape(N, K // 4, 4).bool()
    count = keep.sum(dim=-1)
    if (count != 2).any():
        n, g = (count != 2).nonzero()[0].tolist()
        raise ValueError(f"{name}: bitmask row {n}, group {g} (columns {4 * g}..{4 * g + 3}) sets "
                         f"{count[n, g].item()} bits; sparse-24-bitmask keeps exactly 2 per group of 4")
    slot = torch.arange(4, device=bitmask.device, dtype=torch.int8)
    pos = torch.where(keep, slot, slot + 4).sort(dim=-1).values[..., :2].long()  # kept slots, increasing
    return compressed, _pack_positions(pos)


# -------------------------------------------------------------------------------------- public matmuls


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """``x @ W.T`` for a 2:4-sparse W, without materializing W on the Triton paths.

    Args:
        x: (..., K) float16 / bfloat16 / float32, any strides; K a multiple of 32.
        values: (N, K // 2) float16 / bfloat16 / float32, the kept weights (cast to x's dtype in registers).
        meta: (N, K // 32) int32, nibble j of ``meta[n, i]`` = kept positions of group ``8i + j``.
        path: "auto" (by device and M, see :mod:`almak.kernels.w4a16`), or force "decode", "prefill", "dense".

    Returns:
        (..., N) tensor in x's dtype.

    Example:
        >>> values, meta = compress_24(W)            # W (N, K) 2:4 sparse
        >>> y = sparse24_matmul(x, values, meta)     # == x @ W.T up to rounding
    """
    name = "sparse24_matmul"
    N, K = _check_sparse(x, values, meta, name)
    x2 = x.reshape(-1, K)  # a view when x's leading dims allow it; the kernels take any (M, K) strides
    path = choose_path(x2, path, name)
    if x2.shape[0] == 0:
        y = x2.new_empty((0, N))
    elif path == "dense":
        y = F.linear(x2, decompress_24(values, meta, dtype=x.dtype))
    else:
        y = torch.cat([plan_sparse24(path, rows, values, meta, None, None, -1).run().to(x.dtype)
                       for rows in _row_chunks(x2, path)])
    return y.reshape(*x.shape[:-1], N)


def sparse24_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Pure-torch 2:4 matmul: decompress, ``F.linear`` in float32, cast to x's dtype.

    Example:
        >>> torch.testing.assert_close(sparse24_matmul(x, v, m), sparse24_reference(x, v, m))
    """
    _check_sparse(x, values, meta, "sparse24_reference")
    return F.linear(x.float(), decompress_24(values, meta, dtype=torch.float32)).to(x.dtype)


def sparse24_w4a16_matmul(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor, group_size: int, path: str = "auto") -> torch.Tensor:
    """``x @ W.T`` for a 2:4-sparse W whose kept values are int4 codes with group-wise scales and zeros.

    Args:
        x: (..., K) float16 / bfloat16 / float32, any strides; K a multiple of 32.
        qvalues: (N, K // 16) int32, nibble j of ``qvalues[n, i]`` = code of compressed column ``8i + j``.
        meta: (N, K // 32) int32, as for :func:`sparse24_matmul`.
        scales, zeros: (N, ceil(K / group_size)), indexed by the group of the value's original column;
            (N,) or (N, 1) when ``group_size == -1``.
        group_size: 32, 64, 128, 256, or -1 for one group per output channel.
        path: "auto", "decode", "prefill" or "dense".

    Returns:
        (..., N) tensor in x's dtype.

    Example:
        >>> from almak.kernels import pack_int4
        >>> y = sparse24_w4a16_matmul(x, pack_int4(codes), meta, scales, zeros, 128)   # codes (N, K // 2)
    """
    name = "sparse24_w4a16_matmul"
    N, K, scales, zeros = _check_sparse_w4(x, qvalues, meta, scales, zeros, group_size, name)
    x2 = x.reshape(-1, K)
    path = choose_path(x2, path, name)
    if x2.shape[0] == 0:
        y = x2.new_empty((0, N))
    elif path == "dense":
        y = F.linear(x2, dequantize_sparse24_w4(qvalues, meta, scales, zeros, group_size, dtype=x.dtype))
    else:
        y = torch.cat([plan_sparse24(path, rows, qvalues, meta, scales, zeros, group_size).run().to(x.dtype)
                       for rows in _row_chunks(x2, path)])
    return y.reshape(*x.shape[:-1], N)


def dequantize_sparse24_w4(qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Materialize W (N, K) from the 2:4 + int4 operands: ``(q - zeros[g]) * scales[g]`` in float32 at kept
    positions (g the group of the dense column), 0 elsewhere.

    Example:
        >>> W = dequantize_sparse24_w4(qvalues, meta, scales, zeros, 128)   # (N, K) float32
    """
    name = "dequantize_sparse24_w4"
    N, K, scales, zeros = _check_sparse_w4(None, qvalues, meta, scales, zeros, group_size, name)
    pos = meta_positions(meta, name)
    W = _expand(_nibbles(qvalues), pos, torch.float32)
    kept = _expand(torch.ones((N, K // 2), device=W.device, dtype=torch.bool), pos, torch.bool)
    return apply_groups_(W, scales, zeros, group_size).masked_fill_(~kept, 0.0).to(dtype)


def sparse24_w4a16_reference(x: torch.Tensor, qvalues: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                             zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pure-torch 2:4 + W4A16: dequantize to float32, ``F.linear`` in float32, cast to x's dtype.

    Example:
        >>> torch.testing.assert_close(sparse24_w4a16_matmul(x, qv, m, s, z, 128),
        ...                            sparse24_w4a16_reference(x, qv, m, s, z, 128))
    """
    _check_sparse_w4(x, qvalues, meta, scales, zeros, group_size, "sparse24_w4a16_reference")
    return F.linear(x.float(), dequantize_sparse24_w4(qvalues, meta, scales, zeros, group_size)).to(x.dtype)
