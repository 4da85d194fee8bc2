"""`almak eval` over several directions and against a baseline, on the tiny random LLaMA (fast; the numbers only
have to agree with each other)."""
import json

import pytest
import sacrebleu
from click.testing import CliRunner

from almak.cli.main import main
from almak.modeling.text.data import load_testset

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)

NLL = ["--metrics", "nll", "--device", "cpu", "--dtype", "float32", "--format", "json"]


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """Three WMT22 pairs of de-en and two of en-de, as .tsv files that name their direction."""
    folder = tmp_path_factory.mktemp("sets")
    paths = []
    for pair, n in (("de-en", 3), ("en-de", 2)):
        ts = load_testset(f"wmt22:{pair}").head(n)
        path = folder / f"test.{pair}.tsv"
        path.write_text("".join(f"{s}\t{r}\n" for s, r in zip(ts.sources, ts.references)), encoding="utf-8")
        paths.append(str(path))
    return paths


def eval_json(*args) -> dict:
    result = CliRunner().invoke(main, ["eval", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_each_direction_as_when_evaluated_alone(tiny_llama_dir, two_files, tmp_path):
    out = tmp_path / "run"
    report = eval_json(tiny_llama_dir, "--testset", ",".join(two_files), *NLL, "--out", out)
    assert list(report["directions"]) == ["de-en", "en-de"] and report["model"] == str(tiny_llama_dir)
    for path, pair in zip(two_files, ("de-en", "en-de")):
        alone = eval_json(tiny_llama_dir, "--testset", path, *NLL)
        mine = report["directions"][pair]
        assert (mine["testset"], mine["n"], mine["nll"], mine["ppl"]) == (path, alone["n"], alone["nll"], alone["ppl"])
    ppls = [r["ppl"] for r in report["directions"].values()]
    assert report["mean"]["ppl"] == pytest.approx(sum(ppls) / 2) and report["mean"]["over"] == "directions, unweighted"
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # nll alone generates no hypotheses


def test_generated_scores_and_hyps_per_direction(two_files, tmp_path):
    """The embedded model (the tiny random one scores 0 everywhere): each direction's BLEU and chrF are of its own
    hypotheses, written to hyps.<pair>.txt, which are those of evaluating it alone (checked for one direction: a
    generating run takes a minute on a busy 2-core CPU); the table's rows show them."""
    gen = ["--metrics", "bleu,chrf", "--limit", "2", "--max-new-tokens", "8", "--num-beams", "1", "--device", "cpu",
           "--dtype", "float32"]
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["eval", "--testset", ",".join(two_files), *gen, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean: unweighted, over the 2 directions" in result.stdout
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for pair in ("de-en", "en-de"):  # each direction's scores are of its own hypotheses and references
        hyps = (out / f"hyps.{pair}.txt").read_text(encoding="utf-8").splitlines()
        refs = load_testset(f"wmt22:{pair}").head(2).references
        assert report["directions"][pair]["bleu"] == pytest.approx(
            sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score, abs=0.01)
        assert report["directions"][pair]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=0.01)
    alone = eval_json("--testset", two_files[1], *gen, "--format", "json", "--out", tmp_path / "alone")  # CPU time
    assert (out / "hyps.en-de.txt").read_text() == (tmp_path / "alone" / "hyps.txt").read_text()
    assert [report["directions"]["en-de"][k] for k in ("n", "bleu", "chrf")] == [alone[k] for k in ("n", "bleu", "chrf")]
    scores = [report["directions"][pair][k] for pair in ("de-en", "en-de") for k in ("bleu", "chrf")]
    assert len(set(scores)) == 4  # distinct numbers: a row or the mean showing another's would be seen
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["direction"] == ["direction", "n", "BLEU", "chrF"]
    for pair, r in report["directions"].items():
        assert rows[pair][1:] == [str(r["n"]), f"{r['bleu']:.2f}", f"{r['chrf']:.2f}"]
    assert rows["mean"][1:] == [f"{report['mean']['bleu']:.2f}", f"{report['mean']['chrf']:.2f}"]


def test_baseline_report(tiny_llama_dir, two_files, tmp_path):
    """The deltas are the differences of the two reports; the table shows them and the direction that loses most."""
    testset = ",".join(two_files)
    base = eval_json(tiny_llama_dir, "--testset", testset, *NLL, "--out", tmp_path / "float")
    int4 = ["--quant", "int4", "--group-size", "32"]
    mine = eval_json(tiny_llama_dir, *int4, "--testset", testset, *NLL, "--baseline", tmp_path / "float")
    assert mine["baseline"] == base
    for pair, r in mine["directions"].items():
        b = base["directions"][pair]
        assert r["delta"]["ppl"] == pytest.approx(r["ppl"] - b["ppl"])
        assert r["delta"]["ppl_relative"] == pytest.approx(r["ppl"] / b["ppl"] - 1)
        assert r["delta"]["nll"] == pytest.approx(r["nll"] - b["nll"])
    assert mine["mean"]["delta"]["ppl"] == pytest.approx(mine["mean"]["ppl"] - base["mean"]["ppl"])
    rel = {pair: r["delta"]["ppl_relative"] for pair, r in mine["directions"].items()}
    assert mine["worst"]["ppl_relative"]["direction"] == max(rel, key=rel.get)

    table = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), *int4, "--testset", testset, *NLL[:-2],
                                      "--baseline", str(tmp_path / "float" / "report.json")])
    assert table.exit_code == 0, table.output
    worst = max(rel, key=rel.get)
    assert f"loses most: ppl {worst} ({rel[worst]:+.1%})" in table.stdout
    assert f"{tiny_llama_dir} (report {tmp_path / 'float' / 'report.json'})" in table.stdout


