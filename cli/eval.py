"""``almak eval``: translate a test set and score it."""

from __future__ import annotations

import json

import click

from almak.cli.common import (
    bleu_tokenize_option,
    fmt,
    generation_options,
    metric_rows,
    model_options,
    print_columns,
    print_table,
    quant_config,
    stage_bars,
)
from almak.eval.compare import directions_of
from almak.eval.evaluate import EvalConfig, evaluate
from almak.eval.metrics import parse_metrics
from almak.modeling.engines.engine import EngineConfig
from almak.modeling.engines.generate import GenerationConfig


@click.command(name="eval")
@model_options
@click.option("--testset", default="wmt22:de-en", show_default=True,
              help="wmt22:{de,ru,zh}-en or en-{de,ru,zh} (bundled), wmt22:all for all six; flores200:deu_Latn-yor_Latn "
                   "(devtest) or flores200-dev:... read from --flores-dir; or a file: ALMA JSON/JSONL ('translation' "
                   "records), course-project JSONL (langs/src/ref) or a .tsv of source<TAB>reference (its direction "
                   "from --lang-pair or its name: test.de-en.tsv). A comma-separated list of these evaluates each "
                   "direction in one run, the model loaded once: a row each and their unweighted mean.")
@click.option("--flores-dir", envvar="ALMAK_FLORES200", type=click.Path(file_okay=False),
              help="The FLORES-200 dataset folder (dev/ and devtest/ inside) for flores200:... test sets "
                   "[env: ALMAK_FLORES200].")
@click.option("--lang-pair", help="Direction (de-en, deu_Latn-yor_Latn) for files that do not name it.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N sentences (of each direction).")
@click.option("--metrics", default="bleu,chrf,nll", show_default=True,
              help="Comma-separated: bleu, spbleu (BLEU on FLORES-200's SentencePiece pieces, as LLaMAX reports), "
                   "chrf, comet, nll (reference perplexity under the prompt; nll alone skips generation).")
@bleu_tokenize_option
@click.option("--comet-model", default="Unbabel/wmt22-comet-da", show_default=True,
              help="COMET model: hub name or a local folder with checkpoints/model.ckpt.")
@click.option("--baseline", metavar="BASE",
              help="Compare with BASE, direction by direction: an earlier almak eval --out folder (or its "
                   "report.json), which must cover the same directions, numbers of sentences and metrics; or a model "
                   "(anything MODEL takes), evaluated after MODEL in this run with the same settings and prompt "
                   "(--quant applies to MODEL only). Shows each score, the baseline's and the change, and the "
                   "direction that loses most.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for report.json and the hypotheses: hyps.txt, or hyps.de-en.txt ... for several "
                   "directions (written when complete).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--format", "fmt_", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json prints the whole report as one JSON object on stdout.")
@generation_options
def eval_cmd(model, quant, group_size, device, dtype, prompt_family, testset, flores_dir, lang_pair, limit, metrics,
             bleu_tokenize, comet_model, baseline, out_dir, overwrite, fmt_, num_beams, max_new_tokens, batch_size,
             engine, tensor_parallel_size, cuda_graphs):
    """Translate a test set with MODEL and score it: BLEU, chrF, COMET, reference perplexity, speed, size.

    MODEL: smollm2-135m (the default), a Hugging Face folder, a .gguf file, or a hub id.

    Several test sets (a list, or wmt22:all) give a row per direction and their unweighted mean; --baseline adds,
    for each, the baseline's scores, the change, and the direction that loses most.

    \b
    Examples:
      almak eval --testset wmt22:de-en --limit 100 --num-beams 1
      almak eval LLaMAX/LLaMAX3-8B-Alpaca --testset flores200:eng_Latn-yor_Latn \\
          --flores-dir flores200_dataset --metrics spbleu,chrf
      almak eval --testset wmt22:all --metrics nll --limit 50 --out runs/float
      almak eval --quant int4 --testset wmt22:all --metrics nll --limit 50 --baseline runs/float
    """

    config = EvalConfig(
        metrics=tuple(parse_metrics(metrics)), comet_model=comet_model, bleu_tokenize=bleu_tokenize,
        generation=GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    engine=engine, cuda_graphs=cuda_graphs),
    )
    engine_config = EngineConfig(name=engine, device=device, dtype=dtype, quant=quant_config(quant, group_size),
                                 prompt=prompt_family, tensor_parallel_size=tensor_parallel_size,
                                 cuda_graphs=cuda_graphs)
    with stage_bars() as progress:
        result = evaluate(model, testset, config, engine_config, lang_pair=lang_pair, flores_dir=flores_dir,
                          limit=limit, baseline=baseline, out=out_dir, overwrite=overwrite, progress=progress)
    report, testsets, base_file = result.report, result.testsets, result.baseline_file
    base_report = report.get("baseline")
    if fmt_ == "json":
        click.echo(json.dumps(report, ensure_ascii=False))
        return

    first = next(iter(directions_of(report).values()))
    generated = "sentences_per_s" in first
    rows = [("model", report["model"])]
    if base_report is not None:
        rows.append(("baseline", f"{base_report.get('model', '?')} "
                                 + (f"(report {base_file})" if base_file else "(evaluated in this run)")))
    if len(testsets) == 1:
        ts = testsets[0]
        rows.append(("test set", f"{ts.name} ({ts.lang_pair}, {len(ts.sources)} sentences)"))
    else:
        rows.append(("test sets", ", ".join(ts.name for ts in testsets)))
    rows += [("engine", f"{engine}, {report['dtype']} on {report['device']} ({report['dtype_choice']})"
              + (f", tensor parallel {tensor_parallel_size}" if tensor_parallel_size > 1 else "")),
             ("prompt / beams", f"{report['prompt']} / {num_beams}" if generated else report["prompt"])]
    tail = [("peak memory", f"{report['peak_memory_bytes'] / 2**20:.0f} MiB ({report['peak_memory_kind']})"),
            ("weight bytes", f"{report['weight_bytes'] / 2**20:.1f} MiB")]
    if out_dir:
        tail.append(("written to", out_dir))
    if len(testsets) > 1:
        print_table(rows)
        print_directions(report)
        print_table(tail)
        return
    if base_report is None:
        rows += metric_rows(report)
    else:
        rows += comparison_rows(report, directions_of(base_report)[report["lang_pair"]], report["delta"])
    if generated:
        rows += [("sentences/s", fmt(report["sentences_per_s"])),
                 ("generated tokens/s", fmt(report["generated_tokens_per_s"], 1))]
    print_table(rows + tail)


