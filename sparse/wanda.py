"""Wanda: prune by weight magnitude times input activation norm.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024
(arXiv:2306.11695): the score of ``W[i, j]`` is ``|W[i, j]| * ||X_j||₂`` (the norm of input feature j over
every calibration token), compared within each output row (unstructured) or each N:M group. No weight update.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.sparse.masks import Sparsity, mask_from_scores

__all__ = ["Wanda"]


class Wanda:
    """Wanda for one ``nn.Linear``: feed its inputs with :meth:`add_batch`, then ask for :meth:`mask`.

    >>> wanda = Wanda(layer)
    >>> handle = layer.register_forward_hook(lambda m, inp, out: wanda.add_batch(inp[0]))
    >>> ... calibration batches ...; handle.remove()
    >>> mask = wanda.mask(Sparsity.parse("2:4"))        # True = pruned
    """

    def __init__(self, layer: nn.Linear):
        if not isinstance(layer, nn.Linear):
            raise AlmakError(f"Wanda: expected an nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.columns = layer.in_features
        # Sum over tokens of x_j², per input feature j: ||X_j||₂².
        self.sq_norms = torch.zeros(self.columns, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` (..., K), every token a sample."""
        if x.shape[-1] != self.columns:
            raise AlmakError(f"Wanda: inputs have {x.shape[-1]} features, the layer takes {self.columns}")
        x = x.reshape(-1, self.columns).to(device=self.sq_norms.device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise AlmakError("Wanda: calibration activations contain NaN or inf")
        self.sq_norms += (x * x).sum(0)
        self.nsamples += x.shape[0]

    def scores(self) -> torch.Tensor:
        """``|W| * ||X_j||₂`` (N, K); the mean over tokens instead of the sum would rank the same."""
        if self.nsamples == 0:
            raise AlmakError("Wanda: no calibration data; call add_batch() before mask()")
        return self.layer.weight.detach().float().abs() * self.sq_norms.sqrt().unsqueeze(0)

    @torch.no_grad()
    def mask(self, pattern: Sparsity) -> torch.Tensor:
        return mask_from_scores(self.scores(), pattern)
