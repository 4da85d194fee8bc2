"""``almak bench``: prefill and decode speed of several models side by side."""

from __future__ import annotations

import click

from almak.cli.common import print_table, stage_bars
from almak.errors import AlmakError
from almak.eval.bench import SHAPES as BENCH_SHAPES
from almak.eval.bench import BenchConfig
from almak.eval.bench import bench as run_bench
from almak.modeling.engines.generate import ENGINES


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
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise AlmakError(f"--batch-sizes takes comma-separated integers, got {batch_sizes!r}") from None
    engine_list = tuple(e.strip() for e in engines.split(",") if e.strip())
    if not engine_list or any(e not in ENGINES for e in engine_list):
        raise AlmakError(f"--engine takes comma-separated engines from {', '.join(ENGINES)}, got {engines!r}")
    config = BenchConfig(batch_sizes=sizes, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats,
                         engine=engine_list[0], cuda_graphs=cuda_graphs)
    with stage_bars(unit="run") as progress:
        r = run_bench(models, config, device=device, dtype=dtype, engines=engine_list, shape=shape, layers=layers,
                      tensor_parallel_size=tensor_parallel_size, reports=reports, out=out_dir, plot=not no_plot,
                      overwrite=overwrite, progress=progress)
    rows = []
    for rec in r.records:
        mem = f", peak {rec['peak_mib']:.0f} MiB" if "peak_mib" in rec else ""
        rows.append((f"{rec['model']} b={rec['batch']}",
                     f"prefill {rec['prefill_tok_s']:.0f} tok/s, decode {rec['decode_tok_s']:.1f} tok/s "
                     f"({rec['ms_per_token']:.1f} ms/step, {rec['decode_speedup']:.2f}x {r.baseline}){mem}"))
    rows += [(f"{n} weights", f"{d['weight_bytes'] / 2**20:.1f} MiB ({d['dtype']})") for n, d in r.models.items()
             if d.get("weight_bytes") is not None]
    graphed = "almak" in engine_list and cuda_graphs and r.device.startswith("cuda")
    loop = " / ".join(f"{e} loop" for e in dict.fromkeys(engine_list)) + (" (CUDA graphs)" if graphed else "")
    print_table(rows, title=f"{r.device}, {loop}, {prompt_len} prompt + {gen_len} generated tokens, "
                            f"median of {repeats}")
    if r.out:
        click.echo(f"wrote {r.out}", err=True)
