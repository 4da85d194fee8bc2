"""`almak distill` on a tiny random LLaMA: a 2:4 student recovered into a checkpoint eval takes, and refusals."""
import json

import pytest
import torch
from click.testing import CliRunner

from almak.cli.main import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def student(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "s24"
    result = invoke("prune", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "2:4", "--skip", "self_attn",
                    "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_distill_writes_a_2_to_4_checkpoint(tiny_llama_dir, student, tsv, tmp_path):
    out = tmp_path / "kd"
    result = invoke("distill", str(student), "--teacher", str(tiny_llama_dir), "--data", str(tsv), "--lang-pair",
                    "de-en", "--valid", str(tsv), "--valid-sentences", "4", "--steps", "3", "--batch-size", "2",
                    "--grad-accum", "1", "--max-len", "64", "--lr", "1e-3", "--device", "cpu", "--bf16",
                    "--group-by-length", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "valid ppl before / after" in result.output and "pruned; KD alpha 0.5 at T=2" in result.output
    config = json.loads((out / "almak_recipe.json").read_text())["distill"]["config"]
    assert config["bf16"] is True and config["group_by_length"] is True
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report == json.loads((student / "sparsity_report.json").read_text())
    assert json.loads((out / "almak_recipe.json").read_text())["distill"]["steps"] == 3
    result = invoke("eval", str(out), "--testset", str(tsv), "--lang-pair", "de-en", "--limit", "2", "--metrics", "nll",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    # Still 2:4, stored as such: the MLP projections the student had as 2:4 load as Sparse24Linear layers whose
    # every group of 4 holds at most 2 non-zeros, and training moved their kept weights.
    from almak.modeling.load import load_model
    from almak.modeling.nn.sparse_linear import Sparse24Linear

    before = load_model(str(student), device="cpu").model
    after = load_model(str(out), device="cpu").model
    names = [n for n, m in before.named_modules() if isinstance(m, Sparse24Linear)]
    assert names and all(isinstance(after.get_submodule(n), Sparse24Linear) for n in names)
    for n in names:
        W = after.get_submodule(n).dense_weight()
        assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), n
    assert any(not torch.equal(after.get_submodule(n).values, before.get_submodule(n).values) for n in names)


@pytest.mark.parametrize("args, message", [
    (["--teacher", "./no-such-teacher"], "unknown model './no-such-teacher'"),
    (["--teacher", "x", "--alpha", "2"], "Invalid value for '--alpha'"),
])
def test_refusals(tiny_llama_dir, tmp_path, args, message):
    result = invoke("distill", str(tiny_llama_dir), *args, "--out", str(tmp_path / "o"))
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "o").exists()
