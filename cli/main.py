"""The ``almak`` command line: thin click commands that build a config and call one library function."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click

from almak.errors import AlmakError
from almak.eval.bench import SHAPES as BENCH_SHAPES
from almak.eval.generate import ENGINES
from almak.modeling.prune import PruneRecipe

# The CLI takes its defaults from the library's recipe.
PRUNE_DEFAULTS = PruneRecipe()


class AlmakGroup(click.Group):
    """Turns AlmakError (bad input) into a one-line error and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AlmakError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None


@click.group(cls=AlmakGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="almak")
@click.option("-v", "--verbose", is_flag=True, help="Log what almak does (loading, conversions).")
def main(verbose: bool):
    """almak: compress translation LLMs (ALMA, LLaMAX, Tower) and run them on Triton kernels.

    Every command that takes a MODEL defaults to the embedded smollm2-135m.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:  # COMET's pytorch-lightning logs tips and device banners at INFO
        for name in ("lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def progress_bar(desc: str, total: int, unit: str = "sent"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


def model_options(f):
    """The options every command that runs a model shares."""
    f = click.option("--device", default="auto", show_default=True,
                     help="cpu, cuda, cuda:1, ...; auto picks cuda when torch sees a GPU.")(f)
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="Activation/weight dtype; auto is float32 on CPU and float16 on GPU.")(f)
    f = click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
                     help="Prompt family; guessed from the model name when omitted (alma by default).")(f)
    f = click.option("--group-size", type=click.Choice(["32", "64", "128", "256", "-1"]),
                     help="Columns per scale for --quant (-1: one per output channel); "
                          "default 128 for int4, -1 for int8.")(f)
    f = click.option("--quant", type=click.Choice(["int8", "int4"]),
                     help="Quantize the decoder-layer projections at load time (round to nearest, symmetric).")(f)
    f = click.argument("model", required=False)(f)
    return f


def calibration_options(f):
    """--prompt, --device and --dtype of the commands that calibrate layer by layer (quantize, prune)."""
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="Model dtype (quantization scales are stored in it); auto is float32 on CPU and "
                          "float16 on GPU.")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="Where each decoder layer is calibrated (the model waits on the CPU); auto: cuda if "
                          "present.")(f)
    f = click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
                     help="Prompt family of the calibration samples; guessed from the model name when omitted.")(f)
    return f


def load_for_calibration(model, device: str, dtype: str):
    """(loaded model on the CPU, calibration device, prompt family) for quantize and prune."""
    import torch

    from almak.modeling.load import DEFAULT_MODEL, load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    lm = load_model(model or DEFAULT_MODEL, device="cpu", dtype=dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return lm, device


def peak_memory(device: str) -> str:
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (cuda)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (cpu max rss)"


def generation_options(f):
    from almak.eval.generate import GenerationConfig

    d = GenerationConfig()
    f = click.option("--batch-size", type=click.IntRange(min=1), default=d.batch_size, show_default=True,
                     help="Sentences per batch (left-padded).")(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1), default=d.max_new_tokens,
                     show_default=True, help="Generation budget per sentence.")(f)
    f = click.option("--num-beams", type=click.IntRange(min=1), default=d.num_beams, show_default=True,
                     help="Beam size (5 as ALMA evaluates; 1 is greedy).")(f)
    f = click.option("--engine", type=click.Choice(list(ENGINES)), default=d.engine, show_default=True,
                     help="almak: almak's own loop (preallocated KV cache; finished sentences hand their "
                          "batch row to the next; LLaMA-family models). hf: transformers' generate, for "
                          "comparison or other architectures.")(f)
    f = click.option("--cuda-graphs/--no-cuda-graphs", default=d.cuda_graphs, show_default=True,
                     help="With --engine almak on CUDA: replay each decode step as a CUDA graph (captured on first "
                          "use); --no-cuda-graphs runs it eagerly. No effect on the CPU.")(f)
    return f


def quant_config(quant: str | None, group_size: str | None):
    """The QuantConfig of --quant/--group-size, or None."""
    from almak.modeling.surgery import QuantConfig

    if not quant:
        if group_size:
            raise AlmakError("--group-size needs --quant")
        return None
    bits = int(quant[3:])
    return QuantConfig(bits=bits, group_size=int(group_size or (128 if bits == 4 else -1)))


def load(model, device, dtype, prompt_family, qconfig=None):
    """Load MODEL, quantize it on the fly when asked, and settle the prompt family."""
    import torch

    from almak.eval.prompts import guess_family
    from almak.modeling.load import DEFAULT_MODEL, load_model
    from almak.modeling.surgery import quantize_

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
    if qconfig:
        summary = quantize_(lm.model, qconfig)
        kept = f"; kept {', '.join(summary['skipped'])}" if summary["skipped"] else ""
        click.echo(f"quantized {len(summary['quantized'])} linears to {qconfig.describe()}{kept}", err=True)
    return lm, prompt_family or guess_family(lm.ref, lm.tokenizer)


def print_table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    width = max(len(k) for k, _ in rows)
    if title:
        click.echo(title)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")


def fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


@main.command()
@model_options
@click.option("--src", required=True, help="Source language code (de, cs, is, zh, ru, en, ja, uk, fr, ...).")
@click.option("--tgt", required=True, help="Target language code.")
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False), default="-",
              show_default=True, help="Source sentences, one per line ('-' is stdin).")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default="-",
              show_default=True, help="Translations, one per input line ('-' is stdout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@generation_options
def translate(model, quant, group_size, device, dtype, prompt_family, src, tgt, input_path, output_path, overwrite,
              num_beams, max_new_tokens, batch_size, engine, cuda_graphs):
    """Translate lines from SRC to TGT with MODEL, one output line per input line.

    MODEL: smollm2-135m (the default), a Hugging Face folder, a .gguf file, or a hub id.

    Empty lines stay empty. The output file is written only when all lines are done.

    \b
    Example:
      echo "Die Ware hat unter 20 Euro gekostet." | almak translate --src de --tgt en
    """
    from almak.eval.data import read_lines
    from almak.eval.evaluate import check_new_output
    from almak.files import write_text_atomic
    from almak.eval.generate import GenerationConfig
    from almak.eval.generate import translate as run_translate
    from almak.eval.prompts import Prompt, language_name

    language_name(src), language_name(tgt)  # refuse unknown codes before anything is loaded
    if output_path != "-":
        check_new_output(Path(output_path), overwrite)
    if input_path == "-":
        lines = sys.stdin.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise AlmakError("no input lines on stdin")
    else:
        lines = read_lines(input_path, "input file")
    gen = GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           engine=engine, cuda_graphs=cuda_graphs)
    lm, family = load(model, device, dtype, prompt_family, quant_config(quant, group_size))
    with progress_bar("translate", len(lines)) as bar:
        result = run_translate(lm.model, lm.tokenizer, lines, Prompt(family, src, tgt), gen, bar.update)
    text = "".join(h + "\n" for h in result.hypotheses)
    if output_path == "-":
        click.echo(text, nl=False)
    else:
        write_text_atomic(Path(output_path), text)


@main.command(name="eval")
@model_options
@click.option("--testset", default="wmt22:de-en", show_default=True,
              help="wmt22:{de,ru,zh}-en or en-{de,ru,zh} (bundled), or a file: ALMA JSON/JSONL "
                   "('translation' records), course-project JSONL (langs/src/ref) or a .tsv of source<TAB>reference.")
@click.option("--lang-pair", help="Direction (de-en) for files that do not name it.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N sentences.")
@click.option("--metrics", default="bleu,chrf,nll", show_default=True,
              help="Comma-separated: bleu, chrf, comet, nll (reference perplexity under the prompt; "
                   "nll alone skips generation).")
@click.option("--comet-model", default="Unbabel/wmt22-comet-da", show_default=True,
              help="COMET model: hub name or a local folder with checkpoints/model.ckpt.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for hyps.txt and report.json (written when complete).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--format", "fmt_", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json prints the whole report as one JSON object on stdout.")
@generation_options
def eval_cmd(model, quant, group_size, device, dtype, prompt_family, testset, lang_pair, limit, metrics, comet_model, out_dir,
             overwrite, fmt_, num_beams, max_new_tokens, batch_size, engine, cuda_graphs):
    """Translate a test set with MODEL and score it: BLEU, chrF, COMET, reference perplexity, speed, size.

    MODEL: smollm2-135m (the default), a Hugging Face folder, a .gguf file, or a hub id.

    \b
    Example:
      almak eval --testset wmt22:de-en --limit 100 --num-beams 1
    """
    from almak.eval.data import load_testset
    from almak.eval.evaluate import EvalConfig, check_new_output, evaluate, write_eval_dir
    from almak.eval.generate import GenerationConfig
    from almak.eval.metrics import parse_metrics

    config = EvalConfig(
        metrics=tuple(parse_metrics(metrics)), comet_model=comet_model,
        generation=GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    engine=engine, cuda_graphs=cuda_graphs),
    )
    ts = load_testset(testset, lang_pair).head(limit)
    if out_dir:
        check_new_output(Path(out_dir), overwrite)
    qconfig = quant_config(quant, group_size)
    lm, config.prompt = load(model, device, dtype, prompt_family, qconfig)
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
    if qconfig:
        report["quant"] = {**dataclasses.asdict(qconfig), "method": "rtn-on-load"}
    if out_dir:
        write_eval_dir(Path(out_dir), report, hyps, overwrite)
    if fmt_ == "json":
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    rows = [("model", lm.ref), ("test set", f"{ts.name} ({ts.lang_pair}, {len(ts.sources)} sentences)"),
            ("prompt / beams", f"{config.prompt} / {num_beams}" if "sentences_per_s" in report else config.prompt)]
    rows += _metric_rows(report)
    if "sentences_per_s" in report:
        rows += [("sentences/s", fmt(report["sentences_per_s"])),
                 ("generated tokens/s", fmt(report["generated_tokens_per_s"], 1))]
    rows += [("peak memory", f"{report['peak_memory_bytes'] / 2**20:.0f} MiB ({report['peak_memory_kind']})"),
             ("weight bytes", f"{report['weight_bytes'] / 2**20:.1f} MiB")]
    if out_dir:
        rows.append(("written to", out_dir))
    print_table(rows)


def _metric_rows(report: dict) -> list[tuple[str, str]]:
    rows = []
    for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("comet", "COMET")):
        if key in report:
            value = fmt(report[key], 4 if key == "comet" else 2)
            rows.append((label, value if report.get(f"{key}_error") is None else "n/a (see warning)"))
    if "ppl" in report:
        rows.append(("reference ppl", f"{report['ppl']:.3f} (nll {report['nll']:.4f}/token)"))
    return rows


@main.command()
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="gptq", show_default=True,
              help="rtn: round to nearest, no data. gptq: Frantar et al. 2022, calibrated layer by layer.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256", "-1"]), default="128", show_default=True,
              help="Columns per scale (-1: one per output channel); must divide every projection's in_features "
                   "(the embedded model needs 64 or 32).")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (no zero point) or asymmetric.")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ: visit columns by decreasing Hessian diagonal (static groups: no g_idx at run time).")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="GPTQ: dampening, as a fraction of the Hessian's mean diagonal.")
@click.option("--calib", default="alma", show_default=True,
              help="GPTQ calibration: alma (bundled ALMA pairs, cs/de/is/ru/zh <-> en), alma:de-en,en-de, a "
                   "JSON/JSONL file of translation records named *.xx-yy.*, or a plain text file.")
@click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True,
              help="GPTQ: calibration samples (one prompt + reference each).")
@click.option("--seqlen", type=click.IntRange(min=8), default=512, show_default=True,
              help="GPTQ: tokens per calibration sample at most.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration draw.")
@click.option("--clip-search/--no-clip-search", default=None,
              help="GPTQ: each group's range is its min/max shrunk by the factor (1.00 down to 0.75) with the least "
                   "squared rounding error weighted by the calibration inputs' mean square; --no-clip-search keeps "
                   "the plain min/max, as the GPTQ paper and llm-compressor do. Same checkpoint format. "
                   "[default: on with --method gptq]")
@calibration_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (safetensors, compressed-tensors pack-quantized layout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def quantize(model, method, bits, group_size, sym, act_order, damp, calib, nsamples, seqlen, seed, clip_search,
             prompt_family, device, dtype, out_dir, overwrite):
    """Quantize MODEL's decoder-layer projections to 4 or 8 bits and write a checkpoint.

    The checkpoint loads in almak (almak translate/eval DIR) and in transformers with the compressed-tensors
    package, in the layout vLLM reads (not yet run there; see the README for its kernels' limits).

    MODEL: smollm2-135m (default), a Hugging Face folder, a .gguf file, a hub id, or
    a checkpoint of almak prune: its zeros are kept (GPTQ compensates around them), and 2:4 layers become
    2:4 + int4 layers.

    \b
    Example:
      almak quantize --method gptq --bits 4 --group-size 64 --asym --out smollm-w4g64
    """
    import time

    from almak.eval.evaluate import check_new_output
    from almak.eval.prompts import guess_family
    from almak.modeling.calibrate import decoder_layers
    from almak.modeling.checkpoint import read_recipe, save_quantized, vllm_limits
    from almak.modeling.load import weight_bytes
    from almak.modeling.surgery import QuantizeRecipe, check_group_size, densify_, quantize_model, sparsify_

    recipe = QuantizeRecipe(method=method, bits=int(bits), group_size=int(group_size), sym=sym, act_order=act_order,
                            damp=damp, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                            clip_search=clip_search)
    out = Path(out_dir)
    check_new_output(out, overwrite)
    lm, device = load_for_calibration(model, device, dtype)
    check_group_size(lm.model, recipe.group_size)
    family = prompt_family or guess_family(lm.ref, lm.tokenizer)
    before = weight_bytes(lm.model)
    # A pruned source (almak prune's output): GPTQ keeps its zeros, and 2:4 layers come back 2:4 + int-N.
    source = read_recipe(lm.ref) if Path(lm.ref).is_dir() else None
    sparse24 = densify_(lm.model)
    pruned = source if source and source.get("command") == "prune" else None
    start = time.perf_counter()
    with progress_bar(method, len(decoder_layers(lm.model)), unit="layer") as bar:
        summary = quantize_model(lm.model, lm.tokenizer, recipe, device=device, prompt_family=family,
                                 progress=bar.update, keep_zeros=bool(pruned or sparse24))
    # int4 layers that were 2:4 become 2:4 + int4 (int8 ones stay dense-coded, their zeros kept).
    sparse24_quant = sparsify_(lm.model, names=sparse24) if sparse24 else []
    seconds = time.perf_counter() - start
    fields = dataclasses.asdict(recipe)
    if method == "rtn":
        fields = {k: v for k, v in fields.items() if k in ("method", "bits", "group_size", "sym")}
    fields.update(model=lm.ref, prompt=family if method == "gptq" else None, seconds=round(seconds, 1),
                  quantized=len(summary["quantized"]), skipped=summary["skipped"])
    if pruned or sparse24:
        fields.update(pruned_source=pruned, sparse24_layers=len(sparse24_quant))
    save_quantized(lm.model, lm.tokenizer, out, fields, overwrite=overwrite)
    after = weight_bytes(lm.model)
    peak = peak_memory(device)
    skipped = summary["skipped"]
    print_table([
        ("model", lm.ref),
        ("method", f"{method} int{bits} {'sym' if sym else 'asym'} group {group_size}"
         + (f", act-order {act_order}, damp {damp}, {nsamples} x <={seqlen} tokens of {calib}"
            + (", clip search" if recipe.clip_search else "") if method == "gptq" else "")),
        ("layers quantized", str(len(summary["quantized"]))
         + (f" ({len(sparse24_quant)} of them 2:4 + int4)" if sparse24_quant else "")
         + ("; zeros of the pruned source kept" if pruned or sparse24 else "")),
        ("layers kept", f"{len(skipped)}" + (f" ({', '.join(skipped)})" if skipped else "") + "; lm_head and embeddings stay"),
        ("size before / after", f"{before / 2**20:.1f} MiB / {after / 2**20:.1f} MiB"),
        ("time", f"{seconds:.1f} s"),
        ("peak memory", peak),
        ("vLLM", "; ".join(vllm_limits(lm.model)) or "the layout vLLM reads (not yet run there)"),
        ("written to", out_dir),
    ])


@main.command()
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default=PRUNE_DEFAULTS.method,
              show_default=True, help="magnitude: |W|, no data. wanda: |W| x input norm (Sun et al. 2023). "
                                      "sparsegpt: OBS updates on the remaining weights (Frantar & Alistarh 2023).")
@click.option("--sparsity", type=float, default=None,
              help=f"Unstructured: fraction of each output row to prune [default: {PRUNE_DEFAULTS.sparsity}].")
@click.option("--pattern", default=None, help="N:M semi-structured pattern instead, e.g. 2:4 (keep 2 of every 4 "
                                              "along the input dimension; stored compressed, runs on the 2:4 kernel).")
@click.option("--skip", multiple=True, help="Leave layers dense: a name, a dotted fragment on whole components "
                                            "(layers.0, self_attn, mlp.down_proj) or a glob; repeat or comma-separate.")
@click.option("--calib", default=PRUNE_DEFAULTS.calib, show_default=True,
              help="wanda/sparsegpt calibration: alma, alma:de-en,en-de, a JSON/JSONL translation file or a text file.")
@click.option("--nsamples", type=click.IntRange(min=1), default=PRUNE_DEFAULTS.nsamples, show_default=True)
@click.option("--seqlen", type=click.IntRange(min=8), default=PRUNE_DEFAULTS.seqlen, show_default=True)
@click.option("--seed", type=int, default=PRUNE_DEFAULTS.seed, show_default=True)
@click.option("--damp", type=float, default=PRUNE_DEFAULTS.damp, show_default=True,
              help="sparsegpt: dampening, as a fraction of the Hessian's mean diagonal.")
@calibration_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder: 2:4 layers in compressed-tensors' sparse-24-bitmask layout, the rest dense.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def prune(model, method, sparsity, pattern, skip, calib, nsamples, seqlen, seed, damp, prompt_family, device, dtype,
          out_dir, overwrite):
    """Prune MODEL's decoder-layer projections to 50% (or --sparsity) or an N:M pattern; write a checkpoint.

    2:4 checkpoints store the kept half of each 2:4 layer (compressed-tensors sparse-24-bitmask) and run on
    almak's 2:4 kernel; almak quantize takes them for 2:4 + int4. Unstructured checkpoints are dense with
    zeros. Both hold sparsity_report.json (per-layer sparsity) and almak_recipe.json.

    \b
    Examples:
      almak prune --method sparsegpt --pattern 2:4 --skip self_attn --out smollm-24
      almak prune --method wanda --sparsity 0.5 --out smollm-wanda50
    """
    import time

    import torch

    from almak.eval.evaluate import check_new_output
    from almak.eval.prompts import guess_family
    from almak.modeling.calibrate import decoder_layers
    from almak.modeling.checkpoint import save_pruned, vllm_limits
    from almak.modeling.load import weight_bytes
    from almak.modeling.prune import PruneRecipe, prune_model
    from almak.modeling.surgery import sparsify_

    if pattern and sparsity is not None:
        raise AlmakError("give --sparsity (unstructured) or --pattern (N:M), not both")
    recipe = PruneRecipe(method=method, sparsity=PRUNE_DEFAULTS.sparsity if sparsity is None else sparsity,
                         pattern=pattern, skip=skip, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         damp=damp)
    out = Path(out_dir)
    check_new_output(out, overwrite)
    lm, device = load_for_calibration(model, device, dtype)
    if any(not isinstance(m, torch.nn.Linear) for n, m in lm.model.named_modules()
           if n.rsplit(".", 1)[-1] in ("q_proj", "down_proj")):
        raise AlmakError(f"{lm.ref} is already compressed; prune a float model (then almak quantize the result)")
    family = prompt_family or guess_family(lm.ref, lm.tokenizer)
    before = weight_bytes(lm.model)
    start = time.perf_counter()
    with progress_bar(method, len(decoder_layers(lm.model)), unit="layer") as bar:
        report = prune_model(lm.model, lm.tokenizer, recipe, device=device, prompt_family=family, progress=bar.update)
    seconds = time.perf_counter() - start
    stored_24 = sparsify_(lm.model, names=report["pruned"]) if recipe.target().n == 2 and recipe.target().m == 4 else []
    fields = {"command": "prune", **recipe.to_json(), "model": lm.ref,
              "prompt": None if method == "magnitude" else family, "seconds": round(seconds, 1)}
    save_pruned(lm.model, lm.tokenizer, out, fields, report, overwrite=overwrite)
    after = weight_bytes(lm.model)
    peak = peak_memory(device)
    what = f"{method} {recipe.target()}" + ("" if method == "magnitude" else f", {nsamples} x <={seqlen} tokens of {calib}")
    rows = [("model", lm.ref), ("method", what),
            ("layers pruned", f"{len(report['pruned'])}" + (f" ({len(stored_24)} stored 2:4-compressed)" if stored_24 else "")),
            ("layers kept dense", _skipped_summary(report["skipped"])),
            ("sparsity", f"{report['pruned_sparsity']:.1%} of the pruned layers, {report['sparsity']:.1%} of all "
                         "projections"),
            ("size before / after", f"{before / 2**20:.1f} MiB / {after / 2**20:.1f} MiB"
             + ("" if stored_24 else " (unstructured: stored dense)")),
            ("time", f"{seconds:.1f} s"), ("peak memory", peak)]
    rows += _per_layer_rows(report["layers"])
    if stored_24:
        rows.append(("vLLM", "; ".join(vllm_limits(lm.model))))
    rows.append(("written to", out_dir))
    print_table(rows)


@main.command()
@click.argument("models", nargs=-1)
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt tokens per sequence (random ids, no padding).")
@click.option("--gen-len", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated per sequence (greedy, no stopping).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measurements per (model, batch size); the median is reported.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...; auto: cuda if present.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Activation dtype; auto is float32 on CPU and float16 on GPU.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for bench.json and decode_speedup.png (written when complete).")
@click.option("--shape", type=click.Choice(list(BENCH_SHAPES)),
              help="Benchmark a random-weight LLaMA with these exact dimensions instead; MODELS are then variants "
                   "of it: float, int8 (per channel), int4 (group 128), quantized at load (default: these three), 2:4 "
                   "(magnitude, fp16 kept values) and 2:4-int4.")
@click.option("--layers", type=click.IntRange(min=1), help="With --shape: keep only this many decoder layers.")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="almak", show_default=True,
              help="almak: almak's generation loop (preallocated KV cache), as almak translate runs; hf: "
                   "transformers' forward with its dynamic cache (any architecture).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="With --engine almak on CUDA: replay each decode step as a CUDA graph, captured before timing; "
                   "--no-cuda-graphs runs it eagerly. No effect on the CPU.")
@click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="An almak eval report.json (repeatable): adds quality_vs_bytes.png, perplexity (or chrF) against "
                   "weight bytes, labelled by the report's folder.")
@click.option("--no-plot", is_flag=True, help="Write bench.json only (the plots need matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def bench(models, batch_sizes, prompt_len, gen_len, repeats, device, dtype, shape, layers, engine, cuda_graphs,
          reports, out_dir, no_plot, overwrite):
    """Measure MODELS side by side: prefill and decode tokens/s, latency per token, memory, weight bytes.

    MODELS are any model references (default: smollm2-135m), for example a float model and its almak
    quantize / prune checkpoints. All are loaded, then measured in turn at each batch size, repeatedly, so
    that machine noise hits them alike; speedups are against the first model.

    \b
    Examples:
      almak bench smollm2-135m smollm-w8 smollm-w4g64 --batch-sizes 1,4 --gen-len 64 --out runs/bench
      almak bench --shape alma-7b float int4 --batch-sizes 1,16 --device cuda
    """
    import datetime
    import importlib.util

    import torch

    from almak.eval.bench import (BenchConfig, device_name, plot_decode_speedup, plot_quality, quality_metric,
                                  random_model, run_bench, summarize)
    from almak.eval.evaluate import check_new_output
    from almak.files import write_dir_atomic
    from almak.modeling.load import DEFAULT_MODEL, load_model, weight_bytes

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise AlmakError(f"--batch-sizes takes comma-separated integers, got {batch_sizes!r}") from None
    config = BenchConfig(batch_sizes=sizes, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, engine=engine,
                         cuda_graphs=cuda_graphs)
    out = Path(out_dir) if out_dir else None
    if out:
        check_new_output(out, overwrite)
    quality = {}
    for path in reports:
        try:
            quality[Path(path).resolve().parent.name] = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AlmakError(f"{path} is not an almak eval report.json: {e}") from None
    if quality and (no_plot or not out):
        raise AlmakError("--report makes a plot: give --out, without --no-plot")
    if quality:
        quality_metric(quality)
    if not no_plot and out and importlib.util.find_spec("matplotlib") is None:
        raise AlmakError("the plot needs matplotlib: pip install 'almak[bench]', or pass --no-plot")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if layers and not shape:
        raise AlmakError("--layers goes with --shape")
    loaded, info = {}, {}
    if shape:
        from almak.eval.bench import SHAPE_VARIANTS, make_variant
        from almak.modeling.load import resolve_dtype

        unknown = [m for m in models if m not in SHAPE_VARIANTS]
        if unknown:
            raise AlmakError(f"with --shape, MODELS are variants of it ({', '.join(SHAPE_VARIANTS)}), not "
                             f"{', '.join(unknown)}")
        for name in dict.fromkeys(models or ("float", "int8", "int4")):
            model = random_model(shape, resolve_dtype(dtype, device), device, layers)  # same seed: same weights
            loaded[name] = make_variant(model, name)
            info[name] = {"ref": f"random {shape}" + (f" ({layers} layers)" if layers else ""),
                          "weight_bytes": weight_bytes(model)}
    for ref in () if shape else (models or (DEFAULT_MODEL,)):
        lm = load_model(ref, device=device, dtype=dtype)
        name = Path(ref).name or ref
        while name in loaded:
            name += "'"
        loaded[name] = lm.model
        info[name] = {"ref": lm.ref, "weight_bytes": weight_bytes(lm.model)}
    total = len(loaded) * len(sizes) * repeats
    with progress_bar("bench", total, unit="run") as bar:
        records = run_bench(loaded, config, progress=bar.update)
    baseline = next(iter(loaded))
    summarize(records, baseline)
    rows = []
    for r in records:
        mem = f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else ""
        rows.append((f"{r['model']} b={r['batch']}",
                     f"prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s "
                     f"({r['ms_per_token']:.1f} ms/step, {r['decode_speedup']:.2f}x {baseline}){mem}"))
    rows += [(f"{n} weights", f"{d['weight_bytes'] / 2**20:.1f} MiB") for n, d in info.items()]
    graphed = engine == "almak" and cuda_graphs and torch.device(device).type == "cuda"
    loop = f"{engine} loop" + (" (CUDA graphs)" if graphed else "")
    print_table(rows, title=f"{device}, {loop}, {prompt_len} prompt + {gen_len} generated tokens, median of {repeats}")
    if out is None:
        return
    doc = {"benchmark": "almak bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "config": dataclasses.asdict(config), "models": info, "baseline": baseline, "results": records}
    if quality:
        doc["quality"] = {name: {k: r.get(k) for k in ("model", "testset", "n", "ppl", "chrf", "bleu", "weight_bytes")}
                          for name, r in quality.items()}

    def fill(tmp: Path) -> None:
        (tmp / "bench.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        if not no_plot:
            plot_decode_speedup(records, baseline, tmp / "decode_speedup.png")
        if quality:
            plot_quality(quality, tmp / "quality_vs_bytes.png")

    write_dir_atomic(out, fill)
    click.echo(f"wrote {out}", err=True)


def _skipped_summary(skipped: dict[str, str]) -> str:
    if not skipped:
        return "0; lm_head and embeddings stay"
    reasons: dict[str, int] = {}
    for reason in skipped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return f"{len(skipped)} (" + ", ".join(f"{n} by {r}" for r, n in reasons.items()) + "); lm_head and embeddings stay"


def _per_layer_rows(layers: dict[str, float]) -> list[tuple[str, str]]:
    """One row per decoder layer: the sparsity of each projection."""
    by_layer: dict[str, list[str]] = {}
    for name, value in layers.items():
        head, _, leaf = name.rpartition(".")
        index = head.split("layers.", 1)[-1].split(".", 1)[0]
        by_layer.setdefault(f"layer {index}", []).append(f"{leaf.removesuffix('_proj')} {value:.0%}")
    return list((k, " ".join(v)) for k, v in by_layer.items())


@main.command()
@click.option("--src", "src_path", required=True, type=click.Path(dir_okay=False), help="Source sentences.")
@click.option("--hyp", "hyp_path", required=True, type=click.Path(dir_okay=False), help="System translations.")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False), help="References.")
@click.option("--lang-pair", required=True, help="Direction, e.g. de-en (picks the BLEU tokenizer).")
@click.option("--metrics", default="bleu,chrf", show_default=True, help="Comma-separated: bleu, chrf, comet.")
@click.option("--comet-model", default="Unbabel/wmt22-comet-da", show_default=True,
              help="COMET model: hub name or a local folder with checkpoints/model.ckpt.")
@click.option("--format", "fmt_", type=click.Choice(["table", "json"]), default="table", show_default=True)
def score(src_path, hyp_path, ref_path, lang_pair, metrics, comet_model, fmt_):
    """Score existing translations (one per line) as sacrebleu and comet-score do.

    \b
    Example:
      almak score --src test.de --hyp hyps.en --ref test.en --lang-pair de-en
    """
    from almak.eval.data import read_lines
    from almak.eval.evaluate import ScoreConfig
    from almak.eval.evaluate import score as run_score
    from almak.eval.metrics import parse_metrics
    from almak.eval.prompts import parse_lang_pair

    src, tgt = parse_lang_pair(lang_pair)
    names = parse_metrics(metrics)
    if "nll" in names:
        raise AlmakError("nll needs a model; use almak eval for it")
    sources = read_lines(src_path, "source file")
    hyps = read_lines(hyp_path, "hypothesis file")
    refs = read_lines(ref_path, "reference file")
    report = run_score(sources, hyps, refs, src, tgt, ScoreConfig(tuple(names), comet_model))
    if fmt_ == "json":
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    rows = [("lang pair / lines", f"{lang_pair} / {len(hyps)}")] + _metric_rows(report)
    for key in ("bleu_signature", "chrf_signature"):
        if key in report:
            rows.append((key.replace("_", " "), report[key]))
    print_table(rows)


# The CLI takes finetune's defaults from the library's config.
from almak.modeling.finetune import GROUP_STEPS, FinetuneConfig  # noqa: E402


def training_events(bar):
    """A finetune / distill progress callback that advances ``bar`` and shows the loss and validation ppl."""
    post = {}

    def on_event(event: dict) -> None:
        if event["event"] == "start":
            bar.update(event["step"] - bar.n)
            return
        if event["event"] == "step":
            bar.update(1)
            post["loss"] = f"{event['loss']:.3f}"
        else:
            post["val_ppl"] = f"{event['ppl']:.2f}"
        bar.set_postfix(post, refresh=False)

    return on_event


def training_device(device: str, dtype: str) -> tuple[str, str]:
    """auto device: cuda if present; auto dtype: bfloat16 on a GPU that has it, float32 otherwise."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def training_speed_options(command):
    """--bf16 and --group-by-length, the switches finetune and distill share (see FinetuneConfig)."""
    command = click.option(
        "--group-by-length", is_flag=True,
        help=f"Sort the examples of every {GROUP_STEPS} steps by length into micro-batches, dealt out to those "
             "steps in a seeded random order: less padding, so faster steps.")(command)
    return click.option(
        "--bf16", is_flag=True,
        help="Mixed precision: the forward and backward passes run under torch.autocast in bfloat16 while the "
             "weights, the trained parameters and the optimizer stay in --dtype (CPUs with AVX-512 BF16 and "
             "GPUs from Ampere on). Validation stays in --dtype.")(command)


FINETUNE_DEFAULTS = FinetuneConfig()


@main.command()
@click.argument("model", required=False)
@click.option("--data", default=FINETUNE_DEFAULTS.data, show_default=True,
              help="Training pairs: alma (ALMA's human-written pairs, cs/de/is/ru/zh <-> en, both ways), "
                   "alma:de-en,en-de (chosen directions), or a file: ALMA JSON/JSONL named *.xx-yy.*, "
                   "course-project JSONL (langs/src/ref) or a .tsv of source<TAB>reference (needs --lang-pair).")
@click.option("--lang-pair", help="Direction of a .tsv --data file (or of a JSON file whose name holds none; "
                                  "picks one direction of a course-project file).")
@click.option("--valid", "valid", help="Validation pairs, written as --data [default: ALMA's bundled valid split of "
                                       "the training directions, where it has one (is-en has none)].")
@click.option("--valid-sentences", type=click.IntRange(min=0), default=FINETUNE_DEFAULTS.valid_sentences,
              show_default=True, help="Validation sentences in all, shared between the directions; 0: none.")
@click.option("--full", is_flag=True, help="Fine-tune every weight instead of LoRA adapters (AdamW keeps two more "
                                           "copies of the weights) and write a full model folder.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None,
              help=f"Rank of the LoRA adapters [default: {FINETUNE_DEFAULTS.lora_rank}].")
@click.option("--lora-alpha", type=float, default=None,
              help=f"LoRA scale: updates are multiplied by alpha / rank [default: {FINETUNE_DEFAULTS.lora_alpha:g}].")
@click.option("--lora-dropout", type=float, default=None,
              help=f"Dropout on the adapters' input [default: {FINETUNE_DEFAULTS.lora_dropout}].")
@click.option("--steps", type=click.IntRange(min=1), default=FINETUNE_DEFAULTS.steps, show_default=True,
              help="Optimizer steps.")
@click.option("--lr", type=float, default=None, help="Peak learning rate, after a linear warmup and before a linear "
                                                     "decay to 0 [default: 2e-4 for LoRA, 2e-5 with --full].")
@click.option("--batch-size", type=click.IntRange(min=1), default=FINETUNE_DEFAULTS.batch_size, show_default=True,
              help="Sequences per forward pass.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=FINETUNE_DEFAULTS.grad_accum, show_default=True,
              help="Forward passes per optimizer step (a step sees batch-size x grad-accum examples).")
@click.option("--max-len", type=click.IntRange(min=16), default=FINETUNE_DEFAULTS.max_len, show_default=True,
              help="Tokens per example, prompt and target; longer targets are cut.")
@training_speed_options
@click.option("--warmup", type=float, default=FINETUNE_DEFAULTS.warmup, show_default=True,
              help="Fraction of the steps over which the learning rate rises linearly.")
@click.option("--eval-every", type=click.IntRange(min=0), default=FINETUNE_DEFAULTS.eval_every, show_default=True,
              help="Steps between validations (also before the first and after the last step); 0: only those.")
@click.option("--save-every", type=click.IntRange(min=0), default=FINETUNE_DEFAULTS.save_every, show_default=True,
              help="Steps between checkpoints in --out/checkpoint (for --resume); 0: none.")
@click.option("--seed", type=int, default=FINETUNE_DEFAULTS.seed, show_default=True,
              help="Seed of the example order, the adapters' initialisation and dropout.")
@click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
              help="Prompt family the examples are written in (alma ends answers with a newline, the others with "
                   "EOS); guessed from the model name when omitted. Translate with the same one.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...; auto: cuda if present.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Weight dtype; auto is float32 on CPU and bfloat16 on a GPU that has it (LoRA adapters stay "
                   "float32).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Result folder: a LoRA adapter (peft format) or, with --full, a model folder; during the run it "
                   "holds the checkpoint and train_log.jsonl.")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out (same settings).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def finetune(model, data, lang_pair, valid, valid_sentences, full, lora_rank, lora_alpha, lora_dropout, steps, lr,
             batch_size, grad_accum, max_len, bf16, group_by_length, warmup, eval_every, save_every, seed,
             prompt_family, device, dtype, out_dir, resume, overwrite):
    """Fine-tune MODEL on human-written parallel data (ALMA's second stage), with LoRA or --full.

    The loss is on the reference's tokens only, after the prompt the model family expects. The result is a
    MODEL like any other: almak translate OUT, almak eval OUT (a LoRA adapter loads its base model and merges
    into it). MODEL: smollm2-135m (default), a Hugging Face folder, a .gguf file or a hub id.

    \b
    Examples:
      almak finetune --data alma:de-en,en-de --steps 200 --out smollm-ft
      almak finetune ~/models/ALMA-7B-Pretrain --data alma --steps 2000 --batch-size 16 --grad-accum 4 --out alma-ft
      almak finetune --data alma:de-en,en-de --steps 200 --out smollm-ft --resume   # after an interruption
    """
    import torch

    from almak.eval.prompts import guess_family
    from almak.modeling.finetune import check_output, load_pairs
    from almak.modeling.finetune import finetune as run_finetune
    from almak.modeling.load import DEFAULT_MODEL, load_model

    if full and (lora_rank, lora_alpha, lora_dropout) != (None, None, None):
        raise AlmakError("--lora-rank, --lora-alpha and --lora-dropout configure LoRA; drop them with --full")
    d = FINETUNE_DEFAULTS
    config = FinetuneConfig(
        data=data, lang_pair=lang_pair, valid=valid, valid_sentences=valid_sentences, full=full,
        lora_rank=d.lora_rank if lora_rank is None else lora_rank,
        lora_alpha=d.lora_alpha if lora_alpha is None else lora_alpha,
        lora_dropout=d.lora_dropout if lora_dropout is None else lora_dropout,
        steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_len=max_len, bf16=bf16,
        group_by_length=group_by_length, warmup=warmup, eval_every=eval_every, save_every=save_every, seed=seed)
    out = Path(out_dir)
    check_output(out, resume, overwrite)
    load_pairs(config.data, config.lang_pair)  # refuse unknown directions and bad files before loading the model
    device, dtype = training_device(device, dtype)
    lm = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
    family = prompt_family or guess_family(lm.ref, lm.tokenizer)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with progress_bar("finetune", config.steps, unit="step") as bar:
        result = run_finetune(lm.model, lm.tokenizer, family, config, out, resume=resume,
                              progress=training_events(bar), overwrite=overwrite, base_ref=lm.ref)
    s = result.summary
    if full:
        method = "full (every weight)"
    else:
        method = (f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g}, dropout {config.lora_dropout} on "
                  + "/".join(m.removesuffix("_proj") for m in config.target_modules))
    per_step = config.batch_size * config.grad_accum
    print_table([
        ("model", lm.ref),
        ("method", f"{method}; prompt {family}"),
        ("data", f"{config.data}: {s['examples']} examples"),
        ("steps", f"{s['steps']} x {per_step} examples ({s['epochs']:g} epochs), lr {config.learning_rate:g}"),
        ("train loss first / last", f"{fmt(s['train_loss_first'], 4)} / {fmt(s['train_loss_last'], 4)}"),
        ("valid ppl before / after", f"{fmt(s['val_ppl_before'], 3)} / {fmt(s['val_ppl_after'], 3)}"
         + (f" ({s['val_sentences']} sentences)" if s["val_sentences"] else " (no validation set)")),
        ("trainable parameters", f"{s['trainable_parameters'] / 1e6:.2f}M of {s['parameters'] / 1e6:.1f}M "
                                 f"({s['trainable_parameters'] / s['parameters']:.2%})"),
        ("time", f"{s['seconds']:.1f} s"),
        ("peak memory", peak_memory(device)),
        ("written to", out_dir),
    ])


