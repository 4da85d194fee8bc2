"""``almak quantize``: RTN or GPTQ calibrated on translation prompts, written as a checkpoint."""

from __future__ import annotations

import click

from almak.cli.common import SEED, Finite, calibration_options, print_table, sparse_format_option, stage_bars
from almak.modeling.devices import describe_memory
from almak.modeling.pipelines.quantize import QuantizeRecipe
from almak.modeling.pipelines.quantize import quantize as run_quantize

# The CLI takes its defaults from the library's recipe.
Q = QuantizeRecipe()


@click.command()
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default=Q.method, show_default=True,
              help="rtn: round to nearest, no data. gptq: Frantar et al. 2022, calibrated layer by layer.")
@click.option("--bits", type=click.Choice(["4", "8", "auto"]), default=str(Q.bits), show_default=True,
              help="auto: mixed precision under --target-bits, each projection int4 per channel, int4 at "
                   "--group-size or int8 per channel, chosen by its measured sensitivity.")
@click.option("--target-bits", type=Finite(4, 9),
              help="With --bits auto: average bits per weight over the decoder projections, codes, scales and "
                   "zeros included as the checkpoint stores them (scales in the model's dtype: 16 bits for "
                   "fp16/bf16, 32 for fp32). E.g. 4.5.")
@click.option("--rotate/--no-rotate", default=Q.rotate, show_default=True,
              help="Fold the RMSNorm scales into the next linears and rotate the residual stream and each "
                   "attention head by randomized Hadamard matrices first: the same function (a plain model every "
                   "loader runs), with weight outliers spread out, so int4 per channel and small groups lose "
                   "less. Tied embeddings are untied (lm_head gets its own weight: one more vocab x hidden "
                   "tensor), since the final norm's scale cannot be folded into a tied head.")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256", "-1"]), default=str(Q.group_size),
              show_default=True,
              help="Columns per scale (-1: one per output channel); must divide every projection's in_features "
                   "(the embedded model needs 64 or 32).")
@click.option("--sym/--asym", default=Q.sym, show_default=True, help="Symmetric (no zero point) or asymmetric.")
@click.option("--act-order/--no-act-order", default=Q.act_order, show_default=True,
              help="GPTQ: visit columns by decreasing Hessian diagonal (static groups: no g_idx at run time).")
@click.option("--damp", type=Finite(0, 1, min_open=True), default=Q.damp, show_default=True,
              help="GPTQ: dampening, as a fraction of the Hessian's mean diagonal.")
@click.option("--calib", default=Q.calib, show_default=True,
              help="GPTQ calibration: alma (bundled ALMA pairs, cs/de/is/ru/zh <-> en), alma:de-en,en-de, a "
                   "JSON/JSONL file of translation records named *.xx-yy.*, or a plain text file.")
@click.option("--nsamples", type=click.IntRange(min=1), default=Q.nsamples, show_default=True,
              help="GPTQ: calibration samples (one prompt + reference each).")
@click.option("--seqlen", type=click.IntRange(min=8), default=Q.seqlen, show_default=True,
              help="GPTQ: tokens per calibration sample at most.")
@click.option("--seed", type=SEED, default=Q.seed, show_default=True, help="Seed of the calibration draw.")
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
    if (bits == "auto") != (target_bits is not None):
        raise click.UsageError("--bits auto needs --target-bits, and --target-bits needs --bits auto")
    recipe = QuantizeRecipe(method=method, bits=4 if bits == "auto" else int(bits), group_size=int(group_size),
                            sym=sym, act_order=act_order, damp=damp, calib=calib, nsamples=nsamples, seqlen=seqlen,
                            seed=seed, clip_search=clip_search, rotate=rotate, target_bits=target_bits)
    with stage_bars() as progress:
        r = run_quantize(model, recipe, out_dir, device=device, dtype=dtype, prompt=prompt_family,
                         sparse_format=sparse_format, overwrite=overwrite, progress=progress)
    scheme = f"mixed (target {target_bits:g} bits)" if target_bits is not None else f"int{bits} group {group_size}"
    rows = [("model", r.model)]
    rows += [("method", f"{method} {scheme} {'sym' if sym else 'asym'}"
         + (f", act-order {act_order}, damp {damp}, {nsamples} x <={seqlen} tokens of {calib}"
            + (", clip search" if recipe.clip_search else "") if method == "gptq" else "")),
    ]
    if r.rotation:
        rows.append(("rotation", f"randomized Hadamard {r.rotation['hidden']} (residual) and "
                                 f"{r.rotation['head_dim']} (heads), seed {r.rotation['seed']}"
                                 + ("; lm_head untied" if r.rotation["untied"] else "")))
    if r.allocation:
        a = r.allocation
        rows.append(("allocation", f"{a['average_bits']:.3f} bits per weight: "
                     + ", ".join(f"{n} x {f}" for f, n in a["counts"].items())))
        for f in a["counts"]:
            if f.startswith("int8"):
                where = sorted({int(n.split(".")[2]) for n, g in a["formats"].items() if g == f})
                rows.append((f"  {f}", ", ".join(sorted({n.split(".", 3)[3] for n, g in a["formats"].items()
                                                          if g == f})) + f" in layers {_ranges(where)}"))
    kept_zeros = r.pruned_source is not None or bool(r.sparse24)
    rows += [
        ("layers quantized", str(len(r.quantized))
         + (f" ({len(r.sparse24)} of them 2:4 + int4)" if r.sparse24 else "")
         + ("; zeros of the pruned source kept" if kept_zeros else "")),
        ("layers kept", f"{len(r.skipped)}" + (f" ({', '.join(r.skipped)})" if r.skipped else "")
         + "; lm_head and embeddings stay"),
        ("size before / after", f"{r.bytes_before / 2**20:.1f} MiB / {r.bytes_after / 2**20:.1f} MiB"),
        ("time", f"{r.seconds:.1f} s"),
        ("peak memory", describe_memory(r.peak_memory)),
        ("vLLM", r.vllm),
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
