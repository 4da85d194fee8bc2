"""How a structured-pruned student recovers: chrF and reference perplexity against distillation steps.

    .venv/bin/python benchmarks/student_curve.py STUDENT --teacher smollm2-135m-mt --steps 200 \\
        --at 0,25,50,100,150,200 --out benchmarks/results/student-curve-NAME.json

STUDENT is an ``almak prune --method structured`` folder. The run is ``almak distill``'s (the same loop, data,
loss and schedule as ``almak distill STUDENT --teacher ... --data alma:de-en,en-de``); at each step of ``--at`` the
student being trained is scored in place: chrF of its greedy translations of the first ``--chrf-sentences`` WMT22
de-en sentences (German news, held out from ALMA's training pairs) in almak's loop, and its reference perplexity on
the first ``--ppl-sentences`` of WMT22 de-en and en-de. The teacher is scored the same way once. Writes one JSON
(the settings, the machine, the points) and prints the curve. Measures and records; judges nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def score(model, tokenizer, chrf_n: int, ppl_n: int) -> dict:
    import torch

    from almak.eval.metrics import chrf
    from almak.modeling.engines.generate import GenerationConfig, translate
    from almak.modeling.engines.scoring import reference_nll
    from almak.modeling.text.data import load_testset
    from almak.modeling.text.prompts import Prompt

    was_training = model.training
    model.eval()
    out = {}
    with torch.inference_mode():
        ts = load_testset("wmt22:de-en").head(chrf_n)
        t0 = time.perf_counter()
        hyps = translate(model, tokenizer, ts.sources, Prompt("alma", "de", "en"),
                         GenerationConfig(num_beams=1, batch_size=8, max_new_tokens=256)).hypotheses
        out["translate_s"] = round(time.perf_counter() - t0, 2)
        out["chrf"] = round(chrf(hyps, ts.references)[0], 3)
        for pair in ("de-en", "en-de"):
            ts = load_testset(f"wmt22:{pair}").head(ppl_n)
            nll = reference_nll(model, tokenizer, ts.sources, ts.references, Prompt("alma", ts.src, ts.tgt))
            out[f"ppl_{pair}"] = round(nll.ppl, 4)
    model.train(was_training)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student")
    parser.add_argument("--teacher", default="smollm2-135m-mt")
    parser.add_argument("--data", default="alma:de-en,en-de")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--at", default="0,25,50,100,150,200", help="steps at which to score the student")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--chrf-sentences", type=int, default=64)
    parser.add_argument("--ppl-sentences", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("runs/student-curve"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from almak.eval.bench import device_name
    from almak.modeling.load import load_model
    from almak.modeling.pipelines.distill import DistillConfig, check_same_tokenizer, distill_model

    at = sorted({int(a) for a in args.at.split(",")})
    config = DistillConfig(data=args.data, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                           lr=args.lr, alpha=args.alpha, temperature=args.temperature, max_len=args.max_len,
                           group_by_length=True, valid_sentences=0, eval_every=0, save_every=0, seed=args.seed)
    teacher = load_model(args.teacher, device="cpu", dtype="float32")
    student = load_model(args.student, device="cpu", dtype="float32")
    check_same_tokenizer(student.tokenizer, teacher.tokenizer, student.model, teacher.model)
    recipe = json.loads((Path(args.student) / "almak_recipe.json").read_text(encoding="utf-8"))
    doc = {"benchmark": "student_curve", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "device": device_name("cpu"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "student": args.student, "student_shape": recipe.get("shape"),
        "decoder_params": recipe.get("decoder_params"), "teacher": args.teacher, "config": config.to_json(),
        "teacher_scores": score(teacher.model, teacher.tokenizer, args.chrf_sentences, args.ppl_sentences),
        "points": []}
    print(f"teacher: {doc['teacher_scores']}", flush=True)
    started = time.perf_counter()
    scoring = [0.0]

    def record(step: int) -> None:
        t0 = time.perf_counter()
        point = {"step": step, "examples": step * args.batch_size * args.grad_accum,
                 **score(student.model, student.tokenizer, args.chrf_sentences, args.ppl_sentences)}
        scoring[0] += time.perf_counter() - t0
        point["train_s"] = round(time.perf_counter() - started - scoring[0], 1)
        doc["points"].append(point)
        print(point, flush=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    if 0 in at:
        record(0)

    def on_event(event: dict) -> None:
        if event["event"] == "step" and event["step"] in at and event["step"] > 0:
            record(event["step"])

    args.workdir.parent.mkdir(parents=True, exist_ok=True)
    distill_model(student.model, teacher.model, student.tokenizer, "alma", config, args.workdir,
                  student_ref=args.student, teacher_ref=args.teacher, progress=on_event, overwrite=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
