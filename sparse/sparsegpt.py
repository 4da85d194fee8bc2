"""SparseGPT: prune a layer and update its remaining weights to compensate, in one pass over the columns.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023
(arXiv:2301.00774), Algorithm 1. It solves the same layer-wise problem as GPTQ, ``min ||X Wᵀ - X Ŵᵀ||²``
with ``H = 2 X Xᵀ``, and shares its machinery (:class:`almak.quant.gptq.GPTQ`'s Hessian accumulation and the
upper Cholesky factor of ``H⁻¹``, here ``Hinv``): columns are visited in order; a pruned weight's error
``w / [H⁻¹]_jj`` is spread over the columns to its right (the OBS update), with lazy block updates.

Adaptive mask selection: the mask is chosen as the sweep goes, by the OBS saliency ``w² / [H⁻¹]_jj²`` of
the weights as updated so far: for unstructured sparsity once per block of ``block_size`` columns (the
lowest ``sparsity`` fraction of the whole block, so rows may differ), for N:M at the start of every group of
M columns.
"""
from __future__ import annotations

import torch

from almak.errors import AlmakError
from almak.quant.gptq import GPTQ, inverse_hessian_factor
from almak.sparse.masks import Sparsity

__all__ = ["SparseGPT"]


class SparseGPT(GPTQ):
    """SparseGPT for one ``nn.Linear``: :meth:`add_batch` as GPTQ, then :meth:`prune` once.

    >>> sgpt = SparseGPT(layer)
    >>> handle = layer.register_forward_hook(lambda m, inp, out: sgpt.add_batch(inp[0]))
    >>> ... calibration batches ...; handle.remove()
    >>> W, mask = sgpt.prune(Sparsity.parse("2:4"))
    >>> apply_mask_(layer, mask, W)
    """

    @torch.no_grad()
    def prune(self, pattern: Sparsity, damp: float = 0.01, block_size: int = 128
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(W, mask)``: the updated weights (float32, pruned ones already 0) and the mask (True =
        pruned). The layer itself is not modified; H is freed."""
        if self.H is None:
            raise AlmakError("SparseGPT: this layer was already pruned (H is freed after prune())")
        if self.nsamples == 0:
            raise AlmakError("SparseGPT: no calibration data; call add_batch() before prune()")
        if not 0 < damp < 1:
            raise AlmakError(f"SparseGPT: damp must be strictly between 0 and 1, got {damp}")
        m = pattern.m
        if m and (self.columns % m or block_size % m):
            raise AlmakError(f"SparseGPT: {pattern} needs in_features ({self.columns}) and the block size "
                             f"({block_size}) divisible by {m}")
        N, K = self.rows, self.columns
        W = self.layer.weight.detach().to(device=self.H.device, dtype=torch.float32).clone()
        H = self.H
        self.H = None
        dead = torch.diag(H) == 0
        W[:, dead] = 0
        Hinv = inverse_hessian_factor(H, dead, damp, "SparseGPT")
        del H

        mask = torch.zeros(N, K, dtype=torch.bool, device=W.device)
        loss = torch.zeros((), device=W.device)
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d1 = torch.diag(Hinv1)
            mask1 = mask[:, i1:i2]  # a view: filled in place
            if not m:
                saliency = W1**2 / d1.unsqueeze(0) ** 2
                k = int(saliency.numel() * pattern.sparsity)
                if k:
                    threshold = torch.kthvalue(saliency.flatten(), k).values
                    mask1 |= saliency <= threshold
            for i in range(i2 - i1):
                if m and i % m == 0:
                    saliency = W1[:, i:i + m] ** 2 / d1[i:i + m].unsqueeze(0) ** 2
                    drop = torch.topk(saliency, m - pattern.n, dim=1, largest=False).indices
                    mask1[:, i:i + m].scatter_(1, drop, True)
                w, d = W1[:, i], Hinv1[i, i]
                q = w.masked_fill(mask1[:, i], 0)
                loss += ((w - q) ** 2).sum() / d**2 / 2
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        self.loss = loss.item()
        W[mask] = 0
        return W, mask
