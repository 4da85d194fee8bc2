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

Three paths, chosen by the number of rows M of ``x`` (``w4a16_matmul(..., path="auto")``):

- decode (M <= ``DECODE_MAX_M``): split-K; each program reduces a slice of K for a strip of N and adds its
  partial sums into a float32 buffer with atomics, so that a 4096-wide layer at M = 1 still launches several
  programs per SM. M = 1 multiplies and reduces in registers (GEMV); 2 <= M <= 16 pads M to 16 for ``tl.dot``.
- prefill (``DECODE_MAX_M`` < M < ``DENSE_MIN_M``): the tiled matmul of Triton's tutorial, dequantizing each
  weight tile in registers before ``tl.dot``.
- dense (M >= ``DENSE_MIN_M``, and every CPU tensor unless ``TRITON_INTERPRET=1``): dequantize the whole
  weight, then ``F.linear`` (cuBLAS on GPU). At large M the matmul is compute bound, the weight is read once
  whatever its format, and cuBLAS wins.

Under ``TRITON_INTERPRET=1`` the Triton paths also run on CPU tensors (slowly; for tests), with one fixed
config instead of autotuning.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = [
    "DECODE_MAX_M",
    "DENSE_MIN_M",
    "SUPPORTED_GROUP_SIZES",
    "w4a16_matmul",
    "w4a16_reference",
    "dequantize_w4",
]