def test_baseline_report_of_one_direction(tiny_llama_dir, two_files, tmp_path):
    base = eval_json(tiny_llama_dir, "--testset", two_files[1], *NLL, "--out", tmp_path / "float")
    int4 = [tiny_llama_dir, "--quant", "int4", "--group-size", "32", "--testset", two_files[1], *NLL[:-2]]
    mine = eval_json(*int4, "--format", "json", "--baseline", tmp_path / "float")
    assert mine["baseline"] == base and mine["lang_pair"] == "en-de"
    assert mine["delta"]["ppl"] == pytest.approx(mine["ppl"] - base["ppl"])
    assert mine["delta"]["ppl_relative"] == pytest.approx(mine["ppl"] / base["ppl"] - 1)
    table = CliRunner().invoke(main, ["eval", *map(str, int4), "--baseline", str(tmp_path / "float")])
    assert table.exit_code == 0, table.output
    assert (f"{mine['ppl']:.3f}  baseline {base['ppl']:.3f}  Δ {mine['delta']['ppl']:+.3f} "
            f"({mine['delta']['ppl_relative']:+.1%})") in table.stdout


def test_baseline_model_in_the_same_run(tiny_llama_dir, two_files):
    """A model as --baseline is evaluated with the same settings: its numbers are those of its own run."""
    testset = ",".join(two_files)
    mine = eval_json(tiny_llama_dir, "--quant", "int4", "--group-size", "32", "--testset", testset, *NLL,
                     "--baseline", tiny_llama_dir)
    alone = eval_json(tiny_llama_dir, "--testset", testset, *NLL)
    assert "quant" in mine and "quant" not in mine["baseline"]  # --quant is MODEL's alone
    for pair, r in alone["directions"].items():
        assert mine["baseline"]["directions"][pair]["nll"] == r["nll"]
        assert mine["directions"][pair]["delta"]["nll"] == pytest.approx(mine["directions"][pair]["nll"] - r["nll"])
    assert mine["baseline"]["mean"] == alone["mean"]
