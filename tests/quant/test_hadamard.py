"""Hadamard matrices: ±1 entries and H Hᵀ = n I for every order built; refused orders named."""
import pytest
import torch

from almak.errors import AlmakError
from almak.quant.hadamard import hadamard, random_hadamard


# 12 and 20: Paley I; 28 and 36: Paley II; 96 = 8 · 12 (the test model); 576 = 16 · 36 (SmolLM2); 5120 (LLaMA-2-13B)
@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 96, 576, 1536, 5120])
def test_hadamard_orders(n):
    H = hadamard(n)
    assert H.shape == (n, n) and set(H.unique().tolist()) <= {-1.0, 1.0}
    # In float32 the product is exact (every partial sum is an integer of at most n < 2**24) and twice as fast.
    Hf = H.float()
    assert torch.equal(Hf @ Hf.T, n * torch.eye(n))


def test_order_not_built_is_refused():
    # 92 = 4 · 23: a Hadamard matrix exists (Williamson), but neither Paley construction reaches it
    with pytest.raises(AlmakError, match="no Hadamard matrix of order 92"):
        hadamard(92)


def test_random_hadamard_is_orthogonal_and_seeded():
    Q = random_hadamard(96, torch.Generator().manual_seed(1))
    assert torch.allclose(Q @ Q.T, torch.eye(96, dtype=Q.dtype), atol=1e-12)  # float64 rounding only
    assert torch.equal(Q, random_hadamard(96, torch.Generator().manual_seed(1)))
    assert not torch.equal(Q, random_hadamard(96, torch.Generator().manual_seed(2)))
    # every entry ±1/√n: each input coordinate spread evenly over all outputs
    assert torch.allclose(Q.abs(), torch.full_like(Q, 96**-0.5))
