"""Sparsity patterns and the masks that realize them.

A mask is a bool tensor shaped like the weight, **True where the weight is pruned** (the convention of the
SparseGPT reference code, and of :meth:`almak.quant.gptq.GPTQ.quantize`'s ``keep_zero``). Masks are computed
from a score per weight (higher = more important) by :func:`mask_from_scores`; applying one is a separate
step (:func:`apply_mask_`).

>>> pattern = Sparsity.parse("2:4")
>>> mask = mask_from_scores(W.abs(), pattern)      # doctest: +SKIP
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from almak.errors import AlmakError

__all__ = ["Sparsity", "mask_from_scores", "nm_mask", "row_mask", "apply_mask_", "check_nm", "sparsity_of"]


@dataclass(frozen=True)
class Sparsity:
    """What to prune: ``n:m`` (keep ``n`` of every ``m`` consecutive weights along the input dimension) or,
    when ``m`` is 0, a fraction ``sparsity`` of each output row (unstructured).

    >>> Sparsity.parse("2:4"), Sparsity.parse("0.5")
    (Sparsity(sparsity=0.5, n=2, m=4), Sparsity(sparsity=0.5, n=0, m=0))
    """

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.m:
            if not (0 < self.n < self.m) or self.m > 64:
                raise AlmakError(f"pattern {self.n}:{self.m}: need 0 < N < M <= 64 (keep N of every M)")
            if abs(self.sparsity - (1 - self.n / self.m)) > 1e-9:
                raise AlmakError(f"pattern {self.n}:{self.m} means sparsity {1 - self.n / self.m}, "
                                 f"not {self.sparsity}")
        elif not (isinstance(self.sparsity, (int, float)) and 0 < self.sparsity < 1):
            raise AlmakError(f"sparsity must be a fraction strictly between 0 and 1, got {self.sparsity!r}")

    @classmethod
    def parse(cls, text: str) -> "Sparsity":
        """``"2:4"`` / ``"4:8"`` (N:M) or a fraction such as ``"0.5"`` (unstructured)."""
        text = str(text).strip()
        nm = re.fullmatch(r"(\d+):(\d+)", text)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise AlmakError(f"pattern {text!r}: need 0 < N < M (keep N of every M)")
            return cls(1 - n / m, n, m)
        try:
            return cls(float(text))
        except ValueError:
            raise AlmakError(f"{text!r} is neither an N:M pattern (2:4) nor a sparsity fraction (0.5)") from None

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.sparsity:.0%} unstructured"


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` lowest-scoring weights of every ``m`` consecutive columns of each row.

    >>> nm_mask(torch.tensor([[4., 1., 3., 2.]]), 2, 4)
    tensor([[False,  True, False,  True]])
    """
    rows, cols = scores.shape
    if cols % m:
        raise AlmakError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * cols)`` lowest-scoring weights of each row (ties broken by position)."""
    rows, cols = scores.shape
    k = int(round(sparsity * cols))
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def mask_from_scores(scores: torch.Tensor, pattern: Sparsity) -> torch.Tensor:
    """The mask of ``pattern`` keeping the highest ``scores`` (N:M groups, or per output row)."""
    if pattern.structured:
        return nm_mask(scores, pattern.n, pattern.m)
    return row_mask(scores, pattern.sparsity)


@torch.no_grad()
def apply_mask_(linear: nn.Linear, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Zero the pruned weights of ``linear`` in place; with ``weight`` (SparseGPT's updated weights), first
    take those for the kept ones."""
    if tuple(mask.shape) != tuple(linear.weight.shape) or mask.dtype != torch.bool:
        raise AlmakError(f"mask {mask.dtype} {tuple(mask.shape)} does not fit weight {tuple(linear.weight.shape)}")
    if weight is not None:
        linear.weight.copy_(weight)
    linear.weight.masked_fill_(mask.to(linear.weight.device), 0)


def check_nm(W: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive weights along each row holds at most ``n`` non-zeros."""
    rows, cols = W.shape
    if cols % m:
        return False
    return bool(((W.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def sparsity_of(W: torch.Tensor) -> float:
    """Fraction of exact zeros in ``W``."""
    return float((W == 0).sum()) / max(W.numel(), 1)
