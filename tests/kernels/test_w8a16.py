"""W8A16 Triton kernel vs its pure-torch reference, on the same int8 codes.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) with a pruned grid;
with a GPU and TRITON_INTERPRET=0 the full grid runs, bf16 included.
"""

import itertools

import pytest
import torch

from almak.kernels.w4a16 import INTERPRET
from almak.kernels.w8a16 import dequantize_w8, w8a16_matmul, w8a16_reference

DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

M_GRID = [1, 2, 7, 16, 33, 128]
SHAPES = [(192, 576), (576, 1536), (1000, 64)]
GROUPS = [32, 64, 128, -1]
DTYPES = [torch.float16, torch.float32] + ([] if INTERPRET else [torch.bfloat16])

if INTERPRET:
    # ~1 s per interpreted call on 576x1536: the whole M grid on the embedded model's 192x576 layer
    # (symmetric per-channel, the default int8 scheme, and asymmetric group 128, ragged on 576), every
    # group on the other shapes at one decode and one prefill M.
    GRID = [(M, (192, 576), g, sym, dt) for M in M_GRID for g, sym in ((-1, True), (128, False)) for dt in DTYPES]
    GRID += [(M, shape, g, g != 64, torch.float16) for shape in SHAPES[1:] for M in (1, 33) for g in GROUPS]
    GRID += [(M, (1000, 64), 32, False, torch.float32) for M in (2, 7, 16, 128)]
else:
    GRID = list(itertools.product(M_GRID, SHAPES, GROUPS, (True, False), DTYPES))


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


def make_operands(N, K, group_size, sym, seed=0, device=DEVICE):
    """Random int8 codes over the full range, scales ~1e-3 (outputs ~O(10)), integer zeros or None."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-K // group_size)
    qweight = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    scales = torch.rand(N, groups, generator=gen) * 2e-3 + 5e-4
    zeros = None if sym else torch.randint(-128, 128, (N, groups), generator=gen).float().to(device)
    return qweight.to(device), scales.to(device), zeros


def make_x(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("M,shape,group_size,sym,dtype", GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(M, shape, group_size, sym, dtype):
    N, K = shape
    qweight, scales, zeros = make_operands(N, K, group_size, sym)
    x = make_x((M, K), dtype)
    y = w8a16_matmul(x, qweight, scales, zeros, group_size)
    assert y.shape == (M, N) and y.dtype == dtype
    torch.testing.assert_close(y, w8a16_reference(x, qweight, scales, zeros, group_size), **tolerance(dtype))


@pytest.mark.parametrize("M,path", [(1, "prefill"), (7, "prefill"), (33, "decode"), (7, "dense")])
def test_forced_path_matches_an_independent_product(M, path):
    qweight, scales, zeros = make_operands(192, 576, 64, sym=False)
    x = make_x((M, 576), torch.float32)
    y = w8a16_matmul(x, qweight, scales, zeros, 64, path=path)
    # W written out per column (not dequantize_w8, which the reference and the dense path share).
    g = torch.arange(576) // 64
    W = (qweight.cpu().double() - zeros.cpu().double()[:, g]) * scales.cpu().double()[:, g]
    torch.testing.assert_close(y.cpu().double(), x.cpu().double() @ W.T, **tolerance(torch.float32))


@pytest.mark.parametrize("M", [1, 33])
def test_non_contiguous_operands(M):
    qweight, scales, _ = make_operands(192, 1152, -1, sym=True)
    qweight = qweight[:, ::2]  # (192, 576) int8 with column stride 2
    x = make_x((576, 2 * M), torch.float16).t()[::2]  # strides (2, 2M)
    assert not x.is_contiguous() and not qweight.is_contiguous()
    y = w8a16_matmul(x, qweight, scales)
    torch.testing.assert_close(y, w8a16_reference(x, qweight, scales), **tolerance(torch.float16))


def test_batched_x():
    qweight, scales, zeros = make_operands(192, 576, 128, sym=False)
    x = make_x((3, 2, 576), torch.float32).transpose(0, 1)
    y = w8a16_matmul(x, qweight, scales, zeros, 128)
    assert y.shape == (2, 3, 192)
    torch.testing.assert_close(y, w8a16_reference(x, qweight, scales, zeros, 128), **tolerance(torch.float32))


def test_bfloat16_activations():
    qweight, scales, _ = make_operands(192, 576, -1, sym=True)
    x = make_x((5, 576), torch.bfloat16)
    y = w8a16_matmul(x, qweight, scales.reshape(-1))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, w8a16_reference(x, qweight, scales), **tolerance(torch.bfloat16))


def test_dequantize_convention():
    q = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert dequantize_w8(q, torch.tensor([0.5])).tolist() == [[-64.0, -0.5, 0.0, 63.5]]
    W = dequantize_w8(q, torch.tensor([[0.5]]), torch.tensor([[-1.0]]), 32)  # K=4: one ragged group
    assert W.tolist() == [[-63.5, 0.0, 0.5, 64.0]]
    q2 = torch.ones(1, 40, dtype=torch.int8)  # K=40, group 32: the second group is columns 32..39
    W2 = dequantize_w8(q2, torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, -1.0]]), 32)
    assert W2[0, 31].item() == 1.0 and W2[0, 32:].eq(6.0).all()


def test_refuses_bad_operands():
    qweight, scales, zeros = make_operands(16, 64, 32, sym=False)
    x = make_x((2, 64), torch.float32)
    with pytest.raises(ValueError, match=r"qweight must be a 2-D int8 tensor \(N, K\), got torch.uint8"):
        w8a16_matmul(x, qweight.to(torch.uint8), scales, zeros, 32)
    with pytest.raises(ValueError, match=r"x of shape \(2, 60\) does not end in K=64"):
        w8a16_matmul(make_x((2, 60), torch.float32), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales of shape \(16, 2\) should be \(16,\) or \(16, 1\)"):
        w8a16_matmul(x, qweight, scales)  # group_size defaults to -1 (per channel)
    with pytest.raises(ValueError, match=r"zeros of shape \(16, 1\) should be \(16, 2\)"):
        w8a16_matmul(x, qweight, scales, zeros[:, :1], 32)
    with pytest.raises(ValueError, match=r"group_size must be one of .* got 100"):
        w8a16_matmul(x, qweight, scales, zeros, 100)
