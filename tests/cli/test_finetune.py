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

    sources = ["Hallo Welt", "Das Haus ist klein.", "Ich habe heute keine Zeit."]
    result = invoke("translate", str(out), "--src", "de", "--tgt", "en", "--num-beams", "1", "--max-new-tokens", "8",
                    "--device", "cpu", input="".join(s + "\n" for s in sources))
    assert result.exit_code == 0, result.output
    # The translations are the adapted model's, which the base model's are not.
    from almak.modeling.engines.generate import GenerationConfig, translate
    from almak.modeling.load import load_model
    from almak.modeling.text.prompts import Prompt

    config = GenerationConfig(num_beams=1, max_new_tokens=8)
    prompt = Prompt("alma", "de", "en")
    lm, base_lm = load_model(str(out), device="cpu"), load_model(str(tiny_llama_dir), device="cpu")
    adapted = translate(lm.model, lm.tokenizer, sources, prompt, config).hypotheses
    base = translate(base_lm.model, base_lm.tokenizer, sources, prompt, config).hypotheses
    assert adapted != base
    assert result.stdout.splitlines() == adapted


@pytest.mark.parametrize("args, message", [
    (["--data", "alma:de-fr"], "no bundled ALMA pairs for de-fr"),
    (["--data", "missing.tsv", "--lang-pair", "de-en"], "missing.tsv"),
    (["--full", "--lora-rank", "8"], "drop them with --full"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "Invalid value for '--lr': -1.0 is not in the range 0<x<=1"),
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
