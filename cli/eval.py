"""``almak eval``: translate a test set and score it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from almak.cli.common import (
    bleu_tokenize_option,
    fmt,
    generation_options,
    load_for_engine,
    metric_rows,
    model_options,
    print_table,
    progress_bar,
    quant_config,
)
from almak.eval.data import load_testset
from almak.eval.evaluate import EvalConfig, check_new_output, evaluate, write_eval_dir
from almak.eval.generate import GenerationConfig
from almak.eval.metrics import check_metrics, parse_metrics


@click.command(name="eval")
@model_options
@click.option("--testset", default="wmt22:de-en", show_default=True,
              help="wmt22:{de,ru,zh}-en or en-{de,ru,zh} (bundled); flores200:deu_Latn-yor_Latn (devtest) or "
                   "flores200-dev:... read from --flores-dir; or a file: ALMA JSON/JSONL ('translation' records), "
                   "course-project JSONL (langs/src/ref) or a .tsv of source<TAB>reference.")
@click.option("--flores-dir", envvar="ALMAK_FLORES200", type=click.Path(file_okay=False),
              help="The FLORES-200 dataset folder (dev/ and devtest/ inside) for flores200:... test sets "
                   "[env: ALMAK_FLORES200].")
@click.option("--lang-pair", help="Direction (de-en, deu_Latn-yor_Latn) for files that do not name it.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N sentences.")
@click.option("--metrics", default="bleu,chrf,nll", show_default=True,
              help="Comma-separated: bleu, spbleu (BLEU on FLORES-200's SentencePiece pieces, as LLaMAX reports), "
                   "chrf, comet, nll (reference perplexity under the prompt; nll alone skips generation).")
@bleu_tokenize_option
@click.option("--comet-model", default="Unbabel/wmt22-comet-da", show_default=True,
              help="COMET model: hub name or a local folder with checkpoints/model.ckpt.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for hyps.txt and report.json (written when complete).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--format", "fmt_", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json prints the whole report as one JSON object on stdout.")
@generation_options
def eval_cmd(model, quant, group_size, device, dtype, prompt_family, testset, flores_dir, lang_pair, limit, metrics,
             bleu_tokenize, comet_model, out_dir, overwrite, fmt_, num_beams, max_new_tokens, batch_size, engine, tensor_parallel_size, cuda_graphs):
    """Translate a test set with MODEL and score it: BLEU, chrF, COMET, reference perplexity, speed, size.

    MODEL: smollm2-135m (the default), a Hugging Face folder, a .gguf file, or a hub id.

    \b
    Example:
      almak eval --testset wmt22:de-en --limit 100 --num-beams 1
      almak eval LLaMAX/LLaMAX3-8B-Alpaca --testset flores200:eng_Latn-yor_Latn \\
          --flores-dir flores200_dataset --metrics spbleu,chrf
    """

    config = EvalConfig(
        metrics=tuple(parse_metrics(metrics)), comet_model=comet_model, bleu_tokenize=bleu_tokenize,
        generation=GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    engine=engine, cuda_graphs=cuda_graphs),
    )
    ts = load_testset(testset, lang_pair, flores_dir).head(limit)
    check_metrics(list(config.metrics), ts.tgt, bleu_tokenize)  # a missing tokenizer fails now, not after translating
    if out_dir:
        check_new_output(Path(out_dir), overwrite, inputs=(model, testset, flores_dir))
    qconfig = quant_config(quant, group_size)
    lm, config.prompt = load_for_engine(model, device, dtype, prompt_family, qconfig, config.generation,
                                        tensor_parallel_size)
    bars = []

    def progress(stage, total):  # one bar per stage, the previous one closed first
        for bar in bars:
            bar.close()
        bars.append(progress_bar(stage, total))
        return bars[-1].update

    try:
        report, hyps = evaluate(lm.model, lm.tokenizer, ts, config, progress)
    finally:
        for bar in bars:
            bar.close()
    report["model"] = lm.ref
    report["dtype_choice"] = lm.dtype_choice
    if engine == "vllm":
        report["tensor_parallel_size"] = tensor_parallel_size
    if qconfig:
        report["quant"] = {**dataclasses.asdict(qconfig), "method": "rtn-on-load"}
    if out_dir:
        write_eval_dir(Path(out_dir), report, hyps, overwrite)
    if fmt_ == "json":
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    rows = [("model", lm.ref), ("test set", f"{ts.name} ({ts.lang_pair}, {len(ts.sources)} sentences)"),
            ("engine", f"{engine}, {report['dtype']} on {report['device']} ({lm.dtype_choice})"
             + (f", tensor parallel {tensor_parallel_size}" if tensor_parallel_size > 1 else "")),
            ("prompt / beams", f"{config.prompt} / {num_beams}" if "sentences_per_s" in report else config.prompt)]
    rows += metric_rows(report)
    if "sentences_per_s" in report:
        rows += [("sentences/s", fmt(report["sentences_per_s"])),
                 ("generated tokens/s", fmt(report["generated_tokens_per_s"], 1))]
    rows += [("peak memory", f"{report['peak_memory_bytes'] / 2**20:.0f} MiB ({report['peak_memory_kind']})"),
             ("weight bytes", f"{report['weight_bytes'] / 2**20:.1f} MiB")]
    if out_dir:
        rows.append(("written to", out_dir))
    print_table(rows)
