"""``almak prune``: magnitude, Wanda or SparseGPT, unstructured or N:M, written as a checkpoint."""

from __future__ import annotations

import click

from almak.cli.common import SEED, Finite, calibration_options, print_table, sparse_format_option, stage_bars
from almak.errors import AlmakError
from almak.modeling.devices import describe_memory
from almak.modeling.pipelines.prune import PruneRecipe
from almak.modeling.pipelines.prune import prune as run_prune
from almak.modeling.pipelines.structured import StructuredRecipe

# The CLI takes its defaults from the library's recipes.
PRUNE_DEFAULTS = PruneRecipe()
STRUCTURED_DEFAULTS = StructuredRecipe(layers=1)  # any shape: only its calibration defaults are read


@click.command()
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt", "structured"]),
              default=PRUNE_DEFAULTS.method, show_default=True,
              help="magnitude: |W|, no data. wanda: |W| x input norm (Sun et al. 2023). sparsegpt: OBS updates on "
                   "the remaining weights (Frantar & Alistarh 2023). structured: a smaller model (fewer layers, "
                   "heads, MLP neurons or hidden channels) that every engine runs faster; see --target-params and "
                   "the shape options, then almak distill it from MODEL.")
@click.option("--sparsity", type=Finite(0, 1, min_open=True, max_open=True), default=None,
              help=f"Unstructured: fraction of each output row to prune [default: {PRUNE_DEFAULTS.sparsity}].")
@click.option("--pattern", default=None, help="N:M semi-structured pattern instead, e.g. 2:4 (keep 2 of every 4 "
                                              "along the input dimension; runs on almak's 2:4 kernel).")
@click.option("--skip", multiple=True, help="Leave layers dense: a name, a dotted fragment on whole components "
                                            "(layers.0, self_attn, mlp.down_proj) or a glob; repeat or comma-separate.")
@click.option("--target-params", type=Finite(0, 1, min_open=True, max_open=True),
              help="structured: keep at most this fraction of the decoder layers' parameters; almak measures every "
                   "layer's, head's, neuron's and hidden channel's importance on the calibration samples, prunes "
                   "candidate uniform shapes within 3% under the budget (spread from the most layers to the fewest, "
                   "each dimension at least halved) in one shot, and keeps the one with the lowest calibration loss "
                   "(untrained; distillation then recovers it).")
@click.option("--layers", type=click.IntRange(min=1), help="structured: decoder layers to keep (the least important, "
                                                             "by the loss when skipped, go).")
@click.option("--heads", type=click.IntRange(min=1),
              help="structured: query heads per layer to keep. Under grouped-query attention every key/value group "
                   "keeps the same number (heads / kv-heads): with --kv-heads unchanged, each group drops its least "
                   "important query heads; key/value heads stay unless --kv-heads removes whole groups.")
@click.option("--kv-heads", type=click.IntRange(min=1),
              help="structured: key/value heads per layer to keep; the least important groups (with all their "
                   "query heads) go.")
@click.option("--mlp", type=click.IntRange(min=1), help="structured: MLP width (intermediate size) to keep.")
@click.option("--hidden", type=click.IntRange(min=1),
              help="structured: hidden size to keep: the embeddings, every norm and every projection that reads or "
                   "writes the residual stream lose the same least important channels.")
@click.option("--calib", default=PRUNE_DEFAULTS.calib, show_default=True,
              help="wanda/sparsegpt/structured calibration: alma, alma:de-en,en-de, a JSON/JSONL translation file or "
                   "a text file.")
@click.option("--nsamples", type=click.IntRange(min=1),
              help=f"Calibration samples [default: {PRUNE_DEFAULTS.nsamples}; structured: "
                   f"{STRUCTURED_DEFAULTS.nsamples}].")
@click.option("--seqlen", type=click.IntRange(min=8),
              help=f"Tokens per sample at most [default: {PRUNE_DEFAULTS.seqlen}; structured: "
                   f"{STRUCTURED_DEFAULTS.seqlen}].")
@click.option("--seed", type=SEED, default=PRUNE_DEFAULTS.seed, show_default=True)
@click.option("--damp", type=Finite(0, 1, min_open=True), default=PRUNE_DEFAULTS.damp, show_default=True,
              help="sparsegpt: dampening, as a fraction of the Hessian's mean diagonal.")
