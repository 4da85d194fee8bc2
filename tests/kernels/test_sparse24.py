"""2:4 sparse kernels vs their pure-torch references on the same compressed data; the 2:4 layout itself.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) with a pruned grid;
with a GPU and TRITON_INTERPRET=0 the full grid runs, bf16 included. The layout tests need no Triton.
"""

import importlib.metadata
import itertools

import numpy as np
import pytest
import torch

from almak.kernels.sparse24 import (
    INTERPRET,
    compress_24,
    decompress_24,
    dequantize_sparse24_w4,
    from_bitmask_24,
    sparse24_matmul,
    sparse24_reference,
    sparse24_w4a16_matmul,
    sparse24_w4a16_reference,
    to_bitmask_24,
)
from almak.quant.pack import pack_int4

DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                  reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

M_GRID = [1, 2, 7, 16, 33, 128]
SHAPES = [(192, 576), (576, 1536), (1000, 64)]
GROUPS = [32, 128, -1]
DTYPES = [torch.float16, torch.float32] + ([] if INTERPRET else [torch.bfloat16])

if INTERPRET:
    # The interpreter runs ~0.3 s per call on 192x576 and ~2 s on 576x1536 at M = 33: every M and dtype on
    # the embedded model's ragged 192x576 layer (int4: every M with its ragged group of 128, the other groups
    # at 1, 7, 33); the other shapes at one decode and one prefill M, the large one with one group each.
    GRID = [(M, (192, 576), dt) for M in M_GRID for dt in DTYPES]
    GRID += [(M, shape, torch.float16) for shape in SHAPES[1:] for M in (1, 33)]
    GRID += [(M, (1000, 64), torch.float32) for M in (2, 7, 16, 128)]
    W4_GRID = [(M, (192, 576), 128, torch.float16) for M in M_GRID]
    W4_GRID += [(M, (192, 576), g, torch.float16) for M in (1, 7, 33) for g in (32, -1)]
    W4_GRID += [(M, (192, 576), g, torch.float32) for M in (1, 33) for g in GROUPS]
    W4_GRID += [(1, (576, 1536), 32, torch.float16), (33, (576, 1536), 128, torch.float16)]
    W4_GRID += [(M, (1000, 64), g, torch.float16) for M in (1, 33) for g in GROUPS]
else:
    GRID = list(itertools.product(M_GRID, SHAPES, DTYPES))
    W4_GRID = list(itertools.product(M_GRID, SHAPES, GROUPS, DTYPES))


def tolerance(dtype):
    if dtype == torch.float32:
        # fp32 sums of up to 768 products in another order: ~1e-5 absolute on outputs of magnitude ~1-10.
        return dict(rtol=1e-5, atol=1e-4)
    if dtype == torch.float16:
        # One fp16 output ulp (2^-10 relative), plus fp16-rounded weights where the kernel casts fp32 values
        # or dequantized int4 (2^-11 each, ~2e-3 absolute summed over K).
        return dict(rtol=2e-3, atol=1e-2)
    # bf16 keeps 8 mantissa bits: one output ulp is 2^-7 relative.
    return dict(rtol=1.6e-2, atol=2e-2)


