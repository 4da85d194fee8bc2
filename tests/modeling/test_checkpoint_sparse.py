"""Pruned checkpoints: 2:4 layers stored dense and named in config.json (the default) or in compressed-tensors'
sparse-24-bitmask layout (opt-in), 2:4 + int4 in pack-quantized, unstructured ones dense; almak's round trips,
the 2:4 invariant on the saved tensors, and transformers (+ compressed-tensors) reading almak's folders: the
default with any compressed-tensors, the bitmask layout where one that reads it (<= 0.14) is installed."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from almak.errors import AlmakError
from almak.modeling.checkpoint import load_quantized, save_pruned, save_quantized
from almak.modeling.load import load_model
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear
from almak.modeling.nn.surgery import QuantConfig, quantize_, set_module, sparsify_
from almak.modeling.pipelines.prune import PruneRecipe, prune_model

PROMPT = list(range(100, 124))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from almak.modeling.load import load_model

    return load_model(str(tiny_llama_dir), device="cpu", dtype="float32")


def pruned(tiny, pattern="2:4", sparsity=0.5):
    model = copy.deepcopy(tiny.model)
    report = prune_model(model, tiny.tokenizer, PruneRecipe(method="magnitude", pattern=pattern, sparsity=sparsity))
    return model, report


@torch.no_grad()
def logits(model):
    return model(torch.tensor([PROMPT])).logits


def test_24_dense_default_round_trip(tiny, tmp_path):
    """The default: 2:4 layers as ordinary dense weights (2:4 on disk), named in config.json's almak_sparsity
    and no quantization_config, so that any loader reads a plain model; almak loads its 2:4 layers back."""
    from transformers import AutoModelForCausalLM

    model, report = pruned(tiny)
    expected = logits(model)
    names = sparsify_(model)
    assert len(names) == 14
    out = save_pruned(model, tiny.tokenizer, tmp_path / "p24", {"command": "prune"}, report)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["almak_sparsity"] == {"format": "dense", "sparsity_structure": "2:4", "targets": sorted(names)}
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in names:
            W = f.get_tensor(f"{name}.weight")
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all()
            assert torch.equal(W, model.get_submodule(name).dense_weight())

    lm = load_model(str(out), device="cpu", dtype="float32")
    assert all(isinstance(lm.model.get_submodule(n), Sparse24Linear) for n in names)
    assert torch.equal(logits(lm.model), expected)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(theirs.model.layers[0].mlp.up_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_declared_24_layer_that_is_not_24_loads_dense(tiny, tmp_path, caplog):
    """A layer almak_sparsity names but whose weights are not 2:4 loads dense, with a warning; a name the model
    does not have is refused."""
    model, report = pruned(tiny)
    q_proj = "model.layers.0.self_attn.q_proj"
    set_module(model, q_proj, copy.deepcopy(tiny.model.get_submodule(q_proj)))  # back to dense
    assert q_proj not in sparsify_(model)
    out = save_pruned(model, tiny.tokenizer, tmp_path / "p24", {"command": "prune"}, report)
    config = json.loads((out / "config.json").read_text())
    config["almak_sparsity"]["targets"].append(q_proj)
    (out / "config.json").write_text(json.dumps(config))
    lm = load_model(str(out), device="cpu", dtype="float32")
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(lm.model.model.layers[0].mlp.up_proj, Sparse24Linear)
    assert "declared 2:4 are not 2:4" in caplog.text
    config["almak_sparsity"]["targets"].append("model.layers.9.mlp.up_proj")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlmakError, match=r"almak_sparsity names model.layers.9.mlp.up_proj, which the model has no"):
        load_model(str(out), device="cpu", dtype="float32")


def test_24_bitmask_round_trip_and_invariant_on_disk(tiny, tmp_path):
    model, report = pruned(tiny)
    expected = logits(model)
    assert len(sparsify_(model)) == 14
    out = save_pruned(model, tiny.tokenizer, tmp_path / "p24", {"command": "prune", "method": "magnitude"}, report,
                      sparse_format="sparse-24-bitmask")

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "config_groups" not in qc
    sc = qc["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4" and len(sc["targets"]) == 14
    assert json.loads((out / "sparsity_report.json").read_text())["pruned_sparsity"] == pytest.approx(0.5)

    # The 2:4 invariant, read from the file itself: 2 mask bits per group of 4, values where the bits are.
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for name in sc["targets"]:
            assert f"{name}.weight" not in keys
            bitmask, comp = f.get_tensor(f"{name}.bitmask"), f.get_tensor(f"{name}.compressed")
            N, K = f.get_tensor(f"{name}.shape").flatten().tolist()
            mask = np.unpackbits(bitmask.numpy(), axis=-1, count=K, bitorder="little").astype(bool)
            assert (mask.reshape(N, K // 4, 4).sum(-1) == 2).all()
            dense = torch.zeros(N, K)
            dense[torch.from_numpy(mask)] = comp.flatten()
            assert torch.equal(dense, model.get_submodule(name).dense_weight())

    loaded, tok = load_quantized(out)
    layer = loaded.model.layers[1].mlp.up_proj
    assert isinstance(layer, Sparse24Linear) and tok is not None
    assert torch.equal(logits(loaded), expected)  # the same float32 weights, expanded


def test_unstructured_checkpoint_is_a_plain_dense_folder(tiny, tmp_path):
    from almak.modeling.load import load_model

    model, report = pruned(tiny, pattern=None, sparsity=0.5)
    assert sparsify_(model) == []  # unstructured is not 2:4
    out = save_pruned(model, tiny.tokenizer, tmp_path / "u50", {"command": "prune"}, report)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    lm = load_model(str(out), device="cpu", dtype="float32")
    assert isinstance(lm.model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(logits(lm.model), logits(model))


@pytest.mark.parametrize("sym,sparse_format", [(True, "dense"), (False, "dense"), (True, "sparse-24-bitmask")])
def test_24_plus_int4_round_trip(tiny, tmp_path, sym, sparse_format):
    model, _ = pruned(tiny)
    quantize_(model, QuantConfig(bits=4, group_size=32, sym=sym))  # RTN maps every 0 to the zero point
    names = sparsify_(model)
    assert len(names) == 14
    expected = logits(model)
    out = save_quantized(model, tiny.tokenizer, tmp_path / "p24w4", {"method": "rtn"}, sparse_format=sparse_format)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "pack-quantized"
    if sparse_format == "dense":  # what vLLM loads: no sparsity_config naming layers
        assert qc["sparsity_config"] == {} and config["almak_sparsity"]["targets"] == sorted(names)
    else:
        assert qc["sparsity_config"]["format"] == "sparse-24-bitmask" and "almak_sparsity" not in config
    loaded, _ = load_quantized(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, Sparse24QuantLinear)
    assert torch.equal(logits(loaded), expected)


def test_declared_24_layer_with_dense_codes_loads_dense(tiny, tmp_path, caplog):
    """A sparsity_config that names a layer whose codes are not 2:4 loads it as a dense int4 layer, warning."""
    model = copy.deepcopy(tiny.model)
    quantize_(model, QuantConfig(bits=4, group_size=32))
    out = save_quantized(model, tiny.tokenizer, tmp_path / "w4", {"method": "rtn"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["sparsity_config"] = {"format": "sparse-24-bitmask", "targets": ["Linear"],
                                                        "ignore": ["lm_head"], "sparsity_structure": "2:4"}
    (out / "config.json").write_text(json.dumps(config))
    loaded, _ = load_quantized(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert "declared 2:4 but its codes are not" in caplog.text


# ------------------------------------------------------------------------------------- interoperability

def _ct_reads_24():
    try:
        import compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask  # noqa: F401
    except ImportError:
        return False
    return True


needs_ct_24 = pytest.mark.skipif(not _ct_reads_24(), reason="compressed-tensors >= 0.15 no longer reads "
                                 "sparse-24-bitmask (0.14 is the last that does; make test installs it in .venv-comet)")


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_reads_default_24_plus_int4_checkpoint(tiny, tmp_path, sym, transformers_load):
    """The default 2:4 + int4 folder in transformers with whatever compressed-tensors is installed (the newest
    in .venv): dense int4 layers, the same logits."""
    model, _ = pruned(tiny)
    quantize_(model, QuantConfig(bits=4, group_size=32, sym=sym))
    sparsify_(model)
    out = save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", {"method": "rtn"})
    theirs = transformers_load(out, dequantize=not sym)
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-4, atol=1e-4)


@needs_ct_24
@pytest.mark.parametrize("quant", [None, "int4-sym", "int4-asym"])
def test_transformers_reads_almak_24_checkpoint(tiny, tmp_path, quant):
    from transformers import AutoModelForCausalLM

    model, report = pruned(tiny)
    if quant:
        quantize_(model, QuantConfig(bits=4, group_size=32, sym=quant.endswith("-sym")))
    sparsify_(model)
    fmt = "sparse-24-bitmask"
    out = (save_quantized(model, tiny.tokenizer, tmp_path / "ckpt", {"method": "rtn"}, sparse_format=fmt) if quant
           else save_pruned(model, tiny.tokenizer, tmp_path / "ckpt", {"command": "prune"}, report, sparse_format=fmt))
    theirs = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours, _ = load_quantized(out)
    # transformers decompresses to dense float weights: the same numbers in the same F.linear, up to the
    # order of float32 additions in its dequantization (observed < 1e-5).
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-4, atol=1e-4)