from almak.modeling.distill import PRUNED_LR, SCALES_LR, DistillConfig  # noqa: E402

DISTILL_DEFAULTS = DistillConfig(steps=200)


@main.command()
@click.argument("student")
@click.option("--teacher", required=True, help="The float model the student was compressed from (any model "
                                               "reference: smollm2-135m, a folder, a hub id).")
@click.option("--data", default=DISTILL_DEFAULTS.data, show_default=True,
              help="Training pairs, as almak finetune --data takes them (alma, alma:de-en,en-de, or a file).")
@click.option("--lang-pair", help="Direction of a .tsv --data file (as almak finetune).")
@click.option("--valid", "valid", help="Validation pairs, written as --data [default: ALMA's bundled valid split of "
                                       "the training directions].")
@click.option("--valid-sentences", type=click.IntRange(min=0), default=DISTILL_DEFAULTS.valid_sentences,
              show_default=True, help="Validation sentences in all, shared between the directions; 0: none.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=DISTILL_DEFAULTS.alpha, show_default=True,
              help="Weight of the KD term (KL to the teacher at --temperature); 1 - alpha weighs the references' "
                   "cross-entropy.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=DISTILL_DEFAULTS.temperature,
              show_default=True, help="Softmax temperature of both distributions in the KD term (scaled by T^2).")
