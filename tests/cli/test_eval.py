"""`almak eval` end to end on the embedded model (a few sentences, greedy)."""
import json
import math

import pytest
import sacrebleu
from click.testing import CliRunner

from almak.cli.main import main
from almak.modeling.text.data import load_testset

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)

FAST = ["--limit", "3", "--num-beams", "1", "--max-new-tokens", "24", "--device", "cpu"]


def test_json_report_and_out_dir(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["eval", "--testset", "wmt22:de-en", *FAST, "--format", "json",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("bleu", "chrf", "ppl", "nll", "sentences_per_s", "generated_tokens_per_s",
                "peak_memory_bytes", "weight_bytes", "bleu_signature", "chrf_signature"):
        assert key in report, key
    assert 0 <= report["chrf"] <= 100 and math.isfinite(report["ppl"]) and report["ppl"] > 1
    assert report["n"] == 3 and report["model"] == "smollm2-135m"
    assert report["weight_bytes"] > 100e6  # 135M parameters in fp32, tied embeddings counted once
    hyps = (out / "hyps.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 3
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["chrf"] == report["chrf"]

    # The scores are of these hypotheses against the test set's first three references, recomputed here with
    # sacrebleu directly (13a tokenization for English, chrF defaults), not a copy of what eval computed.
    refs = load_testset("wmt22:de-en").head(3).references
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score, abs=0.01)
    assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=0.01)
    assert "tok:13a" in report["bleu_signature"] and report["chrf"] > 0

    again = CliRunner().invoke(main, ["eval", *FAST, "--out", str(out)])
    assert again.exit_code == 1 and "pass --overwrite" in again.output


def test_table_and_nll_only(smollm):
    result = CliRunner().invoke(main, ["eval", *FAST, "--metrics", "nll"])
    assert result.exit_code == 0, result.output
    assert "reference ppl" in result.output and "BLEU" not in result.output
    assert "sentences/s" not in result.output  # nll alone does not generate


def test_reference_nll_matches_an_unbatched_computation(smollm):
    """Batched right-padded scoring equals scoring each sentence alone."""
    import torch

    from almak.modeling.engines.scoring import reference_nll
    from almak.modeling.text.data import load_testset
    from almak.modeling.text.prompts import Prompt

    ts = load_testset("wmt22:de-en").head(3)
    prompt = Prompt("alma", "de", "en")
    batched = reference_nll(smollm.model, smollm.tokenizer, ts.sources, ts.references, prompt, batch_size=3)
    total, tokens = 0.0, 0
    for s, r in zip(ts.sources, ts.references):
        p = smollm.tokenizer(prompt.build(s))["input_ids"]
        c = smollm.tokenizer(" " + r, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = smollm.model(torch.tensor([p + c])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        total -= sum(float(logp[len(p) + i - 1, t]) for i, t in enumerate(c))
        tokens += len(c)
    assert batched.tokens == tokens
    assert batched.total == __import__("pytest").approx(total, rel=1e-4)  # fp32, padding changes summation order


def test_bad_input(tmp_path):
    cases = [
        (["--testset", "wmt22:de-fr"], "no bundled WMT22 set"),
        (["--metrics", "bleu,foo"], "unknown metric"),
        (["--testset", str(tmp_path / "missing.json")], "nor an existing file"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["eval", *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)


def test_quant_int8_on_load_keeps_perplexity():
    """int8 per-channel RTN: +0.65% reference perplexity on 200 WMT22 de-en sentences; 2% allowed on 20."""
    reports = {}
    for extra in ([], ["--quant", "int8"]):
        result = CliRunner().invoke(main, ["eval", "--limit", "20", "--metrics", "nll", "--device", "cpu", "--dtype", "float32",
                                           "--format", "json", *extra])
        assert result.exit_code == 0, result.output
        reports[bool(extra)] = json.loads(result.stdout)
    float_r, q = reports[False], reports[True]
    assert q["quant"] == {"bits": 8, "group_size": -1, "sym": True, "include_lm_head": False, "method": "rtn-on-load"}
    assert abs(q["ppl"] / float_r["ppl"] - 1) < 0.02
    assert q["weight_bytes"] < 0.5 * float_r["weight_bytes"]  # projections in int8; embeddings stay fp32


def test_quant_int4_translate_and_bad_group_size():
    result = CliRunner().invoke(main, ["translate", "--src", "de", "--tgt", "en", "--quant", "int4", "--group-size",
                                       "64", "--num-beams", "1", "--max-new-tokens", "8", "--device", "cpu"],
                                input="Guten Morgen.\n")
    assert result.exit_code == 0, result.output
    assert "quantized 210 linears to int4 sym g64" in result.stderr and result.stdout.strip()
    bad = CliRunner().invoke(main, ["eval", "--group-size", "64"])
    assert bad.exit_code == 1 and "--group-size needs --quant" in bad.output



def test_flores200_testset_with_flores_codes(tiny_llama_dir, tmp_path):
    """flores200:deu_Latn-eng_Latn from a folder in the dataset's layout, the direction named by FLORES codes: the
    same report as the same three pairs given as a .tsv file."""
    from pathlib import Path

    flores = Path(__file__).resolve().parent.parent / "data" / "flores200"
    common = ["eval", str(tiny_llama_dir), "--limit", "3", "--metrics", "nll", "--device", "cpu", "--dtype",
              "float32", "--format", "json"]
    result = CliRunner().invoke(main, [*common, "--testset", "flores200:deu_Latn-eng_Latn", "--flores-dir",
                                       str(flores)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["testset"], report["lang_pair"], report["n"]) == ("flores200:deu_Latn-eng_Latn", "de-en", 3)
    sources = (flores / "devtest" / "deu_Latn.devtest").read_text(encoding="utf-8").splitlines()[:3]
    refs = (flores / "devtest" / "eng_Latn.devtest").read_text(encoding="utf-8").splitlines()[:3]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{s}\t{r}\n" for s, r in zip(sources, refs)), encoding="utf-8")
    same = CliRunner().invoke(main, [*common, "--testset", str(tsv), "--lang-pair", "deu_Latn-eng_Latn"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["nll"] == report["nll"]
    other = CliRunner().invoke(main, [*common, "--testset", "wmt22:de-en"])
    assert json.loads(other.stdout)["nll"] != report["nll"]


def test_translate_yoruba_with_llamax_prompt(tiny_llama_dir):
    from almak.modeling.text.prompts import Prompt

    for src, tgt in (("yo", "en"), ("yor_Latn", "eng_Latn")):
        result = CliRunner().invoke(main, ["translate", str(tiny_llama_dir), "--src", src, "--tgt", tgt, "--prompt",
                                           "llamax", "--num-beams", "1", "--max-new-tokens", "4", "--device", "cpu"],
                                    input="Ẹ kú àárọ̀\n")
        assert result.exit_code == 0, result.output
        assert len(result.stdout.split("\n")) == 2
    assert "from Yoruba to English" in Prompt("llamax", "yor_Latn", "eng_Latn").build("x")
