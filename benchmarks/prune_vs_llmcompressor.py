"""almak's pruners against llm-compressor's, side by side on one machine in one run.

A benchmark, not a test: llm-compressor lives only in this benchmark's environment (set it up as the
docstring of ``benchmarks/gptq_vs_llmcompressor.py`` says), then from the repository root:

    /tmp/venv-llmc/bin/python benchmarks/prune_vs_llmcompressor.py

What it measures, on SmolLM2-135M-Instruct (fp32, CPU): the reference perplexity of the first ``--limit``
WMT22 de-en sentences under the ALMA prompt, as in the GPTQ benchmark, after pruning every decoder-layer
linear (lm_head stays dense) with

- ``llmc-wanda-24`` / ``almak-wanda-24``: Wanda, 2:4;
- ``llmc-sparsegpt-24`` / ``almak-sparsegpt-24``: SparseGPT, 2:4, dampening 0.01, block 128;
- ``llmc-wanda-50`` / ``almak-wanda-50`` and ``llmc-sparsegpt-50`` / ``almak-sparsegpt-50``: 50% unstructured;
- ``almak-magnitude-24``: the data-free baseline;
- ``almak-sparsegpt-24-skip``: almak's 2:4 recipe for a model this small, with its default calibration
  (every ALMA direction): SparseGPT 2:4 on the MLP gate/up projections of decoder layers 1-28 (``--skip
  self_attn,down_proj,layers.0,layers.29``), everything else dense.

The llm-compressor and almak pairs calibrate on the same samples: almak's ``alma:de-en`` set (``--nsamples``
prompt + reference samples of ALMA's de-en training pairs, at most ``--seqlen`` tokens). Each method runs in
its own child process, one after the other; ``prune_s`` is the pruning call alone, RSS as in the GPTQ
benchmark. Writes ``benchmarks/results/prune-vs-llmcompressor-<device>.json`` and prints a table. Measures
and records; judges nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_vs_llmcompressor import (  # noqa: E402
    MARK,
    MODEL,
    RESULTS_DIR,
    TESTSET,
    device_name,
    perplexity,
    rss_mib,
    run_child,
    versions,
)

# almak's 2:4 recipe for the embedded model: attention, down projections and the first and last decoder layers
# stay dense. Chosen by hand on the same perplexity (200 de-en sentences, 2026-11-25, fp32 CPU, SparseGPT 2:4,
# 128 default samples): skip self_attn 98.1; self_attn + down_proj 63.7; self_attn + layers 0, 1, 28, 29
# 64.1; self_attn + down_proj + layers 0, 29 54.6 (float 31.15).
SKIP = ("self_attn", "down_proj", "layers.0", "layers.29")
# name -> (library, method, pattern or sparsity, skip, calibration)
METHODS = {
    "float": (None, None, None, (), None),
    "llmc-wanda-24": ("llmc", "wanda", "2:4", (), "alma:de-en"),
    "almak-wanda-24": ("almak", "wanda", "2:4", (), "alma:de-en"),
    "llmc-sparsegpt-24": ("llmc", "sparsegpt", "2:4", (), "alma:de-en"),
    "almak-sparsegpt-24": ("almak", "sparsegpt", "2:4", (), "alma:de-en"),
    "llmc-wanda-50": ("llmc", "wanda", 0.5, (), "alma:de-en"),
    "almak-wanda-50": ("almak", "wanda", 0.5, (), "alma:de-en"),
    "llmc-sparsegpt-50": ("llmc", "sparsegpt", 0.5, (), "alma:de-en"),
    "almak-sparsegpt-50": ("almak", "sparsegpt", 0.5, (), "alma:de-en"),
    "almak-magnitude-24": ("almak", "magnitude", "2:4", (), None),
    "almak-sparsegpt-24-skip": ("almak", "sparsegpt", "2:4", SKIP, "alma"),
}
DAMP, BLOCK = 0.01, 128


def llmc_prune(model, tokenizer, samples, seqlen: int, method: str, target) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ds = Dataset.from_dict({"input_ids": [s[0].tolist() for s in samples],
                            "attention_mask": [[1] * s.shape[1] for s in samples]})
    kw = {"sparsity": 0.5, "mask_structure": target if isinstance(target, str) else "0:0",
          "targets": ["Linear"], "ignore": ["lm_head"]}
    if method == "sparsegpt":
        recipe = SparseGPTModifier(**kw, dampening_frac=DAMP, block_size=BLOCK)
    else:
        recipe = WandaPruningModifier(**kw)
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=len(samples),
            max_seq_length=seqlen, shuffle_calibration_samples=False)
    return {"prune_s": time.perf_counter() - t0, "settings": {"recipe": repr(recipe)}}


def sparsity_check(model) -> dict:
    """Zeros of the decoder-layer projections, and whether every one is 2:4 (checked, not assumed)."""
    from almak.modeling.pipelines.prune import prunable_linears
    from almak.sparse import check_nm

    names = prunable_linears(model)
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in names)
    return {"projection_sparsity": zeros / total,
            "all_2of4": all(check_nm(model.get_submodule(n).weight.detach()) for n in names)}


def child(name: str, nsamples: int, seqlen: int, limit: int) -> dict:
    import torch

    from almak.modeling.load import load_model

    library, method, target, skip, calib = METHODS[name]
    t_start = time.perf_counter()
    lm = load_model(MODEL, device="cpu")
    model, tok = lm.model, lm.tokenizer
    rec: dict = {"method": name, "threads": torch.get_num_threads(), "calib": calib}
    samples = None
    if library == "llmc":
        from almak.modeling.pipelines.calibrate import calibration_samples

        samples = calibration_samples(tok, calib, nsamples=nsamples, seqlen=seqlen)
        rec["calib_tokens"] = int(sum(s.shape[1] for s in samples))
    rec["load_s"] = time.perf_counter() - t_start
    rec["rss_loaded_mib"] = rss_mib()
    if library == "llmc":
        rec.update(llmc_prune(model, tok, samples, seqlen, method, target))
    elif library == "almak":
        from almak.modeling.pipelines.prune import PruneRecipe, prune_model

        recipe = PruneRecipe(method=method, pattern=target if isinstance(target, str) else None,
                             sparsity=target if isinstance(target, float) else 0.5, skip=skip,
                             calib=calib or "alma", nsamples=nsamples, seqlen=seqlen, damp=DAMP, block_size=BLOCK)
        t0 = time.perf_counter()
        prune_model(model, tok, recipe)
        rec["prune_s"] = time.perf_counter() - t0
        rec["settings"] = {"recipe": recipe.to_json()}
    rec["rss_prune_mib"] = rss_mib()
    rec.update(sparsity_check(model))
    rec["ppl"], rec["ppl_s"] = perplexity(model, tok, limit)
    rec["rss_peak_mib"] = rss_mib()
    return rec


def table(res: dict) -> str:
    f = res.get("float", {}).get("ppl")
    head = f"{'method':<24} {'calib':<11} {'sparsity':>8} {'2:4':>4} {'ppl':>9} {'x float':>8} {'prune s':>8} {'RSS peak':>9}"
    rows = [head, "-" * len(head)]
    for name, r in res.items():
        x = f"{r['ppl'] / f:.2f}" if f else "-"
        rows.append(f"{name:<24} {str(r.get('calib') or '-'):<11} {r['projection_sparsity']:>8.3f} "
                    f"{'yes' if r['all_2of4'] else 'no':>4} {r['ppl']:>9.3f} {x:>8} "
                    f"{r.get('prune_s', 0):>8.1f} {r['rss_peak_mib']:>8.0f}M")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset, run in this order")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--limit", type=int, default=200, help="WMT22 de-en sentences scored")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.method:
        print(MARK + json.dumps(child(args.method, args.nsamples, args.seqlen, args.limit)), flush=True)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    device = device_name()
    started = datetime.datetime.now(datetime.timezone.utc)
    res = {m: run_child(m, args, __file__) for m in methods}
    ratios = {}
    for name, r in res.items():
        if name.startswith("almak-") and name.replace("almak-", "llmc-") in res:
            other = res[name.replace("almak-", "llmc-")]
            ratios[f"{name} / {name.replace('almak-', 'llmc-')}"] = {
                "ppl": r["ppl"] / other["ppl"], "prune_time": r["prune_s"] / other["prune_s"],
                "rss_peak": r["rss_peak_mib"] / other["rss_peak_mib"]}
    doc = {"benchmark": "prune-vs-llmcompressor", "date": started.isoformat(timespec="seconds"), "device": device,
           "cpu_count": os.cpu_count(), "platform": platform.platform(), "versions": versions(),
           "settings": {"model": MODEL, "dtype": "float32", "device": "cpu", "damp": DAMP, "block_size": BLOCK,
                        "targets": "every decoder-layer linear (lm_head dense)",
                        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
                        "methods": {k: {"library": v[0], "method": v[1], "target": v[2], "skip": list(v[3]),
                                        "calib": v[4]} for k, v in METHODS.items() if k in methods},
                        "eval": {"testset": TESTSET, "limit": args.limit, "prompt": "alma",
                                 "metric": "reference perplexity (almak.eval.metrics.reference_nll)"},
                        "order": methods},
           "results": res, "ratios": ratios}
    out = args.out or RESULTS_DIR / f"prune-vs-llmcompressor-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(res))
    for k, d in ratios.items():
        print(f"{k}: " + ", ".join(f"{n} {v:.3f}" for n, v in d.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
