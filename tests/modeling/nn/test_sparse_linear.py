"""Sparse24Linear / Sparse24QuantLinear: exact against the layers they compress, honest buffers, refusals."""

import pytest
import torch
import torch.nn as nn

from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear, is_24_sparse
from almak.sparse import Sparsity, apply_mask_, magnitude_mask


def pruned_linear(K=576, N=192, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(K, N, bias=bias)
    apply_mask_(layer, magnitude_mask(layer.weight, Sparsity.parse("2:4")))
    with torch.no_grad():  # some groups with fewer than 2 non-zeros, which the layout pads
        layer.weight[:3, :8] = 0
    return layer


@pytest.mark.parametrize("M", [1, 7, 33])
def test_sparse24_linear_equals_the_dense_layer(M):
    dense = pruned_linear()
    layer = Sparse24Linear.from_linear(dense)
    x = torch.randn(M, 576)
    # Same float32 weight, same F.linear: bit-exact.
    assert torch.equal(layer(x), dense(x))
    assert torch.equal(layer.to_linear().weight, dense.weight)
    assert sorted(n for n, _ in layer.named_buffers()) == ["bias", "meta", "values"]
    assert layer.values.shape == (192, 288) and layer.meta.shape == (192, 18) and layer.meta.dtype == torch.int32
    assert "2:4" in repr(layer) and "in_features=576" in repr(layer)


def test_sparse24_linear_refusals():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        Sparse24Linear.from_linear(nn.Linear(64, 4))
    with pytest.raises(ValueError, match="divisible by 32"):
        Sparse24Linear(96 + 4, 8)


@pytest.mark.parametrize("group_size,sym", [(64, True), (64, False), (128, True), (-1, False)])
def test_sparse24_quant_linear_holds_the_quantized_pruned_weight(group_size, sym, reference_rtn):
    dense = pruned_linear()
    q = QuantLinear.from_float(dense, 4, group_size, sym)  # 128 leaves a ragged group on K=576
    layer = Sparse24QuantLinear.from_quant_linear(q)
    assert torch.equal(layer.dense_codes(), q.codes())  # compressing to 2:4 and back keeps every code
    # The expectation comes from the float layer through the suite's own RTN, not from q: pruned weights stay 0.
    W = reference_rtn(dense.weight, 4, group_size, sym).double()
    assert (W[dense.weight == 0] == 0).all()
    torch.testing.assert_close(layer.dequantize().double(), W, rtol=1e-6, atol=1e-7)
    for M, tol in ((1, dict(rtol=2e-2, atol=2e-2)),  # the native int4 path rounds x to bf16
                   (40, dict(rtol=1e-5, atol=1e-5))):  # the dense path, float32
        x = torch.randn(M, 576)
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), x.double() @ W.T + dense.bias.double(), **tol)
    names = sorted(n for n, _ in layer.named_buffers())
    assert names == sorted(["bias", "meta", "qvalues", "weight_scale"] + ([] if sym else ["weight_zero_point"]))
    assert layer.qvalues.shape == (192, 36)  # K/2 codes, 8 a word: half of QuantLinear's 72 words
    assert "2:4 + int4" in repr(layer)


def test_sparse24_quant_linear_refuses_dense_codes():
    q = QuantLinear.from_float(nn.Linear(64, 8), 4, 32, True)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        Sparse24QuantLinear.from_quant_linear(q)


def test_is_24_sparse():
    assert is_24_sparse(pruned_linear().weight)
    assert not is_24_sparse(torch.ones(4, 64))
    assert not is_24_sparse(torch.zeros(4, 36))  # K not a multiple of 32: the kernels' layout cannot hold it
