"""Quantized checkpoints: almak's round trip, transformers + compressed-tensors reading almak's folders, almak
reading compressed-tensors' and GPTQ folders, and the refusals."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling import checkpoint
from almak.modeling.checkpoint import (
    is_compressed_checkpoint,
    is_gptq_checkpoint,
    load_quantized,
    pack_rows,
    read_recipe,
    save_quantized,
    unpack_rows,
)
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.surgery import QuantConfig, quantize_, set_module

RECIPE = {"method": "rtn", "bits": 4, "group_size": 32, "calibration": None}
# 24 tokens: above QuantLinear's decode size, so its CPU forward is dequantize + F.linear in fp32 (the decode
# path rounds activations to bf16), the same arithmetic transformers' dequantized Linear does.
PROMPT = list(range(100, 124))
SCHEMES = {"int4-sym-g32": (4, 32, True), "int4-asym-g32": (4, 32, False), "int8-sym-channel": (8, -1, True),
           "int8-asym-g32": (8, 32, False)}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from almak.modeling.load import load_model

    return load_model(str(tiny_llama_dir), device="cpu", dtype="float32")


def quantized(tiny, bits, group_size, sym):
    model = copy.deepcopy(tiny.model)
    quantize_(model, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    return model


@torch.no_grad()
def logits(model, ids=PROMPT):
    return model(torch.tensor([ids])).logits


def quant_buffers(model):
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b, t in m.named_buffers(recurse=False)}


def no_leftovers(parent, keep):
    return sorted(p.name for p in parent.iterdir()) == sorted(keep)


# ------------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_exact(tiny, tmp_path, scheme):
    model = quantized(tiny, *SCHEMES[scheme])
    out = save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    assert is_compressed_checkpoint(out) and not is_gptq_checkpoint(out)
    loaded, tok = load_quantized(out)
    want, got = quant_buffers(model), quant_buffers(loaded)
    assert want.keys() == got.keys() and len(want) >= 14
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert torch.equal(logits(loaded), logits(model))  # same codes, same scales, same arithmetic
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    assert tok.padding_side == "left" and len(tok) == len(tiny.tokenizer)
    assert no_leftovers(tmp_path, ["ckpt"])


class _FloatTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every float tensor an aten op writes off the meta device: every op but the bare
    allocations (``empty``: nn.Linear's, which accelerate's init_empty_weights moves to the meta device before
    anything is written; an initialization, copy or dequantization into them would show)."""

    BARE = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if (func not in self.BARE and isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.device.type != "meta"):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("scheme", ["int4-sym-g32", "int8-sym-channel"])
def test_loading_never_builds_the_float_weights(tiny, tmp_path, scheme):
    """load_quantized builds the model on the meta device and fills its quantized layers from the file's codes:
    no float tensor of any quantized layer's weight shape is ever made (nor one of its transpose)."""
    model = quantized(tiny, *SCHEMES[scheme])
    out = save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    weights = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantLinear)}
    with _FloatTensors() as seen:
        loaded, _ = load_quantized(out)
    assert len(quant_buffers(loaded)) >= 14 and len(weights) >= 3
    assert not {s for s in seen.shapes if s in weights or s[::-1] in weights}
    assert (len(tiny.tokenizer), 96) in seen.shapes  # the watch sees the float tensors that are loaded


