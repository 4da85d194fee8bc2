"""``almak quantize``: RTN or GPTQ calibrated on translation prompts, written as a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from almak.cli.common import (
    SEED,
    Finite,
    calibration_options,
    load_for_calibration,
    peak_memory,
    print_table,
    progress_bar,
    sparse_format_option,
)
from almak.eval.evaluate import check_new_output
from almak.eval.prompts import guess_family
from almak.modeling.calibrate import decoder_layers
from almak.modeling.checkpoint import read_recipe, save_quantized, vllm_summary
from almak.modeling.load import weight_bytes
from almak.modeling.surgery import QuantizeRecipe, check_group_size, densify_, quantize_model, sparsify_


@click.command()
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
@click.option("--damp", type=Finite(0, 1, min_open=True), default=0.01, show_default=True,
              help="GPTQ: dampening, as a fraction of the Hessian's mean diagonal.")
@click.option("--calib", default="alma", show_default=True,
              help="GPTQ calibration: alma (bundled ALMA pairs, cs/de/is/ru/zh <-> en), alma:de-en,en-de, a "
                   "JSON/JSONL file of translation records named *.xx-yy.*, or a plain text file.")
@click.option("--nsamples", type=click.IntRange(min=1), default=128, show_default=True,
              help="GPTQ: calibration samples (one prompt + reference each).")
@click.option("--seqlen", type=click.IntRange(min=8), default=512, show_default=True,
              help="GPTQ: tokens per calibration sample at most.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the calibration draw.")
@click.option("--clip-search/--no-clip-search", default=None,
              help="GPTQ: each group's range is its min/max shrunk by the factor (1.00 down to 0.75) with the least "
                   "squared rounding error weighted by the calibration inputs' mean square; --no-clip-search keeps "
                   "the plain min/max, as the GPTQ paper and llm-compressor do. Same checkpoint format. "
                   "[default: on with --method gptq]")
@calibration_options
@sparse_format_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (safetensors, compressed-tensors pack-quantized layout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def quantize(model, method, bits, group_size, sym, act_order, damp, calib, nsamples, seqlen, seed, clip_search,
             prompt_family, device, dtype, sparse_format, out_dir, overwrite):
    """Quantize MODEL's decoder-layer projections to 4 or 8 bits and write a checkpoint.

    The checkpoint loads in almak (almak translate/eval DIR), in transformers with the compressed-tensors
    package, and in vLLM (int4; the summary's vLLM row says what vLLM cannot run).

    MODEL: smollm2-135m (default), a Hugging Face folder, a .gguf file, a hub id, or
    a checkpoint of almak prune: its zeros are kept (GPTQ compensates around them), and 2:4 layers become
    2:4 + int4 layers.

    \b
    Example:
      almak quantize --method gptq --bits 4 --group-size 64 --asym --out smollm-w4g64
    """
    import time


    recipe = QuantizeRecipe(method=method, bits=int(bits), group_size=int(group_size), sym=sym, act_order=act_order,
                            damp=damp, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                            clip_search=clip_search)
    out = Path(out_dir)
    check_new_output(out, overwrite, inputs=(model, calib))
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
    save_quantized(lm.model, lm.tokenizer, out, fields, overwrite=overwrite, sparse_format=sparse_format)
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
        ("vLLM", vllm_summary(lm.model, sparse_format)),
        ("written to", out_dir),
    ])
