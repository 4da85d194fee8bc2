"""``almak score``: score existing translations as sacrebleu and comet-score do."""

from __future__ import annotations

import json

import click

from almak.cli.common import bleu_tokenize_option, metric_rows, print_table
from almak.errors import AlmakError
from almak.eval.evaluate import ScoreConfig
from almak.eval.evaluate import score as run_score
from almak.eval.metrics import check_metrics, parse_metrics
from almak.modeling.text.data import read_lines
from almak.modeling.text.languages import parse_lang_pair


@click.command()
@click.option("--src", "src_path", required=True, type=click.Path(dir_okay=False), help="Source sentences.")
@click.option("--hyp", "hyp_path", required=True, type=click.Path(dir_okay=False), help="System translations.")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False), help="References.")
@click.option("--lang-pair", required=True,
              help="Direction, e.g. de-en or deu_Latn-yor_Latn (the target picks the BLEU tokenizer).")
@click.option("--metrics", default="bleu,chrf", show_default=True,
              help="Comma-separated: bleu, spbleu (FLORES-200 SentencePiece BLEU), chrf, comet.")
@bleu_tokenize_option
@click.option("--comet-model", default="Unbabel/wmt22-comet-da", show_default=True,
              help="COMET model: hub name or a local folder with checkpoints/model.ckpt.")
@click.option("--format", "fmt_", type=click.Choice(["table", "json"]), default="table", show_default=True)
def score(src_path, hyp_path, ref_path, lang_pair, metrics, bleu_tokenize, comet_model, fmt_):
    """Score existing translations (one per line) as sacrebleu and comet-score do.

    \b
    Example:
      almak score --src test.de --hyp hyps.en --ref test.en --lang-pair de-en
    """

    src, tgt = parse_lang_pair(lang_pair)
    names = parse_metrics(metrics)
    if "nll" in names:  # before reading any file
        raise AlmakError("nll needs a model; use almak eval for it")
    check_metrics(names, tgt, bleu_tokenize)
    sources = read_lines(src_path, "source file")
    hyps = read_lines(hyp_path, "hypothesis file")
    refs = read_lines(ref_path, "reference file")
    report = run_score(sources, hyps, refs, src, tgt, ScoreConfig(tuple(names), comet_model, bleu_tokenize))
    if fmt_ == "json":
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    rows = [("lang pair / lines", f"{lang_pair} / {len(hyps)}")] + metric_rows(report)
    for key in ("bleu_signature", "spbleu_signature", "chrf_signature"):
        if key in report:
            rows.append((key.replace("_", " "), report[key]))
    print_table(rows)
