"""Structured pruning (issue 36): the smaller model computes what the teacher computes with those parts removed, the
importances keep what matters, the search stays under its budget, and the folder is a plain model."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from almak.cli.main import main
from almak.errors import AlmakError
from almak.modeling.pipelines.structured import (
    Importance,
    Shape,
    StructuredRecipe,
    candidate_shapes,
    choose_shape,
    importance,
    prune_structured,
    prune_to_shape,
)

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)


def tiny_model(model_type: str = "llama", tie: bool = True, seed: int = 0):
    """A random 4-layer model: hidden 128, 8 query heads over 4 key/value heads (head_dim 16), MLP 192."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():  # norms away from 1 and biases nonzero, so that a wrong slice shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def samples(n: int = 6, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (1, length - i), generator=g) for i in range(n)]


def masked_teacher(model: nn.Module, kept) -> nn.Module:
    """The teacher with everything the pruned model lacks removed by hand: skipped layers replaced by identities,
    removed heads' and neurons' output columns zeroed, removed hidden channels zeroed where they enter the residual
    stream (embeddings, o_proj and down_proj rows). Written here, independently of the code under test."""
    class Identity(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.attention_type = getattr(layer, "attention_type", "full_attention")

        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    m = copy.deepcopy(model)
    cfg = m.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    gone = [c for c in range(cfg.hidden_size) if c not in set(kept.channels)]
    with torch.no_grad():
        m.model.embed_tokens.weight[:, gone] = 0
        for i, layer in enumerate(m.model.layers):
            if i not in kept.layers:
                continue
            j = kept.layers.index(i)
            for h in range(cfg.num_attention_heads):
                if h not in kept.heads[j]:
                    layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            for n in range(cfg.intermediate_size):
                if n not in set(kept.neurons[j]):
                    layer.mlp.down_proj.weight[:, n] = 0
            layer.self_attn.o_proj.weight[gone] = 0
            layer.mlp.down_proj.weight[gone] = 0
        m.model.layers = nn.ModuleList([layer if i in kept.layers else Identity(layer)
                                        for i, layer in enumerate(m.model.layers)])
    return m


SHAPES = {
    "layers": dict(layers=3),
    "heads-in-groups": dict(heads=4),  # one query head of each key/value group goes
    "kv-groups": dict(heads=4, kv_heads=2),  # two whole groups go (the hidden size stays a multiple of the heads)
    "mlp": dict(mlp=128),
    "hidden": dict(hidden=96),
    "all": dict(layers=3, heads=4, kv_heads=2, mlp=128, hidden=64),
}


@pytest.mark.parametrize("model_type, tie", [("llama", True), ("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("change", list(SHAPES), ids=list(SHAPES))
def test_pruned_model_computes_the_masked_teacher(model_type, tie, change):
    teacher = tiny_model(model_type, tie)
    calib = samples()
    imp = importance(teacher, calib)
    shape = Shape.of(teacher.config)._replace(**SHAPES[change])
    pruned = prune_to_shape(teacher, shape, imp)
    small = pruned.model
    assert Shape.of(small.config) == shape
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters())
    reference = masked_teacher(teacher, pruned.kept)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = small(input_ids=ids).logits, reference(input_ids=ids).logits
    # fp32 rounding only: the same products summed over fewer (zero) terms, and the norms' rescaled epsilon
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pruning_leaves_the_teacher_as_it_was():
    teacher = tiny_model()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    prune_to_shape(teacher, Shape.of(teacher.config)._replace(hidden=96, layers=3), importance(teacher, samples()))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_importance_keeps_what_matters_on_a_planted_model():
    teacher = tiny_model()
    hd = 16
    with torch.no_grad():
        attn, mlp = teacher.model.layers[1].self_attn, teacher.model.layers[1].mlp
        attn.o_proj.weight[:, 5 * hd:6 * hd] *= 50  # head 5 of layer 1 writes loudly
        attn.o_proj.weight[:, 2 * hd:3 * hd] = 0  # head 2 writes nothing
        mlp.down_proj.weight[:, 7] *= 50  # neuron 7 matters
        mlp.down_proj.weight[:, 9] = 0  # neuron 9 does not
        teacher.model.embed_tokens.weight[:, 33] *= 30  # a loud hidden channel
        for layer in teacher.model.layers:  # a silent one: nothing writes it and nothing reads it
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight[40] = 0
        teacher.model.embed_tokens.weight[:, 40] = 0
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()  # layer 2 does nothing:
        teacher.model.layers[2].mlp.down_proj.weight.zero_()  # skipping it changes no output
    imp = importance(teacher, samples())
    assert imp.heads[1].argmax() == 5 and imp.heads[1, 2] == 0
    assert imp.neurons[1].argmax() == 7 and imp.neurons[1, 9] == 0
    assert imp.channels.argmax() == 33 and imp.channels[40] == 0
    assert imp.layers.argmin() == 2 and abs(float(imp.layers[2])) < 1e-6
    kept = prune_to_shape(teacher, Shape.of(teacher.config)._replace(layers=3, heads=4, mlp=96, hidden=64),
                          imp).kept
    assert kept.layers == [0, 1, 3]
    assert 5 in kept.heads[1] and 2 not in kept.heads[1]
    assert 7 in kept.neurons[1] and 9 not in kept.neurons[1]
    assert 33 in kept.channels and 40 not in kept.channels


def test_search_stays_under_the_budget_and_picks_the_lowest_loss():
    teacher = tiny_model()
    calib = samples()
    imp = importance(teacher, calib)
    recipe = StructuredRecipe(target_params=0.7, nsamples=6, search_samples=6, search_candidates=5)
    choice = choose_shape(teacher, imp, recipe, calib)
    source = Shape.of(teacher.config)
    assert len(choice.losses) == 5
    for shape, _ in choice.losses:
        assert shape.decoder_params() <= 0.7 * source.decoder_params()
    assert choice.shape == min(choice.losses, key=lambda sl: sl[1])[0]
    assert len({s.layers for s, _ in choice.losses}) > 1  # spread over depths, not only the widest


def test_candidates_are_uniform_sub_shapes():
    source = Shape(30, 9, 3, 1536, 576, 64)
    shapes = candidate_shapes(source, 0.5)
    assert shapes and all(s.heads % s.kv_heads == 0 and s.heads // s.kv_heads <= 3 for s in shapes)
    assert all(s.hidden % 64 == 0 and s.mlp % 64 == 0 and s.layers >= 15 for s in shapes)
    assert all(s.hidden % s.heads == 0 for s in shapes)  # transformers 5 refuses any other LLaMA config
    assert any(s.heads == 6 for s in shapes) and any(s.hidden < 576 for s in shapes)


@pytest.mark.parametrize("kw, message", [
    (dict(target_params=0), "strictly between 0 and 1"),
    (dict(target_params=1.5), "strictly between 0 and 1"),
    (dict(), "needs a budget"),
    (dict(target_params=0.5, layers=3), "not both"),
    (dict(layers=0), "positive integer"),
])
def test_recipe_refusals(kw, message):
    with pytest.raises(AlmakError, match=message):
        StructuredRecipe(**kw)


@pytest.mark.parametrize("kw, message", [
    (dict(heads=9), "--heads 9: the model has 8"),
    (dict(layers=5), "--layers 5: the model has 4"),
    (dict(heads=6), "does not split over the model's 4 key/value heads"),
    (dict(heads=6, kv_heads=2), "at most the model's 2 per group"),
    (dict(heads=4, kv_heads=3), "same number of query heads in every key/value group"),
    (dict(layers=4), "nothing to prune"),
    (dict(hidden=100), "--hidden 100 is not a multiple of --heads 8: transformers .* or --heads 4"),
])
def test_shape_refusals(kw, message):
    with pytest.raises(AlmakError, match=message):
        StructuredRecipe(**kw).shape_for(Shape(4, 8, 4, 192, 128, 16))


def test_written_folder_is_a_plain_model_transformers_loads(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from almak.modeling.load import load_model

    out = tmp_path / "small"
    r = prune_structured(str(tiny_llama_dir), StructuredRecipe(layers=1, heads=4, kv_heads=2, mlp=128, hidden=64,
                                                               nsamples=4, seqlen=32, search_samples=4), out,
                         device="cpu")
    assert r.shape == Shape(1, 4, 2, 128, 64, 16)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["hidden_size"], config["head_dim"]) == (1, 4, 2, 128, 64, 16)
    assert "quantization_config" not in config
    report = json.loads((out / "structure_report.json").read_text())
    assert report["shape"]["hidden"] == 64 and len(report["kept"]["channels"]) == 64
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mine = load_model(str(out), device="cpu", dtype="float32").model
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, mine(input_ids=ids).logits)


def test_cli_prunes_by_budget_and_refuses_bad_shapes(tiny_llama_dir, tmp_path):
    out = tmp_path / "small"
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--method", "structured", "--target-params",
                                       "0.6", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--out",
                                       str(out)])
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "almak_recipe.json").read_text())
    before, after = recipe["decoder_params"]
    assert after <= 0.6 * before
    assert "shape after" in result.output
    for args, message in [(["--target-params", "0"], "0<x<1"),
                          (["--heads", "5"], "does not split over the model's 2 key/value heads"),
                          (["--heads", "12"], "--heads 12: the model has 6"),
                          (["--layers", "2", "--sparsity", "0.5"], "--sparsity prune weights inside the layers")]:
        bad = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--method", "structured", *args, "--out",
                                        str(tmp_path / "bad")])
        assert bad.exit_code != 0 and message in bad.output, bad.output
        assert "Traceback" not in bad.output and not (tmp_path / "bad").exists()
    wrong = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "--layers", "1", "--out", str(tmp_path / "w")])
    assert wrong.exit_code != 0 and "go with --method structured" in wrong.output


