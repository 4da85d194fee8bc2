"""`almak score` reproduces sacrebleu on ALMA-13B-LoRA's released WMT22 outputs, and refuses bad input."""
import json
from pathlib import Path

import pytest
import sacrebleu
from click.testing import CliRunner

from almak.cli.main import main
from almak.modeling.text.data import load_testset

OUTPUTS = Path(__file__).resolve().parents[1] / "data" / "ALMA-13B-LoRA"


def write_lines(path: Path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def run_score(tmp_path, pair, hyps, extra=()):
    ts = load_testset(f"wmt22:{pair}")
    args = ["score", "--src", write_lines(tmp_path / "src", ts.sources),
            "--hyp", write_lines(tmp_path / "hyp", hyps), "--ref", write_lines(tmp_path / "ref", ts.references),
            "--lang-pair", pair, "--format", "json", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), ts


def test_reproduces_alma_13b_lora_de_en(tmp_path):
    hyps = (OUTPUTS / "deen" / "test.de-en.en").read_text(encoding="utf-8").splitlines()
    report, _ = run_score(tmp_path, "de-en", hyps)
    # The published sacrebleu figures for these outputs, to the 0.01 the issue asks for.
    assert report["bleu"] == pytest.approx(31.26, abs=0.005)
    assert report["chrf"] == pytest.approx(56.09, abs=0.005)
    assert "tok:13a" in report["bleu_signature"]


def test_reproduces_alma_13b_lora_en_de(tmp_path):
    hyps = (OUTPUTS / "ende" / "test.en-de.de").read_text(encoding="utf-8").splitlines()
    report, ts = run_score(tmp_path, "en-de", hyps)
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [ts.references]).score, abs=1e-9)
    assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [ts.references]).score, abs=1e-9)


@pytest.mark.parametrize("pair, tokenize", [("en-zh", "zh"), ("zh-en", "13a"), ("en-ru", "13a"), ("ru-en", "13a")])
def test_every_direction_matches_sacrebleu(tmp_path, pair, tokenize):
    """A degraded copy of the references (every third dropped to its first half) is a non-trivial system."""
    ts = load_testset(f"wmt22:{pair}")
    hyps = [r[: len(r) // 2] if i % 3 == 0 else r for i, r in enumerate(ts.references)]
    report, _ = run_score(tmp_path, pair, hyps)
    assert f"tok:{tokenize}" in report["bleu_signature"]
    assert report["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [ts.references], tokenize=tokenize).score, abs=1e-9)
    assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [ts.references]).score, abs=1e-9)


def test_japanese_uses_mecab(tmp_path):
    pytest.importorskip("MeCab")
    refs = ["今日は良い天気です。", "私は学生です。"]
    hyps = ["今日は天気です。", "私は学生です。"]
    args = ["score", "--src", write_lines(tmp_path / "s", ["a", "b"]), "--hyp", write_lines(tmp_path / "h", hyps),
            "--ref", write_lines(tmp_path / "r", refs), "--lang-pair", "en-ja", "--format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "tok:ja-mecab" in report["bleu_signature"]
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="ja-mecab").score)


def test_table_output(tmp_path):
    f = write_lines(tmp_path / "a", ["Hello world."])
    result = CliRunner().invoke(main, ["score", "--src", f, "--hyp", f, "--ref", f, "--lang-pair", "de-en"])
    assert result.exit_code == 0
    assert "BLEU" in result.output and "100.00" in result.output and "bleu signature" in result.output


@pytest.mark.parametrize("case, message", [
    ("mismatch", "line counts differ: 2 sources, 1 hypotheses, 2 references"),
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("badpair", "unknown language code 'xx'"),
    ("badmetric", "unknown metric"),
])
def test_bad_input(tmp_path, case, message):
    two = write_lines(tmp_path / "two", ["a", "b"])
    one = write_lines(tmp_path / "one", ["a"])
    empty = write_lines(tmp_path / "empty", [])
    args = {"mismatch": ["--src", two, "--hyp", one, "--ref", two, "--lang-pair", "de-en"],
            "missing": ["--src", two, "--hyp", str(tmp_path / "nope"), "--ref", two, "--lang-pair", "de-en"],
            "empty": ["--src", two, "--hyp", empty, "--ref", two, "--lang-pair", "de-en"],
            "badpair": ["--src", two, "--hyp", two, "--ref", two, "--lang-pair", "xx-en"],
            "badmetric": ["--src", two, "--hyp", two, "--ref", two, "--lang-pair", "de-en", "--metrics", "ter"],
            }[case]
    result = CliRunner().invoke(main, ["score", *args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_spbleu_without_its_model_is_refused_before_scoring(tmp_path, monkeypatch):
    pytest.importorskip("sentencepiece")
    import sacrebleu.tokenizers.tokenizer_spm as tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "empty"))
    f = tmp_path / "x.txt"
    f.write_text("a\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["score", "--src", str(f), "--hyp", str(f), "--ref", str(f), "--lang-pair",
                                       "eng_Latn-yor_Latn", "--metrics", "spbleu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "spBLEU needs FLORES-200's SentencePiece model" in result.output


def test_bleu_tokenize_choice_is_used(tmp_path):
    f, g = tmp_path / "h.txt", tmp_path / "r.txt"
    f.write_text("Die Katze sitzt auf der Matte.\n", encoding="utf-8")
    g.write_text("Die Katze saß auf der Matte.\n", encoding="utf-8")
    runs = {tok: CliRunner().invoke(main, ["score", "--src", str(f), "--hyp", str(f), "--ref", str(g), "--lang-pair",
                                           "en-de", "--bleu-tokenize", tok, "--format", "json"]) for tok in ("13a", "char")}
    reports = {tok: json.loads(r.stdout) for tok, r in runs.items()}
    assert "tok:char" in reports["char"]["bleu_signature"] and "tok:13a" in reports["13a"]["bleu_signature"]
    assert reports["char"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(["Die Katze sitzt auf der Matte."],
                                                    [["Die Katze saß auf der Matte."]], tokenize="char").score)
