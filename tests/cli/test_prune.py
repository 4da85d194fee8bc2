"""`almak prune` end to end on a tiny random LLaMA, then quantize on top; its refusals leave nothing behind."""
import json

import pytest
from click.testing import CliRunner

from almak.cli.main import main
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear

FAST = ["--nsamples", "8", "--seqlen", "64", "--device", "cpu"]


def test_prune_24_then_eval_then_quantize(tiny_llama_dir, tmp_path):
    from almak.modeling.load import load_model

    out = tmp_path / "p24"
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--method", "sparsegpt", "--pattern", "2:4",
                                       "--skip", "layers.0.self_attn", *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "layers pruned        10 (10 of them 2:4 layers)" in result.output
    assert "vLLM runs the 2:4 layers as dense weights" in result.output
    assert json.loads((out / "config.json").read_text())["almak_sparsity"]["sparsity_structure"] == "2:4"
    assert "4 (4 by --skip layers.0.self_attn)" in result.output
    assert "layer 1              q 50% k 50% v 50% o 50% gate 50% up 50% down 50%" in result.output
    recipe = json.loads((out / "almak_recipe.json").read_text())
    assert recipe["command"] == "prune" and recipe["method"] == "sparsegpt" and recipe["pattern"] == "2:4"
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["layers"]["model.layers.0.self_attn.q_proj"] == 0.0

    lm = load_model(str(out), device="cpu")
    assert isinstance(lm.model.model.layers[1].mlp.up_proj, Sparse24Linear)
    ev = CliRunner().invoke(main, ["eval", str(out), "--limit", "2", "--metrics", "nll", "--format", "json"])
    assert ev.exit_code == 0, ev.output

    w4 = tmp_path / "p24w4"
    result = CliRunner().invoke(main, ["quantize", str(out), "--method", "gptq", "--bits", "4", "--group-size",
                                       "32", *FAST, "--out", str(w4)])
    assert result.exit_code == 0, result.output
    assert "(10 of them 2:4 + int4); zeros of the pruned source kept" in result.output
    lm = load_model(str(w4), device="cpu")
    # GPTQ kept every pruned weight at the zero point: the layers load as 2:4 + int4 again.
    assert isinstance(lm.model.model.layers[1].mlp.up_proj, Sparse24QuantLinear)
    assert json.loads((w4 / "almak_recipe.json").read_text())["pruned_source"]["method"] == "sparsegpt"


def test_prune_24_bitmask_format(tiny_llama_dir, tmp_path):
    out = tmp_path / "p24"
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "2:4",
                                       "--sparse-format", "sparse-24-bitmask", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "current vLLM does not load 2:4" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert "almak_sparsity" not in config


def test_prune_unstructured_magnitude(tiny_llama_dir, tmp_path):
    out = tmp_path / "u"
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.3",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "unstructured: stored dense" in result.output
    # round(0.3 * 96) = 29 of 96 (30.2%) and round(0.3 * 256) = 77 of 256 weights per row
    assert json.loads((out / "sparsity_report.json").read_text())["pruned_sparsity"] == pytest.approx(0.3, abs=0.005)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "0.5", "--pattern", "2:4"], "not both"),
    (["--pattern", "2:5"], "in_features=96 is not divisible by 5"),
    (["--pattern", "4:2"], "need 0 < N < M"),
    (["--pattern", "x"], "neither an N:M pattern"),
    (["--sparsity", "1.5"], "Invalid value for '--sparsity': 1.5 is not in the range 0<x<1"),
    (["--skip", "layers.9"], "--skip layers.9 matches no prunable layer"),
    (["--method", "obs"], "'obs' is not one of"),
])
def test_bad_input_is_refused_and_leaves_nothing(tiny_llama_dir, tmp_path, args, message):
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--method", "magnitude", *args,
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_compressed_input_are_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--method", "magnitude", "--out", str(out)])
    assert result.exit_code == 1 and "exists; pass --overwrite" in result.output
    w4 = tmp_path / "w4"
    assert CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32",
                                     "--out", str(w4)]).exit_code == 0
    result = CliRunner().invoke(main, ["prune", str(w4), "--method", "magnitude", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "already compressed" in result.output
