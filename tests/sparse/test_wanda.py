"""Wanda's mask equals a plain, loop-by-loop computation of the paper's rule on a small layer."""

import pytest
import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.sparse import Sparsity, Wanda


def reference_mask(W, X, pattern):
    """Sun et al. 2023, written out: score |W_ij| * ||X_j||, prune the lowest per row or per N:M group."""
    norms = torch.sqrt((X.reshape(-1, X.shape[-1]).double() ** 2).sum(0))
    score = W.double().abs() * norms
    mask = torch.zeros(W.shape, dtype=torch.bool)
    for i in range(W.shape[0]):
        if pattern.m:
            for j in range(0, W.shape[1], pattern.m):
                group = score[i, j:j + pattern.m].tolist()
                for k in sorted(range(pattern.m), key=lambda k: group[k])[:pattern.m - pattern.n]:
                    mask[i, j + k] = True
        else:
            row = score[i].tolist()
            for k in sorted(range(len(row)), key=lambda k: row[k])[:round(pattern.sparsity * len(row))]:
                mask[i, k] = True
    return mask


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "0.5", "0.3"])
def test_mask_matches_reference(pattern):
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(32, 6, bias=False)
    X = torch.randn(3, 10, 32, generator=g) * torch.rand(32, generator=g)  # uneven input norms
    wanda = Wanda(layer)
    for chunk in X.chunk(3):  # several batches, as hooks deliver them
        wanda.add_batch(chunk)
    p = Sparsity.parse(pattern)
    assert torch.equal(wanda.mask(p), reference_mask(layer.weight.detach(), X, p))


def test_activation_norms_change_the_mask():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    wanda = Wanda(layer)
    wanda.add_batch(torch.tensor([[10.0, 10.0, 0.1, 0.1]]))
    # Magnitude would prune columns 0 and 1; the activations make 2 and 3 the unimportant ones.
    assert wanda.mask(Sparsity.parse("2:4")).tolist() == [[False, False, True, True]]


def test_refusals():
    wanda = Wanda(nn.Linear(8, 2))
    with pytest.raises(AlmakError, match="no calibration data"):
        wanda.mask(Sparsity.parse("2:4"))
    with pytest.raises(AlmakError, match="inputs have 4 features"):
        wanda.add_batch(torch.randn(2, 4))
    with pytest.raises(AlmakError, match="NaN or inf"):
        wanda.add_batch(torch.full((2, 8), float("nan")))
