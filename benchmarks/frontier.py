"""Quality per byte: the reference perplexity of the embedded model against its weight bytes, for almak's and
llm-compressor's weight-only schemes, on every bundled WMT22 direction.

A benchmark, not a test. The llm-compressor points need the environment that
``benchmarks/gptq_vs_llmcompressor.py``'s docstring sets up (plus matplotlib for the plot); almak's points run
in almak's own environment too. From the repository root:

    /tmp/venv-llmc/bin/python benchmarks/frontier.py [--nsamples 128] [--seqlen 256] [--limit-de-en 200]
        [--limit 50] [--methods float,almak-gptq-w4g64,...] [--out FILE.json] [--plot-only]

What it measures, on SmolLM2-135M-Instruct (almak's ``smollm2-135m`` alias, fp32 on the CPU): for each point,
the teacher-forced perplexity of the references under the ALMA prompt (:func:`almak.eval.metrics.reference_nll`)
of the first ``--limit-de-en`` WMT22 de-en sentences and the first ``--limit`` sentences of each of en-de,
ru-en, en-ru, zh-en, en-zh (the same sentences for every point), their plain mean over the six directions, and
the point's weight bytes. The points (``--methods`` picks a subset, run in the order given):

- ``float``: the unquantized model;
- ``almak-{rtn,gptq}-{w8ch,w4g32,w4g64,w4ch}``: :func:`almak.modeling.nn.surgery.quantize_model` with
  ``QuantizeRecipe(method, bits, group_size, sym=False, calib="alma", nsamples, seqlen)``: int8 per channel,
  int4 in groups of 32 or 64 columns, int4 per channel; asymmetric. Everything else is the recipe's default,
  i.e. what ``almak quantize`` does: GPTQ with static act-order, damping 0.01 and ``clip_search`` (each group's
  range searched for the least H-weighted rounding error), calibrated on almak's ``alma`` samples (every ALMA
  direction both ways, ``prompt_family="alma"``, seed 0); lm_head (tied to the embeddings) kept in float;
- ``almak-{rtn,gptq}-{w4g32,w4g64,w4ch}-rot``: the same with ``rotate=True`` (a fused randomized-Hadamard
  rotation before quantizing);
- ``almak-gptq-mixed{4.25,4.5}-rot``: GPTQ with ``rotate=True`` and ``target_bits`` 4.25 / 4.5: int4 per channel, int4 g64 or
  int8 per channel layer by layer, under that average bits-per-weight budget;
- ``llmcompressor-gptq-{w8ch,w4g32,w4g64,w4ch}``: ``llmcompressor.oneshot`` with a ``GPTQModifier``, exactly as
  ``gptq_vs_llmcompressor.py``'s ``llmc_quantize`` (asymmetric, static act-order, ``dampening_frac=0.01``,
  targets Linear, ignore lm_head) with that bits / group size, calibrated on the very samples almak's GPTQ
  builds (``calibration_samples(tokenizer, "alma", nsamples, seqlen, seed=0, prompt_family="alma")``). It
  leaves a fake-quantized model; the child checks every quantized weight is on its grid (``llmc_check``) first.

``rotate`` and ``target_bits`` are passed to ``QuantizeRecipe`` only by the points that use them, so the other
points run on an almak without them.

Weight bytes: what the model's checkpoint stores, one accounting for both libraries, the compressed-tensors
``pack-quantized`` layout (the one almak writes, :mod:`almak.modeling.checkpoint.pack_quantized`, and
llm-compressor's ``save_pretrained`` writes). Each quantized projection (N outputs, K inputs, G groups per row,
G = 1 per channel) stores

- codes: N x ceil(K * bits / 32) int32 (8 int4 or 4 int8 codes a word);
- scales: N x G in the scale's dtype: the model's, fp32 here, on both sides (almak makes its scales in the
  layer's dtype; llm-compressor's ``weight_scale`` takes the weight's, and compressed-tensors writes it as it is;
  the child records both dtypes in ``scale_dtypes``);
- zeros (asymmetric): ceil(N * bits / 32) x G int32, the integer zero points packed along the output channels;
- ``weight_shape`` (2 int64) and the bias, if any;

every other parameter and persistent buffer (embeddings, tied to lm_head and counted once, norms, anything a
rotation leaves) counts at its own dtype's size, as :func:`almak.modeling.load.weight_bytes` counts. For almak's
layers the formula is checked against the tensors almak's writer produces
(:func:`~almak.modeling.checkpoint.pack_quantized.layer_tensors`), for llm-compressor's against compressed-tensors'
own ``ModelCompressor`` on the quantized layers (``ct_check``, after the perplexity pass). ``bytes`` is the
total; ``bits_per_weight`` is (codes + scales + zeros) x 8 over the quantized projections' parameter count
(the float point: its projections' dtype, 32). ``bytes_in_memory`` is ``weight_bytes`` of the model as the child
holds it, for reference: almak keeps its zero points as floats of the layer's dtype (4 bytes each here, not
packed), llm-compressor a float copy of every weight.

Each point runs in its own child process (this script re-invoked with ``--method``, as
``gptq_vs_llmcompressor.py`` does); ``quant_s`` is the wall time of the quantization call alone
(``quantize_model``, which builds its calibration samples and rotates inside it / ``oneshot``). Writes
``benchmarks/results/frontier-<device>.json`` after every point and, with matplotlib, ``frontier-<device>.png``
(x: weight MiB, y: reference perplexity, log scale, one panel per direction and one for the mean; float a
horizontal line); prints a table and, per point, the direction it loses most in against float. ``--plot-only``
redraws the plot and the table from an existing JSON. Measures and records; judges nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_vs_llmcompressor import (  # noqa: E402
    DAMP,
    MARK,
    MODEL,
    RESULTS_DIR,
    SYM,
    device_name,
    llmc_check,
    llmc_quantize,
    perplexity,
    rss_mib,
    run_child,
    run_header,
)

DIRECTIONS = ("de-en", "en-de", "ru-en", "en-ru", "zh-en", "en-zh")
CALIB, SEED, PROMPT_FAMILY = "alma", 0, "alma"
# tag -> (bits, group size). No g128: it does not divide the embedded model's 576 (compressed-tensors, and so
# almak's writer, refuse ragged groups); g32 is the finer setting that does.
SCHEMES = {"w8ch": (8, -1), "w4g32": (4, 32), "w4g64": (4, 64), "w4ch": (4, -1)}
TARGET_BITS = (4.25, 4.5)
MIXED_GROUP_SIZE = 64  # the int4 groups mixed precision chooses from, besides per channel
# The projection tensors that the compressed-tensors accounting replaces (the rest of such a module counts as float).
ALMAK_QUANT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "input_perm")
LLMC_QUANT_TENSORS = ("weight", "weight_scale", "weight_zero_point", "weight_g_idx")


@dataclass(frozen=True)
class Point:
    """One point of the frontier: ``lib`` None is the float model."""

    lib: str | None = None  # "almak" or "llmcompressor"
    method: str | None = None  # "rtn" or "gptq"
    bits: int | None = None
    group_size: int | None = None
    rotate: bool = False
    target_bits: float | None = None


def _points() -> dict[str, Point]:
    out = {"float": Point()}
    for method in ("rtn", "gptq"):
        for tag, (bits, g) in SCHEMES.items():
            out[f"almak-{method}-{tag}"] = Point("almak", method, bits, g)
        for tag, (bits, g) in SCHEMES.items():
            if bits == 4:
                out[f"almak-{method}-{tag}-rot"] = Point("almak", method, bits, g, rotate=True)
    for tb in TARGET_BITS:
        out[f"almak-gptq-mixed{tb:g}-rot"] = Point("almak", "gptq", 4, MIXED_GROUP_SIZE, True, tb)
    for tag, (bits, g) in SCHEMES.items():
        out[f"llmcompressor-gptq-{tag}"] = Point("llmcompressor", "gptq", bits, g)
    return out


METHODS = _points()


# ----------------------------------------------------------------------------------------------- child


def ct_linear_bytes(N: int, K: int, bits: int, groups: int, sym: bool, scale_bytes: int) -> tuple[int, int, int]:
    """(codes, scales, zeros) bytes of one N x K projection in compressed-tensors' ``pack-quantized`` layout."""
    codes = N * math.ceil(K * bits / 32) * 4
    scales = N * groups * scale_bytes
    zeros = 0 if sym else math.ceil(N * bits / 32) * groups * 4
    return codes, scales, zeros