# Rows of x up to which the split-K decode kernel is used: the tl.dot branch pads M to 16 (the smallest
# tl.dot tile), so beyond 16 rows a tiled kernel wastes nothing and no longer needs split-K to fill the GPU.
DECODE_MAX_M = 16
# Rows of x from which dequantize + cuBLAS replaces the Triton prefill kernel. UNMEASURED: chosen without a
# GPU as a conservative guess (the fp16 GEMM is compute bound well before 256 rows on an H100, so the 4x
# smaller weight read stops paying). Measure with `python benchmarks/run_kernels.py` on the target GPU and
# set it to the first M where the "dequant" provider beats "triton".
DENSE_MIN_M = 256
# Group sizes the kernels are compiled for (a power of two keeps `k // group` a shift and lets a K tile sit
# inside one group); -1 means one group per output channel.
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
# int4 codes per int32 word.
PACK_FACTOR = 8
# Same parsing as Triton's own TRITON_INTERPRET knob; read once because triton.jit also decides at import
# time whether the kernels below are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# ALMAK_AUTOTUNE=0 gives the GPU the interpreter's single config per path instead of autotuning (the GPU test
# run uses it: hundreds of test shapes x 8 configs would compile for minutes).
AUTOTUNE = not INTERPRET and os.environ.get("ALMAK_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PATHS = ("auto", "decode", "prefill", "dense")


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _w4_dequant_tile(
    b_ptr, scales_ptr, zeros_ptr,
    offs_k, offs_n, k_start, K, N,
    stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
    QUANT_GROUP_SIZE: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Load a (BLOCK_SIZE_K, BLOCK_SIZE_N) tile of W.T and dequantize it in registers.

    Returns ``(w, s)``: when the tile lies inside one quantization group (per-channel, or the group is at
    least BLOCK_SIZE_K wide: both are powers of two, so tiles never straddle groups) ``w = q - z`` in
    DOT_DTYPE (exact: small integers) and ``s`` is the (BLOCK_SIZE_N,) scale to apply to the tile's dot
    product; otherwise ``w = (q - z) * s`` already and ``s`` is None.
    """
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    # 8 consecutive k share one int32 word; the repeated loads hit the same cache line.
    packed = tl.load(b_ptr + offs_n[None, :] * stride_bn + (offs_k[:, None] // 8) * stride_bk, mask=mask, other=0)
    # Arithmetic shift sign-extends nibble 7, but the & 0xF keeps only the 4 wanted bits.
    q = ((packed >> ((offs_k[:, None] % 8) * 4)) & 0xF).to(tl.float32)
    if QUANT_GROUP_SIZE == 0 or QUANT_GROUP_SIZE >= BLOCK_SIZE_K:
        if QUANT_GROUP_SIZE == 0:
            g = 0
        else:
            g = k_start // QUANT_GROUP_SIZE
        s = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
        return (q - z[None, :]).to(DOT_DTYPE), s
    else:
        g = offs_k // QUANT_GROUP_SIZE
        s = tl.load(scales_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=mask, other=0.0)
        z = tl.load(zeros_ptr + offs_n[None, :] * stride_zn + g[:, None] * stride_zg, mask=mask, other=0.0)
        return ((q - z.to(tl.float32)) * s.to(tl.float32)).to(DOT_DTYPE), None


@triton.jit
def _w4a16_decode_kernel(
    # pointers: x (M, K), qweight (N, K // 8), scales/zeros (N, groups), float32 output (M, N), zero-filled
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    M_BUCKET,  # autotune key only: next power of two of M
    # meta-parameters
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,  # 1 (GEMV in registers) or 16 (tl.dot on a padded tile)
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Split-K decode: program (pid_mn, pid_k) reduces K tiles pid_k, pid_k + SPLIT_K, ... and atomically
    adds its (BLOCK_SIZE_M, BLOCK_SIZE_N) partial sum into c."""
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
            # GEMV: x as a (BLOCK_SIZE_K, 1) column, products reduced over K in float32.
            a = tl.load(a_ptr + offs_m[None, :] * stride_am + offs_k[:, None] * stride_ak,
                        mask=mask_k[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
            w, s = _w4_dequant_tile(b_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k_start, K, N,
                                    stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                                    QUANT_GROUP_SIZE, BLOCK_SIZE_K, tl.float32)
            part = tl.sum(a * w, axis=0)[None, :]
        else:
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w, s = _w4_dequant_tile(b_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k_start, K, N,
                                    stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                                    QUANT_GROUP_SIZE, BLOCK_SIZE_K, dot_dtype)
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
def _w4a16_prefill_kernel(
    # pointers: x (M, K), qweight (N, K // 8), scales/zeros (N, groups), output (M, N) in x's dtype
    a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg, stride_cm, stride_cn,
    M_BUCKET,  # autotune key only
    # meta-parameters
    QUANT_GROUP_SIZE: tl.constexpr,  # 0 = one group per output channel
    DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Tiled matmul (Triton tutorial 03) with the B tile dequantized in registers."""
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
    mask_m = offs_m < M
    dot_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k_tile in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_start = k_tile * BLOCK_SIZE_K
        offs_k = k_start + tl.arange(0, BLOCK_SIZE_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w, s = _w4_dequant_tile(b_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k_start, K, N,
                                stride_bn, stride_bk, stride_sn, stride_sg, stride_zn, stride_zg,
                                QUANT_GROUP_SIZE, BLOCK_SIZE_K, dot_dtype)
        if s is not None:
            acc += tl.dot(a, w, input_precision=DOT_PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))


def kernel_configs(path: str, interpret: bool = not AUTOTUNE) -> list[triton.Config]:
    """Autotuning space for the decode or prefill kernel (shared by the W8A16 kernels).

    UNMEASURED: written without a GPU. The decode list spans strips of 32..256 output channels and
    2..16-way split-K (4096 / 64 channels x 8 splits = 512 programs ~ 4 per H100 SM); the prefill list is
    the tutorial's fp16 list cut to BLOCK_SIZE_K <= 128 (tiles then sit inside one group of 128 or more).
    Under the interpreter (and with ALMAK_AUTOTUNE=0) one config each: blocks of 128 (3x faster there than 64,
    measured on the tests' shapes) that still leave every test shape a ragged N or K edge (192, 576, 1000,
    64), group sizes on both sides of BLOCK_SIZE_K (32, 64 < 128 <= 128, per-channel), and SPLIT_K = 2 so
    that the atomic reduction runs.
    """
    if path == "decode":
        if interpret:
            return [triton.Config({"BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "SPLIT_K": 2})]
        shapes = [  # (BLOCK_SIZE_N, BLOCK_SIZE_K, SPLIT_K, num_warps)
            (32, 128, 8, 4), (64, 64, 16, 4), (64, 128, 4, 4), (64, 128, 8, 4),
            (128, 64, 8, 4), (128, 128, 4, 8), (256, 64, 4, 8), (64, 256, 2, 4),
        ]
        return [triton.Config({"BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "SPLIT_K": s}, num_warps=w, num_stages=3)
                for n, k, s, w in shapes]
    if path == "prefill":
        if interpret:
            return [triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 4})]
        shapes = [  # (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, num_warps)
            (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
            (64, 256, 64, 3, 8), (128, 128, 64, 3, 8), (128, 64, 128, 3, 4), (64, 128, 128, 3, 4),
        ]
        return [triton.Config({"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": 8},
                              num_stages=st, num_warps=w) for m, n, k, st, w in shapes]
    raise ValueError(f"unknown kernel path {path!r}; expected 'decode' or 'prefill'")


_KEY = ["M_BUCKET", "N", "K", "QUANT_GROUP_SIZE"]
# The decode kernel accumulates with atomics, so every autotuning trial must start from a zeroed output.
_w4a16_decode = triton.autotune(configs=kernel_configs("decode"), key=_KEY, reset_to_zero=["c_ptr"])(
    _w4a16_decode_kernel)
_w4a16_prefill = triton.autotune(configs=kernel_configs("prefill"), key=_KEY)(_w4a16_prefill_kernel)


# ---------------------------------------------------------------------------------------- shared checks


def check_activation(x: torch.Tensor, K: int, name: str) -> None:
    """Raise ValueError unless x is a floating (..., K) activation of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACTIVATION_DTYPES:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{name}: x of shape {tuple(x.shape)} does not end in K={K} (the weight's in_features)")


def check_scales(scales: torch.Tensor, zeros: torch.Tensor | None, N: int, K: int, group_size: int,
                 device: torch.device, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate scales/zeros for (N, K) weights; return them as 2-D (N, groups) views."""
    if group_size != -1 and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{name}: group_size must be one of {SUPPORTED_GROUP_SIZES} or -1 (per output "
                         f"channel), got {group_size}")
    groups = 1 if group_size == -1 else triton.cdiv(K, group_size)
    out = []
    for label, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if label == "scales" and not t.is_floating_point():
            raise ValueError(f"{name}: scales must be floating point, got {t.dtype}")
        if label == "zeros" and (t.is_complex() or t.dtype == torch.bool):
            raise ValueError(f"{name}: zeros must be floating point or integer, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: {label} is on {t.device} but qweight is on {device}")
        if group_size == -1 and t.shape in ((N,), (N, 1)):
            t = t.reshape(N, 1)
        if tuple(t.shape) != (N, groups):
            want = f"({N},) or ({N}, 1)" if group_size == -1 else f"({N}, {groups}) = (N, ceil(K / group_size))"
            raise ValueError(f"{name}: {label} of shape {tuple(t.shape)} should be {want} for N={N}, K={K}, "
                             f"group_size={group_size}")
        out.append(t)
    return out[0], out[1]


def choose_path(x2: torch.Tensor, path: str, name: str) -> str:
    """Resolve ``path="auto"`` from the device and the number of rows; refuse Triton paths without Triton."""
    if path not in _PATHS:
        raise ValueError(f"{name}: path must be one of {_PATHS}, got {path!r}")
    triton_ok = x2.device.type == "cuda" or (INTERPRET and x2.device.type == "cpu")
    if path == "auto":
        M = x2.shape[0]
        if not triton_ok or M >= DENSE_MIN_M:
            return "dense"
        return "decode" if M <= DECODE_MAX_M else "prefill"
    if path != "dense" and not triton_ok:
        raise ValueError(f"{name}: path={path!r} needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got x on {x2.device}")
    return path


def launch(decode_fn, prefill_fn, path: str, x2: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
           zeros: torch.Tensor | None, N: int, quant_group_size: int, **extra) -> torch.Tensor:
    """Allocate the output and launch the decode or prefill kernel on 2-D x (shared with W8A16)."""
    M, K = x2.shape
    out_dtype = x2.dtype
    if INTERPRET and x2.dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot is wrong; compute the bf16 case in float32 there (GPU runs bf16).
        x2 = x2.float()
    # Zeros pointer is never read when HAS_ZEROS is False; scales stands in for it.
    z = scales if zeros is None else zeros
    # fp32 activations get true fp32 products, matching torch's default (TF32 off for matmuls).
    precision = "ieee" if x2.dtype == torch.float32 else "tf32"
    common = dict(M_BUCKET=triton.next_power_of_2(M), QUANT_GROUP_SIZE=quant_group_size,
                  DOT_PRECISION=precision, **extra)
    strides = (*x2.stride(), *b.stride(), *scales.stride(), *z.stride())
    if path == "decode":
        c = torch.zeros((M, N), device=x2.device, dtype=torch.float32)
        block_m = 1 if M == 1 else 16  # 16: the smallest M tile tl.dot accepts
        grid = lambda META: (triton.cdiv(M, block_m) * triton.cdiv(N, META["BLOCK_SIZE_N"]), META["SPLIT_K"])
        decode_fn[grid](x2, b, scales, z, c, M, N, K, *strides, *c.stride(), BLOCK_SIZE_M=block_m, **common)
        return c.to(out_dtype)
    c = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_SIZE_M"]) * triton.cdiv(N, META["BLOCK_SIZE_N"]),)
    prefill_fn[grid](x2, b, scales, z, c, M, N, K, *strides, *c.stride(), **common)
    return c.to(out_dtype)


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
        >>> from almak.quant.pack import pack_int4, quantize_rtn_groupwise
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
        y = launch(_w4a16_decode, _w4a16_prefill, path, x2, qweight, scales, zeros, N,
                   0 if group_size == -1 else group_size)
    return y.reshape(*x.shape[:-1], N)


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
    return _apply_groups_(W.view(N, K), scales, zeros, group_size).to(dtype)


def _apply_groups_(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """In place on float32 codes W (N, K): ``(W - z) * s`` with (N, groups) scales/zeros, ragged tail included.

    Broadcasting over (N, groups, group_size) views instead of repeating the scales K times: on CPU the
    dequantization is bound by memory traffic and fresh allocations.
    """
    N, K = W.shape
    G = K if group_size == -1 else group_size
    full = K // G  # complete groups; a ragged last group, if any, has K - full * G columns
    s, z = scales.float().unsqueeze(-1), None if zeros is None else zeros.float().unsqueeze(-1)
    parts = [(W[:, :full * G].view(N, full, G), slice(0, full))] if full else []
    if full * G < K:
        parts.append((W[:, full * G:].view(N, 1, K - full * G), slice(full, full + 1)))
    for part, g in parts:
        if z is not None:
            part.sub_(z[:, g])
        part.mul_(s[:, g])
    return W


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Pure-torch W4A16: dequantize to float32, ``F.linear`` in float32, cast to x's dtype.

    Example:
        >>> torch.testing.assert_close(w4a16_matmul(x, qw, s, z, 64), w4a16_reference(x, qw, s, z, 64))
    """
    _check_w4(x, qweight, scales, zeros, group_size, "w4a16_reference")
    return F.linear(x.float(), dequantize_w4(qweight, scales, zeros, group_size)).to(x.dtype)
