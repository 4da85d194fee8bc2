"""`almak bench` on a tiny random LLaMA and its int4 checkpoint: the table, bench.json, the plot, refusals."""
import json

import pytest
from click.testing import CliRunner

from almak.cli.main import main

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)

FAST = ["--batch-sizes", "1,2", "--prompt-len", "6", "--gen-len", "3", "--repeats", "1"]


@pytest.fixture(scope="module")
def w4_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "w4"
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_bench_two_models_writes_json(tiny_llama_dir, w4_dir, tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), str(w4_dir), *FAST, "--out", str(out),
                                       "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "w4 b=2" in result.output and "x tiny-llama0" in result.output and "w4 weights" in result.output
    doc = json.loads((out / "bench.json").read_text())
    assert doc["baseline"] == "tiny-llama0" and doc["config"]["batch_sizes"] == [1, 2]
    assert {(r["model"], r["batch"]) for r in doc["results"]} == {("tiny-llama0", 1), ("tiny-llama0", 2),
                                                                   ("w4", 1), ("w4", 2)}
    assert doc["models"]["w4"]["weight_bytes"] < doc["models"]["tiny-llama0"]["weight_bytes"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]


def test_bench_engine_hf_is_recorded(tiny_llama_dir, tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), *FAST, "--engine", "hf", "--out", str(out),
                                       "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "hf loop" in result.output
    assert json.loads((out / "bench.json").read_text())["config"]["engine"] == "hf"


def test_bench_plot(tiny_llama_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "decode_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes takes comma-separated integers"),
    (["--batch-sizes", "0"], "batch sizes must be positive"),
    (["--gen-len", "1"], "1 is not in the range x>=2"),
])
def test_bad_input(tiny_llama_dir, tmp_path, args, message):
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), *args, "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tiny_llama_dir, tmp_path):
    (tmp_path / "b").mkdir()
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), *FAST, "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "pass --overwrite" in result.output


def test_shape_variant(tmp_path):
    """A one-layer random model with ALMA-7B's dimensions, quantized to int4 at load."""
    result = CliRunner().invoke(main, ["bench", "--shape", "alma-7b", "--layers", "1", "int4", "--batch-sizes", "1",
                                       "--prompt-len", "4", "--gen-len", "2", "--repeats", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "int4 b=1" in result.output and "int4 weights" in result.output


@pytest.mark.parametrize("args, message", [
    (["--layers", "1"], "--layers goes with --shape"),
    (["--shape", "alma-7b", "smollm2-135m"], "MODELS are variants of it (float, int8, int4, 2:4, 2:4-int4)"),
])
def test_shape_refusals(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 1 and message in result.output, result.output


def _report(folder, **fields):
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(fields))
    return str(folder / "report.json")


def test_quality_plot_from_eval_reports(tiny_llama_dir, tmp_path):
    pytest.importorskip("matplotlib")
    a = _report(tmp_path / "fp32", model="m", ppl=31.2, weight_bytes=500 * 2**20)
    b = _report(tmp_path / "w4", model="m-w4", ppl=35.0, weight_bytes=170 * 2**20)
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), *FAST, "--report", a, "--report", b,
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "quality_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "bench.json").read_text())["quality"]["w4"]["ppl"] == 35.0


def test_reports_without_a_shared_metric_are_refused_before_measuring(tiny_llama_dir, tmp_path):
    a = _report(tmp_path / "x", ppl=31.2, weight_bytes=1)
    b = _report(tmp_path / "y", bleu=3.0, weight_bytes=1)
    result = CliRunner().invoke(main, ["bench", str(tiny_llama_dir), *FAST, "--report", a, "--report", b,
                                       "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "one metric they all have" in result.output, result.output
    assert not (tmp_path / "b").exists()