def test_quantized_source_is_refused(tiny_llama_dir, tmp_path):
    q = tmp_path / "q"
    assert CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32",
                                     "--out", str(q)]).exit_code == 0
    bad = CliRunner().invoke(main, ["prune", str(q), "--method", "structured", "--layers", "1", "--out",
                                    str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "takes a float model" in bad.output, bad.output


def test_importance_type():
    imp = Importance(torch.ones(2, 4), torch.ones(2, 8), torch.ones(16), torch.zeros(2), 1.0)
    assert imp.kv_groups(2).shape == (2, 2) and float(imp.kv_groups(2)[0, 0]) == 2.0


def test_a_student_quantizes_and_prunes_like_any_model(tiny_llama_dir, tmp_path):
    """The compressed kinds compose: a structured student takes GPTQ, mixed precision and 2:4 like any model, and
    the results load as almak's layers of the student's shape."""
    from almak.modeling.load import load_model
    from almak.modeling.nn.quant_linear import QuantLinear
    from almak.modeling.nn.sparse_linear import Sparse24Linear

    student = tmp_path / "student"
    prune_structured(str(tiny_llama_dir), StructuredRecipe(layers=1, heads=4, kv_heads=2, mlp=128, hidden=64,
                                                           nsamples=4, seqlen=32), student, device="cpu")
    calib = ["--calib", "alma:de-en", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
    for name, args, layer in [
        ("gptq", ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", *calib], QuantLinear),
        ("mixed", ["quantize", "--method", "rtn", "--bits", "auto", "--target-bits", "6", "--group-size", "32",
                   *calib], QuantLinear),
        ("24", ["prune", "--method", "wanda", "--pattern", "2:4", *calib], Sparse24Linear),
    ]:
        out = tmp_path / name
        result = CliRunner().invoke(main, [args[0], str(student), *args[1:], "--out", str(out)])
        assert result.exit_code == 0, (name, result.output)
        model = load_model(str(out), device="cpu", dtype="float32").model
        assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 1
        assert isinstance(model.model.layers[0].mlp.up_proj, layer), name
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.randint(0, 1000, (1, 8))).logits).all()


def test_make_recipe_builds_and_installs_the_student(tiny_llama_dir, tmp_path, monkeypatch):
    """``make smollm2-mt-student`` as shipped, on a tiny teacher and a short budget: prune, distill, install under the
    name; run again, it builds nothing and installs the same model."""
    import subprocess
    import sys

    from almak.modeling.load import load_model

    root = Path(__file__).resolve().parents[3]
    venv = Path(sys.prefix)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = ["make", "-C", str(root), "-o", f"{venv}/.installed", "smollm2-mt-student", f"VENV={venv}",
           f"STUDENT_RUN={run_dir}", f"STUDENT_TEACHER={tiny_llama_dir}", "STUDENT_SHAPE=--layers 1 --mlp 128",
           "STUDENT_CALIB=--calib alma:de-en --nsamples 4 --seqlen 32", "STUDENT_STEPS=2",
           "STUDENT_TRAIN=--data alma:de-en --batch-size 2 --grad-accum 1 --valid-sentences 0 --save-every 1"]
    env = {**os.environ, "ALMAK_CACHE": str(cache)}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    built = cache / "built" / "smollm2-mt-student"
    assert f"installed {built}" in first.stdout
    recipe = json.loads((built / "almak_recipe.json").read_text())
    assert recipe["shape"]["layers"] == 1 and recipe["shape"]["mlp"] == 128
    assert recipe["distill"]["teacher"] == str(tiny_llama_dir) and recipe["distill"]["config"]["steps"] == 2
    before = (built / "model.safetensors").read_bytes()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "distilled is built" in second.stdout and "almak prune" not in second.stdout
    assert (built / "model.safetensors").read_bytes() == before
    monkeypatch.setenv("ALMAK_CACHE", str(cache))
    student = load_model("smollm2-mt-student", device="cpu", dtype="float32").model
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 128
