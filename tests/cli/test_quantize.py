"""`almak quantize` end to end on a tiny random LLaMA, and its refusals (nothing left behind)."""
import json

import pytest
import torch
from click.testing import CliRunner

from almak.cli.main import main
from almak.modeling.nn.quant_linear import QuantLinear

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
    from almak.modeling.load import load_model
    from almak.modeling.pipelines.calibrate import calibration_samples

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
    (["--bits", "3", "--group-size", "32"], "'3' is not one of '4', '8', 'auto'"),
    (["--bits", "auto", "--group-size", "32"], "--bits auto needs --target-bits"),
    (["--target-bits", "5", "--group-size", "32"], "--bits auto needs --target-bits, and --target-bits needs"),
    (["--bits", "auto", "--target-bits", "12", "--group-size", "32"], "12.0 is not in the range 4<=x<=9"),
    # int4 per channel with fp32 scales and 4-bit zeros: 4 + 36/K bits (K = 96, 256 for down_proj) at the least
    (["--bits", "auto", "--target-bits", "4.2", "--asym", "--group-size", "32"],
     "--target-bits 4.2 is below the smallest model these formats make (4.316 bits per weight: int4 per-channel everywhere, 32-bit scales)"),
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


def test_rotated_mixed_checkpoint(tiny_llama_dir, tmp_path):
    """--rotate --bits auto: the allocation is recorded and within budget, every layer loads in its recorded
    format, the head is untied, and the loaded model runs."""
    from almak.modeling.load import load_model
    from almak.modeling.pipelines.allocate import Format

    out = tmp_path / "mixed"
    args = [a for a in FAST_GPTQ if a not in ("--bits", "4")]
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), *args, "--bits", "auto", "--target-bits",
                                       "5", "--asym", "--rotate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "randomized Hadamard 96 (residual) and 16 (heads), seed 0; lm_head untied" in result.output
    recipe = json.loads((out / "almak_recipe.json").read_text())
    alloc = recipe["allocation"]
    assert recipe["rotate"] is True and recipe["target_bits"] == 5 and recipe["rotation"]["untied"] is True
    assert f"{alloc['average_bits']:.3f} bits per weight" in result.output and len(alloc["formats"]) == 14
    assert len(alloc["counts"]) >= 2  # the budget (5 bits) lies between the formats' costs: really mixed
    lm = load_model(str(out), device="cpu")
    model = lm.model
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    stored, params = 0, 0
    for name, fmt in alloc["formats"].items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and f"int{layer.bits} " in fmt, (name, fmt)
        f = Format(layer.bits, layer.group_size)
        assert str(f) == fmt
        stored += f.stored_bits(layer.out_features, layer.in_features, sym=False, scale_bits=32)
        params += layer.out_features * layer.in_features
    assert stored / params == pytest.approx(alloc["average_bits"], abs=1e-4) and stored / params <= 5
    ev = CliRunner().invoke(main, ["eval", str(out), "--limit", "2", "--metrics", "nll", "--format", "json"])
    assert ev.exit_code == 0, ev.output


def test_rotated_int8_keeps_the_function(tiny_llama_dir, tmp_path, tsv):
    """A rotated int8 per-channel checkpoint scores the references as the float model does (rotation exact,
    int8 nearly so); its norms are all 1."""
    from almak.modeling.load import load_model

    out = tmp_path / "w8-rot"
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "8",
                                       "--group-size", "-1", "--rotate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    nll = {}
    for folder in (tiny_llama_dir, out):
        ev = CliRunner().invoke(main, ["eval", str(folder), "--testset", str(tsv), "--lang-pair", "de-en",
                                       "--limit", "4", "--metrics", "nll", "--format", "json"])
        assert ev.exit_code == 0, ev.output
        nll[folder] = json.loads(ev.stdout)["ppl"]
    assert nll[out] == pytest.approx(nll[tiny_llama_dir], rel=2e-3)  # int8 rounding on a random model
    model = load_model(str(out), device="cpu").model
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
