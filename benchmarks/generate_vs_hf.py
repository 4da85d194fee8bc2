"""almak's generation loop against transformers' generate, side by side on one machine in one run.

    .venv/bin/python benchmarks/generate_vs_hf.py [--limit-greedy 24] [--limit-beam 8] [--repeats 2] [--device cpu]

What it measures, on the embedded model (``smollm2-135m``, fp32 on the CPU, or ``--dtype`` on a GPU): the wall
time of :func:`almak.modeling.engines.generate.translate` over the first WMT22 de-en sentences under the ALMA prompt, with
``engine="almak"`` and ``engine="hf"``, in three settings: greedy at batch 1, greedy at batch 8 (``--limit-greedy``
sentences each) and beam 5 at batch 8 (``--limit-beam`` sentences), 256 new tokens at most, as ``almak translate``
does. Runs alternate between the engines (almak, hf, almak, hf, ...) so that machine noise hits both alike; the
median of ``--repeats`` is reported. Tokens/s counts the tokens each sentence generated up to its stop (the same
count for both engines when their outputs agree), so it is a user's speed, padding and finished rows not counted.
``same_output`` says whether both engines wrote exactly the same raw text for every sentence.

Writes ``benchmarks/results/generate-vs-hf-<device>.json`` and prints a table. Measures and records; judges
nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SETTINGS = (("greedy, batch 1", 1, 1), ("greedy, batch 8", 1, 8), ("beam 5, batch 8", 5, 8))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-greedy", type=int, default=24)
    parser.add_argument("--limit-beam", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/generate-vs-hf-<device>.json)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from almak.eval.bench import device_name
    from almak.modeling.engines.generate import GenerationConfig, translate
    from almak.modeling.load import load_model
    from almak.modeling.text.data import load_testset
    from almak.modeling.text.prompts import Prompt

    lm = load_model("smollm2-135m", device=args.device, dtype=args.dtype)
    testset = load_testset("wmt22:de-en")
    prompt = Prompt("alma", "de", "en")
    translate(lm.model, lm.tokenizer, testset.sources[:2], prompt, GenerationConfig(num_beams=1, max_new_tokens=8))
    results = []
    for label, beams, batch in SETTINGS:
        sources = testset.sources[: args.limit_beam if beams > 1 else args.limit_greedy]
        runs = {"almak": [], "hf": []}
        raw = {}
        for _ in range(args.repeats):
            for engine in runs:
                config = GenerationConfig(num_beams=beams, max_new_tokens=args.max_new_tokens, batch_size=batch,
                                          engine=engine)
                t0 = time.perf_counter()
                out = translate(lm.model, lm.tokenizer, sources, prompt, config)
                seconds = time.perf_counter() - t0
                runs[engine].append({"seconds": seconds, "tokens": out.generated_tokens})
                raw[engine] = out.raw
        rec = {"setting": label, "num_beams": beams, "batch_size": batch, "sentences": len(sources)}
        for engine, rs in runs.items():
            seconds = statistics.median(r["seconds"] for r in rs)
            rec[engine] = {"seconds": round(seconds, 3), "generated_tokens": rs[0]["tokens"],
                           "tok_s": round(rs[0]["tokens"] / seconds, 2), "all_seconds": [round(r["seconds"], 3) for r in rs]}
        rec["speedup"] = round(rec["hf"]["seconds"] / rec["almak"]["seconds"], 3)
        rec["same_output"] = raw["almak"] == raw["hf"]
        results.append(rec)
        print(f"{label:18s} {len(sources):3d} sentences: almak {rec['almak']['tok_s']:7.1f} tok/s, "
              f"hf {rec['hf']['tok_s']:7.1f} tok/s, {rec['speedup']:.2f}x, same output: {rec['same_output']}",
              flush=True)

    device = device_name(args.device)
    doc = {"benchmark": "generate_vs_hf", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "model": "smollm2-135m", "dtype": str(next(lm.model.parameters()).dtype),
           "testset": "wmt22:de-en", "prompt": "alma", "max_new_tokens": args.max_new_tokens,
           "repeats": args.repeats, "results": results}
    out = Path(args.out) if args.out else RESULTS_DIR / f"generate-vs-hf-{device}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