@calibration_options
@sparse_format_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (safetensors; see --sparse-format for 2:4 layers).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def prune(model, method, sparsity, pattern, skip, target_params, layers, heads, kv_heads, mlp, hidden, calib, nsamples,
          seqlen, seed, damp, prompt_family, device, dtype, sparse_format, out_dir, overwrite):
    """Prune MODEL's decoder-layer projections to 50% (or --sparsity) or an N:M pattern; write a checkpoint.

    2:4 checkpoints load back into almak's 2:4 layers (its 2:4 kernel); by default they are stored dense, named
    2:4 in config.json, so that transformers and vLLM load them too (as dense models). almak quantize takes
    them for 2:4 + int4. Unstructured checkpoints are dense with zeros. Both hold sparsity_report.json
    (per-layer sparsity) and almak_recipe.json.

    Structured pruning writes a plain model of a smaller, uniform shape (transformers, vLLM and llama.cpp load it
    as they load MODEL), with structure_report.json (what was kept, the importances, the shapes compared).

    \b
    Examples:
      almak prune --method sparsegpt --pattern 2:4 --skip self_attn --out smollm-24
      almak prune --method wanda --sparsity 0.5 --out smollm-wanda50
      almak prune smollm2-135m-mt --method structured --target-params 0.67 --out smollm-small
      almak prune smollm2-135m-mt --method structured --layers 24 --mlp 1280 --out smollm-small
    """
    shape = {"--target-params": target_params, "--layers": layers, "--heads": heads, "--kv-heads": kv_heads,
             "--mlp": mlp, "--hidden": hidden}
    if method == "structured":
        unused = [o for o, v in (("--sparsity", sparsity), ("--pattern", pattern), ("--skip", skip)) if v]
        if unused:
            raise AlmakError(f"{', '.join(unused)} prune weights inside the layers; --method structured removes whole "
                             "layers, heads, neurons and channels (--target-params, --layers, ...)")
        recipe = StructuredRecipe(target_params=target_params, layers=layers, heads=heads, kv_heads=kv_heads,
                                  mlp=mlp, hidden=hidden, calib=calib, seed=seed,
                                  nsamples=nsamples or STRUCTURED_DEFAULTS.nsamples,
                                  seqlen=seqlen or STRUCTURED_DEFAULTS.seqlen)
        with stage_bars(unit="pass") as progress:
            r = run_prune(model, recipe, out_dir, device=device, dtype=dtype, prompt=prompt_family,
                          sparse_format=sparse_format, overwrite=overwrite, progress=progress)
        print_structured(r, out_dir)
        return
    given = [o for o, v in shape.items() if v is not None]
    if given:
        raise AlmakError(f"{', '.join(given)} go with --method structured")
    nsamples, seqlen = nsamples or PRUNE_DEFAULTS.nsamples, seqlen or PRUNE_DEFAULTS.seqlen
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


def print_structured(r, out_dir) -> None:
    fraction = r.shape.decoder_params() / r.source_shape.decoder_params()
    rows = [("model", r.model),
            ("method", f"structured, {r.recipe.nsamples} x <={r.recipe.seqlen} tokens of {r.recipe.calib}"
             + (f", budget {r.recipe.target_params:g} of the decoder parameters" if r.recipe.target_params else "")),
            ("shape before", r.source_shape.describe()),
            ("shape after", r.shape.describe()),
            ("decoder parameters", f"{r.source_shape.decoder_params() / 1e6:.1f}M -> "
                                   f"{r.shape.decoder_params() / 1e6:.1f}M ({fraction:.3f})"),
            ("all parameters", f"{r.params_before / 1e6:.1f}M -> {r.params_after / 1e6:.1f}M"),
            ("layers kept", ", ".join(map(str, r.kept.layers))),
            ("calibration loss", f"{r.base_loss:.3f} -> {r.loss:.3f} (before distillation)")]
    if r.candidates:
        best = min(v for _, v in r.candidates)
        rows.append(("shapes compared", f"{len(r.candidates)}; the chosen one's loss {best:.3f}, the worst's "
                                        f"{max(v for _, v in r.candidates):.3f}"))
    rows += [("time", f"{r.seconds:.1f} s"), ("peak memory", describe_memory(r.peak_memory)),
             ("next", f"almak distill {out_dir} --teacher {r.model} ..."), ("written to", out_dir)]
    print_table(rows)
