"""What a CPU user sees end to end: wall time, peak memory, speed and chrF of whole ``almak`` runs, float against
int8 and int4, side by side in one run.

    .venv/bin/python benchmarks/cpu_end_to_end.py [--sentences 64] [--batch-size 8] [--layers 2] [--repeats 1]

Part 1, the embedded model (``smollm2-135m-mt``): each run is one fresh ``almak eval`` process over the first
``--sentences`` WMT22 de-en sentences (German news, held out from the adapter's training pairs), greedy, batch
``--batch-size``, chrF only, ``--dtype auto`` (what a user gets; the report says which dtype that was): the
float model in transformers' ``generate`` (``--engine hf``) and in almak's loop, then almak's int8 (RTN per
channel) and int4 (GPTQ group 64, symmetric, calibrated on de-en pairs: RTN int4 wrecks this small model, whose
outputs then run on for many more tokens) checkpoints of it in almak's loop. Wall time is the whole
process (start-up, loading, translation, scoring), peak RSS its ``ru_maxrss`` (``os.wait4``); tokens/s is the
run's own count of generated tokens over its translation time. Runs go in turn, ``--repeats`` rounds, medians
reported; the checkpoints are written first (``--workdir``, reused when present).

Part 2, a random-weight model of ALMA-7B's exact layer shapes cut to ``--layers`` decoder layers: ``almak bench
--shape alma-7b --layers N`` with float, int8 and int4 in one process (decode tokens/s at batch 1, side by side,
interleaved), then each variant alone in its own process for its peak RSS.

Writes ``benchmarks/results/cpu-end-to-end-<device>.json`` and ``.png`` (wall time, peak RSS and tokens/s per
run, when matplotlib is installed) and prints a table. Measures and records; judges nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-mt"
CHECKPOINTS = {
    "int8": ["--method", "rtn", "--bits", "8", "--group-size", "-1"],
    "int4": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--calib", "alma:de-en"],
}


def run_process(args: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one process (``env``: its environment, this one's when None);
    stops the benchmark if it fails."""
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out_file, stderr=err_file, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (Popen.wait would discard it)
        seconds = time.perf_counter() - t0
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}):\n{err[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, out


def almak(*args) -> list[str]:
    return [sys.executable, "-P", "-m", "almak.cli.main", *map(str, args)]  # -P: the checkout stays off sys.path


def embedded_runs(args, workdir: Path) -> list[dict]:
    for name, recipe in CHECKPOINTS.items():
        if not (workdir / name).is_dir():
            run_process(almak("quantize", MODEL, *recipe, "--out", workdir / name))
    runs = [("float, transformers generate", MODEL, "hf"), ("float, almak", MODEL, "almak"),
            ("int8 checkpoint, almak", workdir / "int8", "almak"), ("int4 g64 (GPTQ) checkpoint, almak", workdir / "int4", "almak")]
    measured: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
    for _ in range(args.repeats):
        for label, model, engine in runs:
            seconds, rss, out = run_process(almak(
                "eval", model, "--testset", "wmt22:de-en", "--limit", args.sentences, "--num-beams", "1",
                "--batch-size", args.batch_size, "--metrics", "chrf", "--engine", engine, "--format", "json"))
            report = json.loads(out)
            measured[label].append({"wall_s": seconds, "peak_rss_bytes": rss, "chrf": report["chrf"],
                                    "tok_s": report["generated_tokens_per_s"], "dtype": report["dtype"],
                                    "translate_s": report["translate_seconds"]})
            print(f"  {label:28s} {seconds:6.1f} s  {rss / 2**20:6.0f} MiB  chrF {report['chrf']:.2f}  "
                  f"{report['generated_tokens_per_s']:.1f} tok/s ({report['dtype']})", flush=True)
    base = None
    records = []
    for label, model, engine in runs:
        rs = measured[label]
        rec = {"run": label, "model": str(model), "engine": engine, "dtype": rs[0]["dtype"], "chrf": rs[0]["chrf"],
               "wall_s": round(statistics.median(r["wall_s"] for r in rs), 2),
               "translate_s": round(statistics.median(r["translate_s"] for r in rs), 2),
               "peak_rss_mib": round(statistics.median(r["peak_rss_bytes"] for r in rs) / 2**20, 1),
               "tok_s": round(statistics.median(r["tok_s"] for r in rs), 2),
               "all_wall_s": [round(r["wall_s"], 2) for r in rs]}
        base = base or rec
        rec["speedup_vs_generate"] = round(base["wall_s"] / rec["wall_s"], 3)
        rec["rss_vs_float"] = round(rec["peak_rss_mib"] / base["peak_rss_mib"], 3)
        records.append(rec)
    return records


def shaped_runs(args, workdir: Path) -> dict:
    common = ["--shape", "alma-7b", "--layers", args.layers, "--device", "cpu", "--batch-sizes", "1",
              "--prompt-len", "64", "--gen-len", args.gen_len, "--repeats", args.bench_repeats, "--no-plot"]
    out = workdir / "bench-shape"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    run_process(almak("bench", "float", "int8", "int4", *common, "--out", out))
    bench = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    result = {"layers": args.layers, "decode": [
        {"variant": r["model"], "decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"],
         "decode_speedup": r["decode_speedup"]} for r in bench["results"]],
        "dtype": {name: m["dtype"] for name, m in bench["models"].items()}}
    rss = {}
    for variant in ("float", "int8", "int4"):
        alone = workdir / f"bench-shape-{variant}"
        if alone.exists():
            import shutil

            shutil.rmtree(alone)
        _, peak, _ = run_process(almak("bench", variant, *common, "--out", alone))
        rss[variant] = round(peak / 2**20, 1)
        print(f"  alma-7b x{args.layers} layers {variant:6s} peak RSS {rss[variant]:.0f} MiB", flush=True)
    result["peak_rss_mib"] = rss
    result["rss_vs_float"] = {v: round(m / rss["float"], 3) for v, m in rss.items()}
    return result


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = doc["embedded"]
    labels = [r["run"].replace(", ", "\n") for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("wall_s", "peak_rss_mib", "tok_s"),
                              ("wall time (s)", "peak RSS (MiB)", "generated tokens/s")):
        ax.bar(range(len(records)), [r[key] for r in records], color=["#999", "#48c", "#e83", "#c33"])
        ax.set_xticks(range(len(records)), labels, fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"{doc['model']}, {doc['sentences']} WMT22 de-en sentences, greedy, batch {doc['batch_size']} "
                 f"({doc['device']}, {doc['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the ALMA-7B-shaped model")
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--bench-repeats", type=int, default=3)
    parser.add_argument("--skip-shape", action="store_true", help="part 1 only")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/cpu-end-to-end-<device>.json)")
    args = parser.parse_args(argv)

    import torch

    from almak.eval.bench import device_name
    from almak.modeling.devices import cpu_bf16_support

    device = device_name("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"{MODEL}, {args.sentences} sentences, batch {args.batch_size}:", flush=True)
        doc = {"benchmark": "cpu_end_to_end",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_bf16": cpu_bf16_support() or "none", "model": MODEL, "sentences": args.sentences,
               "batch_size": args.batch_size, "repeats": args.repeats, "checkpoints": CHECKPOINTS,
               "embedded": embedded_runs(args, workdir)}
        if not args.skip_shape:
            print(f"alma-7b shape, {args.layers} layers, batch 1:", flush=True)
            doc["alma_7b_shape"] = shaped_runs(args, workdir)
    out = Path(args.out) if args.out else RESULTS_DIR / f"cpu-end-to-end-{device}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print("\n| run | dtype | wall time | peak RSS | generated tok/s | chrF |\n| --- | --- | --- | --- | --- | --- |")
    for r in doc["embedded"]:
        print(f"| {r['run']} | {r['dtype']} | {r['wall_s']:.1f} s ({r['speedup_vs_generate']:.2f}x) | "
              f"{r['peak_rss_mib']:.0f} MiB ({r['rss_vs_float']:.2f}x) | {r['tok_s']:.1f} | {r['chrf']:.2f} |")
    if "alma_7b_shape" in doc:
        s = doc["alma_7b_shape"]
        for r in s["decode"]:
            print(f"alma-7b x{s['layers']}: {r['variant']:6s} decode {r['decode_tok_s']:.2f} tok/s "
                  f"({r['decode_speedup']:.2f}x float), peak RSS {s['peak_rss_mib'][r['variant']]:.0f} MiB "
                  f"({s['rss_vs_float'][r['variant']]:.2f}x)")
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot(doc, out.with_suffix(".png")) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
