"""Means over directions, deltas against a baseline and the checks of a baseline report (no model)."""
import json

import pytest

from almak.errors import AlmakError
from almak.eval.compare import check_baseline, compare, mean_report, read_report, report_path


def direction(pair, n=3, **scores):
    return {"testset": f"wmt22:{pair}", "lang_pair": pair, "n": n, "prompt": "alma", **scores}


def multi(*directions):
    by_pair = {d["lang_pair"]: d for d in directions}
    return {"model": "m", "directions": by_pair, "mean": mean_report(by_pair)}


def test_mean_is_unweighted_and_none_stays_none():
    mean = mean_report({"de-en": direction("de-en", n=100, bleu=30.0, ppl=10.0, comet=None),
                        "en-de": direction("en-de", n=2, bleu=20.0, ppl=20.0, comet=0.8)})
    assert (mean["bleu"], mean["ppl"], mean["comet"], mean["n_directions"]) == (25.0, 15.0, None, 2)
    assert "chrf" not in mean


def test_compare_several_directions():
    report = multi(direction("de-en", bleu=28.0, ppl=11.0), direction("en-de", bleu=19.0, ppl=26.0))
    base = multi(direction("de-en", bleu=30.0, ppl=10.0), direction("en-de", bleu=20.0, ppl=20.0))
    out = compare(report, base)
    assert out["baseline"] is base
    assert out["directions"]["de-en"]["delta"] == pytest.approx({"bleu": -2.0, "ppl": 1.0, "ppl_relative": 0.1})
    assert out["directions"]["en-de"]["delta"] == pytest.approx({"bleu": -1.0, "ppl": 6.0, "ppl_relative": 0.3})
    assert out["mean"]["delta"] == pytest.approx({"bleu": -1.5, "ppl": 3.5, "ppl_relative": 18.5 / 15 - 1})
    assert out["worst"]["bleu"] == {"direction": "de-en", "delta": pytest.approx(-2.0)}
    assert out["worst"]["ppl_relative"] == {"direction": "en-de", "delta": pytest.approx(0.3)}
    assert "delta" not in report["directions"]["de-en"]  # the report given is left as it was


def test_compare_one_direction_against_a_one_direction_of_a_multi_report():
    out = compare(direction("de-en", chrf=50.0, comet=None), multi(direction("de-en", chrf=55.0, comet=0.8)))
    assert out["delta"] == pytest.approx({"chrf": -5.0})  # no number for COMET: no delta


def test_a_baseline_made_with_other_settings_is_named_in_a_warning(caplog):
    compare(direction("de-en", bleu=1.0, num_beams=1), direction("de-en", bleu=2.0, num_beams=5))
    assert "num_beams: 1 vs 5" in caplog.text


@pytest.mark.parametrize("sizes, metrics, message", [
    ({"de-en": 3, "en-zh": 3}, ["nll"],
     "covers de-en, en-de, this run de-en, en-zh: evaluate both with the same --testset"),
    ({"de-en": 3}, ["nll"], "covers de-en, en-de, this run de-en"),
    ({"de-en": 3, "en-de": 2}, ["nll"], "has 3 sentences of en-de, this run 2: evaluate both with the same --limit"),
    ({"de-en": 3, "en-de": 3}, ["bleu", "nll"], "has the metrics nll for de-en, this run bleu,nll: evaluate both with"),
])
def test_check_baseline_refuses(sizes, metrics, message):
    base = multi(direction("de-en", nll=2.0, ppl=7.0), direction("en-de", nll=2.0, ppl=7.0))
    check_baseline(base, {"en-de": 3, "de-en": 3}, ["nll"], "'b'")  # order does not matter
    with pytest.raises(AlmakError, match=message.replace("(", r"\(")):
        check_baseline(base, sizes, metrics, "'b'")


def test_report_path_and_read_report(tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    run.mkdir()
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    (run / "report.json").write_text(json.dumps(direction("de-en", bleu=1.0)), encoding="utf-8")
    assert report_path(str(run)) == run / "report.json" and report_path(str(run / "report.json")) == run / "report.json"
    assert report_path(str(model)) is None and report_path("smollm2-135m") is None  # models
    assert read_report(run / "report.json")["bleu"] == 1.0
    (run / "other.json").write_text('{"bleu": 1}', encoding="utf-8")
    with pytest.raises(AlmakError, match="is not a report of almak eval"):
        read_report(run / "other.json")
    with pytest.raises(AlmakError, match="does not exist"):
        read_report(run / "missing.json")
