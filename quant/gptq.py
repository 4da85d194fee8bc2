"""GPTQ: one linear layer's weights quantized column by column, each column's rounding error compensated on
the columns not yet quantized, using second-order information from calibration inputs.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1: the Hessian of the layer-wise objective
``||X Wᵀ - X Ŵᵀ||²`` is ``H = 2 X Xᵀ``; columns are quantized in order, the error of column j spread over the
remaining columns through the upper Cholesky factor of ``H⁻¹`` (``Hinv``), with lazy block updates.

The three steps are separate: observe (:meth:`GPTQ.add_batch`, typically from a forward hook), solve and
round (:meth:`GPTQ.quantize`, which leaves the layer untouched), and pack (``QuantLinear.set_quantized``).
Codes, scales and zeros are those of :func:`almak.quant.pack.quantize_rtn_groupwise`, in the original
column order: act-order uses static groups (each group's scale and zero computed up front on the original
columns), so the runtime kernel needs no ``g_idx``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.quant.pack import GROUP_SIZES, quantize_rtn_groupwise, search_clip

__all__ = ["GPTQConfig", "GPTQ", "inverse_hessian_factor"]

log = logging.getLogger(__name__)


@dataclass
class GPTQConfig:
    """How GPTQ quantizes: the RTN scheme (bits, group_size, sym) plus the solver's knobs.

    - ``damp``: added to H's diagonal as a fraction of its mean, so H is safely positive definite.
    - ``block_size``: columns per lazy batch update (speed only; the result is the same for any value).
    - ``act_order``: visit columns by decreasing H diagonal (most activated inputs first).
    - ``clip_search``: each group's range is the min/max shrunk by the factor that minimizes the squared
      rounding error weighted by H's diagonal (:func:`almak.quant.pack.search_clip`), not the plain min/max.

    >>> GPTQConfig(bits=4, group_size=64, sym=False)
    GPTQConfig(bits=4, group_size=64, sym=False, damp=0.01, block_size=128, act_order=True, clip_search=False)
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_search: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise AlmakError(f"GPTQ: bits must be 4 or 8, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool):
            raise AlmakError(f"GPTQ: group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {self.group_size!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 < self.damp < 1:
            raise AlmakError(f"GPTQ: damp must be a fraction strictly between 0 and 1 (e.g. 0.01), got {self.damp!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise AlmakError(f"GPTQ: block_size must be a positive integer, got {self.block_size!r}")


def inverse_hessian_factor(H: torch.Tensor, dead: torch.Tensor, damp: float, who: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, dead columns' diagonal set to
    1 first. ``H`` is modified in place. Shared by GPTQ and SparseGPT (same solver, same Hessian)."""
    K = H.shape[0]
    H.diagonal()[dead] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        raise AlmakError(f"{who}: the dampened Hessian is not positive definite (damp={damp}); "
                         f"try a larger damp or more calibration data")
    # H⁻¹ by cholesky_solve, not cholesky_inverse: same result, but MKL's potri is far slower on the CPU
    # (2-core x86_64, 2026-11-25: K=576 0.97 s vs 0.023 s; K=1536 11.3 s vs 0.18 s).
    Hinv = torch.cholesky_solve(torch.eye(K, device=H.device), L)
    return torch.linalg.cholesky(Hinv, upper=True)


class GPTQ:
    """GPTQ for one ``nn.Linear``: accumulate ``H`` with :meth:`add_batch`, then :meth:`quantize` once.

    >>> gptq = GPTQ(layer)
    >>> handle = layer.register_forward_hook(lambda m, inp, out: gptq.add_batch(inp[0]))
    >>> ... run calibration batches through the model ...; handle.remove()
    >>> q, scales, zeros = gptq.quantize(GPTQConfig(bits=4, group_size=128))
    >>> QuantLinear(layer.in_features, layer.out_features, 4, 128).set_quantized(q, scales, zeros)
    """

    def __init__(self, layer: nn.Linear | list[nn.Linear]):
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        if not layers or not all(isinstance(m, nn.Linear) for m in layers):
            raise AlmakError(f"GPTQ: expected an nn.Linear (or a list of them), got {type(layer).__name__}")
        if len({m.in_features for m in layers}) != 1:
            raise AlmakError("GPTQ: linears solved together must read the same input (same in_features)")
        # Several linears that read the same input (q/k/v, gate/up) share H, its inverse and the column sweep:
        # GPTQ treats rows independently, so solving their stacked rows once gives each layer its own result.
        self.layers = layers
        self.layer = layers[0]
        self.rows, self.columns = sum(m.out_features for m in layers), layers[0].in_features
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=layers[0].weight.device)
        self.nsamples = 0  # tokens seen
        self.loss: float | None = None  # sum of the OBS losses of the last quantize(), for logging

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` (..., K), every token a sample, to ``H = 2 X Xᵀ``. (The reference code keeps the
        mean, ``2 X Xᵀ / nsamples``; GPTQ's result does not depend on H's scale, since the damping is relative
        to H's mean diagonal, and a running sum saves rescaling H at every batch.)"""
        if self.H is None:
            raise AlmakError("GPTQ: this layer was already quantized; create a new GPTQ to observe again")
        if x.shape[-1] != self.columns:
            raise AlmakError(f"GPTQ: inputs have {x.shape[-1]} features, the layer takes {self.columns}")
        x = x.reshape(-1, self.columns).to(device=self.H.device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise AlmakError("GPTQ: calibration activations contain NaN or inf (is the model overflowing "
                             "in this dtype? try float32 or bfloat16)")
        m = x.shape[0]
        if m == 0:
            return
        self.nsamples += m
        self.H.addmm_(x.t(), x, alpha=2)

    @torch.no_grad()
    def quantize(self, config: GPTQConfig, keep_zero: torch.Tensor | None = None,
                 scale_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Solve for the layer's quantized weight; returns ``(q, scales, zeros)`` as ``quantize_rtn_groupwise``
        (for a list of linears, their rows stacked in order: ``torch.split`` by their out_features).

        Args:
            config: the scheme and the solver's settings.
            keep_zero: optional (N, K) bool mask of weights that must dequantize to exactly 0 (a 2:4-pruned
                layer): they get the zero-point code, and their error is compensated like any other. Every
                scheme of :mod:`almak.quant.pack` represents 0 exactly (symmetric: code 8 for int4, 0 for
                int8; asymmetric: the range always contains 0 and the zero point is an integer code).
            scale_dtype: dtype of scales/zeros, the layer weight's by default (codes are rounded against the
                scales as stored, as in RTN).

        H is freed afterwards; the layer itself is not modified.
        """
        if self.H is None:
            raise AlmakError("GPTQ: this layer was already quantized (H is freed after quantize())")
        if self.nsamples == 0:
            raise AlmakError("GPTQ: no calibration data; call add_batch() before quantize()")
        bits, G = config.bits, config.group_size
        N, K = self.rows, self.columns
        device = self.H.device
        scale_dtype = scale_dtype or self.layer.weight.dtype
        M = self._check_mask(keep_zero, device)
        W = torch.cat([m.weight.detach().to(device=device, dtype=torch.float32) for m in self.layers])

        hdiag = torch.diag(self.H).clone()  # 2 x each input's sum of squares: the weight of its rounding error
        # Dead inputs (never nonzero in calibration) carry no information: their weights are dropped.
        dead = hdiag == 0
        W[:, dead] = 0
        if M is not None:
            W[M] = 0

        def group_params(Wg: torch.Tensor, group_size: int, importance: torch.Tensor):
            if config.clip_search:
                return search_clip(Wg, bits, group_size, config.sym, scale_dtype, importance=importance)
            return quantize_rtn_groupwise(Wg, bits, group_size, config.sym, scale_dtype)

        groups = 1 if G == -1 else -(-K // G)
        scales = torch.empty(N, groups, dtype=scale_dtype, device=device)
        zeros = None if (bits == 8 and config.sym) else torch.empty(N, groups, dtype=scale_dtype, device=device)
        static = config.act_order or G == -1
        if static:
            # Static groups: scales and zeros from the original columns, before any error is propagated.
            _, scales[:], z = group_params(W, G, hdiag)
            if zeros is not None:
                zeros[:] = z
        # Group of each original column; the scheme's unsigned (int4) or signed (int8) code range.
        group_of = torch.zeros(K, dtype=torch.long, device=device) if G == -1 else torch.arange(K, device=device) // G
        qmin, qmax = (0, 15) if bits == 4 else (-128, 127)

        perm = (torch.argsort(hdiag, descending=True) if config.act_order
                else torch.arange(K, device=device))
        # A permuted copy: self.H stays intact until the solve succeeds, so a failed one can be retried.
        W, H = W[:, perm], self.H[perm][:, perm]
        M = None if M is None else M[:, perm]
        group_of = group_of[perm].tolist()

        Hinv = inverse_hessian_factor(H, dead[perm], config.damp, "GPTQ")
        del H
        self.H = None

        # Groups computed during the sweep must see their columns fully updated: with no block boundary
        # inside a group, they all sit in W1 when the group starts. Lazy updates are exact, so this is free.
        B = config.block_size if static else -(-config.block_size // G) * G
        codes = torch.empty(N, K, dtype=torch.float32, device=device)
        loss = torch.zeros((), device=device)
        for i1 in range(0, K, B):
            i2 = min(i1 + B, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                g = group_of[j]
                if not static and j % G == 0:
                    Wg = W1[:, i:i + G] if M is None else W1[:, i:i + G].masked_fill(M[:, j:j + G], 0)
                    _, scales[:, g:g + 1], z = group_params(Wg, -1, hdiag[perm[j:j + G]])
                    if zeros is not None:
                        zeros[:, g:g + 1] = z
                s = scales[:, g].float()
                z = 0.0 if zeros is None else zeros[:, g].float()
                w, d = W1[:, i], Hinv1[i, i]
                c = (torch.round(w / s) + z).clamp(qmin, qmax)
                if M is not None:
                    c = torch.where(M[:, j], z, c)
                q = (c - z) * s
                codes[:, j] = c
                loss += ((w - q) ** 2).sum() / d**2 / 2
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        codes = codes[:, torch.argsort(perm)]
        self.loss = loss.item()
        log.debug("GPTQ %dx%d: loss %.4g over %d tokens", N, K, self.loss, self.nsamples)
        return codes.to(torch.uint8 if bits == 4 else torch.int8), scales, zeros

    def _check_mask(self, keep_zero: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if keep_zero is None:
            return None
        if keep_zero.dtype != torch.bool or tuple(keep_zero.shape) != (self.rows, self.columns):
            raise AlmakError(f"GPTQ: keep_zero must be a bool mask shaped like the weight "
                             f"{(self.rows, self.columns)}, got {keep_zero.dtype} {tuple(keep_zero.shape)}")
        return keep_zero.to(device)
