"""Packing primitives and RTN quantization: round trips, bit layout, and the kernels' conventions."""

import pytest
import torch

from almak.kernels import dequantize_w4, dequantize_w8
from almak.quant.pack import dequantize_groupwise, pack_int4, quantize_rtn_groupwise, search_clip, unpack_int4


def test_pack_bit_layout_matches_definition():
    # Nibble j (bits 4j..4j+3) of word i holds column 8i + j, checked with Python integers.
    codes = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    words = pack_int4(codes)
    assert words.shape == (5, 3) and words.dtype == torch.int32
    for n in range(5):
        for i in range(3):
            word = words[n, i].item() & 0xFFFFFFFF
            assert [(word >> (4 * j)) & 0xF for j in range(8)] == codes[n, 8 * i:8 * i + 8].tolist()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_round_trip(dtype):
    codes = torch.randint(0, 16, (64, 576), generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))


def test_sign_bit_nibble():
    # Code 15 in nibble 7 sets int32's sign bit; unpacking must not sign-extend it into other nibbles.
    codes = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15], [15] * 8, [8, 0, 0, 0, 0, 0, 0, 8]])
    words = pack_int4(codes)
    assert words.tolist() == [[-(2**28)], [-1], [-(2**31) + 8]]
    assert torch.equal(unpack_int4(words), codes.to(torch.uint8))


def test_pack_refusals():
    with pytest.raises(ValueError, match=r"multiple of 8.*\(4, 12\)"):
        pack_int4(torch.zeros(4, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\], got \[0, 16\]"):
        pack_int4(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 16]]))
    with pytest.raises(ValueError, match=r"2-D integer codes"):
        pack_int4(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"2-D int32"):
        unpack_int4(torch.zeros(4, 1, dtype=torch.int64))


