"""QuantLinear against the float layer (signal-to-noise) and against its own dequantized weight."""
import pytest
import torch
import torch.nn as nn

from almak.modeling import quant_linear
from almak.modeling.quant_linear import QuantLinear


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
    (8, -1, True, "native-int8"), (4, 128, True, "native-int4"), (4, 64, False, "native-int4"),
    (4, -1, True, "dense"), (8, 64, True, "dense"), (8, -1, False, "dense"),
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
    native = path != "dense" and rows <= quant_linear.CPU_NATIVE_MAX_M
    # The native kernels round x to bf16 (8 mantissa bits): relative error ~2^-9 per element, averaged down.
    tol = 1e-2 if native else 1e-6
    assert float((y - ref).norm() / ref.norm()) <= tol
    assert set(layer._cpu_cache) == {path if native else "dense"}


def test_ragged_group_uses_dense_path():
    layer = QuantLinear.from_float(nn.Linear(576, 64), 4, 128)  # 576 = 4 * 128 + 64
    assert layer.cpu_path() == "dense"


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
