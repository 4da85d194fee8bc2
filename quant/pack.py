"""Packing primitives and round-to-nearest (RTN) group-wise quantization.

These produce exactly what :mod:`almak.kernels` consumes:

- int4: ``codes`` (N, K) in [0, 15] -> :func:`pack_int4` -> ``qweight`` (N, K // 8) int32, 8 codes along K
  per word, lowest nibble first (compressed-tensors ``pack-quantized`` order); ``scales``/``zeros``
  (N, ceil(K / group_size)) with ``W ~ (q - zeros) * scales``.
- int8: ``q`` (N, K) int8 and ``scales`` of the same shape convention; ``zeros`` None when symmetric.

Scale conventions (those of compressed-tensors / llm-compressor, so that a checkpoint written by either
dequantizes the same way):

- symmetric, b bits: ``s = max|W| / (2**b - 1) * 2`` (int4: ``max|W| / 7.5``, int8: ``max|W| / 127.5``),
  signed codes ``round(W / s)`` clamped to [-2**(b-1), 2**(b-1) - 1]. int4 stores them offset by +8 as
  unsigned codes with ``zeros = 8``; int8 stores the signed codes and no zeros. The grid reaches the most
  negative weight exactly; the most positive one is clipped by half a step, as in compressed-tensors.
- asymmetric: the range [min(W, 0), max(W, 0)] (so 0.0 is always exact) over ``2**b - 1`` steps,
  ``zero = round(-min / s)`` (shifted by -128 for int8 so that codes fit int8), clamped to the code range.

Group handling: ``group_size`` columns of K share a scale and zero; when it does not divide K the last group
is ragged (shorter). ``group_size = -1`` gives one group per output channel, scales shaped (N, 1).
"""

from __future__ import annotations

import torch

# The int4 layout belongs to the kernel that reads it; quant/ packs through it.
from almak.kernels.w4a16 import pack_int4, unpack_int4

__all__ = ["pack_int4", "unpack_int4", "quantize_rtn_groupwise", "search_clip", "dequantize_groupwise"]

# Group sizes almak's schemes use (the kernels compile for these); -1 is one group per output row.
GROUP_SIZES = (32, 64, 128, 256, -1)


def _grouped(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, groups, group_size), the ragged last group zero-padded."""
    N, K = W.shape
    G = K if group_size == -1 else group_size
    groups = -(-K // G)
    pad = groups * G - K
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(N, groups, G)


def _step(Wg: torch.Tensor, bits: int, sym: bool, shrink: torch.Tensor | float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each group's quantization step over its range shrunk by ``shrink``, and the range's low end (None when
    symmetric). Grouped weight ``Wg`` (N, groups, size); ``shrink`` a float or (N, groups). The range is
    [-amax, amax] when symmetric, else [min, max] widened to hold 0; an all-zero group gets step 1 (its codes
    are all zero point either way)."""
    levels = 2**bits - 1  # 15 or 255 steps
    if sym:
        lo = None
        s = Wg.abs().amax(dim=-1) * shrink / (levels / 2)
    else:
        lo = Wg.amin(dim=-1).clamp(max=0.0) * shrink
        hi = Wg.amax(dim=-1).clamp(min=0.0) * shrink
        s = (hi - lo) / levels
    return torch.where(s > 0, s, torch.ones_like(s)), lo