def test_folder_contents(tiny, tmp_path):
    from safetensors import safe_open

    model = quantized(tiny, 4, 32, False)
    out = save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", {**RECIPE, "act_order": True})
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "almak_recipe.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == \
           ("compressed-tensors", "pack-quantized", "compressed")
    assert qc["ignore"] == ["lm_head"] and list(qc["config_groups"]) == ["group_0"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32,
                       "dynamic": False, "actorder": "weight"}
    assert config["almak_recipe"] == "almak_recipe.json"
    recipe = read_recipe(out)
    assert recipe["method"] == "rtn" and recipe["almak_version"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.mlp.down_proj"  # N=96, K=256
        assert f.get_tensor(f"{name}.weight_packed").shape == (96, 32)
        assert f.get_tensor(f"{name}.weight_scale").shape == (96, 8)
        assert f.get_tensor(f"{name}.weight_zero_point").shape == (12, 8)  # 8 zeros a word along N
        assert f.get_tensor(f"{name}.weight_shape").tolist() == [96, 256]
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert not any(k.endswith((".weight", ".bias")) and "proj" in k for k in keys)


def test_generation_after_load(tiny, tmp_path):
    model = quantized(tiny, 4, 32, True)
    loaded, tok = load_quantized(save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", RECIPE))
    ids = tok(["Translate this from German to English:\nGerman: Hallo Welt\nEnglish:"], return_tensors="pt")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        assert torch.equal(loaded.generate(**ids, **kwargs), model.generate(**ids, **kwargs))


def test_mixed_schemes_round_trip(tiny, tmp_path):
    model = copy.deepcopy(tiny.model)
    quantize_(model, QuantConfig(bits=8, group_size=-1), filter_fn=lambda n, m: n.endswith("down_proj"))
    quantize_(model, QuantConfig(bits=4, group_size=32))
    out = save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [len(g["targets"]) for g in groups.values()] == [12, 2]
    loaded, _ = load_quantized(out)
    assert torch.equal(logits(loaded), logits(model))


def test_load_to_bfloat16(tiny, tmp_path):
    model = quantized(tiny, 4, 32, True)
    loaded, _ = load_quantized(save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", RECIPE), dtype="bfloat16")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.weight_scale.dtype == torch.bfloat16 and layer.weight_packed.dtype == torch.int32
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ the layout

@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(0)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    signed = torch.randint(lo, hi, (24, 72), generator=g, dtype=torch.int8)
    ours = pack_rows(signed.to(torch.int64) + hi, bits)
    assert torch.equal(ours, ct.pack_to_int32(signed, bits))
    assert torch.equal(pack_rows((signed.to(torch.int64) + hi).t(), bits).t(),
                       ct.pack_to_int32(signed, bits, packed_dim=0))  # zero points: packed along N
    assert torch.equal(unpack_rows(ours, bits, 72) - hi, signed.to(torch.int64))


def test_int4_weight_packed_is_stored_as_is(tiny):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    layer = quantized(tiny, 4, 32, True).model.layers[0].mlp.up_proj
    signed = (layer.codes().to(torch.int16) - 8).to(torch.int8)
    assert torch.equal(layer.weight_packed, ct.pack_to_int32(signed, 4))


# ------------------------------------------------------------------------------------------------ interop

@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_almak_checkpoint(tiny, tmp_path, scheme, transformers_load):
    """The issue's interop proof: transformers + compressed-tensors reads almak's folder as it is."""
    pytest.importorskip("compressed_tensors")
    bits, group_size, sym = SCHEMES[scheme]
    out = save_quantized(quantized(tiny, bits, group_size, sym), tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    # transformers 5.24 + compressed-tensors 0.20 cannot build asymmetric pack-quantized layers on the meta
    # device (the packed zero point's shape mismatches, for their own checkpoints too); their dequantize-on-
    # load path reads the same tensors.
    hf = transformers_load(out, dequantize=not sym)
    ours, _ = load_quantized(out)
    # Both compute (q - z) * s in fp32 and a dense matmul; only summation order differs.
    torch.testing.assert_close(logits(hf), logits(ours), atol=1e-4, rtol=1e-4)


def test_transformers_loads_mixed_schemes(tiny, tmp_path, transformers_load):
    pytest.importorskip("compressed_tensors")
    model = copy.deepcopy(tiny.model)
    quantize_(model, QuantConfig(bits=8, group_size=-1), filter_fn=lambda n, m: n.endswith("down_proj"))
    quantize_(model, QuantConfig(bits=4, group_size=32))
    out = save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    # Same arithmetic as above: dequantize in fp32, dense matmul.
    torch.testing.assert_close(logits(transformers_load(out, False)), logits(model), atol=1e-4, rtol=1e-4)


def write_with_compressed_tensors(model, tokenizer, folder, bits, group_size, sym):
    """What llm-compressor saves, made with compressed-tensors' own API (min-max scales, no calibration)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, symmetric=sym, strategy="group" if group_size > 0 else "channel",
                            group_size=group_size if group_size > 0 else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            W = module.weight.data
            Wg = W.reshape(W.shape[0], -1, W.shape[1] if group_size == -1 else group_size)
            scale, zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if not sym:
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("scheme", ["int4-sym-g32", "int4-asym-g32", "int8-sym-channel"])
def test_reads_compressed_tensors_checkpoint(tiny, tmp_path, scheme, transformers_load):
    """llm-compressor's layout, written by compressed-tensors itself, loads into QuantLinear."""
    pytest.importorskip("compressed_tensors")
    bits, group_size, sym = SCHEMES[scheme]
    folder = tmp_path / "ct"
    write_with_compressed_tensors(copy.deepcopy(tiny.model), tiny.tokenizer, folder, bits, group_size, sym)
    assert is_compressed_checkpoint(folder)
    ours, _ = load_quantized(folder)
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and (layer.bits, layer.group_size, layer.sym) == (bits, group_size, sym)
    hf = transformers_load(folder, dequantize=not sym)  # see test_transformers_loads_almak_checkpoint
    # Same arithmetic (fp32 dequantize, dense matmul); only summation order differs.
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.dequantize(torch.float32), hf.model.layers[1].mlp.down_proj.weight,
                               atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ GPTQ format

def autogptq_pack(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """One layer in AutoGPTQ's layout (qlinear_cuda_old ``pack``): qweight (K*bits/32, N) packed along K,
    qzeros (G, N*bits/32) packed along N holding zero - 1 (v1), scales (G, N) fp16, g_idx (K,) int32: the group
    of each input column, so a layer with an ``input_perm`` is written as desc_act=True writes it."""
    bits, K = layer.bits, layer.in_features
    per = 32 // bits
    if bits == 4:
        codes, zeros = layer.codes().to(torch.int64), layer.zeros().to(torch.int64)
    else:
        codes = layer.codes().to(torch.int64) + 128
        zeros = (torch.zeros_like(layer.weight_scale) if layer.sym else layer.weight_zero_point).to(torch.int64) + 128
    g = K if layer.group_size == -1 else layer.group_size
    g_idx = torch.arange(K) // g
    if layer.input_perm is not None:  # codes and groups back in input order
        codes = torch.empty_like(codes).index_copy_(1, layer.input_perm, codes)
        g_idx = torch.empty_like(g_idx).index_copy_(0, layer.input_perm, g_idx)

    def pack_dim0(u):  # (R, C) -> (R / per, C): value r of each word at bits * (r % per)
        u = u.reshape(-1, per, u.shape[1]) << (torch.arange(per) * bits).reshape(1, per, 1)
        words = u.sum(1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    stored = (zeros - 1) & (2**bits - 1)  # v1: zero - 1, a zero of 0 wraps to 2**bits - 1
    return {"qweight": pack_dim0(codes.t()), "qzeros": pack_dim0(stored).t().contiguous(),
            "scales": layer.weight_scale.t().contiguous().half(), "g_idx": g_idx.to(torch.int32)}


def write_gptq(model, tokenizer, folder, bits, group_size, sym, config_in="config.json"):
    packed = {name: autogptq_pack(module) for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    write_gptq_folder(model, tokenizer, folder, packed, {"bits": bits, "group_size": group_size, "desc_act": False,
                                                          "sym": sym}, config_in)


def write_gptq_folder(model, tokenizer, folder, packed, qc, config_in="config.json"):
    """A GPTQ folder: the ``packed`` layers' tensors, the rest of ``model``'s state, and the quantization config in
    config.json (as transformers' GPTQ integration writes it) or in quantize_config.json (older AutoGPTQ)."""
    from safetensors.torch import save_file

    folder.mkdir()
    tensors = {f"{name}.{k}": v for name, layer in packed.items() for k, v in layer.items()}
    tensors.update({k: v for k, v in model.state_dict().items()
                    if k.rpartition(".")[0] not in packed and k != "lm_head.weight"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    qc = {**qc, "damp_percent": 0.01, "static_groups": False, "true_sequential": True}
    if config_in == "config.json":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", **qc}
        (folder / "config.json").write_text(json.dumps(config))
    else:  # older AutoGPTQ folders: quantize_config.json only
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    tokenizer.save_pretrained(folder)


def fp16_scales_(model):
    """GPTQ files hold fp16 scales: round the in-memory model's scales the same way."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.weight_scale.copy_(module.weight_scale.half().float())
            module._cpu_cache = {}
    return model


@pytest.mark.parametrize("scheme,config_in", [("int4-sym-g32", "config.json"), ("int4-asym-g32", "config.json"),
                                              ("int8-sym-channel", "quantize_config.json")])
def test_reads_gptq_checkpoint(tiny, tmp_path, scheme, config_in):
    bits, group_size, sym = SCHEMES[scheme]
    model = fp16_scales_(quantized(tiny, bits, group_size, sym))
    if not sym:  # a zero of 0, which the v1 convention stores wrapped to 15
        layer = model.model.layers[0].self_attn.q_proj
        layer.weight_zero_point[0, 0] = 0
        layer._cpu_cache = {}
    write_gptq(model, tiny.tokenizer, tmp_path / "gptq", bits, group_size, sym, config_in)
    assert is_gptq_checkpoint(tmp_path / "gptq") and not is_compressed_checkpoint(tmp_path / "gptq")
    loaded, _ = load_quantized(tmp_path / "gptq")
    want, got = quant_buffers(model), quant_buffers(loaded)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(logits(loaded), logits(model))
    # and almak re-saves it in the compressed-tensors layout
    again, _ = load_quantized(save_quantized(loaded, None, tmp_path / "ct", RECIPE))
    assert torch.equal(logits(again), logits(model))


def permute_inputs_(model, names, seed=0):
    """Give the named layers a random input order, as GPTQ with desc_act (non-static groups) leaves them."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        layer = model.get_submodule(name)
        layer.set_input_perm(torch.randperm(layer.in_features, generator=g))
    return model


ACT_ORDER_LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def test_input_perm_gathers_the_input(tiny):
    """A layer whose stored column j holds input column perm[j]: every CPU path (decode-size native int4, dense
    above it) computes x @ dequantize().T, and dequantize() is in the input's order."""
    model = permute_inputs_(quantized(tiny, 4, 32, False), ACT_ORDER_LAYERS[:1])
    layer = model.get_submodule(ACT_ORDER_LAYERS[0])
    plain = quantized(tiny, 4, 32, False).get_submodule(ACT_ORDER_LAYERS[0])
    W = layer.dequantize(torch.float32)
    torch.testing.assert_close(W[:, layer.input_perm], plain.dequantize(torch.float32), rtol=0, atol=0)
    for m in (2, 40):
        x = torch.randn(m, layer.in_features)
        torch.testing.assert_close(layer(x), x @ W.T, atol=2e-2 if m <= 16 else 1e-5, rtol=1e-2)  # bf16 at m=2
    assert "input permuted" in repr(layer)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True)])
def test_reads_gptq_act_order_checkpoint(tiny, tmp_path, bits, sym):
    """desc_act=True folders (a permuted g_idx, as many GPTQ models on the hub) load with the layer's input
    permuted."""
    model = permute_inputs_(fp16_scales_(quantized(tiny, bits, 32, sym)), ACT_ORDER_LAYERS)
    write_gptq(model, tiny.tokenizer, tmp_path / "gptq", bits, 32, sym)
    loaded, _ = load_quantized(tmp_path / "gptq")
    for name in ACT_ORDER_LAYERS:
        layer, want = loaded.get_submodule(name), model.get_submodule(name)
        assert layer.input_perm is not None
        torch.testing.assert_close(layer.dequantize(torch.float32), want.dequantize(torch.float32), rtol=0, atol=0)
    assert loaded.model.layers[0].self_attn.k_proj.input_perm is None  # a trivial g_idx stays unpermuted
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)  # within-group order differs

    # compressed-tensors removed actorder "group", the only way it stored such layers: almak refuses to write them
    with pytest.raises(AlmakError, match="q_proj has a permuted input order"):
        save_quantized(loaded, None, tmp_path / "ct", RECIPE)
    assert not (tmp_path / "ct").exists()


def test_reads_compressed_tensors_actorder_group(tiny, tmp_path):
    """Older compressed-tensors folders with actorder "group": codes in input order plus weight_g_idx."""
    from safetensors.torch import load_file, save_file

    from almak.quant.pack import pack_int4, unpack_int4

    model = quantized(tiny, 4, 32, False)
    out = save_quantized(model, tiny.tokenizer, tmp_path / "ct", RECIPE)
    name = ACT_ORDER_LAYERS[0]
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(3))  # stored column j is input perm[j]
    tensors = load_file(out / "model.safetensors")
    codes = unpack_int4(tensors[f"{name}.weight_packed"])
    tensors[f"{name}.weight_packed"] = pack_int4(torch.empty_like(codes).index_copy_(1, perm, codes))
    for key in [k for k in tensors if k.endswith(".weight_shape")]:  # every layer of the group has one
        tensors[key.replace("weight_shape", "weight_g_idx")] = (torch.arange(tensors[key][1]) // 32).to(torch.int32)
    tensors[f"{name}.weight_g_idx"] = torch.empty(96, dtype=torch.int32).index_copy_(
        0, perm, (torch.arange(96) // 32).to(torch.int32))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (out / "config.json").write_text(json.dumps(config))

    loaded, _ = load_quantized(out)
    layer = loaded.get_submodule(name)
    W = model.get_submodule(name).dequantize(torch.float32)
    torch.testing.assert_close(layer.dequantize(torch.float32)[:, perm], W, rtol=0, atol=0)
    assert loaded.get_submodule(ACT_ORDER_LAYERS[1]).input_perm is None
    del tensors[f"{name}.weight_g_idx"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AlmakError, match="actorder 'group' but has no weight_g_idx"):
        load_quantized(out)


AUTOGPTQ_QLINEAR = Path(sys.prefix, "share", "auto-gptq-0.7.1", "qlinear_cuda.py")


def autogptq_quant_linear():
    """AutoGPTQ 0.7.1's QuantLinear (nn_modules/qlinear/qlinear_cuda.py), the module its GPTQ v1 checkpoints are
    packed with; its CPU forward unpacks them with torch. `make test` takes the file from AutoGPTQ's wheel (the
    package itself needs CUDA extensions, accelerate, peft and more; this module only torch, numpy, transformers)."""
    if not AUTOGPTQ_QLINEAR.is_file():
        pytest.fail(f"{AUTOGPTQ_QLINEAR} is missing: `make test` fetches it (see fetch_autogptq in the Makefile)")
    spec = importlib.util.spec_from_file_location("autogptq_qlinear_cuda", AUTOGPTQ_QLINEAR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QuantLinear


def autogptq_layer(quant_linear, linear, bits, group_size, sym, g_idx):
    """``linear`` quantized per group as GPTQ's quantizer sets its grid (min/max, fp16 scales; sym: the zero at
    2**(bits-1)) and packed by AutoGPTQ's own ``pack``. As GPTQ does, the Linear handed to ``pack`` holds the
    weights already on the grid, and ``g_idx`` gives each input column's group (a permuted one for desc_act)."""
    W = linear.weight.detach()
    N, K = W.shape
    maxq, G = 2**bits - 1, int(g_idx.max()) + 1
    scales, zeros = torch.empty(N, G), torch.empty(N, G)
    for g in range(G):
        cols = W[:, g_idx == g]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        scales[:, g] = ((hi - lo) / maxq).half().float()
        zeros[:, g] = (maxq + 1) / 2 if sym else torch.round(-lo / scales[:, g])
    assert (zeros > 0).all()  # AutoGPTQ's v1 packing cannot store a zero of 0 (zero - 1 = -1 fills the word)
    S, Z = scales[:, g_idx], zeros[:, g_idx]
    on_grid = nn.Linear(K, N, bias=False)
    on_grid.weight.data = (torch.clamp(torch.round(W / S) + Z, 0, maxq) - Z) * S
    layer = quant_linear(bits, group_size, K, N, False)
    layer.pack(on_grid, scales, zeros, g_idx.to(torch.int32))
    return layer


@pytest.mark.parametrize("bits,group_size,sym,act_order", [(4, 32, False, False), (4, 32, True, False),
                                                             (4, 32, False, True), (8, -1, True, False),
                                                             (8, 32, False, True)])
def test_reads_checkpoint_packed_by_autogptq(tiny, tmp_path, bits, group_size, sym, act_order):
    """A folder AutoGPTQ's own pack wrote loads into layers whose weights are those AutoGPTQ's own reader unpacks
    (its CPU forward on the identity), so a misreading the suite's packer above shares with almak is caught."""
    quant_linear = autogptq_quant_linear()
    model = copy.deepcopy(tiny.model)
    perm = torch.Generator().manual_seed(1)
    theirs = {}
    for name, linear in list(model.named_modules()):
        if isinstance(linear, nn.Linear) and ".layers." in name:
            K = linear.in_features
            g_idx = torch.arange(K) // (K if group_size == -1 else group_size)
            if act_order:  # desc_act: columns of a group scattered over the input
                g_idx = g_idx[torch.randperm(K, generator=perm)]
            theirs[name] = autogptq_layer(quant_linear, linear, bits, group_size, sym, g_idx)
    packed = {name: {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales.half(),
                     "g_idx": layer.g_idx} for name, layer in theirs.items()}
    write_gptq_folder(model, tiny.tokenizer, tmp_path / "gptq", packed,
                      {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym})
    loaded, _ = load_quantized(tmp_path / "gptq")

    with torch.no_grad():
        for name, layer in theirs.items():
            want = layer(torch.eye(layer.infeatures)).T  # AutoGPTQ's dequantized weight, (N, K)
            got = loaded.get_submodule(name)
            assert isinstance(got, QuantLinear) and (got.bits, got.sym) == (bits, sym)
            assert (got.input_perm is not None) == act_order, name
            torch.testing.assert_close(got.dequantize(torch.float32), want, rtol=0, atol=0, msg=name)
        for name, layer in theirs.items():  # the model run on AutoGPTQ's layers
            set_module(model, name, layer)
        torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


def test_gptq_g_idx_that_splits_groups_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model = fp16_scales_(quantized(tiny, 4, 32, True))
    write_gptq(model, tiny.tokenizer, tmp_path / "gptq", 4, 32, True)
    path = tmp_path / "gptq" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[key][0] = 1  # group 1 gets 33 columns, group 0 31
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(AlmakError, match=r"q_proj: g_idx does not give every group 32 columns"):
        load_quantized(tmp_path / "gptq")


# ------------------------------------------------------------------------------------------------ refusals

def test_existing_output_is_refused_and_untouched(tiny, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = quantized(tiny, 4, 32, True)
    with pytest.raises(AlmakError, match="already exists; pass --overwrite"):
        save_quantized(model, tiny.tokenizer, out, RECIPE)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert no_leftovers(tmp_path, ["ckpt"])
    save_quantized(model, tiny.tokenizer, out, RECIPE, overwrite=True)
    assert not (out / "keep.txt").exists() and is_compressed_checkpoint(out)
    assert no_leftovers(tmp_path, ["ckpt"])


def test_group_size_that_does_not_divide_is_refused(tiny, tmp_path):
    model = quantized(tiny, 4, 64, True)  # K=96 leaves a ragged group, which compressed-tensors cannot load
    with pytest.raises(AlmakError, match=r"model\.layers\.0\.self_attn\.q_proj: group size 64 does not divide "
                                         r"in_features=96.*group size 32"):
        save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    assert no_leftovers(tmp_path, [])


def test_model_without_quantized_layers_is_refused(tiny, tmp_path):
    with pytest.raises(AlmakError, match="no quantized \\(QuantLinear\\) layers"):
        save_quantized(tiny.model, tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    assert no_leftovers(tmp_path, [])


def test_short_disk_is_refused(tiny, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(AlmakError, match="not enough disk space.*MiB are free"):
        save_quantized(quantized(tiny, 4, 32, True), tiny.tokenizer, tmp_path / "ckpt", RECIPE)
    assert no_leftovers(tmp_path, [])


def test_failure_midway_leaves_nothing(tiny, tmp_path, monkeypatch):
    tok = copy.deepcopy(tiny.tokenizer)

    def broken(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk gone"):
        save_quantized(quantized(tiny, 4, 32, True), tok, tmp_path / "ckpt", RECIPE)
    assert no_leftovers(tmp_path, [])


def test_unserializable_recipe_is_refused(tiny, tmp_path):
    with pytest.raises(AlmakError, match="recipe cannot be written as JSON"):
        save_quantized(quantized(tiny, 4, 32, True), tiny.tokenizer, tmp_path / "ckpt", {"bad": object()})
    assert no_leftovers(tmp_path, [])


def test_float_folder_is_not_a_quantized_checkpoint(tiny_llama_dir):
    assert not is_compressed_checkpoint(tiny_llama_dir) and not is_gptq_checkpoint(tiny_llama_dir)
    with pytest.raises(AlmakError, match="not a compressed-tensors pack-quantized / sparse-24-bitmask or GPTQ"):
        load_quantized(tiny_llama_dir)


def test_vllm_limits_name_what_vllm_kernels_will_not_run():
    from almak.modeling.nn.sparse_linear import Sparse24Linear

    layers = torch.nn.ModuleDict({"ok": QuantLinear(256, 64, bits=4, group_size=64, sym=False, dtype=torch.float16)})
    assert checkpoint.vllm_limits(layers) == [] and checkpoint.vllm_summary(layers) == "loads and runs in vLLM"
    layers["g256_int8_asym"] = QuantLinear(256, 64, bits=8, group_size=256, sym=False, dtype=torch.float32)
    notes = checkpoint.vllm_limits(layers)
    assert len(notes) == 4 and "not 256" in notes[0] and "no int8 kernel" in notes[1]
    assert "asymmetric int8" in notes[2] and "float32" in notes[3]
    assert checkpoint.vllm_summary(layers).startswith("vLLM's int4/int8 kernels take group size")
    layers["sparse"] = Sparse24Linear(64, 64, device="meta")
    assert "2:4 (sparse)" in checkpoint.vllm_limits(layers, "sparse-24-bitmask")[0]
    assert "2:4 layers as dense weights" in checkpoint.vllm_notes(layers)[0]