@click.option("--steps", type=click.IntRange(min=1), default=DISTILL_DEFAULTS.steps, show_default=True,
              help="Optimizer steps.")
@click.option("--lr", type=float, default=None,
              help=f"Peak learning rate of everything that trains [default: {PRUNED_LR:g} for the kept weights of "
                   f"pruned layers, {SCALES_LR:g} for the scales of quantized ones].")
@click.option("--batch-size", type=click.IntRange(min=1), default=DISTILL_DEFAULTS.batch_size, show_default=True,
              help="Sequences per forward pass (the teacher runs on the same batch).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=DISTILL_DEFAULTS.grad_accum, show_default=True,
              help="Forward passes per optimizer step.")
@click.option("--max-len", type=click.IntRange(min=16), default=DISTILL_DEFAULTS.max_len, show_default=True,
              help="Tokens per example, prompt and target; longer targets are cut.")
@training_speed_options
@click.option("--warmup", type=float, default=DISTILL_DEFAULTS.warmup, show_default=True,
              help="Fraction of the steps over which the learning rate rises linearly.")
@click.option("--eval-every", type=click.IntRange(min=0), default=DISTILL_DEFAULTS.eval_every, show_default=True,
              help="Steps between validations (also before the first and after the last step); 0: only those.")
@click.option("--save-every", type=click.IntRange(min=0), default=DISTILL_DEFAULTS.save_every, show_default=True,
              help="Steps between checkpoints in --out/checkpoint (for --resume); 0: none.")