def _max_error_over_step(W, q, s, z, group_size):
    W_hat = dequantize_groupwise(q, s, z, group_size)
    G = W.shape[1] if group_size == -1 else group_size
    step = s.float().repeat_interleave(G, dim=1)[:, :W.shape[1]]
    return ((W.float() - W_hat).abs() / step).max().item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_rtn_error_within_half_step(bits, sym, group_size):
    # K = 576: group 128 leaves a ragged last group of 64 columns.
    W = torch.randn(48, 576, generator=torch.Generator().manual_seed(2))
    q, s, z = quantize_rtn_groupwise(W, bits, group_size, sym)
    groups = 1 if group_size == -1 else -(-576 // group_size)
    assert q.shape == W.shape and s.shape == (48, groups)
    if bits == 4:
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        assert z.shape == s.shape and (not sym or z.eq(8).all())
    else:
        assert q.dtype == torch.int8
        assert (z is None) == sym
    # Round to nearest: at most half a step, the clipped positive extreme included (rounding slack 1e-4).
    assert _max_error_over_step(W, q, s, z, group_size) <= 0.5 + 1e-4


def test_symmetric_scale_convention():
    # compressed-tensors: s = max|W| / 7.5 (int4) and / 127.5 (int8); the most negative weight is exact.
    W = torch.tensor([[-3.0, 1.0, 2.0, 0.5, 0.0, -1.5, 2.5, 0.25]])
    q4, s4, z4 = quantize_rtn_groupwise(W, 4, -1, sym=True)
    assert s4.item() == pytest.approx(3.0 / 7.5) and q4[0, 0].item() == 0 and z4.item() == 8
    q8, s8, z8 = quantize_rtn_groupwise(W, 8, -1, sym=True)
    assert s8.item() == pytest.approx(3.0 / 127.5) and q8[0, 0].item() == -128 and z8 is None


def test_asymmetric_zero_point_and_exact_zero():
    W = torch.tensor([[-1.0, 0.0, 2.0, 0.7, 0.0, 1.9, -0.3, 0.1]])
    q, s, z = quantize_rtn_groupwise(W, 4, -1, sym=False)
    assert s.item() == pytest.approx(3.0 / 15) and z.item() == 5.0  # round(-min / s) = round(5)
    W_hat = dequantize_groupwise(q, s, z, -1)
    assert W_hat[0, 1].item() == 0.0 and W_hat[0, 4].item() == 0.0


def test_all_zero_group_and_scale_dtype():
    W = torch.randn(4, 64, dtype=torch.float16)
    W[1] = 0
    for bits in (4, 8):
        q, s, z = quantize_rtn_groupwise(W, bits, 32, sym=False, scale_dtype=torch.float16)
        assert s.dtype == torch.float16 and z.dtype == torch.float16
        assert torch.isfinite(s).all() and s.gt(0).all()
        W_hat = dequantize_groupwise(q, s, z, 32)
        assert W_hat[1].eq(0).all()
        # Codes were computed against the fp16-rounded scales, so the half-step bound holds with them.
        assert _max_error_over_step(W, q, s, z, 32) <= 0.5 + 1e-3


@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_packed_rtn_matches_kernel_dequantize(group_size):
    # The layouts agree end to end: quantize -> pack -> the kernels' own dequantizer.
    W = torch.randn(96, 576, generator=torch.Generator().manual_seed(3))
    q, s, z = quantize_rtn_groupwise(W, 4, group_size, sym=False)
    assert torch.equal(dequantize_w4(pack_int4(q), s, z, group_size), dequantize_groupwise(q, s, z, group_size))
    q8, s8, z8 = quantize_rtn_groupwise(W, 8, group_size, sym=True)
    assert torch.equal(dequantize_w8(q8, s8, z8, group_size), dequantize_groupwise(q8, s8, z8, group_size))


def test_rtn_refusals():
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        quantize_rtn_groupwise(torch.randn(4, 8), 3, -1, True)
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_rtn_groupwise(torch.ones(4, 8, dtype=torch.int32), 4, -1, True)


def weighted_group_error(W, q, s, z, group_size, importance):
    err = (dequantize_groupwise(q, s, z, group_size) - W).square() * importance
    return err.reshape(W.shape[0], -1, group_size).sum(-1)


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, True), (8, False)])
def test_search_clip_never_loses_to_the_full_range(bits, sym):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 256, generator=g) * torch.rand(32, 256, generator=g).pow(4).mul(6).add(0.2)  # heavy tails
    importance = torch.rand(256, generator=g)
    full = quantize_rtn_groupwise(W, bits, 64, sym)
    q, s, z = search_clip(W, bits, 64, sym, importance=importance)
    e_full = weighted_group_error(W, *full, 64, importance)
    e_clip = weighted_group_error(W, q, s, z, 64, importance)
    assert (e_clip <= e_full * (1 + 1e-6)).all()  # 1.0 is a candidate: no group gets worse
    assert e_clip.sum() < (0.95 if bits == 4 else 1.0) * e_full.sum()  # int8's fine step gains ~1% only
    assert (s <= full[1]).all() and q.dtype == full[0].dtype and (z is None) == (full[2] is None)
    # one candidate, no shrink: RTN exactly
    one = search_clip(W, bits, 64, sym, importance=importance, grid=(1.0,))
    assert all(torch.equal(a, b) for a, b in zip(one, full) if a is not None)


def test_search_clip_follows_the_importance():
    """An outlier in a column that never sees input costs nothing when clipped: its group's range shrinks all
    the way; weighed like the others, the outlier keeps its range."""
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    W[:, 0] = 3.0
    ignored = torch.ones(64)
    ignored[0] = 0
    _, s_ignored, _ = search_clip(W, 4, 64, sym=True, importance=ignored)
    _, s_counted, _ = search_clip(W, 4, 64, sym=True)
    _, s_full, _ = quantize_rtn_groupwise(W, 4, 64, sym=True)
    torch.testing.assert_close(s_ignored, s_full * 0.75, rtol=1e-6, atol=0)
    assert (s_counted > 1.2 * s_ignored).all()
