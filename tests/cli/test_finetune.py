"""`almak finetune` on a tiny random LLaMA: a LoRA run whose adapter `almak translate` takes, and refusals."""
import json

import pytest
from click.testing import CliRunner

from almak.cli.main import main

pytest.importorskip("peft")


def invoke(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_lora_run_writes_an_adapter_that_translates(tiny_llama_dir, tsv, tmp_path):
    out = tmp_path / "ft"
    result = invoke("finetune", str(tiny_llama_dir), "--data", str(tsv), "--lang-pair", "de-en", "--valid", str(tsv),
                    "--valid-sentences", "4", "--steps", "3", "--batch-size", "2", "--grad-accum", "1",
                    "--max-len", "64", "--lr", "1e-2", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "valid ppl before / after" in result.output and "LoRA rank 16" in result.output
    recipe = json.loads((out / "almak_finetune.json").read_text())
    assert recipe["steps"] == 3 and recipe["data"]["train"] == {"de-en": 12}
    assert recipe["val_ppl_after"] < recipe["val_ppl_before"]
    assert (out / "adapter_config.json").is_file() and not (out / "checkpoint").exists()

    result = invoke("translate", str(out), "--src", "de", "--tgt", "en", "--num-beams", "1", "--max-new-tokens", "4",
                    "--device", "cpu", input="Hallo Welt\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split("\n")) == 2


@pytest.mark.parametrize("args, message", [
    (["--data", "alma:de-fr"], "no bundled ALMA pairs for de-fr"),
    (["--data", "missing.tsv", "--lang-pair", "de-en"], "missing.tsv"),
    (["--full", "--lora-rank", "8"], "drop them with --full"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "the learning rate must be positive"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "ft"
    result = invoke("finetune", "--out", str(out), *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("finetune", "--out", str(out))
    assert result.exit_code != 0 and "pass --overwrite to replace it" in result.output
    assert (out / "keep.txt").read_text() == "mine"
