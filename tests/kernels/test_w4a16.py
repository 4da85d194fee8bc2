"""W4A16 Triton kernel vs its pure-torch reference, on the same packed integers.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) with a pruned grid;
with a GPU and TRITON_INTERPRET=0 the full grid runs, bf16 included.
"""

import itertools

import numpy as np
import pytest
import torch

from almak.kernels.w4a16 import DENSE_MIN_M, INTERPRET, choose_path, dequantize_w4, w4a16_matmul, w4a16_reference

DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

M_GRID = [1, 2, 7, 16, 33, 128]
SHAPES = [(192, 576), (576, 1536), (1000, 64)]
GROUPS = [32, 64, 128, -1]
DTYPES = [torch.float16, torch.float32] + ([] if INTERPRET else [torch.bfloat16])

if INTERPRET:
    # The interpreter runs ~1 s per call on 576x1536: every M and dtype on the embedded model's ragged
    # 192x576 layer, every group on the other shapes at one decode and one prefill M.
    GRID = [(M, (192, 576), g, dt) for M in M_GRID for g in (32, 128, -1) for dt in DTYPES]
    GRID += [(M, shape, g, torch.float16) for shape in SHAPES[1:] for M in (1, 33) for g in GROUPS]
    GRID += [(M, (1000, 64), 64, torch.float32) for M in (2, 7, 16, 128)]
else:
    GRID = list(itertools.product(M_GRID, SHAPES, GROUPS, DTYPES))


def tolerance(dtype):
    if dtype == torch.float32:
        # fp32 sums of up to 1536 products in another order: ~1e-5 absolute on outputs of magnitude ~10.
        return dict(rtol=1e-5, atol=1e-4)
    if dtype == torch.float16:
        # One fp16 output ulp (2^-10 relative), plus fp16-rounded dequantized weights when a K tile spans
        # several groups (2^-11 each, ~2e-3 absolute summed over K).
        return dict(rtol=2e-3, atol=1e-2)
    # bf16 keeps 8 mantissa bits: one output ulp is 2^-7 relative.
    return dict(rtol=1.6e-2, atol=2e-2)


