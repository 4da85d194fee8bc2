"""End-to-end speed of whole models, side by side: prefill and decode tokens/s, latency, memory, weight bytes.

>>> records = run_bench({"fp32": float_model, "w4": w4_model}, BenchConfig(batch_sizes=(1, 4)))  # doctest: +SKIP

Each measurement feeds a batch of ``prompt_len`` random token ids through the model once (prefill), then
runs ``gen_len - 1`` greedy decode steps of one token per sequence on the model's KV cache (decode); no
padding, no stopping, so every variant does exactly the same work. Measurements are interleaved (for each
repeat, for each batch size, every model in turn) so that machine noise hits all models alike, and each
number is the median over ``repeats``. The loop is ``engine``'s: ``almak`` (the default) is almak's generation
loop (:class:`almak.modeling.engines.decoder.Decoder`: preallocated KV cache, allocated before the clock starts; on CUDA
each decode step replays a CUDA graph captured before the clock starts, unless ``cuda_graphs=False``), what
``almak translate`` runs; ``hf`` is transformers' forward with its dynamic cache, for models almak's loop does not
run and for comparison; ``vllm`` is vLLM's engine (the model a :class:`~almak.modeling.engines.vllm.VllmEngine`),
where prefill is the time of a run that generates one token and decode the rest of a full run's time.
``run_bench`` can give each model its own engine, to compare engines side by side.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from almak.errors import AlmakError
from almak.files import check_new_output, write_dir_atomic
from almak.modeling.architecture import context_limit
from almak.modeling.devices import DTYPES, check_device, inference_dtype, release_freed_memory
from almak.modeling.engines.decoder import Decoder, check_room, kv_cache_bytes
from almak.modeling.engines.generate import ENGINES
from almak.modeling.load import DEFAULT_MODEL, load_model, weight_bytes
from almak.modeling.nn.surgery import QuantConfig, quantize_, set_module, sparsify_, target_linears
from almak.sparse.masks import apply_mask_, nm_mask

__all__ = ["BenchConfig", "run_bench", "bench_once", "summarize", "device_name", "SHAPES", "SHAPE_VARIANTS",
           "random_model", "make_variant"]

# LLaMA-2 shapes of ALMA-7B / ALMA-13B (their config.json), for speed runs where the weights cannot be had.
SHAPES = {
    "alma-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "alma-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                     num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
}


def random_model(shape: str, dtype: torch.dtype, device: str, layers: int | None = None, seed: int = 0,
                 variant: str = "float"):
    """A LlamaForCausalLM with ``shape``'s exact dimensions and random weights (std 0.02; norms 1), built on
    ``device`` as ``variant`` of :data:`SHAPE_VARIANTS`.

    It is built projection by projection: each is drawn in float, turned into ``variant`` (:func:`make_variant`)
    and only then is the next one drawn, so that the peak memory is the variant's model plus one float
    projection, as when loading a checkpoint; every variant of one seed starts from the same weights.
    ``layers`` keeps only that many decoder layers (a quick run of the same layer shapes). On the meta device
    nothing is drawn (shapes only).
    """
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise AlmakError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if variant not in SHAPE_VARIANTS:
        raise AlmakError(f"unknown variant {variant!r}; choose from {', '.join(SHAPE_VARIANTS)}")
    dims = dict(SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= dims["num_hidden_layers"]:
            raise AlmakError(f"--layers must be between 1 and {dims['num_hidden_layers']} for {shape}, got {layers}")
        dims["num_hidden_layers"] = layers
    config = LlamaConfig(**dims, tie_word_embeddings=False)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers (rotary) real
        model = LlamaForCausalLM(config)
    if torch.device(device).type == "meta":
        return model.to(dtype).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    projections = {name for name, _ in target_linears(model)}
    for name in [n for n, _ in model.named_modules()]:  # names only: a list of modules would keep every float
        module = model.get_submodule(name)
        for pname, p in list(module.named_parameters(recurse=False)):
            if "norm" in name.rsplit(".", 1)[-1]:
                value = torch.ones(p.shape, dtype=dtype, device=device)
            else:
                value = torch.randn(p.shape, generator=generator, dtype=dtype, device=device).mul_(0.02)
            module._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
        if name in projections and variant != "float":
            leaf = name.rsplit(".", 1)[-1]
            holder = torch.nn.Module()  # make_variant finds the projection by its name
            holder.add_module(leaf, module)
            set_module(model, name, getattr(make_variant(holder, variant), leaf))
            del holder, module
            release_freed_memory()
    return model.eval()


# What ``almak bench --shape`` can make of a random model: quantized at load (RTN: int8 per channel, int4 group
# 128), 2:4 by magnitude (fp16 kept values), or both (magnitude 2:4, then int4 group 128 on the kept weights).
SHAPE_VARIANTS = ("float", "int8", "int4", "2:4", "2:4-int4")


@torch.no_grad()
def make_variant(model, variant: str):
    """Turn ``model`` (a :func:`random_model`) into ``variant`` of :data:`SHAPE_VARIANTS`, in place; returns it.

    Speed runs only: the pruning is by magnitude and the quantization round-to-nearest, with no calibration.
    """

    if variant not in SHAPE_VARIANTS:
        raise AlmakError(f"unknown variant {variant!r}; choose from {', '.join(SHAPE_VARIANTS)}")
    projections = target_linears(model)
    if variant.startswith("2:4"):
        for _, linear in projections:
            apply_mask_(linear, nm_mask(linear.weight.abs(), 2, 4))
    if variant == "int8":
        quantize_(model, QuantConfig(bits=8, group_size=-1))
    elif variant.endswith("int4"):
        quantize_(model, QuantConfig(bits=4))
    if variant.startswith("2:4"):
        swapped = sparsify_(model)
        if len(swapped) != len(projections):
            raise AlmakError(f"only {len(swapped)} of {len(projections)} projections could be stored as 2:4")
    return model


def device_name(device: str | None = None) -> str:
    """File-name-safe device id: the GPU's name, or the CPU model and core count (``cpu-amd-epyc-2cores``)."""
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"cpu {name} {os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass
class BenchConfig:
    """What ``almak bench`` measures: batch sizes, prompt and generated lengths, repeats."""

    batch_sizes: tuple[int, ...] = (1, 4, 16)
    prompt_len: int = 128
    gen_len: int = 128
    repeats: int = 3
    seed: int = 0
    engine: str = "almak"  # almak: almak's generation loop; hf: transformers' forward and dynamic cache
    cuda_graphs: bool = True  # almak's loop on CUDA: decode steps replay a CUDA graph captured before timing

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise AlmakError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise AlmakError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.prompt_len < 1 or self.gen_len < 2:
            raise AlmakError(f"need prompt length >= 1 and generated length >= 2, got {self.prompt_len} and "
                             f"{self.gen_len}")
        if self.repeats < 1:
            raise AlmakError(f"repeats must be at least 1, got {self.repeats}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_name() -> str:
    """transformers 5 names the KV cache argument and output ``cache``; 4.x names them ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@torch.inference_mode()
def bench_once(model, batch: int, prompt_len: int, gen_len: int, seed: int = 0, engine: str = "almak",
               cuda_graphs: bool = True) -> dict:
    """One prefill + greedy decode measurement in ``engine``'s loop; returns seconds and tokens/s.

    With ``cuda_graphs`` (almak's loop on CUDA) the decode graph is captured before the clock starts."""
    if engine == "vllm":  # model is a VllmEngine
        return model.bench_once(batch, prompt_len, gen_len, seed)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    limit = context_limit(model)
    if limit is not None and prompt_len + gen_len > limit:
        raise AlmakError(f"--prompt-len {prompt_len} and --gen-len {gen_len} need {prompt_len + gen_len} positions; "
                         f"the model has {limit}")
    # the prompt ids, and the logits of every prompt position where transformers' forward computes them
    per_token = 8 + (vocab * model.dtype.itemsize if engine == "hf" else 0)
    need = batch * prompt_len * per_token + (kv_cache_bytes(model, batch, prompt_len + gen_len) if engine == "almak" else 0)
    check_room(need, device, f"batch {batch} with {prompt_len}-token prompts and {gen_len} new tokens",
               "lower --batch-sizes, --prompt-len or --gen-len")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if engine == "almak":
        decoder = Decoder(model, batch, prompt_len + gen_len, graphs=cuda_graphs and device.type == "cuda")
        decoder.capture(batch)
        _sync(device)
        t0 = time.perf_counter()
        token = decoder.add(ids.tolist()).argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            token = decoder.step(token).argmax(-1)
    else:
        cache = _cache_name()
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        past, token = getattr(out, cache), out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            out = model(input_ids=token, use_cache=True, **{cache: past})
            past, token = getattr(out, cache), out.logits[:, -1:].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    steps = gen_len - 1
    rec = {"prefill_s": t1 - t0, "decode_s": t2 - t1,
           "prefill_tok_s": batch * prompt_len / (t1 - t0), "decode_tok_s": batch * steps / (t2 - t1),
           "ms_per_token": (t2 - t1) / steps * 1000}
    if device.type == "cuda":
        rec["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return rec


def run_bench(models: dict[str, torch.nn.Module], config: BenchConfig,
              progress: Callable[[int], None] | None = None, engines: dict[str, str] | None = None) -> list[dict]:
    """Measure every model at every batch size, interleaved; one record per (model, batch) with medians.

    ``engines`` gives a model its own engine (default: ``config.engine``); a ``vllm`` one is a VllmEngine.
    """
    if not models:
        raise AlmakError("no models to benchmark")
    engine = {name: (engines or {}).get(name, config.engine) for name in models}
    unknown = sorted({e for e in engine.values() if e not in ENGINES})
    if unknown:
        raise AlmakError(f"unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")
    for name, model in models.items():  # warm-up: first-call allocations, caches and kernel choices
        bench_once(model, 1, min(8, config.prompt_len), 2, config.seed, engine[name], config.cuda_graphs)
        if engine[name] == "vllm":  # its first run at each batch shape is slower still
            for batch in config.batch_sizes:
                bench_once(model, batch, config.prompt_len, 2, config.seed, "vllm")
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(config.repeats):
        for batch in config.batch_sizes:
            for name, model in models.items():
                runs.setdefault((name, batch), []).append(
                    bench_once(model, batch, config.prompt_len, config.gen_len, config.seed, engine[name],
                               config.cuda_graphs))
                if progress:
                    progress(1)
    records = []
    for (name, batch), rs in runs.items():
        rec = {"model": name, "engine": engine[name], "batch": batch}
        for key in rs[0]:
            rec[key] = statistics.median(r[key] for r in rs)
        records.append(rec)
    return records


def summarize(records: list[dict], baseline: str) -> list[dict]:
    """Add each record's decode and prefill speedup over ``baseline`` at the same batch size."""
    base = {r["batch"]: r for r in records if r["model"] == baseline}
    for r in records:
        b = base.get(r["batch"])
        if b:
            r["decode_speedup"] = r["decode_tok_s"] / b["decode_tok_s"]
            r["prefill_speedup"] = r["prefill_tok_s"] / b["prefill_tok_s"]
    return records


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AlmakError("plots need matplotlib: pip install 'almak[bench]' (or pass --no-plot)") from None
    return plt


def quality_metric(reports: dict[str, dict]) -> str:
    """The metric the ``almak eval`` reports all have: ``ppl`` (preferred) or ``chrf``; AlmakError otherwise."""
    for metric in ("ppl", "chrf"):
        if all(r.get(metric) is not None and r.get("weight_bytes") for r in reports.values()):
            return metric
    raise AlmakError("every --report needs weight_bytes and one metric they all have (ppl, or else chrf); "
                     "make them with almak eval --out DIR (--metrics nll gives ppl)")


def plot_quality(reports: dict[str, dict], path) -> None:
    """PNG: each ``almak eval`` report's quality against its weight bytes (reference perplexity, or chrF)."""
    metric = quality_metric(reports)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in reports.items():
        x, y = r["weight_bytes"] / 2**20, r[metric]
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("weight MiB")
    ax.set_ylabel("reference perplexity (lower is better)" if metric == "ppl" else "chrF (higher is better)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decode_speedup(records: list[dict], baseline: str, path) -> None:
    """PNG: decode speedup over ``baseline`` against batch size, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in records):
        rs = sorted((r for r in records if r["model"] == name), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rs], [r.get("decode_speedup", float("nan")) for r in rs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in records})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"decode tokens/s vs {baseline}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class BenchResult:
    """What :func:`bench` measured: a record per (model, batch size), each model's reference, engine, dtype and
    weight bytes (``models``), the baseline (the first model), and the ``bench.json`` document (``doc``)."""

    records: list[dict]
    models: dict[str, dict]
    baseline: str
    device: str
    doc: dict
    out: Path | None = None


def bench(models: tuple[str, ...] | list[str] = (), config: BenchConfig | None = None, *, device: str = "auto",
          dtype: str = "auto", engines: tuple[str, ...] = ("almak",), shape: str | None = None,
          layers: int | None = None, tensor_parallel_size: int = 1, reports: tuple[str, ...] = (),
          out: str | Path | None = None, plot: bool = True, overwrite: bool = False,
          progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> BenchResult:
    """``almak bench``: load ``models`` (model references; with ``shape``, variants of a random-weight model of that
    shape: float, int8, int4, 2:4, 2:4-int4) and measure each on each of ``engines`` at every batch size, in turn and
    repeatedly. ``out`` gets bench.json and, with ``plot``, decode_speedup.png (and quality_vs_bytes.png from eval
    ``reports``). ``progress("bench", runs)`` may return a callback fed per measurement.

    >>> bench(["smollm2-135m", "smollm-w4"], BenchConfig(batch_sizes=(1, 8), gen_len=32)).records  # doctest: +SKIP
    """
    config = config or BenchConfig()
    engine_list = list(dict.fromkeys(engines))
    unknown = [e for e in engine_list if e not in ENGINES]
    if unknown or not engine_list:
        raise AlmakError(f"--engine takes comma-separated engines from {', '.join(ENGINES)}, got {','.join(engines)!r}")
    if "vllm" in engine_list and shape:
        raise AlmakError("--engine vllm runs model folders, not --shape's in-memory models: write the variant with "
                         "almak quantize / prune and pass its folder")
    if tensor_parallel_size != 1 and "vllm" not in engine_list:
        raise AlmakError("--tensor-parallel-size goes with --engine vllm")
    config = dataclasses.replace(config, engine=engine_list[0])
    sizes, prompt_len, gen_len, cuda_graphs = config.batch_sizes, config.prompt_len, config.gen_len, config.cuda_graphs
    out = Path(out) if out else None
    if out:
        check_new_output(out, overwrite, inputs=(*models, *reports))
    quality = {}
    for path in reports:
        try:
            quality[Path(path).resolve().parent.name] = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AlmakError(f"{path} is not an almak eval report.json: {e}") from None
    if quality and (not plot or not out):
        raise AlmakError("--report makes a plot: give --out, without --no-plot")
    if quality:
        quality_metric(quality)
    if plot and out and importlib.util.find_spec("matplotlib") is None:
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
                from almak.modeling.engines.vllm import VllmEngine

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
    tick = progress("bench", len(loaded) * len(sizes) * config.repeats) if progress else None
    records = run_bench(loaded, config, progress=tick, engines=run_engine)
    baseline = next(iter(loaded))
    summarize(records, baseline)
    doc = {"benchmark": "almak bench",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "config": {**dataclasses.asdict(config), "engines": engine_list}, "models": info, "baseline": baseline,
           "results": records}
    if quality:
        doc["quality"] = {name: {k: r.get(k) for k in ("model", "testset", "n", "ppl", "chrf", "bleu", "weight_bytes")}
                          for name, r in quality.items()}
    if out:
        def fill(tmp: Path) -> None:
            (tmp / "bench.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            if plot:
                plot_decode_speedup(records, baseline, tmp / "decode_speedup.png")
            if quality:
                plot_quality(quality, tmp / "quality_vs_bytes.png")

        write_dir_atomic(out, fill)
    return BenchResult(records, info, baseline, device, doc, out)
