"""``almak bench``: prefill and decode speed of several models side by side."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from almak.cli.common import print_table, progress_bar
from almak.errors import AlmakError
from almak.eval.bench import (
    SHAPE_VARIANTS,
    BenchConfig,
    device_name,
    plot_decode_speedup,
    plot_quality,
    quality_metric,
    random_model,
    run_bench,
    summarize,
)
from almak.eval.bench import SHAPES as BENCH_SHAPES
from almak.eval.evaluate import check_new_output
from almak.files import write_dir_atomic
from almak.modeling.devices import DTYPES, check_device, inference_dtype
from almak.modeling.engines.generate import ENGINES
from almak.modeling.engines.vllm import VllmEngine
from almak.modeling.load import DEFAULT_MODEL, load_model, weight_bytes


@click.command()
@click.argument("models", nargs=-1)
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt tokens per sequence (random ids, no padding).")
@click.option("--gen-len", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated per sequence (greedy, no stopping).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measurements per (model, batch size); the median is reported.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...; auto: cuda if present.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Activation dtype; auto is bfloat16 on a CPU with native bfloat16 arithmetic, float32 on other "
                   "CPUs, float16 on GPUs (vLLM: bfloat16).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for bench.json and decode_speedup.png (written when complete).")
@click.option("--shape", type=click.Choice(list(BENCH_SHAPES)),
              help="Benchmark a random-weight LLaMA with these exact dimensions instead; MODELS are then variants "
                   "of it: float, int8 (per channel), int4 (group 128), quantized at load (default: these three), 2:4 "
                   "(magnitude, fp16 kept values) and 2:4-int4.")
@click.option("--layers", type=click.IntRange(min=1), help="With --shape: keep only this many decoder layers.")
@click.option("--engine", "engines", default="almak", show_default=True,
              help="Comma-separated, to compare engines side by side (each model runs in each): almak: almak's "
                   "generation loop (preallocated KV cache), as almak translate runs; hf: transformers' forward "
                   "with its dynamic cache (any architecture); vllm: vLLM's engine (model references only, not "
                   "--shape; bfloat16 with --dtype auto).")
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --engine vllm: GPUs to split each model over.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="With --engine almak on CUDA: replay each decode step as a CUDA graph, captured before timing; "
                   "--no-cuda-graphs runs it eagerly. No effect on the CPU.")
@click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="An almak eval report.json (repeatable): adds quality_vs_bytes.png, perplexity (or chrF) against "
                   "weight bytes, labelled by the report's folder.")
@click.option("--no-plot", is_flag=True, help="Write bench.json only (the plots need matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def bench(models, batch_sizes, prompt_len, gen_len, repeats, device, dtype, shape, layers, engines,
          tensor_parallel_size, cuda_graphs, reports, out_dir, no_plot, overwrite):
    """Measure MODELS side by side: prefill and decode tokens/s, latency per token, memory, weight bytes.

    MODELS are any model references (default: smollm2-135m), for example a float model and its almak
    quantize / prune checkpoints. All are loaded, then measured in turn at each batch size, repeatedly, so
    that machine noise hits them alike; speedups are against the first model.

    \b
    Examples:
      almak bench smollm2-135m smollm-w8 smollm-w4g64 --batch-sizes 1,4 --gen-len 64 --out runs/bench
      almak bench --shape alma-7b float int4 --batch-sizes 1,16 --device cuda
      almak bench smollm2-135m --engine almak,hf,vllm --dtype bfloat16 --batch-sizes 1,8
    """
    import datetime
    import importlib.util

    import torch


    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise AlmakError(f"--batch-sizes takes comma-separated integers, got {batch_sizes!r}") from None
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    unknown = [e for e in engine_list if e not in ENGINES]
    if unknown or not engine_list:
        raise AlmakError(f"--engine takes comma-separated engines from {', '.join(ENGINES)}, got {engines!r}")
    engine_list = list(dict.fromkeys(engine_list))
    if "vllm" in engine_list and shape:
        raise AlmakError("--engine vllm runs model folders, not --shape's in-memory models: write the variant with "
                         "almak quantize / prune and pass its folder")
    if tensor_parallel_size != 1 and "vllm" not in engine_list:
        raise AlmakError("--tensor-parallel-size goes with --engine vllm")
    config = BenchConfig(batch_sizes=sizes, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats,
                         engine=engine_list[0], cuda_graphs=cuda_graphs)
    out = Path(out_dir) if out_dir else None
    if out:
        check_new_output(out, overwrite, inputs=(*models, *reports))
    quality = {}
    for path in reports:
        try:
            quality[Path(path).resolve().parent.name] = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AlmakError(f"{path} is not an almak eval report.json: {e}") from None
    if quality and (no_plot or not out):
        raise AlmakError("--report makes a plot: give --out, without --no-plot")
    if quality:
        quality_metric(quality)
    if not no_plot and out and importlib.util.find_spec("matplotlib") is None:
        raise AlmakError("the plot needs matplotlib: pip install 'almak[bench]', or pass --no-plot")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vllm_dtype, (dtype, _) = dtype, inference_dtype(dtype, check_device(device).type)
    if layers and not shape:
        raise AlmakError("--layers goes with --shape")
    loaded, info = {}, {}
    if shape:

        unknown = [m for m in models if m not in SHAPE_VARIANTS]
        if unknown:
            raise AlmakError(f"with --shape, MODELS are variants of it ({', '.join(SHAPE_VARIANTS)}), not "
                             f"{', '.join(unknown)}")
        for name in dict.fromkeys(models or ("float", "int8", "int4")):
            # same seed: same weights; each projection is made the variant as it is drawn
            model = loaded[name] = random_model(shape, DTYPES[dtype], device, layers, variant=name)
            info[name] = {"ref": f"random {shape}" + (f" ({layers} layers)" if layers else ""),
                          "engine": engine_list[0], "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                          "weight_bytes": weight_bytes(model)}
    run_engine = {name: engine_list[0] for name in loaded}
    for ref in () if shape else (models or (DEFAULT_MODEL,)):
        base = Path(ref).name or ref
        lm = None
        for engine in engine_list:
            name = base if len(engine_list) == 1 else f"{base} [{engine}]"
            while name in loaded:
                name += "'"
            if engine == "vllm":
                model = VllmEngine(ref, vllm_dtype, tensor_parallel_size, cuda_graphs)
                model.start(prompt_len + gen_len + 1, max(sizes))
                info[name] = {"ref": ref, "engine": engine, "dtype": model.dtype, "weight_bytes": model.weight_bytes()}
            else:
                lm = lm or load_model(ref, device=device, dtype=dtype)
                model = lm.model
                info[name] = {"ref": lm.ref, "engine": engine,
                              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                              "weight_bytes": weight_bytes(model)}
            loaded[name], run_engine[name] = model, engine
    total = len(loaded) * len(sizes) * repeats
    with progress_bar("bench", total, unit="run") as bar:
        records = run_bench(loaded, config, progress=bar.update, engines=run_engine)
    baseline = next(iter(loaded))
    summarize(records, baseline)
    rows = []
    for r in records:
        mem = f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else ""
        rows.append((f"{r['model']} b={r['batch']}",
                     f"prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s "
                     f"({r['ms_per_token']:.1f} ms/step, {r['decode_speedup']:.2f}x {baseline}){mem}"))
    rows += [(f"{n} weights", f"{d['weight_bytes'] / 2**20:.1f} MiB ({d['dtype']})") for n, d in info.items()
             if d.get("weight_bytes") is not None]
    graphed = "almak" in engine_list and cuda_graphs and torch.device(device).type == "cuda"
    loop = " / ".join(f"{e} loop" for e in engine_list) + (" (CUDA graphs)" if graphed else "")
    print_table(rows, title=f"{device}, {loop}, {prompt_len} prompt + {gen_len} generated tokens, median of {repeats}")
    if out is None:
        return
    doc = {"benchmark": "almak bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "config": {**dataclasses.asdict(config), "engines": engine_list}, "models": info, "baseline": baseline, "results": records}
    if quality:
        doc["quality"] = {name: {k: r.get(k) for k in ("model", "testset", "n", "ppl", "chrf", "bleu", "weight_bytes")}
                          for name, r in quality.items()}

    def fill(tmp: Path) -> None:
        (tmp / "bench.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        if not no_plot:
            plot_decode_speedup(records, baseline, tmp / "decode_speedup.png")
        if quality:
            plot_quality(quality, tmp / "quality_vs_bytes.png")

    write_dir_atomic(out, fill)
    click.echo(f"wrote {out}", err=True)
