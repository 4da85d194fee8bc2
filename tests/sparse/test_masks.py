"""Sparsity patterns and masks: N:M and per-row masks keep what they should, refusals name the problem."""

import pytest
import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.sparse import Sparsity, apply_mask_, check_nm, magnitude_mask, nm_mask, row_mask, sparsity_of


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_best_of_every_m(n, m):
    scores = torch.rand(37, 64, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, n, m)
    groups_kept = (~mask).reshape(37, -1, m)
    assert (groups_kept.sum(-1) == n).all()
    # Every kept score beats every pruned score of its group.
    s = scores.reshape(37, -1, m)
    kept_min = s.masked_fill(~groups_kept, float("inf")).min(-1).values
    pruned_max = s.masked_fill(groups_kept, float("-inf")).max(-1).values
    assert (kept_min > pruned_max).all()
    assert check_nm(scores.masked_fill(mask, 0), n, m)


def test_row_mask_prunes_the_same_count_in_every_row():
    scores = torch.rand(5, 100, generator=torch.Generator().manual_seed(1))
    mask = row_mask(scores, 0.3)
    assert (mask.sum(1) == 30).all()
    assert (scores[mask].max() <= scores[~mask].min()) or all(
        scores[r][mask[r]].max() < scores[r][~mask[r]].min() for r in range(5))


def test_magnitude_mask_hand_example():
    W = torch.tensor([[0.1, -2.0, 0.5, 0.0, 3.0, -0.2, 0.3, 1.0]])
    assert magnitude_mask(W, Sparsity.parse("2:4")).tolist() == [[True, False, False, True,
                                                                  False, True, True, False]]
    assert magnitude_mask(W, Sparsity.parse("0.25")).tolist() == [[True, False, False, True,
                                                                   False, False, False, False]]


def test_apply_mask_zeroes_exactly_the_mask():
    layer = nn.Linear(8, 3)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(2)) < 0.5
    before = layer.weight.detach().clone()
    apply_mask_(layer, mask)
    assert (layer.weight[mask] == 0).all() and torch.equal(layer.weight[~mask], before[~mask])
    assert sparsity_of(layer.weight) == pytest.approx(mask.float().mean().item())
    with pytest.raises(AlmakError, match="does not fit weight"):
        apply_mask_(layer, mask[:, :4])


def test_check_nm():
    assert check_nm(torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, 0]]))
    assert not check_nm(torch.tensor([[1.0, 1, 0, 2, 0, 0, 0, 0]]))
    assert not check_nm(torch.ones(2, 6))  # 6 columns: no whole groups of 4


@pytest.mark.parametrize("text,expected", [("2:4", Sparsity(0.5, 2, 4)), ("4:8", Sparsity(0.5, 4, 8)),
                                           ("0.6", Sparsity(0.6))])
def test_parse(text, expected):
    assert Sparsity.parse(text) == expected


@pytest.mark.parametrize("text,message", [("4:2", "need 0 < N < M"), ("1.5", "strictly between 0 and 1"),
                                          ("half", "neither an N:M pattern")])
def test_parse_refusals(text, message):
    with pytest.raises(AlmakError, match=message):
        Sparsity.parse(text)


def test_nm_refuses_ragged_columns():
    with pytest.raises(AlmakError, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)
