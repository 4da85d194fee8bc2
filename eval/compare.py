"""Reports across directions and against a baseline: the mean over directions, deltas, the direction that loses most.

A report here is what :func:`almak.eval.evaluate.evaluate` returns for one direction, or the multi-direction report
of :func:`almak.eval.evaluate.evaluate_testsets` (``{"directions": {pair: report}, "mean": ...}``); an ``almak eval
--out`` folder holds either as ``report.json``.

>>> base = {"lang_pair": "de-en", "n": 2, "bleu": 30.0, "nll": 2.0, "ppl": 7.39}
>>> compare({**base, "bleu": 28.5, "ppl": 8.13}, base)["delta"]["bleu"]
-1.5
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from almak.errors import AlmakError
from almak.eval.metrics import METRICS

log = logging.getLogger(__name__)

# The numbers a report can hold, in the order tables show them: the higher the better, except nll and ppl.
SCORES = ("bleu", "spbleu", "chrf", "comet", "nll", "ppl")
HIGHER_IS_BETTER = ("bleu", "spbleu", "chrf", "comet")


def directions_of(report: dict) -> dict[str, dict]:
    """A report's per-direction reports by language pair: a multi-direction report's ``directions``, or a
    single-direction report on its own."""
    return report["directions"] if "directions" in report else {report["lang_pair"]: report}


def report_metrics(report: dict) -> list[str]:
    """The metrics (names as ``--metrics`` takes them) a one-direction report was made with."""
    return [m for m in METRICS if m in report]


def mean_report(directions: dict[str, dict]) -> dict:
    """The unweighted mean over ``directions`` of each score they all have: each direction counts once, whatever its
    number of sentences (``ppl`` is the mean of their perplexities). A score that is None in one direction (COMET
    that could not be had) is None.

    >>> mean_report({"de-en": {"bleu": 30.0}, "en-de": {"bleu": 20.0}})
    {'over': 'directions, unweighted', 'n_directions': 2, 'bleu': 25.0}
    """
    mean: dict = {"over": "directions, unweighted", "n_directions": len(directions)}
    for key in SCORES:
        if all(key in r for r in directions.values()):
            values = [r[key] for r in directions.values()]
            mean[key] = None if None in values else sum(values) / len(values)
    return mean


def delta(report: dict, baseline: dict) -> dict:
    """``report`` minus ``baseline`` for each score both have a number for; ``ppl_relative`` is the relative change
    of perplexity (0.05: 5% higher than the baseline's)."""
    out = {key: report[key] - baseline[key] for key in SCORES
           if report.get(key) is not None and baseline.get(key) is not None}
    if "ppl" in out:
        out["ppl_relative"] = report["ppl"] / baseline["ppl"] - 1
    return out


def worst(directions: dict[str, dict]) -> dict:
    """For each score, the direction whose ``delta`` loses most: the lowest change of BLEU, spBLEU, chrF and COMET,
    the highest relative change of perplexity."""
    out = {}
    for key in (*HIGHER_IS_BETTER, "ppl_relative"):
        changes = {pair: r["delta"][key] for pair, r in directions.items() if key in r["delta"]}
        if changes:
            pair = (max if key == "ppl_relative" else min)(changes, key=changes.get)
            out[key] = {"direction": pair, "delta": changes[pair]}
    return out


def compare(report: dict, baseline: dict) -> dict:
    """``report`` with ``baseline`` beside it (``"baseline"``) and a ``delta`` against it: in a single-direction
    report at the top; in a multi-direction one in each direction and in the mean (the difference of the two means),
    with ``worst`` naming the direction that loses most on each score. ``baseline`` covers the same directions
    (:func:`check_baseline`); settings in which the two differ are logged as a warning."""
    differ = _settings_differ(report, baseline)
    if differ:
        log.warning("the baseline was evaluated with other settings (%s, this run's first)", "; ".join(differ))
    base = directions_of(baseline)
    if "directions" not in report:
        return {**report, "baseline": baseline, "delta": delta(report, base[report["lang_pair"]])}
    directions = {pair: {**r, "delta": delta(r, base[pair])} for pair, r in report["directions"].items()}
    base_mean = baseline["mean"] if "mean" in baseline else mean_report(base)
    return {**report, "directions": directions, "mean": {**report["mean"], "delta": delta(report["mean"], base_mean)},
            "baseline": baseline, "worst": worst(directions)}


def report_path(ref: str) -> Path | None:
    """The report.json that ``--baseline`` names (an ``almak eval --out`` folder, or a ``.json`` file), or None when
    it names a model."""
    path = Path(ref).expanduser()
    if path.suffix == ".json":
        return path
    if (path / "report.json").is_file():
        return path / "report.json"
    return None


def read_report(path: str | Path) -> dict:
    """An ``almak eval`` report.json; anything else is an AlmakError."""
    path = Path(path)
    where = f"baseline report {str(path)!r}"
    if not path.is_file():
        raise AlmakError(f"{where} " + ("is not a regular file" if path.exists() else "does not exist"))
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlmakError(f"{where} is not JSON ({e})") from None
    ok = isinstance(report, dict) and ("directions" in report or "lang_pair" in report)
    if ok:
        ok = all(isinstance(r, dict) and isinstance(r.get("n"), int) for r in directions_of(report).values())
    if not ok:
        raise AlmakError(f"{where} is not a report of almak eval (it has no lang_pair and n, nor directions)")
    return report


def check_baseline(baseline: dict, sizes: dict[str, int], metrics: list[str], where: str) -> None:
    """Refuse a baseline report that does not cover the directions of this run (``sizes``: sentences by language
    pair) with the same number of sentences and the same ``metrics``."""
    base = directions_of(baseline)
    if sorted(base) != sorted(sizes):
        raise AlmakError(f"the baseline {where} covers {', '.join(base)}, this run {', '.join(sizes)}: evaluate both "
                         "with the same --testset")
    wanted = [m for m in METRICS if m in metrics]
    for pair, n in sizes.items():
        if base[pair]["n"] != n:
            raise AlmakError(f"the baseline {where} has {base[pair]['n']} sentences of {pair}, this run {n}: evaluate "
                             "both with the same --limit")
        if report_metrics(base[pair]) != wanted:
            raise AlmakError(f"the baseline {where} has the metrics {','.join(report_metrics(base[pair])) or 'none'} "
                             f"for {pair}, this run {','.join(wanted)}: evaluate both with the same --metrics")


def _settings_differ(report: dict, baseline: dict) -> list[str]:
    """The settings (prompt, beams, generation budget) in which ``report``'s first direction differs from its
    baseline's, as ``name: mine vs baseline``."""
    mine, theirs = next(iter(directions_of(report).values())), next(iter(directions_of(baseline).values()))
    generated = any(m in mine for m in HIGHER_IS_BETTER)
    keys = ("prompt", "num_beams", "max_new_tokens") if generated else ("prompt",)
    return [f"{k}: {mine.get(k)} vs {theirs.get(k)}" for k in keys if mine.get(k) != theirs.get(k)]
