"""The Python API (issue 30): one public call behind every command, the README's examples, and the CLI writing what
the API writes."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import almak
from almak.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu"]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_import_almak_is_light():
    code = ("import sys, almak\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "assert almak.__version__ and 'quantize' in dir(almak)\n"
            "almak.QuantizeRecipe\n"  # first use imports its package
            "assert 'torch' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        almak.quantise  # noqa: B018


@pytest.mark.transformers
@pytest.mark.parametrize("command, recipe, api", [
    (["quantize", *RTN], almak.QuantizeRecipe(method="rtn", bits=4, group_size=32), almak.quantize),
    (["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym", "--calib", "alma:de-en",
      "--nsamples", "4", "--seqlen", "32", "--device", "cpu"],
     almak.QuantizeRecipe(method="gptq", bits=4, group_size=32, sym=False, calib="alma:de-en", nsamples=4, seqlen=32),
     almak.quantize),
    (["prune", "--method", "wanda", "--pattern", "2:4", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"],
     almak.PruneRecipe(method="wanda", pattern="2:4", nsamples=4, seqlen=32), almak.prune),
    (["prune", "--method", "structured", "--layers", "1", "--heads", "4", "--mlp", "128", "--nsamples", "4",
      "--seqlen", "32", "--device", "cpu"],
     almak.StructuredRecipe(layers=1, heads=4, mlp=128, nsamples=4, seqlen=32), almak.prune),
], ids=["rtn", "gptq", "wanda-2:4", "structured"])
def test_cli_and_api_write_byte_identical_checkpoints(tiny_llama_dir, tmp_path, command, recipe, api):
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    result = CliRunner().invoke(main, [command[0], str(tiny_llama_dir), *command[1:], "--out", str(cli_out)])
    assert result.exit_code == 0, result.output
    api(str(tiny_llama_dir), recipe, api_out, device="cpu")
    cli_files, api_files = files_of(cli_out), files_of(api_out)
    assert sorted(cli_files) == sorted(api_files)
    different = [name for name in cli_files if cli_files[name] != api_files[name]]
    assert not different, f"files that differ between the CLI's and the API's checkpoint: {different}"


# Each command, the library function its module calls, and what that call must receive.
THIN = [
    ("translate", ["translate", "--src", "de", "--tgt", "en", "--num-beams", "1"], "run_translate",
     lambda args, kw: args[1] == ["Hallo"] and args[4].num_beams == 1 and args[5].name == "almak"),
    ("eval", ["eval", "--limit", "2", "--metrics", "nll"], "evaluate",
     lambda args, kw: args[2].metrics == ("nll",) and kw["limit"] == 2),
    ("score", ["score", "--lang-pair", "de-en", "--metrics", "chrf"], "run_score",
     lambda args, kw: args[3:5] == ("de", "en") and args[5].metrics == ("chrf",)),
    ("bench", ["bench", "--batch-sizes", "1,2", "--no-plot"], "run_bench",
     lambda args, kw: args[1].batch_sizes == (1, 2) and kw["plot"] is False),
    ("quantize", ["quantize", "--method", "rtn", "--out", "OUT"], "run_quantize",
     lambda args, kw: args[1] == almak.QuantizeRecipe(method="rtn") and str(args[2]) == "OUT"),
    ("prune", ["prune", "--method", "magnitude", "--out", "OUT"], "run_prune",
     lambda args, kw: args[1] == almak.PruneRecipe(method="magnitude") and str(args[2]) == "OUT"),
    ("finetune", ["finetune", "--steps", "3", "--out", "OUT"], "run_finetune",
     lambda args, kw: args[1].steps == 3 and str(args[2]) == "OUT"),
    ("distill", ["distill", "STUDENT", "--teacher", "T", "--steps", "3", "--out", "OUT"], "run_distill",
     lambda args, kw: args[:2] == ("STUDENT", "T") and args[2].steps == 3 and str(args[3]) == "OUT"),
]


class Called(Exception):
    pass


@pytest.mark.parametrize("command, argv, function, check", THIN, ids=[t[0] for t in THIN])
def test_each_command_is_one_call(monkeypatch, tmp_path, command, argv, function, check):
    """The command's module hands its options to one library call (stopped here before it does any work)."""
    import importlib

    module = importlib.import_module(f"almak.cli.{command}")
    seen = {}

    def fake(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise Called

    monkeypatch.setattr(module, function, fake)
    monkeypatch.chdir(tmp_path)
    for name in ("src", "hyp", "ref"):
        (tmp_path / name).write_text("Hallo\n", encoding="utf-8")
    extra = ["--src", "src", "--hyp", "hyp", "--ref", "ref"] if command == "score" else []
    result = CliRunner().invoke(main, [*argv, *extra], input="Hallo\n")
    assert isinstance(result.exception, Called), result.output
    assert check(seen["args"], seen["kwargs"]), seen


def readme_examples() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert blocks, "the README's Python API section has no python example"
    return "\n".join(blocks)


@pytest.mark.transformers
def test_readme_python_api_examples_run(tmp_path):
    """The section's examples, run as written in an empty folder, in a fresh process."""
    code = readme_examples()
    for call in ("quantize", "prune", "translate", "evaluate", "score", "bench", "finetune", "distill"):
        assert f"almak.{call}(" in code, f"no README example of almak.{call}"
    script = tmp_path / "examples.py"
    script.write_text(code, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (work / "smollm-w8").is_dir() and (work / "smollm-24-kd").is_dir()
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ppl ") for line in lines), lines


def test_results_are_dataclasses():
    for name in ("QuantizeResult", "PruneResult", "FinetuneResult", "DistillResult", "TranslateResult", "EvalResult",
                 "BenchResult"):
        assert dataclasses.is_dataclass(getattr(almak, name)), name
