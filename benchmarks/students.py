"""Depth-only, width-only and combined students of ``smollm2-135m-mt`` at the same parameter budget, side by side:
quality after the same distillation budget, and end-to-end translation time on three engines.

    .venv/bin/python -P benchmarks/students.py --steps 25 --workdir runs/students \\
        [--vllm-python .venv-vllm/bin/python] [--extra shipped=smollm2-mt-student] [--skip depth-only:hf]

Each student is ``almak prune smollm2-135m-mt --method structured SHAPE --calib alma:de-en,en-de`` then ``almak
distill STUDENT --teacher smollm2-135m-mt --data alma:de-en,en-de --steps N`` (the same settings for each; folders
in ``--workdir`` are reused when present). Then, for the teacher and each student:

- quality: reference perplexity on the first ``--ppl-sentences`` WMT22 de-en and en-de sentences, chrF of greedy
  translations of the first ``--sentences`` of each (``almak eval``);
- speed: wall time of whole ``almak eval MODEL --testset wmt22:de-en --limit --sentences --metrics chrf
  --num-beams 1 --batch-size 8`` processes (start-up, load, translation, scoring), in almak's loop (``--engine
  almak``), transformers' ``generate`` (``--engine hf``) and, with ``--vllm-python``, vLLM's CPU build (``--engine
  vllm``), ``--repeats`` rounds in turn, medians; and the tokens each wrote per second of translation (a student
  that has not learnt to stop writes longer translations: its whole-process time mixes speed with quality).

Quality is kept in ``--workdir`` (``quality-NAME.json``) and reused by later runs.
Writes ``benchmarks/results/students-<device>.json`` and a ``.png`` beside it. Measures and records; judges nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_end_to_end import run_process  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TEACHER = "smollm2-135m-mt"
# About two thirds of the decoder parameters each (106.2M in the teacher's 30 layers).
SHAPES = {
    "depth-only": ["--layers", "20"],  # 70.8M (0.667)
    "width-only": ["--heads", "6", "--kv-heads", "2", "--mlp", "1024"],  # 70.8M (0.667)
    "combined": ["--layers", "24", "--mlp", "1152"],  # 69.0M (0.650)
}


def run(args: list, python: str = sys.executable, env: dict | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of ``python -P -m almak.cli.main ARGS``; stops the benchmark if it fails."""
    seconds, _, stdout = run_process([python, "-P", "-m", "almak.cli.main", *map(str, args)], env)
    return seconds, stdout


def build(name: str, shape: list[str], args, workdir: Path) -> Path:
    pruned, student = workdir / f"{name}-pruned", workdir / name
    if not (pruned / "config.json").is_file():
        run(["prune", TEACHER, "--method", "structured", *shape, "--calib", "alma:de-en,en-de", "--device", "cpu",
             "--out", pruned])
    if not (student / "config.json").is_file():
        seconds, _ = run(["distill", pruned, "--teacher", TEACHER, "--data", "alma:de-en,en-de", "--steps",
                          args.steps, "--batch-size", 8, "--grad-accum", 2, "--group-by-length",
                          "--valid-sentences", 0, "--save-every", 0, "--seed", 0, "--device", "cpu", "--out", student,
                          *(["--lr", args.lr] if args.lr else []), "--overwrite"])
        print(f"  {name}: distilled in {seconds:.0f} s", flush=True)
    return student


def quality(model, args) -> dict:
    out = {}
    for pair in ("de-en", "en-de"):
        _, text = run(["eval", model, "--testset", f"wmt22:{pair}", "--limit", args.ppl_sentences, "--metrics", "nll",
                       "--dtype", "float32", "--format", "json"])
        out[f"ppl_{pair}"] = round(json.loads(text)["ppl"], 4)
        _, text = run(["eval", model, "--testset", f"wmt22:{pair}", "--limit", args.sentences, "--metrics", "chrf",
                       "--num-beams", "1", "--batch-size", 8, "--dtype", "float32", "--format", "json"])
        out[f"chrf_{pair}"] = round(json.loads(text)["chrf"], 3)
    return out