@click.option("--seed", type=int, default=DISTILL_DEFAULTS.seed, show_default=True, help="Seed of the example order.")
@click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
              help="Prompt family of the examples; guessed from the teacher's name when omitted.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...; auto: cuda if present.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]),
              help="Dtype of both models; auto is float32 on CPU and bfloat16 on a GPU that has it.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Result: a checkpoint of the student's kind (quantized or pruned); during the run it holds the "
                   "checkpoint and train_log.jsonl.")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out (same settings).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def distill(student, teacher, data, lang_pair, valid, valid_sentences, alpha, temperature, steps, lr, batch_size,
            grad_accum, max_len, bf16, group_by_length, warmup, eval_every, save_every, seed, prompt_family, device,
            dtype, out_dir, resume, overwrite):
    """Recover a pruned or quantized STUDENT by distilling its float --teacher on parallel data.

    STUDENT is an almak prune or almak quantize checkpoint. The loss on each reference token mixes the KL
    divergence to the teacher's next-token distribution (at --temperature) with cross-entropy on the reference.
    The student keeps its structure: pruned layers train their kept weights only (2:4 stays 2:4), quantized
    layers keep their integer codes and train their scales; embeddings, norms and lm_head stay frozen. The
    result is a checkpoint of the same kind: almak eval / translate / bench take it, and transformers
    loads it as it loads the student.

    \b
    Examples:
      almak distill runs/smollm-24 --teacher smollm2-135m --data alma:de-en --steps 90 --batch-size 8 \\
          --grad-accum 1 --out runs/smollm-24-kd
      almak distill runs/smollm-w4g64 --teacher smollm2-135m --data alma:de-en,en-de --out runs/smollm-w4-kd
    """
    import torch

    from almak.eval.prompts import guess_family
    from almak.modeling.checkpoint import is_compressed_checkpoint, is_gptq_checkpoint
    from almak.modeling.distill import distill as run_distill
    from almak.modeling.finetune import check_output, load_pairs
    from almak.modeling.load import load_model

    config = DistillConfig(data=data, lang_pair=lang_pair, valid=valid, valid_sentences=valid_sentences, alpha=alpha,
                           temperature=temperature, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                           max_len=max_len, bf16=bf16, group_by_length=group_by_length, warmup=warmup,
                           eval_every=eval_every, save_every=save_every, seed=seed)
    out = Path(out_dir)
    check_output(out, resume, overwrite)
    if not Path(student).is_dir() or not ((Path(student) / "sparsity_report.json").is_file()
                                          or is_compressed_checkpoint(student) or is_gptq_checkpoint(student)):
        raise AlmakError(f"{student!r} is not an almak prune or almak quantize checkpoint folder")
    if Path(student).resolve() == out.resolve():
        raise AlmakError("--out must not be the student's own folder")
    load_pairs(config.data, config.lang_pair)  # refuse unknown directions and bad files before loading models
    device, dtype = training_device(device, dtype)
    t = load_model(teacher, device=device, dtype=dtype)
    s = load_model(student, device=device, dtype=dtype)
    family = prompt_family or guess_family(t.ref, t.tokenizer)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with progress_bar("distill", config.steps, unit="step") as bar:
        result = run_distill(s.model, t.model, s.tokenizer, family, config, out, student_ref=student,
                             teacher_ref=t.ref, resume=resume, progress=training_events(bar), overwrite=overwrite)
    r = result.summary
    per_step = config.batch_size * config.grad_accum
    print_table([
        ("student / teacher", f"{student} / {t.ref}"),
        ("trains", f"{r['trains']}; KD alpha {config.alpha:g} at T={config.temperature:g}, prompt {family}"),
        ("data", f"{config.data}: {r['examples']} examples"),
        ("steps", f"{r['steps']} x {per_step} examples ({r['epochs']:g} epochs)"),
        ("train loss first / last", f"{fmt(r['train_loss_first'], 4)} / {fmt(r['train_loss_last'], 4)}"),
        ("valid ppl before / after", f"{fmt(r['val_ppl_before'], 3)} / {fmt(r['val_ppl_after'], 3)}"
         + (f" ({r['val_sentences']} sentences)" if r["val_sentences"] else " (no validation set)")),
        ("trainable parameters", f"{r['trainable_parameters'] / 1e6:.2f}M of {r['parameters'] / 1e6:.1f}M"),
        ("time", f"{r['seconds']:.1f} s"),
        ("peak memory", peak_memory(device)),
        ("written to", out_dir),
    ])

if __name__ == "__main__":
    main()