def stored_bytes(model) -> dict:
    """The model's bytes as a compressed-tensors checkpoint stores them (see the module docstring)."""
    import torch

    from almak.modeling.checkpoint.pack_quantized import layer_tensors
    from almak.modeling.nn.quant_linear import QuantLinear

    seen: set = set()
    acc = {"float": 0, "codes": 0, "scales": 0, "zeros": 0, "shapes": 0}
    quantized_params, schemes, scale_dtypes, mismatches = 0, {}, set(), []
    proj_float_bits = set()

    def add_float(t: torch.Tensor) -> None:
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            acc["float"] += t.numel() * t.element_size()

    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        own.update({k: b for k, b in m.named_buffers(recurse=False)
                    if b is not None and k not in m._non_persistent_buffers_set})
        skip: tuple = ()
        scheme = getattr(m, "quantization_scheme", None)
        if isinstance(m, QuantLinear):
            N, K, bits, g, sym = m.out_features, m.in_features, m.bits, m.group_size, m.sym
            parts = ct_linear_bytes(N, K, bits, m.weight_scale.shape[1], sym, m.weight_scale.element_size())
            written = layer_tensors(name, m)
            got = tuple(written[f"{name}.{k}"].numel() * written[f"{name}.{k}"].element_size()
                        if f"{name}.{k}" in written else 0
                        for k in ("weight_packed", "weight_scale", "weight_zero_point"))
            if got != parts:
                mismatches.append(f"{name}: formula {parts}, almak's writer {got}")
            skip = ALMAK_QUANT_TENSORS
        elif scheme is not None and scheme.weights is not None and hasattr(m, "weight_scale"):
            (N, K), w = m.weight.shape, scheme.weights
            bits, sym = w.num_bits, w.symmetric
            g = -1 if str(w.strategy).endswith("channel") else w.group_size
            groups = m.weight_scale.shape[-1] if m.weight_scale.dim() > 1 else 1
            parts = ct_linear_bytes(N, K, bits, groups, sym, m.weight_scale.element_size())
            skip = LLMC_QUANT_TENSORS
        else:
            if name.rsplit(".", 1)[-1].endswith("_proj") and hasattr(m, "weight"):
                proj_float_bits.add(m.weight.element_size() * 8)
            for t in own.values():
                add_float(t)
            continue
        for key, part in zip(("codes", "scales", "zeros"), parts):
            acc[key] += part
        acc["shapes"] += 16  # weight_shape: 2 int64
        quantized_params += N * K
        label = f"int{bits} {'ch' if g == -1 else f'g{g}'}"
        schemes[label] = schemes.get(label, 0) + 1
        scale_dtypes.add(str(m.weight_scale.dtype).replace("torch.", ""))
        for k, t in own.items():
            if k not in skip:  # the bias, anything else a library hangs on the layer
                add_float(t)
    quant = acc["codes"] + acc["scales"] + acc["zeros"]
    bpw = 8 * quant / quantized_params if quantized_params else (max(proj_float_bits) if proj_float_bits else None)
    return {"bytes": sum(acc.values()), "bytes_parts": acc, "bits_per_weight": bpw,
            "quantized_params": quantized_params, "layers_by_scheme": schemes, "scale_dtypes": sorted(scale_dtypes),
            "almak_writer_check": "no almak layers" if not any(isinstance(m, QuantLinear) for m in model.modules())
            else (mismatches or "formula == almak's pack-quantized writer, every layer")}