def speed(models: dict[str, str], args) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and engine, medians over the rounds: ``seconds`` (the whole process), ``tokens`` (generated in
    all) and ``tokens_per_s`` (generated tokens per second of translation, as the eval report gives it). A student
    that has not learnt to stop writes longer translations, so its whole-process time mixes speed with quality;
    the token rate does not."""
    engines = [("almak", sys.executable), ("hf", sys.executable)]
    if args.vllm_python:
        engines.append(("vllm", args.vllm_python))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    skip = {tuple(pair.split(":", 1)) for pair in args.skip.split(",") if pair}
    runs: dict[str, dict[str, list[dict]]] = {m: {e: [] for e, _ in engines if (m, e) not in skip} for m in models}
    for _ in range(args.repeats):
        for name, ref in models.items():
            for engine, python in engines:
                if (name, engine) in skip:
                    continue
                seconds, text = run(["eval", ref, "--testset", "wmt22:de-en", "--limit", args.sentences,
                                     "--metrics", "chrf", "--num-beams", 1, "--batch-size", 8, "--engine", engine,
                                     "--format", "json"], python, env)
                report = json.loads(text)
                rate = report["generated_tokens_per_s"]
                runs[name][engine].append({"seconds": seconds, "tokens_per_s": rate,
                                           "tokens": round(rate * report["translate_seconds"])})
                print(f"  {name:12s} {engine:6s} {seconds:6.1f} s, {rate:6.1f} tokens/s", flush=True)
    return {m: {e: {k: round(statistics.median(r[k] for r in v), 2) for k in ("seconds", "tokens", "tokens_per_s")}
                for e, v in t.items()} for m, t in runs.items()}


def cached_quality(name: str, model: str, args) -> dict:
    """:func:`quality` of ``model``, kept in ``--workdir`` (``quality-NAME.json``) for later runs with the same
    sentence counts."""
    path = args.workdir / f"quality-{name}.json"
    key = {"model": str(model), "sentences": args.sentences, "ppl_sentences": args.ppl_sentences}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["key"] == key:
            return saved["quality"]
    out = quality(model, args)
    path.write_text(json.dumps({"key": key, "quality": out}, indent=2) + "\n", encoding="utf-8")
    return out


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(doc["models"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, keys, title in ((axes[0], ("ppl_de-en", "ppl_en-de"), "reference perplexity (lower is better)"),
                            (axes[1], ("chrf_de-en", "chrf_en-de"), "chrF, greedy"),
                            (axes[2], tuple(doc["engines"]), "generated tokens per second, greedy, batch 8")):
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            values = [doc["models"][n]["quality"][key] if key.startswith(("ppl", "chrf"))
                      else doc["models"][n]["speed"].get(key, {}).get("tokens_per_s", 0) for n in names]
            ax.bar([i + k * width for i in range(len(names))], values, width, label=key)
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(names))], names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"students of {TEACHER} at about 2/3 of its decoder parameters, {doc['steps']} distillation steps "
                 f"({doc['device']}, {doc['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="distillation steps of each student (16 examples)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--ppl-sentences", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default=",".join(SHAPES), help="comma-separated students to build and measure")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=MODEL",
                        help="also measure a model built elsewhere (a name almak takes, or a folder), e.g. "
                             "shipped=smollm2-mt-student; repeatable")
    parser.add_argument("--skip", default="", metavar="NAME:ENGINE,...",
                        help="model/engine pairs not timed (e.g. depth-only:hf)")
    parser.add_argument("--vllm-python", help="the Python of an environment with vLLM's CPU build (make test-vllm's)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/students"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from transformers import AutoConfig

    from almak.eval.bench import device_name
    from almak.modeling.load import BUILT, built_path
    from almak.modeling.pipelines.structured import Shape

    args.workdir.mkdir(parents=True, exist_ok=True)
    device = device_name("cpu")
    models = {"teacher": TEACHER}
    for name in args.only.split(","):
        print(f"building {name} ({' '.join(SHAPES[name])})", flush=True)
        models[name] = str(build(name, SHAPES[name], args, args.workdir))
    for extra in args.extra:
        name, _, ref = extra.partition("=")
        if not name or not ref:
            raise SystemExit(f"--extra takes NAME=MODEL, got {extra!r}")
        models[name] = ref
    doc = {"benchmark": "students", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "teacher": TEACHER,
           "steps": args.steps, "sentences": args.sentences, "ppl_sentences": args.ppl_sentences,
           "engines": ["almak", "hf"] + (["vllm"] if args.vllm_python else []), "models": {}}
    for name, ref in models.items():
        folder = built_path(ref) if ref in BUILT else Path(ref)
        shape = Shape.of(AutoConfig.from_pretrained(folder)) if (folder / "config.json").is_file() else None
        doc["models"][name] = {"ref": ref, "shape": shape._asdict() if shape else None,
                               "decoder_params": shape.decoder_params() if shape else None,
                               "quality": cached_quality(name, ref, args)}
        print(f"  {name}: {doc['models'][name]['quality']}", flush=True)
    for name, measured in speed(models, args).items():
        doc["models"][name]["speed"] = measured
    for name in models:  # against the teacher's, measured in the same rounds
        t, m = doc["models"]["teacher"]["speed"], doc["models"][name]["speed"]
        doc["models"][name]["speedup"] = {e: round(t[e]["seconds"] / m[e]["seconds"], 3) for e in m if e in t}
        doc["models"][name]["rate_ratio"] = {e: round(m[e]["tokens_per_s"] / t[e]["tokens_per_s"], 3) for e in m
                                             if e in t}
    out = args.out or RESULTS_DIR / f"students-{device}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print("\n| model | decoder params | ppl de-en / en-de | chrF de-en / en-de | " + " | ".join(
        f"{e}: time, tokens/s" for e in doc["engines"]) + " |")
    for name, m in doc["models"].items():
        q = m["quality"]
        params = f"{m['decoder_params'] / 1e6:.1f}M" if m["decoder_params"] else "106.2M (teacher)"
        print(f"| {name} | {params} | {q['ppl_de-en']:.2f} / {q['ppl_en-de']:.2f} | {q['chrf_de-en']:.2f} / "
              f"{q['chrf_en-de']:.2f} | " + " | ".join(
                  f"{m['speed'][e]['seconds']:.1f} s ({m['speedup'][e]:.2f}x), {m['speed'][e]['tokens_per_s']:.0f} "
                  f"({m['rate_ratio'][e]:.2f}x)" if e in m["speed"] else "-" for e in doc["engines"]) + " |")
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot(doc, out.with_suffix(".png")) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
