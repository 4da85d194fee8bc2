"""``almak quantize``: RTN or GPTQ calibrated on translation prompts, written as a checkpoint."""

from __future__ import annotations

import contextlib
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
from almak.modeling.checkpoint import read_recipe, save_quantized, vllm_summary
from almak.modeling.load import weight_bytes
from almak.modeling.nn.surgery import QuantizeRecipe, check_group_size, densify_, quantize_model, sparsify_
from almak.modeling.pipelines.calibrate import decoder_layers
from almak.modeling.text.prompts import guess_family


@click.command()
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default="gptq", show_default=True,
              help="rtn: round to nearest, no data. gptq: Frantar et al. 2022, calibrated layer by layer.")
@click.option("--bits", type=click.Choice(["4", "8", "auto"]), default="4", show_default=True,
              help="auto: mixed precision under --target-bits, each projection int4 per channel, int4 at "
                   "--group-size or int8 per channel, chosen by its measured sensitivity.")
@click.option("--target-bits", type=Finite(4, 9),
              help="With --bits auto: average bits per weight over the decoder projections, codes, scales and "
                   "zeros included as the checkpoint stores them (scales in the model's dtype: 16 bits for "
                   "fp16/bf16, 32 for fp32). E.g. 4.5.")
@click.option("--rotate/--no-rotate", default=False, show_default=True,
              help="Fold the RMSNorm scales into the next linears and rotate the residual stream and each "
                   "attention head by randomized Hadamard matrices first: the same function (a plain model every "
                   "loader runs), with weight outliers spread out, so int4 per channel and small groups lose "
                   "less. Tied embeddings are untied (lm_head gets its own weight: one more vocab x hidden "
                   "tensor), since the final norm's scale cannot be folded into a tied head.")
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
def quantize(model, method, bits, target_bits, rotate, group_size, sym, act_order, damp, calib, nsamples, seqlen,
             seed, clip_search, prompt_family, device, dtype, sparse_format, out_dir, overwrite):
    """Quantize MODEL's decoder-layer projections to 4 or 8 bits and write a checkpoint.

    The checkpoint loads in almak (almak translate/eval DIR), in transformers with the compressed-tensors
    package, and in vLLM (int4; the summary's vLLM row says what vLLM cannot run).

    MODEL: smollm2-135m (default), a Hugging Face folder, a .gguf file, a hub id, or
    a checkpoint of almak prune: its zeros are kept (GPTQ compensates around them), and 2:4 layers become
    2:4 + int4 layers.

    \b
    Examples:
      almak quantize --method gptq --bits 4 --group-size 64 --asym --out smollm-w4g64
      almak quantize --rotate --group-size -1 --asym --out smollm-w4-rot
      almak quantize --rotate --bits auto --target-bits 4.5 --asym --out smollm-mixed
    """
    import time

    if (bits == "auto") != (target_bits is not None):
        raise click.UsageError("--bits auto needs --target-bits, and --target-bits needs --bits auto")
    recipe = QuantizeRecipe(method=method, bits=4 if bits == "auto" else int(bits), group_size=int(group_size),
                            sym=sym, act_order=act_order, damp=damp, calib=calib, nsamples=nsamples, seqlen=seqlen,
                            seed=seed, clip_search=clip_search, rotate=rotate, target_bits=target_bits)
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
    with contextlib.ExitStack() as bars:
        measure = bars.enter_context(progress_bar("sensitivity", nsamples, unit="sample")).update \
            if target_bits is not None else None
        bar = bars.enter_context(progress_bar(method, len(decoder_layers(lm.model)), unit="layer"))
        summary = quantize_model(lm.model, lm.tokenizer, recipe, device=device, prompt_family=family,
                                 progress=bar.update, keep_zeros=bool(pruned or sparse24),
                                 sensitivity_progress=measure)
    # int4 layers that were 2:4 become 2:4 + int4 (int8 ones stay dense-coded, their zeros kept).
    sparse24_quant = sparsify_(lm.model, names=sparse24) if sparse24 else []
    seconds = time.perf_counter() - start
    fields = dataclasses.asdict(recipe)
    if method == "rtn":
        keep = ("method", "bits", "group_size", "sym", "rotate", "target_bits")
        keep += ("calib", "nsamples", "seqlen", "seed") if target_bits is not None else ()
        fields = {k: v for k, v in fields.items() if k in keep}
    calibrated = method == "gptq" or target_bits is not None
    fields.update(model=lm.ref, prompt=family if calibrated else None, seconds=round(seconds, 1),
                  quantized=len(summary["quantized"]), skipped=summary["skipped"])
    for key in ("rotation", "allocation"):
        if key in summary:
            fields[key] = summary[key]
    if pruned or sparse24:
        fields.update(pruned_source=pruned, sparse24_layers=len(sparse24_quant))
    save_quantized(lm.model, lm.tokenizer, out, fields, overwrite=overwrite, sparse_format=sparse_format)
    after = weight_bytes(lm.model)
    peak = peak_memory(device)
    skipped = summary["skipped"]
    scheme = (f"mixed (target {target_bits:g} bits)" if target_bits is not None else f"int{bits} group {group_size}")
    rows = [("model", lm.ref)]
    rows += [("method", f"{method} {scheme} {'sym' if sym else 'asym'}"
         + (f", act-order {act_order}, damp {damp}, {nsamples} x <={seqlen} tokens of {calib}"
            + (", clip search" if recipe.clip_search else "") if method == "gptq" else "")),
    ]
    if "rotation" in summary:
        r = summary["rotation"]
        rows.append(("rotation", f"randomized Hadamard {r['hidden']} (residual) and {r['head_dim']} (heads), "
                                 f"seed {r['seed']}" + ("; lm_head untied" if r["untied"] else "")
))
    if "allocation" in summary:
        a = summary["allocation"]
        rows.append(("allocation", f"{a['average_bits']:.3f} bits per weight: "
                     + ", ".join(f"{n} x {f}" for f, n in a["counts"].items())))
        for f in a["counts"]:
            if f.startswith("int8"):
                where = sorted({int(n.split(".")[2]) for n, g in a["formats"].items() if g == f})
                rows.append((f"  {f}", ", ".join(sorted({n.split(".", 3)[3] for n, g in a["formats"].items()
                                                          if g == f})) + f" in layers {_ranges(where)}"))
    rows += [
        ("layers quantized", str(len(summary["quantized"]))
         + (f" ({len(sparse24_quant)} of them 2:4 + int4)" if sparse24_quant else "")
         + ("; zeros of the pruned source kept" if pruned or sparse24 else "")),
        ("layers kept", f"{len(skipped)}" + (f" ({', '.join(skipped)})" if skipped else "") + "; lm_head and embeddings stay"),
        ("size before / after", f"{before / 2**20:.1f} MiB / {after / 2**20:.1f} MiB"),
        ("time", f"{seconds:.1f} s"),
        ("peak memory", peak),
        ("vLLM", vllm_summary(lm.model, sparse_format)),
        ("written to", out_dir),
    ]
    print_table(rows)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
