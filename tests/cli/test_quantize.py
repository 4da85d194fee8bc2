"""`almak quantize` end to end on a tiny random LLaMA, and its refusals (nothing left behind)."""
import json

import pytest
import torch
from click.testing import CliRunner

from almak.cli.main import main
from almak.modeling.quant_linear import QuantLinear

FAST_GPTQ = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "64",
             "--device", "cpu"]


def test_gptq_checkpoint_then_eval_and_translate(tiny_llama_dir, tmp_path):
    out = tmp_path / "w4"
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), *FAST_GPTQ, "--asym", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "layers quantized     14" in result.output and "size before / after" in result.output
    recipe = json.loads((out / "almak_recipe.json").read_text())
    assert recipe["method"] == "gptq" and recipe["nsamples"] == 8 and recipe["calib"] == "alma"
    assert recipe["clip_search"] is True and "clip search" in result.output  # on by default for GPTQ
    assert "float32 scales: vLLM rounds them" in result.output  # quantized on the CPU, in float32
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"

    from almak.modeling.load import load_model

    lm = load_model(str(out), device="cpu")
    assert isinstance(lm.model.model.layers[1].mlp.up_proj, QuantLinear) and not lm.model.model.layers[1].mlp.up_proj.sym
    ev = CliRunner().invoke(main, ["eval", str(out), "--limit", "2", "--metrics", "nll", "--format", "json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["ppl"] > 1
    tr = CliRunner().invoke(main, ["translate", str(out), "--src", "de", "--tgt", "en", "--num-beams", "1",
                                   "--max-new-tokens", "4"], input="Hallo\n")
    assert tr.exit_code == 0, tr.output


def test_gptq_beats_rtn_on_the_model(tiny_llama_dir, tmp_path):
    """On the calibration prompts, GPTQ's logits are closer to the float model's than RTN's."""
    from almak.modeling.calibrate import calibration_samples
    from almak.modeling.load import load_model

    runs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        extra = FAST_GPTQ[2:] if method == "gptq" else ["--group-size", "32"]
        result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--method", method, *extra,
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs[method] = load_model(str(out), device="cpu").model
    ref = load_model(str(tiny_llama_dir), device="cpu")
    samples = calibration_samples(ref.tokenizer, "alma", nsamples=8, seqlen=64)
    with torch.no_grad():
        err = {m: sum(float((model(s).logits - ref.model(s).logits).pow(2).sum()) for s in samples)
               for m, model in runs.items()}
    assert err["gptq"] < err["rtn"]


@pytest.mark.parametrize("args, message", [
    (["--group-size", "64"], "group size 64 does not divide in_features=96"),
    (["--bits", "3", "--group-size", "32"], "'3' is not one of '4', '8'"),
    (["--damp", "1.5", "--group-size", "32"], "damp"),
    (["--calib", "nowhere.txt", "--group-size", "32"], "neither 'alma'"),
    (["--method", "rtn", "--clip-search", "--group-size", "32"], "--clip-search weighs each input column"),
])
def test_bad_input_leaves_nothing(tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--nsamples", "2", *args, "--out", str(out)])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["activations", "weights"])
def test_nan_is_refused(tiny_llama_dir, tmp_path, where):
    from almak.modeling.load import load_model

    lm = load_model(str(tiny_llama_dir), device="cpu")
    with torch.no_grad():
        if where == "activations":  # every token's embedding: layer 0 sees NaN inputs
            lm.model.model.embed_tokens.weight[:, 0] = float("nan")
        else:
            lm.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    broken = tmp_path / "broken"
    lm.model.save_pretrained(broken)
    lm.tokenizer.save_pretrained(broken)
    result = CliRunner().invoke(main, ["quantize", str(broken), *FAST_GPTQ, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "NaN" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(tiny_llama_dir, tmp_path):
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "--overwrite" in result.output