def _zero_point(lo: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed zero point that puts the range's low end ``lo`` on the lowest code: lo / s + z = qmin."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (qmin - torch.round(lo / s)).clamp(qmin, qmax)


def quantize_rtn_groupwise(W: torch.Tensor, bits: int, group_size: int, sym: bool,
                           scale_dtype: torch.dtype | None = None, shrink: torch.Tensor | float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of W (N, K) with one scale (and zero) per ``group_size`` columns.

    Args:
        W: (N, K) floating point weight (out_features, in_features).
        bits: 4 or 8.
        group_size: columns per group (the last one may be ragged), or -1 for one group per row.
        sym: symmetric (no zero point) or asymmetric (min/max range).
        scale_dtype: dtype of the returned scales and zeros; W's dtype by default. Codes are computed
            against the scales as stored in that dtype, so dequantizing reproduces them exactly.
        shrink: the range's ends are multiplied by this factor in (0, 1], one for all or one per group
            (N, groups): the weights beyond them are clipped (see :func:`search_clip`).

    Returns:
        ``(q, scales, zeros)``. bits=4: q (N, K) uint8 codes in [0, 15] (pack them with :func:`pack_int4`),
        zeros (8 when symmetric) as floats. bits=8: q (N, K) int8; zeros None when symmetric, else floats
        in [-128, 127]. scales/zeros are (N, ceil(K / group_size)), or (N, 1) for group_size -1.

    Example:
        >>> q, s, z = quantize_rtn_groupwise(torch.randn(64, 576), bits=4, group_size=128, sym=True)
        >>> q.shape, s.shape, z.unique().tolist()
        (torch.Size([64, 576]), torch.Size([64, 5]), [8.0])
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_rtn_groupwise: bits must be 4 or 8, got {bits}")
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"quantize_rtn_groupwise: W must be a 2-D floating tensor, got {W.dtype} {tuple(W.shape)}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"quantize_rtn_groupwise: group_size must be positive or -1, got {group_size}")
    scale_dtype = scale_dtype or W.dtype
    N, K = W.shape
    Wg = _grouped(W.float(), group_size)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1  # signed code range
    s, lo = _step(Wg, bits, sym, shrink)
    # Store the scale rounded up, never down, in scale_dtype (a scale rounded down would clip the range
    # ends by more than half a step), and compute codes against the stored value the kernels will read.
    stored = s.to(scale_dtype)
    stored = torch.where(stored.float() < s, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    s = stored.float()
    if sym:
        z = torch.zeros_like(s)
    else:
        z = _zero_point(lo, s, bits)
    q = (torch.round(Wg / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(qmin, qmax)
    q = q.reshape(N, -1)[:, :K]
    if bits == 4:
        # Unsigned codes and zeros for the pack-quantized layout: shift both by +8.
        return (q + 8).to(torch.uint8), s.to(scale_dtype), (z + 8).to(scale_dtype)
    return q.to(torch.int8), s.to(scale_dtype), None if sym else z.to(scale_dtype)


# search_clip's candidate shrink factors: 1.00, 0.99, ..., 0.75.
CLIP_GRID = tuple(round(1 - 0.01 * i, 2) for i in range(26))


def search_clip(W: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype | None = None,
                importance: torch.Tensor | None = None, grid: tuple[float, ...] = CLIP_GRID
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_rtn_groupwise` with each group's range shrunk by the factor of ``grid`` that gives the
    least ``sum_k importance[k] * (W[n, k] - W_hat[n, k])**2`` over the group: clipping a few outliers buys a
    finer step for all the other weights. ``importance`` (K,) weighs the input columns, e.g. the calibration
    inputs' mean square (the diagonal of GPTQ's Hessian); None weighs them alike. Ties keep the wider range.

    Example:
        >>> W = torch.randn(64, 576); W[0, 0] = 20.0           # an outlier stretches its group's range
        >>> err = lambda q, s, z: (dequantize_groupwise(q, s, z, 64) - W).square().sum().item()
        >>> err(*search_clip(W, 4, 64, sym=False)) < err(*quantize_rtn_groupwise(W, 4, 64, sym=False))
        True
    """
    N, K = W.shape
    imp = torch.ones(K, device=W.device) if importance is None else importance.to(W.device, torch.float32)
    if imp.shape != (K,):
        raise ValueError(f"search_clip: importance must have one value per input column ({K}), got {tuple(imp.shape)}")
    # The candidates are ranked with scales as computed (not rounded to scale_dtype), in the grouped layout of
    # quantize_rtn_groupwise, signed codes; the padding of a ragged last group has importance 0.
    Wg = _grouped(W.float(), group_size)
    impg = _grouped(imp.unsqueeze(0), group_size)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    best_err = torch.full(Wg.shape[:2], float("inf"), device=W.device)
    best = torch.ones(Wg.shape[:2], device=W.device)
    for factor in grid:
        s, lo = _step(Wg, bits, sym, factor)
        z = torch.zeros_like(s) if sym else _zero_point(lo, s, bits)
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        deq = (Wg / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
        err = deq.sub_(Wg).square_().mul_(impg).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, factor), best)
    return quantize_rtn_groupwise(W, bits, group_size, sym, scale_dtype, shrink=best)


def dequantize_groupwise(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         group_size: int) -> torch.Tensor:
    """``(q - zeros[g]) * scales[g]`` in float32 for unpacked codes q (N, K); zeros None means 0.

    Example:
        >>> q, s, z = quantize_rtn_groupwise(W, 4, 64, sym=False)
        >>> W_hat = dequantize_groupwise(q, s, z, 64)   # (N, K) float32
    """
    N, K = q.shape
    groups = 1 if group_size == -1 else -(-K // group_size)
    s = scales.reshape(N, groups).float()
    z = None if zeros is None else zeros.reshape(N, groups).float()
    G = K if group_size == -1 else group_size
    s = s.repeat_interleave(G, dim=1)[:, :K]
    z = None if z is None else z.repeat_interleave(G, dim=1)[:, :K]
    qf = q.float()
    return (qf if z is None else qf - z) * s
