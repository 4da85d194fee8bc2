"""``almak prune``: magnitude, Wanda or SparseGPT, unstructured or N:M, written as a checkpoint."""

from __future__ import annotations

import click

from almak.cli.common import SEED, Finite, calibration_options, print_table, sparse_format_option, stage_bars
from almak.errors import AlmakError
from almak.modeling.devices import describe_memory
from almak.modeling.pipelines.prune import PruneRecipe
from almak.modeling.pipelines.prune import prune as run_prune

# The CLI takes its defaults from the library's recipe.
PRUNE_DEFAULTS = PruneRecipe()


@click.command()
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default=PRUNE_DEFAULTS.method,
              show_default=True, help="magnitude: |W|, no data. wanda: |W| x input norm (Sun et al. 2023). "
                                      "sparsegpt: OBS updates on the remaining weights (Frantar & Alistarh 2023).")
@click.option("--sparsity", type=Finite(0, 1, min_open=True, max_open=True), default=None,
              help=f"Unstructured: fraction of each output row to prune [default: {PRUNE_DEFAULTS.sparsity}].")
@click.option("--pattern", default=None, help="N:M semi-structured pattern instead, e.g. 2:4 (keep 2 of every 4 "
                                              "along the input dimension; runs on almak's 2:4 kernel).")
@click.option("--skip", multiple=True, help="Leave layers dense: a name, a dotted fragment on whole components "
                                            "(layers.0, self_attn, mlp.down_proj) or a glob; repeat or comma-separate.")
@click.option("--calib", default=PRUNE_DEFAULTS.calib, show_default=True,
              help="wanda/sparsegpt calibration: alma, alma:de-en,en-de, a JSON/JSONL translation file or a text file.")
@click.option("--nsamples", type=click.IntRange(min=1), default=PRUNE_DEFAULTS.nsamples, show_default=True)
@click.option("--seqlen", type=click.IntRange(min=8), default=PRUNE_DEFAULTS.seqlen, show_default=True)
@click.option("--seed", type=SEED, default=PRUNE_DEFAULTS.seed, show_default=True)
@click.option("--damp", type=Finite(0, 1, min_open=True), default=PRUNE_DEFAULTS.damp, show_default=True,
              help="sparsegpt: dampening, as a fraction of the Hessian's mean diagonal.")
@calibration_options
@sparse_format_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (safetensors; see --sparse-format for 2:4 layers).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def prune(model, method, sparsity, pattern, skip, calib, nsamples, seqlen, seed, damp, prompt_family, device, dtype,
          sparse_format, out_dir, overwrite):
    """Prune MODEL's decoder-layer projections to 50% (or --sparsity) or an N:M pattern; write a checkpoint.

    2:4 checkpoints load back into almak's 2:4 layers (its 2:4 kernel); by default they are stored dense, named
    2:4 in config.json, so that transformers and vLLM load them too (as dense models). almak quantize takes
    them for 2:4 + int4. Unstructured checkpoints are dense with zeros. Both hold sparsity_report.json
    (per-layer sparsity) and almak_recipe.json.

    \b
    Examples:
      almak prune --method sparsegpt --pattern 2:4 --skip self_attn --out smollm-24
      almak prune --method wanda --sparsity 0.5 --out smollm-wanda50
    """
    if pattern and sparsity is not None:
        raise AlmakError("give --sparsity (unstructured) or --pattern (N:M), not both")
    recipe = PruneRecipe(method=method, sparsity=PRUNE_DEFAULTS.sparsity if sparsity is None else sparsity,
                         pattern=pattern, skip=skip, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         damp=damp)
    with stage_bars(unit="layer") as progress:
        r = run_prune(model, recipe, out_dir, device=device, dtype=dtype, prompt=prompt_family,
                      sparse_format=sparse_format, overwrite=overwrite, progress=progress)
    report, stored_24 = r.report, r.stored_24
    what = f"{method} {recipe.target()}" + ("" if method == "magnitude" else f", {nsamples} x <={seqlen} tokens of {calib}")
    rows = [("model", r.model), ("method", what),
            ("layers pruned", f"{len(report['pruned'])}" + (f" ({len(stored_24)} of them 2:4 layers)" if stored_24 else "")),
            ("layers kept dense", _skipped_summary(report["skipped"])),
            ("sparsity", f"{report['pruned_sparsity']:.1%} of the pruned layers, {report['sparsity']:.1%} of all "
                         "projections"),
            ("size before / after", f"{r.bytes_before / 2**20:.1f} MiB / {r.bytes_after / 2**20:.1f} MiB in memory"
             + ("" if stored_24 and sparse_format != "dense" else
                " (stored dense)" if stored_24 else " (unstructured: stored dense)")),
            ("time", f"{r.seconds:.1f} s"), ("peak memory", describe_memory(r.peak_memory))]
    rows += _per_layer_rows(report["layers"])
    if r.vllm:
        rows.append(("vLLM", r.vllm))
    rows.append(("written to", out_dir))
    print_table(rows)


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
