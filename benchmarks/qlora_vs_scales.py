"""QLoRA-style recovery of a quantized student, measured: LoRA on the frozen QuantLinear layers, distilled from
the float teacher, then merged into the weights and quantized again on the student's own grid.

An experiment, not a test: it backs the choice ``almak distill`` makes for quantized students (train the scales,
PEQA) over the QLoRA path issue 7 describes. Run from the repository root after making the student:

    almak quantize --method rtn --bits 4 --group-size 64 --asym --out runs/smollm-w4g64
    python benchmarks/qlora_vs_scales.py                      # writes benchmarks/results/qlora-vs-scales-<device>.json

It trains rank-16 LoRA adapters (alpha 32) on every quantized projection with the same loop, data and KD loss as
``almak distill --alpha 1`` (90 steps of 8 ALMA de-en pairs, bf16, grouped by length), then reports the reference
perplexity on 200 WMT22 de-en sentences of the student before training, with the adapters on top (unmerged), and
after merging them and rounding each weight again to its group's scale and zero point. It also reports how many
codes the merge changed and the share of the adapters' updates below half a quantization step. For the scale-
training side, run ``almak distill STUDENT --teacher smollm2-135m --data alma:de-en --steps 90 --batch-size 8
--grad-accum 1 --valid-sentences 48 --eval-every 30 --save-every 0 --alpha 1 --bf16 --group-by-length`` and
``almak eval OUT --testset wmt22:de-en --limit 200 --metrics nll``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from almak.modeling.engines.scoring import reference_nll
from almak.modeling.load import load_model
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.surgery import set_module
from almak.modeling.pipelines.distill import DistillConfig, kd_loss
from almak.modeling.pipelines.finetune import schedule, train
from almak.modeling.text.data import load_testset
from almak.modeling.text.prompts import Prompt

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class LoRAOnQuant(nn.Module):
    """``y = base(x) + (alpha / r) * x Aᵀ Bᵀ`` on a frozen QuantLinear; B starts at 0."""

    def __init__(self, base: QuantLinear, rank: int = 16, alpha: float = 32.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale

    @torch.no_grad()
    def merge_and_requantize(self) -> tuple[int, float]:
        """Round W + ΔW to the base's grid in place; returns (codes changed, share of |ΔW| below half a step)."""
        b = self.base
        G = b.in_features if b.group_size == -1 else b.group_size
        s = b.weight_scale.float().repeat_interleave(G, 1)[:, :b.in_features]
        z = b.zeros().float().repeat_interleave(G, 1)[:, :b.in_features]
        delta = (self.B @ self.A) * self.scale
        lo, hi = (0, 15) if b.bits == 4 else (-128, 127)
        codes = (torch.round((b.dequantize(torch.float32) + delta) / s) + z).clamp(lo, hi)
        old = b.codes().float()
        b.set_quantized(codes.to(torch.uint8 if b.bits == 4 else torch.int8), b.weight_scale, b.weight_zero_point)
        return int((codes != old).sum()), float((delta.abs() < 0.5 * s).float().mean())


def perplexity(model, tokenizer, limit: int) -> float:
    ts = load_testset("wmt22:de-en").head(limit)
    with torch.no_grad():
        return reference_nll(model, tokenizer, ts.sources, ts.references, Prompt("alma", "de", "en")).ppl


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--student", default="runs/smollm-w4g64")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "qlora-vs-scales-cpu-amd-epyc-2cores.json")
    args = ap.parse_args(argv)

    teacher = load_model(args.teacher).model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    lm = load_model(args.student)
    config = DistillConfig(data="alma:de-en", steps=args.steps, batch_size=8, grad_accum=1, valid_sentences=48,
                           eval_every=30, save_every=0, alpha=1.0, bf16=True, group_by_length=True, lr=args.lr)
    before = perplexity(lm.model, lm.tokenizer, args.limit)
    wrappers: dict[str, LoRAOnQuant] = {}

    def prepare(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for name, m in list(model.named_modules()):
            if isinstance(m, QuantLinear):
                wrappers[name] = LoRAOnQuant(m)
                set_module(model, name, wrappers[name])
        return model

    def optimizer(model):
        opt = torch.optim.AdamW([{"params": [p for w in wrappers.values() for p in (w.A, w.B)],
                                  "weight_decay": 0.0, "lr": args.lr}])
        return opt, schedule(opt, config)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        run = train(lm.model, lm.tokenizer, "alma", config, Path(work) / "run", prepare,
                    kd_loss(teacher, config.alpha, config.temperature), base_ref=args.student, optimizer=optimizer)
    seconds = time.perf_counter() - started
    model = run.model.eval()
    unmerged = perplexity(model, lm.tokenizer, args.limit)
    changed, below_half = 0, []
    for name, w in wrappers.items():
        n, share = w.merge_and_requantize()
        changed += n
        below_half.append(share)
        set_module(model, name, w.base)
    total = sum(w.base.out_features * w.base.in_features for w in wrappers.values())
    doc = {
        "benchmark": "qlora-vs-scales",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "student": args.student, "teacher": args.teacher, "config": config.to_json(),
        "lora": {"rank": 16, "alpha": 32}, "layers": len(wrappers), "train_seconds": round(seconds, 1),
        "ppl_student": before, "ppl_lora_unmerged": unmerged,
        "ppl_merged_requantized": perplexity(model, lm.tokenizer, args.limit), "codes_changed": changed / total,
        "delta_below_half_step": sum(below_half) / len(below_half),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("ppl_student", "ppl_lora_unmerged", "ppl_merged_requantized",
                                          "codes_changed", "delta_below_half_step", "train_seconds")}))


if __name__ == "__main__":
    main()