# The scores of a table's columns: key, label, digits.
SCORES = (("bleu", "BLEU", 2), ("spbleu", "spBLEU", 2), ("chrf", "chrF", 2), ("comet", "COMET", 4), ("ppl", "ppl", 3))
LABELS = {"bleu": "BLEU", "spbleu": "spBLEU", "chrf": "chrF", "comet": "COMET", "ppl_relative": "ppl"}


def _signed(x, digits) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def comparison_rows(report: dict, base: dict, delta: dict) -> list[tuple[str, str]]:
    """A single direction's scores with the baseline's and the change, one row each."""
    rows = []
    for key, label, digits in SCORES:
        if key in report:
            change = _signed(delta.get(key), digits)
            if key == "ppl" and "ppl_relative" in delta:
                change += f" ({delta['ppl_relative']:+.1%})"
            rows.append(("reference ppl" if key == "ppl" else label,
                         f"{fmt(report[key], digits)}  baseline {fmt(base.get(key), digits)}  Δ {change}"))
    return rows


def print_directions(report: dict) -> None:
    """A row per direction and the mean row, a column per score (with the baseline's and the change when there is
    one), then what the mean is and, against a baseline, the direction that loses most."""
    directions, mean = report["directions"], report["mean"]
    compared = "baseline" in report
    base = directions_of(report["baseline"]) if compared else {}
    base_mean = report["baseline"].get("mean", {}) if compared else {}
    keys = [(key, label, digits) for key, label, digits in SCORES if key in mean]
    header = ["direction", "n"]
    for key, label, _ in keys:
        header += [label] + (["base", f"Δ{label}"] + ([f"Δ{label}%"] if key == "ppl" else []) if compared else [])

    def cells(r: dict, b: dict) -> list[str]:
        out = []
        for key, _, digits in keys:
            out.append(fmt(r.get(key), digits))
            if compared:
                out += [fmt(b.get(key), digits), _signed(r["delta"].get(key), digits)]
                if key == "ppl":
                    relative = r["delta"].get("ppl_relative")
                    out.append("n/a" if relative is None else f"{relative:+.1%}")
        return out

    rows = [[pair, str(r["n"]), *cells(r, base.get(pair, {}))] for pair, r in directions.items()]
    rows.append(["mean", "", *cells(mean, base_mean)])
    print_columns(header, rows)
    click.echo(f"  mean: unweighted, over the {len(directions)} directions (each counts once, whatever its number of "
               "sentences)" + ("; its Δ: the difference of the two means" if compared else ""))
    if compared and report["worst"]:
        worst = [f"{LABELS[key]} {w['direction']} ("
                 + (f"{w['delta']:+.1%}" if key == "ppl_relative" else _signed(w["delta"], 4 if key == "comet" else 2))
                 + ")" for key, w in report["worst"].items()]
        click.echo(f"  loses most: {', '.join(worst)}")