def random_24(N, K, seed=0, dtype=torch.float32, scale=0.05):
    """Random 2:4 W: mostly 2 non-zeros per group at random positions, and some groups with 1 or 0."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K // 4, 4, generator=gen) * scale
    keep = torch.rand(N, K // 4, 4, generator=gen).argsort(dim=-1) < 2  # 2 random slots per group
    fewer = torch.rand(N, K // 4, 1, generator=gen)
    keep &= torch.rand(N, K // 4, 4, generator=gen) > 0.5 * (fewer < 0.2)  # ~20% of groups drop some
    return (W * keep).reshape(N, K).to(dtype)


def make_sparse(N, K, seed=0, dtype=torch.float32):
    values, meta = compress_24(random_24(N, K, seed, dtype))
    return values.to(DEVICE), meta.to(DEVICE)


def make_sparse_w4(N, K, group_size, seed=0):
    """2:4 positions from a random W; random int4 codes for the kept values, scales ~0.01, integer zeros."""
    gen = torch.Generator().manual_seed(seed + 100)
    _, meta = compress_24(random_24(N, K, seed))
    groups = 1 if group_size == -1 else -(-K // group_size)
    qvalues = pack_int4(torch.randint(0, 16, (N, K // 2), generator=gen))
    scales = torch.rand(N, groups, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (N, groups), generator=gen).float()
    return qvalues.to(DEVICE), meta.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)


def make_x(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------ kernels vs reference


@needs_triton
@pytest.mark.parametrize("M,shape,dtype", GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(M, shape, dtype):
    N, K = shape
    values, meta = make_sparse(N, K, dtype=dtype)
    x = make_x((M, K), dtype)
    y = sparse24_matmul(x, values, meta)
    assert y.shape == (M, N) and y.dtype == dtype
    torch.testing.assert_close(y, sparse24_reference(x, values, meta), **tolerance(dtype))


@needs_triton
@pytest.mark.parametrize("M,shape,group_size,dtype", W4_GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_w4_matches_reference(M, shape, group_size, dtype):
    N, K = shape
    qvalues, meta, scales, zeros = make_sparse_w4(N, K, group_size)
    x = make_x((M, K), dtype)
    y = sparse24_w4a16_matmul(x, qvalues, meta, scales, zeros, group_size)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = sparse24_w4a16_reference(x, qvalues, meta, scales, zeros, group_size)
    torch.testing.assert_close(y, ref, **tolerance(dtype))


def independent_dense(kept, meta, K):
    """Dense W (float64) from kept values (N, K // 2) and meta, placed with numpy: group i's nibble is bits
    4 (i % 8).. of word i // 8, its low 2 bits the first kept position, its high 2 bits the second (not
    decompress_24, which the reference and the dense path share)."""
    words = meta.cpu().numpy().view(np.uint32)
    groups = np.arange(K // 4)
    nib = (words[:, groups // 8] >> (4 * (groups % 8))) & 0xF
    W = np.zeros((kept.shape[0], K))
    rows = np.arange(kept.shape[0])[:, None]
    W[rows, 4 * groups + (nib & 3)] = kept[:, 0::2]
    W[rows, 4 * groups + (nib >> 2)] = kept[:, 1::2]
    return torch.from_numpy(W)


@needs_triton
@pytest.mark.parametrize("M,path", [(1, "prefill"), (16, "prefill"), (33, "decode"), (7, "dense")])
def test_forced_path_matches_an_independent_product(M, path):
    # Each path on the M range the auto dispatch does not give it, on the ragged embedded-model layer.
    K = 576
    values, meta = make_sparse(192, K)
    qvalues, qmeta, scales, zeros = make_sparse_w4(192, K, 128)
    x = make_x((M, K), torch.float32)
    y = sparse24_matmul(x, values, meta, path=path)
    W = independent_dense(values.cpu().double().numpy(), meta, K)
    torch.testing.assert_close(y.cpu().double(), x.cpu().double() @ W.T, **tolerance(torch.float32))
    # int4 kept values: codes as numpy nibbles, each scaled by the group of its dense column.
    words = qvalues.cpu().numpy().view(np.uint32)
    codes = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=-1).reshape(words.shape[0], -1)
    W = independent_dense(codes.astype(np.float64), qmeta, K)
    g = np.arange(K) // 128
    kept = independent_dense(np.ones_like(codes, dtype=np.float64), qmeta, K).bool()
    W = torch.where(kept, (W - zeros.cpu().double()[:, g]) * scales.cpu().double()[:, g], 0.0)
    y = sparse24_w4a16_matmul(x, qvalues, qmeta, scales, zeros, 128, path=path)
    torch.testing.assert_close(y.cpu().double(), x.cpu().double() @ W.T, **tolerance(torch.float32))


@needs_triton
@pytest.mark.parametrize("x_dtype,v_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                             (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("M", [1, 33])
def test_values_dtype_differs_from_x(M, x_dtype, v_dtype):
    values, meta = make_sparse(192, 576, dtype=v_dtype)
    x = make_x((M, 576), x_dtype)
    y = sparse24_matmul(x, values, meta)
    assert y.dtype == x_dtype
    torch.testing.assert_close(y, sparse24_reference(x, values, meta), **tolerance(x_dtype))


@needs_triton
@pytest.mark.parametrize("M", [1, 33])
def test_non_contiguous_x(M):
    values, meta = make_sparse(192, 576, dtype=torch.float16)
    qvalues, qmeta, scales, zeros = make_sparse_w4(192, 576, 32)
    x = make_x((576, 2 * M), torch.float16).t()[::2]  # strides (2, 2M): neither dimension contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(sparse24_matmul(x, values, meta), sparse24_reference(x, values, meta),
                               **tolerance(torch.float16))
    torch.testing.assert_close(sparse24_w4a16_matmul(x, qvalues, qmeta, scales, zeros, 32),
                               sparse24_w4a16_reference(x, qvalues, qmeta, scales, zeros, 32),
                               **tolerance(torch.float16))


@needs_triton
@pytest.mark.parametrize("lead", [(2, 3), (3, 1, 11)])
def test_batched_x(lead):
    values, meta = make_sparse(192, 576)
    qvalues, qmeta, scales, zeros = make_sparse_w4(192, 576, -1)
    x = make_x((*lead, 576), torch.float32)
    x = x.transpose(0, 1) if len(lead) == 2 else x  # 3-D and non-contiguous: reshape must copy
    y = sparse24_matmul(x, values, meta)
    assert y.shape == (*x.shape[:-1], 192)
    torch.testing.assert_close(y, sparse24_reference(x, values, meta), **tolerance(torch.float32))
    y = sparse24_w4a16_matmul(x, qvalues, qmeta, scales.reshape(-1), zeros.reshape(-1), -1)  # (N,) accepted
    ref = sparse24_w4a16_reference(x, qvalues, qmeta, scales, zeros, -1)
    torch.testing.assert_close(y, ref, **tolerance(torch.float32))


@needs_triton
def test_bfloat16_activations():
    # Under the interpreter the launcher computes bf16 in fp32 (its bf16 tl.dot is wrong); on GPU, bf16.
    values, meta = make_sparse(192, 576, dtype=torch.bfloat16)
    x = make_x((5, 576), torch.bfloat16)
    y = sparse24_matmul(x, values, meta)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, sparse24_reference(x, values, meta), **tolerance(torch.bfloat16))


@needs_triton
def test_matches_dense_weight():
    # The end-to-end claim: the kernel multiplies by the W that was compressed, not only by its reference.
    W = random_24(192, 576)
    values, meta = compress_24(W)
    x = make_x((3, 576), torch.float32)
    y = sparse24_matmul(x, values.to(DEVICE), meta.to(DEVICE))
    torch.testing.assert_close(y, x @ W.to(DEVICE).T, **tolerance(torch.float32))


def test_empty_batch():
    values, meta = make_sparse(192, 576)
    y = sparse24_matmul(make_x((0, 576), torch.float16), values, meta)
    assert y.shape == (0, 192) and y.dtype == torch.float16


@needs_triton
def test_w4_ragged_last_group_uses_its_own_scale():
    # K = 576 with group 128: dense columns 512..575 form a ragged 5th group and must read scales[:, 4],
    # whatever compressed column their values sit in (the group follows the ORIGINAL column).
    W = torch.zeros(1, 576)
    W[0, 1::4] = 1.0  # position 1 of every group kept: meta pads position 0
    _, meta = compress_24(W)
    qvalues = torch.full((1, 36), 0x11111111, dtype=torch.int32)  # every code 1
    scales = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    dense = dequantize_sparse24_w4(qvalues, meta, scales, torch.zeros(1, 5), 128)
    assert dense[0, 509].item() == 4.0 and dense[0, 513].item() == 5.0 and dense[0, 514].item() == 0.0
    x = torch.zeros(1, 576, device=DEVICE)
    x[0, 512:] = 1.0  # 16 groups x 2 kept positions, each worth 5
    y = sparse24_w4a16_matmul(x, qvalues.to(DEVICE), meta.to(DEVICE), scales.to(DEVICE),
                              torch.zeros(1, 5, device=DEVICE), 128)
    assert y.item() == 32 * 5.0


def test_w4_dequantize_zeroes_dropped_positions():
    # Codes 3 with zero 8 give -5 * scale at kept positions; the dropped ones must be 0, not (0 - 8) * scale.
    W = random_24(4, 64)
    _, meta = compress_24(W)
    qvalues = torch.full((4, 4), 0x33333333, dtype=torch.int32)
    dense = dequantize_sparse24_w4(qvalues, meta, torch.full((4, 1), 0.5), torch.full((4, 1), 8.0), -1)
    kept = decompress_24(torch.ones(4, 32), meta).bool()
    assert dense[kept].eq(-2.5).all() and dense[~kept].eq(0).all()


# --------------------------------------------------------------------------------------------- the layout


def test_compress_round_trip_with_sparser_groups():
    W = random_24(64, 256, seed=3)
    nonzeros = (W.reshape(64, 64, 4) != 0).sum(-1)
    assert {0, 1, 2} <= set(nonzeros.unique().tolist())  # the sample has every case
    values, meta = compress_24(W)
    assert values.shape == (64, 128) and meta.shape == (64, 8) and meta.dtype == torch.int32
    assert torch.equal(decompress_24(values, meta), W)
    # The kept half holds every non-zero.
    assert values.ne(0).sum() == W.ne(0).sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_keeps_dtype(dtype):
    W = random_24(8, 64, dtype=dtype)
    values, meta = compress_24(W)
    assert values.dtype == dtype
    assert torch.equal(decompress_24(values, meta), W)
    assert decompress_24(values, meta, dtype=torch.float32).dtype == torch.float32


def test_meta_nibble_layout():
    # Groups 0..7 of one row keep positions (0,1) (0,2) (0,3) (1,2) (1,3) (2,3), then an empty group, which
    # pads with (0,1), then a lone non-zero at 2, padded with the lowest unused position: (0,2).
    # Nibble = first | second << 2, group j in bits 4j..4j+3: 0x4, 0x8, 0xC, 0x9, 0xD, 0xE, 0x4, 0x8.
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    W = torch.zeros(1, 32)
    for g, (a, b) in enumerate(pairs):
        W[0, 4 * g + a], W[0, 4 * g + b] = 10 * g + 1, 10 * g + 2
    W[0, 4 * 7 + 2] = 71.0
    values, meta = compress_24(W)
    assert meta.tolist() == [[0x84ED9C84 - 2**32]]
    assert values.tolist() == [[1, 2, 11, 12, 21, 22, 31, 32, 41, 42, 51, 52, 0, 0, 0, 71]]
    # Second word: nibble j describes group 8 + j.
    W2 = torch.cat([W, torch.zeros(1, 32)], dim=1)
    W2[0, 32 + 4 * 3 + 3] = 5.0  # group 11: lone non-zero at 3 -> (0, 3) -> 0xC in bits 12..15
    assert compress_24(W2)[1][0, 1].item() == 0x4444C444


def test_decompress_refuses_malformed_meta():
    values, meta = compress_24(random_24(2, 64))
    meta[1, 1] = 0x44444444 | 0x00000500  # group 10: positions (1, 1)
    with pytest.raises(ValueError, match=r"meta row 1, group 10 \(columns 40\.\.43\) holds positions \(1, 1\)"):
        decompress_24(values, meta)


def test_bitmask_round_trip():
    W = random_24(16, 96, seed=5)
    values, meta = compress_24(W)
    compressed, bitmask = to_bitmask_24(values, meta)
    assert compressed.shape == (16, 48) and bitmask.shape == (16, 12) and bitmask.dtype == torch.uint8
    # Exactly 2 bits per group, always meta's positions, packed as numpy.packbits(bitorder="little").
    keep = decompress_24(torch.ones_like(values), meta).bool()
    assert keep.reshape(16, 24, 4).sum(-1).eq(2).all()
    assert np.array_equal(bitmask.numpy(), np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(compressed, W[keep].reshape(16, 48))
    back_values, back_meta = from_bitmask_24(compressed, bitmask, torch.tensor([[16], [96]]))
    assert torch.equal(back_values, values) and torch.equal(back_meta, meta)


def test_from_bitmask_accepts_any_two_bits_per_group():
    # A lone non-zero at position 2: almak pads with position 0, compressed-tensors' top-2 |w| may pick 3.
    W = torch.zeros(1, 32)
    W[0, 2] = 7.0
    keep = torch.zeros(1, 32, dtype=torch.bool)
    keep[0, 2:4] = True
    keep[0, 4:].view(7, 4)[:, :2] = True
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    values, meta = from_bitmask_24(W[keep].reshape(1, 16), bitmask, (1, 32))
    assert meta[0, 0].item() & 0xF == 2 | 3 << 2
    assert torch.equal(decompress_24(values, meta), W)


def test_from_bitmask_refuses_wrong_bit_count():
    _, bitmask = to_bitmask_24(*compress_24(random_24(2, 64)))
    bitmask[1, 3] |= 0xFF  # columns 24..31: groups 6 and 7 get all 4 bits
    with pytest.raises(ValueError, match=r"bitmask row 1, group 6 \(columns 24\.\.27\) sets 4 bits"):
        from_bitmask_24(torch.zeros(2, 32), bitmask, (2, 64))
    with pytest.raises(ValueError, match=r"bitmask should be uint8 \(2, 8\)"):
        from_bitmask_24(torch.zeros(2, 32), bitmask[:, :4], (2, 64))
    with pytest.raises(ValueError, match=r"compressed should be \(2, 32\)"):
        from_bitmask_24(torch.zeros(2, 30), bitmask, (2, 64))


def _ct_sparse24():
    reason = ("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask exists only in "
              "compressed-tensors <= 0.14")
    try:
        # Checked by version first: importing compressed_tensors costs ~2 s, for nothing on newer versions.
        major, minor = (int(p) for p in importlib.metadata.version("compressed-tensors").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pytest.skip(reason)
    if (major, minor) > (0, 14):
        pytest.skip(f"{reason}; found {importlib.metadata.version('compressed-tensors')}")
    try:
        from compressed_tensors.compressors.sparse_compressors import sparse_24_bitmask
    except ImportError:
        pytest.skip(reason)
    return sparse_24_bitmask


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matches_compressed_tensors_sparse_24_bitmask(dtype):
    ct = _ct_sparse24()
    # Exactly 2 non-zeros per group (distinct magnitudes): top-2 |w| is the non-zero mask, so both sides
    # must agree bit for bit.
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(32, 64, 4, generator=gen).argsort(dim=-1) < 2
    W = ((torch.rand(32, 64, 4, generator=gen) + 0.5) * torch.sign(torch.randn(32, 64, 4, generator=gen)) * keep)
    W = W.reshape(32, 256).to(dtype)
    ct_compressed, ct_bitmask = ct.sparse24_bitmask_compress(W)
    compressed, bitmask = to_bitmask_24(*compress_24(W))
    assert torch.equal(compressed, ct_compressed) and torch.equal(bitmask, ct_bitmask)
    values, meta = from_bitmask_24(ct_compressed, ct_bitmask, W.shape)
    assert all(torch.equal(a, b) for a, b in zip((values, meta), compress_24(W)))
    # Sparser groups: the masks may differ on which zeros they keep; each side must still decode the other.
    W = random_24(32, 256, seed=8, dtype=dtype)
    ct_compressed, ct_bitmask = ct.sparse24_bitmask_compress(W)
    assert torch.equal(decompress_24(*from_bitmask_24(ct_compressed, ct_bitmask, W.shape)), W)
    assert torch.equal(ct.sparse24_bitmask_decompress(*to_bitmask_24(*compress_24(W)), W.shape), W)


# ------------------------------------------------------------------------------------------------ refusals


def test_refuses_k_not_multiple_of_32():
    values, meta = make_sparse(4, 64)
    with pytest.raises(ValueError, match=r"multiple of 32; got x of shape \(3, 100\) \(K=100\)"):
        sparse24_matmul(torch.randn(3, 100, device=DEVICE), values, meta)
    with pytest.raises(ValueError, match=r"multiple of 32; got values of shape \(4, 50\), K = 2 \* 50 \(K=100\)"):
        decompress_24(torch.zeros(4, 50), meta)
    with pytest.raises(ValueError, match=r"multiple of 32; got W of shape \(2, 36\)"):
        compress_24(torch.zeros(2, 36))
    with pytest.raises(ValueError, match=r"multiple of 32; got shape \(2, 48\)"):
        from_bitmask_24(torch.zeros(2, 24), torch.zeros(2, 6, dtype=torch.uint8), (2, 48))


def test_refuses_group_with_three_non_zeros():
    W = random_24(3, 64)
    W[2, 20:24] = torch.tensor([1.0, 0.0, 2.0, 3.0])
    W[2, 40:44] = 1.0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 2, group 5 \(columns 20\.\.23\) has 3 non-zeros"):
        compress_24(W)


def test_refuses_wrong_operand_shapes_and_dtypes():
    values, meta = make_sparse(16, 64)
    x = make_x((2, 64), torch.float32)
    with pytest.raises(ValueError, match=r"meta of shape \(16, 3\) should be \(16, 2\) = \(N, K // 32\)"):
        sparse24_matmul(x, values, torch.zeros(16, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"meta must be a 2-D int32 tensor"):
        sparse24_matmul(x, values, meta.to(torch.int64))
    with pytest.raises(ValueError, match=r"values must be a 2-D float16, bfloat16 or float32 tensor"):
        sparse24_matmul(x, values.to(torch.int32), meta)
    with pytest.raises(ValueError, match=r"does not end in K=64"):
        sparse24_matmul(make_x((2, 32), torch.float32), values, meta)
    with pytest.raises(ValueError, match=r"x must be float16, bfloat16 or float32"):
        sparse24_matmul(x.to(torch.int32), values, meta)
    with pytest.raises(ValueError, match=r"path must be one of"):
        sparse24_matmul(x, values, meta, path="gemv")
    with pytest.raises(ValueError, match=r"meta of shape \(16, 3\) should be \(16, 2\)"):
        decompress_24(values, torch.zeros(16, 3, dtype=torch.int32, device=DEVICE))


def test_w4_refuses_wrong_operands():
    qvalues, meta, scales, zeros = make_sparse_w4(16, 64, 32)
    x = make_x((2, 64), torch.float32)
    with pytest.raises(ValueError, match=r"qvalues must be a 2-D int32 tensor \(N, K // 16\)"):
        sparse24_w4a16_matmul(x, qvalues.float(), meta, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"meta of shape \(16, 2\) should be \(16, 1\)"):
        sparse24_w4a16_matmul(make_x((2, 32), torch.float32), qvalues[:, :2], meta, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales of shape \(16, 3\) should be \(16, 2\)"):
        sparse24_w4a16_matmul(x, qvalues, meta, torch.ones(16, 3, device=DEVICE), zeros, 32)
    with pytest.raises(ValueError, match=r"zeros is required"):
        sparse24_w4a16_matmul(x, qvalues, meta, scales, None, 32)
    with pytest.raises(ValueError, match=r"group_size must be one of .* got 48"):
        sparse24_w4a16_matmul(x, qvalues, meta, scales, zeros, 48)


def test_refuses_mixed_devices():
    values, meta = compress_24(random_24(16, 64))
    with pytest.raises(ValueError, match=r"x is on meta but the values are on cpu"):
        sparse24_matmul(torch.empty(1, 64, device="meta"), values, meta)
    with pytest.raises(ValueError, match=r"meta is on meta but the values are on cpu"):
        sparse24_matmul(torch.randn(1, 64), values, meta.to("meta"))