def ct_check(model, formula_bytes: int) -> dict:
    """compressed-tensors' own compression of llm-compressor's quantized layers, against the formula's bytes
    (codes + scales + zeros + weight_shape). Compresses the model: run it last."""
    try:
        from compressed_tensors.compressors import ModelCompressor

        names = {n for n, m in model.named_modules()
                 if getattr(m, "quantization_scheme", None) is not None and hasattr(m, "weight_scale")}
        mc = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
        if hasattr(mc, "compress_model"):  # newer compressed-tensors: in place, then the state dict
            mc.compress_model(model)
            sd = model.state_dict()
        else:
            sd = mc.compress(model)
        got = sum(t.numel() * t.element_size() for k, t in sd.items()
                  if k.rsplit(".", 1)[0] in names and not k.endswith(".bias"))
        keys = sorted({k.rsplit(".", 1)[1] for k in sd if k.rsplit(".", 1)[0] in names})
        return {"compressed_tensors_bytes": got, "formula_bytes": formula_bytes, "equal": got == formula_bytes,
                "tensors": keys}
    except Exception as e:  # a check, not the measurement: record why it could not run
        return {"error": f"{type(e).__name__}: {e}"}


def child(name: str, nsamples: int, seqlen: int, limit_de_en: int, limit: int) -> dict:
    import torch

    from almak.modeling.load import load_model, weight_bytes

    p = METHODS[name]
    t_start = time.perf_counter()
    lm = load_model(MODEL, device="cpu")
    model, tok = lm.model, lm.tokenizer
    rec: dict = {"method": name, "lib": p.lib or "float", "point": asdict(p), "threads": torch.get_num_threads(),
                 "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    samples = None
    if p.method == "gptq":
        from almak.modeling.pipelines.calibrate import calibration_samples

        # the samples almak's quantize_model builds from the recipe; llm-compressor is given these very ones
        samples = calibration_samples(tok, CALIB, nsamples, seqlen, SEED, PROMPT_FAMILY)
        rec["calib"] = CALIB
        rec["calib_tokens"] = int(sum(s.shape[1] for s in samples))
    rec["load_s"] = time.perf_counter() - t_start
    rec["rss_loaded_mib"] = rss_mib()

    if p.lib == "almak":
        from almak.modeling.pipelines.quantize import QuantizeRecipe, quantize_model

        new = {}  # fields being added to QuantizeRecipe: only where a point uses them
        if p.rotate:
            new["rotate"] = True
        if p.target_bits is not None:
            new["target_bits"] = p.target_bits
        recipe = QuantizeRecipe(method=p.method, bits=p.bits, group_size=p.group_size, sym=SYM, calib=CALIB,
                                nsamples=nsamples, seqlen=seqlen, seed=SEED, **new)
        t0 = time.perf_counter()
        info = quantize_model(model, tok, recipe, prompt_family=PROMPT_FAMILY)
        rec["quant_s"] = time.perf_counter() - t0
        rec["quantized_linears"] = len(info["quantized"])
        rec["settings"] = {"recipe": repr(recipe)}
        rec.update({k: info[k] for k in ("rotation", "allocation") if k in info})
    elif p.lib == "llmcompressor":
        rec.update(llmc_quantize(model, tok, samples, seqlen, p.bits, p.group_size))
        rec["llmc_check"] = llmc_check(model, True, p.bits, p.group_size)
    rec["rss_quant_mib"] = rss_mib()

    rec.update(stored_bytes(model))
    rec["bytes_in_memory"] = weight_bytes(model)
    rec["sentences"], rec["ppl_by_direction"], rec["ppl_s"] = {}, {}, 0.0
    for pair in DIRECTIONS:
        n = limit_de_en if pair == "de-en" else limit
        ppl, seconds = perplexity(model, tok, n, f"wmt22:{pair}")
        rec["sentences"][pair], rec["ppl_by_direction"][pair] = n, ppl
        rec["ppl_s"] += seconds
    rec["ppl"] = sum(rec["ppl_by_direction"].values()) / len(DIRECTIONS)  # plain mean over the directions
    rec["rss_peak_mib"] = rss_mib()
    if p.lib == "llmcompressor":
        parts = rec["bytes_parts"]
        rec["ct_check"] = ct_check(model, parts["codes"] + parts["scales"] + parts["zeros"] + parts["shapes"])
    rec["child_wall_s"] = time.perf_counter() - t_start
    return rec


# ---------------------------------------------------------------------------------------------- parent


def worst_directions(res: dict) -> dict:
    """Per point: the direction whose perplexity rose most against float's (relative), and by how much."""
    f = res.get("float", {}).get("ppl_by_direction")
    if not f:
        return {}
    out = {}
    for name, r in res.items():
        if name == "float" or "ppl_by_direction" not in r:
            continue
        rel = {d: r["ppl_by_direction"][d] / f[d] - 1 for d in DIRECTIONS if d in f}
        d = max(rel, key=rel.get)
        out[name] = {"direction": d, "ppl_increase": rel[d]}
    return out


def table(res: dict) -> str:
    head = (f"{'point':<28} {'MiB':>7} {'bits/w':>6} " + " ".join(f"{d:>8}" for d in DIRECTIONS)
            + f" {'mean':>8} {'quant s':>8}")
    rows = [head, "-" * len(head)]
    for name, r in res.items():
        if "error" in r:
            rows.append(f"{name:<28} failed: {r['error'].splitlines()[0][:80]}")
            continue
        q = f"{r['quant_s']:.1f}" if "quant_s" in r else "-"
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
        rows.append(f"{name:<28} {r['bytes'] / 2**20:>7.1f} {bpw:>6} "
                    + " ".join(f"{r['ppl_by_direction'][d]:>8.3f}" for d in DIRECTIONS)
                    + f" {r['ppl']:>8.3f} {q:>8}")
    return "\n".join(rows)


def _style(name: str) -> dict:
    if name.startswith("llmcompressor"):
        return {"color": "#c33", "marker": "s"}
    color = "#7a3fb0" if "mixed" in name else "#e83" if "-rtn-" in name else "#27c"
    return {"color": color, "marker": "o", "facecolors": "none" if name.endswith("-rot") else color}


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    res = {n: r for n, r in doc["results"].items() if "ppl_by_direction" in r}
    flt = res.pop("float", None)
    panels = [*DIRECTIONS, "mean"]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    for ax, panel in zip(axes.flat, panels):
        def y(r):
            return r["ppl"] if panel == "mean" else r["ppl_by_direction"][panel]

        for name, r in res.items():
            st = _style(name)
            ax.scatter(r["bytes"] / 2**20, y(r), s=36, marker=st["marker"], edgecolors=st["color"],
                       facecolors=st.get("facecolors", st["color"]), linewidths=1.3, zorder=3)
            label = name.replace("llmcompressor-gptq-", "llmc-").replace("almak-", "")
            ax.annotate(label, (r["bytes"] / 2**20, y(r)), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        color=st["color"])
        if flt:
            ax.axhline(y(flt), color="#777", ls="--", lw=1)
            ax.annotate(f"float ({flt['bytes'] / 2**20:.0f} MiB)", (0.01, y(flt)), xycoords=("axes fraction", "data"),
                        fontsize=7, color="#555", xytext=(0, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        n = doc["settings"]["eval"]["sentences"]
        ax.set_title(f"{panel} ({n[panel]} sentences)" if panel != "mean" else "mean over the six directions",
                     fontsize=10)
        ax.set_xlabel("weight MiB (compressed-tensors layout)", fontsize=8)
        ax.set_ylabel("reference perplexity", fontsize=8)
        ax.grid(True, which="both", alpha=0.25)
    legend = axes.flat[-1]
    legend.axis("off")
    for label, st in (("almak RTN", _style("almak-rtn-x")), ("almak GPTQ", _style("almak-gptq-x")),
                      ("almak GPTQ mixed int4/int8, rotated", _style("almak-gptq-mixed-rot")),
                      ("almak, rotated (hollow)", {**_style("almak-gptq-x-rot")}),
                      ("llm-compressor GPTQ", _style("llmcompressor-gptq-x"))):
        legend.scatter([], [], marker=st["marker"], edgecolors=st["color"], facecolors=st.get("facecolors", st["color"]),
                       label=label)
    legend.plot([], [], color="#777", ls="--", label="float")
    legend.legend(loc="center", fontsize=10, frameon=False)
    s = doc["settings"]
    fig.suptitle(f"{s['model']} ({s['dtype']}): reference perplexity under the ALMA prompt against weight bytes; "
                 f"calibration {s['calibration']['nsamples']} x {s['calibration']['seqlen']} "
                 f"({doc['device']}, {doc['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(doc: dict, out: Path) -> None:
    res = doc["results"]
    print(table(res))
    worst = worst_directions(res)
    if worst:
        print("\nlargest relative perplexity increase against float:")
        for name, w in worst.items():
            print(f"  {name:<28} {w['direction']}  {w['ppl_increase']:+.1%}")
    png = out.with_suffix(".png")
    print(f"wrote {out}" if not doc.get("plot_only") else f"read {out}")
    print(f"wrote {png}" if plot(doc, png) else "no plot: matplotlib is not installed")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset, run in this order; "
                    f"of: {', '.join(METHODS)}")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration samples (GPTQ)")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sample length in tokens (GPTQ)")
    ap.add_argument("--limit-de-en", type=int, default=200, help="WMT22 de-en sentences scored")
    ap.add_argument("--limit", type=int, default=50, help="WMT22 sentences scored in each other direction")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (the plot goes beside it, .png)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot and the table from --out's JSON")
    args = ap.parse_args(argv)

    if args.method:
        rec = child(args.method, args.nsamples, args.seqlen, args.limit_de_en, args.limit)
        print(MARK + json.dumps(rec, default=str), flush=True)
        return

    if args.plot_only:
        out = args.out or RESULTS_DIR / f"frontier-{device_name()}.json"
        doc = json.loads(out.read_text())
        report({**doc, "plot_only": True}, out)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    device = device_name()
    out = args.out or RESULTS_DIR / f"frontier-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    doc = {
        **run_header("frontier", started, device),
        "settings": {
            "model": MODEL, "dtype": "float32", "device": "cpu",
            "scheme": {"sym": SYM, "damp": DAMP, "act_order": "static", "lm_head": "not quantized (tied; the rotated points untie it)",
                       "almak": "QuantizeRecipe defaults otherwise (GPTQ: clip_search on)",
                       "mixed_int4_group_size": MIXED_GROUP_SIZE},
            "calibration": {"set": CALIB, "prompt_family": PROMPT_FAMILY, "seed": SEED, "nsamples": args.nsamples,
                            "seqlen": args.seqlen, "llmcompressor": "the samples almak's GPTQ builds"},
            "eval": {"testsets": [f"wmt22:{d}" for d in DIRECTIONS], "prompt": "alma",
                     "sentences": {d: args.limit_de_en if d == "de-en" else args.limit for d in DIRECTIONS},
                     "metric": "reference perplexity (almak.eval.metrics.reference_nll); mean: plain mean of the "
                               "six directions' perplexities"},
            "bytes": "compressed-tensors pack-quantized checkpoint: int32-packed codes, scales in the model dtype, "
                     "int32-packed integer zeros, weight_shape; float tensors at their dtype, tied ones once",
            "order": methods,
        },
        "results": {},
    }
    extra = ("--limit-de-en", str(args.limit_de_en))
    for name in methods:
        try:
            doc["results"][name] = run_child(name, args, __file__, extra)
        except SystemExit as e:  # one failed point (say, a recipe field not in this almak yet) ends no run
            print(f"   {name}: {e}", file=sys.stderr, flush=True)
            doc["results"][name] = {"method": name, "error": str(e)}
        doc["worst_direction"] = worst_directions(doc["results"])
        out.write_text(json.dumps(doc, indent=2) + "\n")  # after every point: a long run keeps what it has
    report(doc, out)


if __name__ == "__main__":
    main()
