"""QuantLinear against the float layer (signal-to-noise) and against its own dequantized weight."""
import pytest
import torch
import torch.nn as nn

from almak.modeling.nn import quant_linear
from almak.modeling.nn.quant_linear import QuantLinear


def snr_db(y, ref):
    return float(10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()))


# RTN on Gaussian weights: about 6 dB per bit minus the scale overhead; the floors leave ~3 dB of margin.
SNR_FLOOR = {(4, 32): 20.0, (4, 128): 17.0, (4, -1): 13.0, (8, -1): 38.0, (8, 128): 40.0}


@pytest.mark.parametrize("bits, group_size", list(SNR_FLOOR))
@pytest.mark.parametrize("sym", [True, False])
def test_snr_against_float_layer(bits, group_size, sym):
    torch.manual_seed(0)
    linear = nn.Linear(576, 192, bias=True)
    layer = QuantLinear.from_float(linear, bits, group_size, sym)
    x = torch.randn(7, 576)
    assert snr_db(layer(x), linear(x).detach()) > SNR_FLOOR[(bits, group_size)]


@pytest.mark.parametrize("bits, group_size, sym, path", [
    (8, -1, True, "native-int8"), (8, -1, False, "native-int8"), (4, 128, True, "native-int4"),
    (4, 64, False, "native-int4"), (4, -1, True, "native-int4"), (4, -1, False, "native-int4"),
    (8, 64, True, "chunked"), (8, 64, False, "chunked"),
])
@pytest.mark.parametrize("rows", [1, 15, 40])
def test_cpu_paths_match_the_dequantized_weight(bits, group_size, sym, path, rows):
    torch.manual_seed(1)
    layer = QuantLinear.from_float(nn.Linear(1024, 256), bits, group_size, sym)
    assert layer.cpu_path() == path and f"path={path}" in repr(layer)
    x = torch.randn(rows, 1, 1024)  # 3-D: (batch, sequence, features)
    ref = x @ layer.dequantize(torch.float32).T + layer.bias
    y = layer(x)
    assert y.shape == (rows, 1, 256) and y.dtype == torch.float32
    native = path != "chunked" and rows <= quant_linear.CPU_NATIVE_MAX_M
    # The native kernels round x to bf16 (8 mantissa bits): relative error ~2^-9 per element, averaged down.
    tol = 1e-2 if native else 1e-6
    assert float((y - ref).norm() / ref.norm()) <= tol
    assert set(layer._cpu_cache) == ({path} if native else set())


@pytest.mark.parametrize("bits, group_size, sym", [(8, -1, True), (4, 64, False), (4, -1, True), (8, 32, False),
                                                   (4, 128, True)])
def test_cpu_layer_holds_no_dense_weight(bits, group_size, sym, monkeypatch):
    """After decode- and prefill-sized calls, the layer holds its codes (and the native kernel's packing of
    them), never a float copy of the weight; the chunked path gives the dequantized weight's product in
    float32 and in bfloat16 (rounded once per weight, as dequantizing in float32 and casting does), its
    chunks split across the output rows."""
    torch.manual_seed(3)
    N, K = 208, 576  # 576 = 4.5 groups of 128: the ragged case too; N a multiple of 16 for the native int4 kernel
    layer = QuantLinear.from_float(nn.Linear(K, N, bias=False), bits, group_size, sym)
    monkeypatch.setattr(quant_linear, "CPU_CHUNK_ELEMS", 48 * K)  # 5 chunks: 48, 48, 48, 48, 16 rows
    W = layer.dequantize(torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        layer(torch.randn(1, K).to(dtype))  # decode-sized: the native kernel where there is one
        x = torch.randn(40, K).to(dtype)  # prefill-sized: chunked
        ref = (x.float() @ W.to(dtype).float().T).to(dtype)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4)
    held = {t.data_ptr(): t for t in [*layer.buffers(), *(t for ops in layer._cpu_cache.values() for t in ops
                                                         if isinstance(t, torch.Tensor))]}.values()
    assert not [t for t in held if t.is_floating_point() and t.numel() >= N * K // 4]
    assert sum(t.numel() * t.element_size() for t in held) <= N * K * bits // 8 * 2 + N * K // 2


def test_ragged_group_uses_chunked_path():
    layer = QuantLinear.from_float(nn.Linear(576, 64), 4, 128)  # 576 = 4 * 128 + 64
    assert layer.cpu_path() == "chunked"


def test_triton_backend_matches_cpu_path():
    torch.manual_seed(2)
    layer = QuantLinear.from_float(nn.Linear(576, 192), 4, 128, sym=False)
    x = torch.randn(2, 576)
    cpu = layer(x)
    layer.backend = "triton"  # the interpreter runs the Triton kernel on CPU tensors (tests/conftest.py)
    torch.testing.assert_close(layer(x), cpu, rtol=1e-4, atol=1e-4)  # fp32 accumulation in another order


def test_state_dict_round_trip():
    layer = QuantLinear.from_float(nn.Linear(256, 64), 4, 64, sym=False)
    fresh = QuantLinear(256, 64, 4, 64, sym=False, bias=True, dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 256)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"weight_packed", "weight_scale", "weight_zero_point", "bias"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(group_size=100), "group_size must be one of"),
])
def test_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantLinear(256, 64, **kwargs)
    with pytest.raises(ValueError, match="in_features divisible by 8"):
        QuantLinear(100, 64, bits=4)


@pytest.mark.parametrize("sym", [True, False])
def test_blockwise_quantization_and_int4_packing_match_whole(monkeypatch, sym):
    """from_float quantizes, and the native int4 path packs, a block of rows at a time (bounded temporaries):
    the same codes, scales and native packing as in one piece."""
    torch.manual_seed(4)
    linear = nn.Linear(512, 1024)
    whole = QuantLinear.from_float(linear, 4, 64, sym)
    monkeypatch.setattr(quant_linear, "CPU_CHUNK_ELEMS", 64 * 512)  # 128-row quantization blocks, 64-row packs
    blocks = QuantLinear.from_float(linear, 4, 64, sym)
    for (key, a), (_, b) in zip(whole.state_dict().items(), blocks.state_dict().items()):
        assert torch.equal(a, b), key
    one_piece = torch.ops.aten._convert_weight_to_int4pack_for_cpu(whole.codes().to(torch.int32),
                                                                  quant_linear.INT4_INNER_K_TILES)
    assert torch.equal(blocks._native_operands("native-int4")[0], one_piece)