def make_operands(N, K, group_size, asym=True, seed=0, device=DEVICE):
    """Random packed weights over every int32 bit pattern (sign bit included), scales ~0.01, integer zeros."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-K // group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), generator=gen, dtype=torch.int32)
    scales = torch.rand(N, groups, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (N, groups), generator=gen).float() if asym else torch.full((N, groups), 8.0)
    return qweight.to(device), scales.to(device), zeros.to(device)


def make_x(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("M,shape,group_size,dtype", GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(M, shape, group_size, dtype):
    N, K = shape
    qweight, scales, zeros = make_operands(N, K, group_size)
    x = make_x((M, K), dtype)
    y = w4a16_matmul(x, qweight, scales, zeros, group_size)
    assert y.shape == (M, N) and y.dtype == dtype
    torch.testing.assert_close(y, w4a16_reference(x, qweight, scales, zeros, group_size), **tolerance(dtype))


def independent_weight(qweight, scales, zeros, group_size):
    """W (float64) from the packed words with numpy's bit operations: not dequantize_w4, which the reference and
    the dense path share."""
    words = qweight.cpu().numpy().view(np.uint32)
    codes = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=-1).reshape(words.shape[0], -1)
    g = np.arange(codes.shape[1]) // (codes.shape[1] if group_size == -1 else group_size)
    return torch.from_numpy((codes - zeros.cpu().double().numpy()[:, g]) * scales.cpu().double().numpy()[:, g])


@pytest.mark.parametrize("M,path", [(1, "prefill"), (7, "prefill"), (16, "prefill"), (33, "decode"), (7, "dense")])
def test_forced_path_matches_an_independent_product(M, path):
    # Each path on the M range the auto dispatch does not give it, on the ragged embedded-model layer.
    qweight, scales, zeros = make_operands(192, 576, 128)
    x = make_x((M, 576), torch.float32)
    y = w4a16_matmul(x, qweight, scales, zeros, 128, path=path)
    expected = x.cpu().double() @ independent_weight(qweight, scales, zeros, 128).T
    torch.testing.assert_close(y.cpu().double(), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("M", [1, 33])
def test_non_contiguous_x(M):
    qweight, scales, zeros = make_operands(192, 576, 64)
    x = make_x((576, 2 * M), torch.float16).t()[::2]  # strides (2, 2M): neither dimension contiguous
    assert not x.is_contiguous()
    y = w4a16_matmul(x, qweight, scales, zeros, 64)
    torch.testing.assert_close(y, w4a16_reference(x, qweight, scales, zeros, 64), **tolerance(torch.float16))


@pytest.mark.parametrize("lead", [(2, 3), (3, 1, 11)])
def test_batched_x(lead):
    qweight, scales, zeros = make_operands(192, 576, 128, asym=False)
    x = make_x((*lead, 576), torch.float32)
    x = x.transpose(0, 1) if len(lead) == 2 else x  # 3-D and non-contiguous: reshape must copy
    y = w4a16_matmul(x, qweight, scales, zeros, 128)
    assert y.shape == (*x.shape[:-1], 192)
    torch.testing.assert_close(y, w4a16_reference(x, qweight, scales, zeros, 128), **tolerance(torch.float32))


def test_per_channel_scales_accept_1d():
    qweight, scales, zeros = make_operands(192, 576, -1)
    x = make_x((3, 576), torch.float32)
    y1 = w4a16_matmul(x, qweight, scales.reshape(-1), zeros.reshape(-1), -1)
    y2 = w4a16_matmul(x, qweight, scales, zeros, -1)
    # Same kernel, same operands: identical bits.
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_bfloat16_activations():
    # Under the interpreter the launcher computes bf16 in fp32 (its bf16 tl.dot is wrong); on GPU, bf16.
    qweight, scales, zeros = make_operands(192, 576, 32)
    x = make_x((5, 576), torch.bfloat16)
    y = w4a16_matmul(x, qweight, scales, zeros, 32)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, w4a16_reference(x, qweight, scales, zeros, 32), **tolerance(torch.bfloat16))


def test_empty_batch():
    qweight, scales, zeros = make_operands(192, 576, 128)
    y = w4a16_matmul(make_x((0, 576), torch.float16), qweight, scales, zeros, 128)
    assert y.shape == (0, 192) and y.dtype == torch.float16


def test_auto_dispatch_by_m():
    on = lambda M: choose_path(torch.empty(M, 64, device=DEVICE), "auto", "t")
    assert [on(1), on(16), on(17), on(DENSE_MIN_M - 1), on(DENSE_MIN_M)] == [
        "decode", "decode", "prefill", "prefill", "dense"]


def test_dequantize_nibble_order():
    # Word 0xF7654321: nibble j (bits 4j..4j+3) is the code of column j, lowest first; zero 0, scale 1.
    qweight = torch.tensor([[0xF7654321 - 2**32]], dtype=torch.int32)
    W = dequantize_w4(qweight, torch.ones(1, 1), torch.zeros(1, 1), -1)
    assert W.tolist() == [[1, 2, 3, 4, 5, 6, 7, 15]]


def test_ragged_last_group_uses_its_own_scale():
    # K = 576 with group 128: columns 512..575 form a ragged 5th group and must read scales[:, 4].
    qweight = torch.full((1, 72), 0x11111111, dtype=torch.int32)  # every code 1
    scales = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    W = dequantize_w4(qweight, scales, torch.zeros(1, 5), 128)
    assert W[0, 511].item() == 4.0 and W[0, 512:].eq(5.0).all()
    x = torch.zeros(1, 576, device=DEVICE)
    x[0, 512:] = 1.0
    y = w4a16_matmul(x, qweight.to(DEVICE), scales.to(DEVICE), torch.zeros(1, 5, device=DEVICE), 128)
    assert y.item() == 64 * 5.0


# ------------------------------------------------------------------------------------------------ refusals


def test_refuses_k_not_multiple_of_8():
    x = torch.randn(3, 100)
    with pytest.raises(ValueError, match=r"multiple of 8.*\(3, 100\).*K=100"):
        w4a16_matmul(x, torch.zeros(4, 12, dtype=torch.int32), torch.ones(4, 1), torch.zeros(4, 1), -1)


@pytest.mark.parametrize("group_size", [48, 0, 512])
def test_refuses_unsupported_group_size(group_size):
    qweight, scales, zeros = make_operands(16, 64, 32)
    with pytest.raises(ValueError, match=f"group_size must be one of .* got {group_size}"):
        w4a16_matmul(make_x((1, 64), torch.float32), qweight, scales, zeros, group_size)


def test_refuses_wrong_operand_shapes_and_dtypes():
    qweight, scales, zeros = make_operands(16, 64, 32)
    x = make_x((2, 64), torch.float32)
    with pytest.raises(ValueError, match=r"does not end in K=64"):
        w4a16_matmul(make_x((2, 56), torch.float32), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales of shape \(16, 3\) should be \(16, 2\)"):
        w4a16_matmul(x, qweight, torch.ones(16, 3, device=DEVICE), zeros, 32)
    with pytest.raises(ValueError, match=r"zeros of shape \(16,\) should be"):
        w4a16_matmul(x, qweight, scales, torch.zeros(16, device=DEVICE), 32)
    with pytest.raises(ValueError, match=r"qweight must be a 2-D int32 tensor"):
        w4a16_matmul(x, qweight.to(torch.int64), scales, zeros, 32)
    with pytest.raises(ValueError, match=r"x must be float16, bfloat16 or float32"):
        w4a16_matmul(x.to(torch.int32), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales must be floating point"):
        w4a16_matmul(x, qweight, scales.to(torch.int32), zeros, 32)
    with pytest.raises(ValueError, match=r"zeros is required"):
        w4a16_matmul(x, qweight, scales, None, 32)
    with pytest.raises(ValueError, match=r"path must be one of"):
        w4a16_matmul(x, qweight, scales, zeros, 32, path="gemv")


def test_refuses_mixed_devices():
    qweight, scales, zeros = make_operands(16, 64, 32, device="cpu")
    with pytest.raises(ValueError, match=r"x is on meta but qweight is on cpu"):
        w4a16_matmul(torch.empty(1, 64, device="meta"), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales is on meta but qweight is on cpu"):
        w4a16_matmul(torch.randn(1, 64), qweight, scales.to("meta"), zeros, 32)
