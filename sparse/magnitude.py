"""Magnitude pruning: the baseline every calibration-aware pruner is compared with; no data needed."""
from __future__ import annotations

import torch

from almak.sparse.masks import Sparsity, mask_from_scores

__all__ = ["magnitude_mask"]


@torch.no_grad()
def magnitude_mask(W: torch.Tensor, pattern: Sparsity) -> torch.Tensor:
    """Prune the smallest ``|W|`` (per output row, or per N:M group); True marks a pruned weight.

    >>> magnitude_mask(torch.tensor([[0.1, -2.0, 0.5, 0.0]]), Sparsity.parse("2:4"))
    tensor([[ True, False, False,  True]])
    """
    return mask_from_scores(W.detach().float().abs(), pattern)
