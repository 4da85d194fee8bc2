"""Static report of almak's Triton kernels: compiled for each GPU generation on a machine without a GPU.

    python benchmarks/kernel_report.py                    # every kernel, config and arch -> static-report.json
    python benchmarks/kernel_report.py --kernels w4a16 --arches 90 --out /tmp/r.json --sass-dir /tmp/sass

For every kernel (w4a16, w8a16, sparse24, sparse24_w4a16), path (decode, prefill) and autotune config, the
kernel is compiled ahead of time (``triton.compile`` for ``GPUTarget("cuda", arch, 32)``) with the arguments
its launcher passes for real tensors, so that the JIT's specialization (integers divisible by 16, unit
strides, M == 1) is the same. From the PTX and SASS (``sass_stats.py``) it records, per (kernel, path,
config, arch, shape, M): registers, spills, shared memory against the arch's per-block limit, resident warps
per SM, the width of the weight-stream loads and how many times each weight byte is requested per CTA, SASS
instructions per main-loop iteration and weight bytes per issued warp instruction, and a PREDICTED time and
speedup over an fp16 GEMV/GEMM of the same shape on A100, H100 and H200:

    t = max(bytes / (bandwidth * min(1, CTAs / SMs)),                 # memory (an under-filled GPU pulls less)
            ceil(CTAs / SMs) * warp instructions per CTA / (4 * clock), # issue: 4 schedulers per SM, 1 instr/clock
            tensor-core FLOPs / dense fp16 peak)                       # x padded to the kernel's M tile
    t_fp16 = max((2 N K + 2 M K + 2 M N) / bandwidth, 2 M N K / dense fp16 peak)

Nothing here is measured: the figures are predictions from compiled code and published specifications.
``make gpu-check`` measures the same kernels on a GPU (benchmarks/results/<gpu>.json); put the two side by
side to check the model. Output: benchmarks/results/static-report.json and static-report.png.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
sys.path.insert(0, str(HERE))

# Published figures, used for every prediction. The issue rate is SMs x 4 warp schedulers x clock (one warp
# instruction per scheduler per cycle); the clock is the one NVIDIA's dense FP16 tensor peak is quoted at.
GPUS = {
    "A100-SXM4-80GB": dict(
        arch=80, sms=108, clock_ghz=1.41, bandwidth_gbps=2039, fp16_tflops=312,
        source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 2,039 GB/s HBM2e, 312 TFLOPS FP16 tensor dense) "
               "and the NVIDIA A100 architecture whitepaper (108 SMs, 1410 MHz boost)"),
    "H100-SXM5-80GB": dict(
        arch=90, sms=132, clock_ghz=1.83, bandwidth_gbps=3350, fp16_tflops=989,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM: 3.35 TB/s HBM3, 1,979 TFLOPS FP16 tensor with "
               "sparsity = 989 dense) and the NVIDIA H100 architecture whitepaper (132 SMs; 989 TFLOPS = "
               "132 SMs x 4,096 FLOP/clock at 1.83 GHz)"),
    "H200-SXM-141GB": dict(
        arch=90, sms=132, clock_ghz=1.83, bandwidth_gbps=4800, fp16_tflops=989,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM: 4.8 TB/s HBM3e, 1,979 TFLOPS FP16 tensor with "
               "sparsity); same GH100 SMs and clocks as the H100 SXM"),
}
# Per-SM limits by compute capability (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"): max resident warps, max resident blocks, shared memory per SM; 65,536 registers on all,
# allocated per warp in units of 256; 1 KiB of shared memory per block is reserved by the system.
ARCH_LIMITS = {
    80: dict(max_warps=64, max_blocks=32, shared_per_sm=167936),
    86: dict(max_warps=48, max_blocks=16, shared_per_sm=102400),
    89: dict(max_warps=48, max_blocks=24, shared_per_sm=102400),
    90: dict(max_warps=64, max_blocks=32, shared_per_sm=233472),
    100: dict(max_warps=64, max_blocks=32, shared_per_sm=233472),
    120: dict(max_warps=48, max_blocks=32, shared_per_sm=102400),
}
ARCHES = tuple(ARCH_LIMITS)
KERNELS = ("w4a16", "w8a16", "sparse24", "sparse24_w4a16")
KERNEL_FILES = ("common.py", "w4a16.py", "w8a16.py", "sparse24.py")
# (K, N) = (in_features, out_features) of the ALMA-7B (LLaMA-2-7B) and ALMA-13B projections.
SHAPES = {"alma-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
          "alma-13b": [(5120, 5120), (5120, 13824), (13824, 5120)]}
# M values each path serves: decode compiles differently for M == 1 (the JIT turns it into a constant).
PATH_M = {"decode": (1, 16), "prefill": (64, 128)}
W4_GROUP = 128  # the common GPTQ/AWQ layout; int8 is per output channel


# The kernel files each kernel's compiled code comes from: its own file and the files it imports.
KERNEL_DEPS = {"w4a16": ("_triton.py", "common.py", "w4a16.py"),
               "w8a16": ("_triton.py", "common.py", "w4a16.py", "w8a16.py"),
               "sparse24": ("_triton.py", "common.py", "w4a16.py", "sparse24.py"),
               "sparse24_w4a16": ("_triton.py", "common.py", "w4a16.py", "sparse24.py")}


def kernel_hashes() -> dict[str, str]:
    """Per kernel, sha256 of the files it compiles from and of the compiling Triton's version: a kernel whose
    hash matches a report's compiles to that report's records (make test compiles only the others)."""
    import triton

    out = {}
    for kernel, files in KERNEL_DEPS.items():
        h = hashlib.sha256(f"triton {triton.__version__}".encode())
        for name in files:
            h.update(name.encode())
            h.update((ROOT / "kernels" / name).read_bytes())
        out[kernel] = h.hexdigest()
    return out


def source_hash() -> str:
    """sha256 of the kernel files the report compiles, so a report can be matched to the code."""
    h = hashlib.sha256()
    for name in KERNEL_FILES:
        h.update(name.encode())
        h.update((ROOT / "kernels" / name).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- operands


def weight_layout(kernel: str, N: int, K: int) -> dict:
    """Bytes of one (N, K) layer in each kernel's format: the streamed weight (codes, kept values, metadata)
    and the scales/zeros read beside it (float16)."""
    groups = math.ceil(K / W4_GROUP)
    if kernel == "w4a16":
        return dict(weight=N * K // 2, side=2 * N * groups * 2, bits=4.0)
    if kernel == "w8a16":
        return dict(weight=N * K, side=N * 2, bits=8.0)
    if kernel == "sparse24":
        return dict(weight=N * K // 2 * 2 + N * K // 8, side=0, bits=9.0)
    return dict(weight=N * K // 4 + N * K // 8, side=2 * N * groups * 2, bits=3.0)


def plan(kernel: str, path: str, M: int, N: int, K: int, activations: str = "float16"):
    """The launcher's Launch for meta-device operands of this shape; scales and 2:4 values in the activations'
    dtype, as almak's layers keep them."""
    import torch

    from almak.kernels import sparse24, w4a16, w8a16

    meta = dict(device="meta")
    dtype = getattr(torch, activations)
    x = torch.empty(M, K, dtype=dtype, **meta)
    groups = math.ceil(K / W4_GROUP)
    if kernel == "w4a16":
        qw = torch.empty(N, K // 8, dtype=torch.int32, **meta)
        s = torch.empty(N, groups, dtype=dtype, **meta)
        return w4a16.plan_w4a16(path, x, qw, s, s.clone(), W4_GROUP)
    if kernel == "w8a16":
        qw = torch.empty(N, K, dtype=torch.int8, **meta)
        return w8a16.plan_w8a16(path, x, qw, torch.empty(N, 1, dtype=dtype, **meta), None, -1)
    m = torch.empty(N, K // 32, dtype=torch.int32, **meta)
    if kernel == "sparse24":
        v = torch.empty(N, K // 2, dtype=dtype, **meta)
        return sparse24.plan_sparse24(path, x, v, m, None, None, -1)
    qv = torch.empty(N, K // 16, dtype=torch.int32, **meta)
    s = torch.empty(N, groups, dtype=dtype, **meta)
    return sparse24.plan_sparse24(path, x, qv, m, s, s.clone(), W4_GROUP)


def _jit_and_heuristics(kernel_obj):
    """Unwrap Triton's autotuner and heuristics down to the JITFunction; return it with the heuristics."""
    from triton.runtime.jit import JITFunction

    heuristics, obj = {}, kernel_obj
    while not isinstance(obj, JITFunction):
        heuristics.update(getattr(obj, "values", None) or {})
        obj = obj.fn
    return obj, heuristics


def weight_param_indices(jit_fn, kernel: str) -> set[int]:
    """Indices of the pointer parameters that stream the weight: codes or kept values, and 2:4 metadata."""
    names = {"b_ptr", "v_ptr", "meta_ptr"}
    return {i for i, name in enumerate(jit_fn.arg_names) if name in names}


def compile_case(job: dict) -> dict:
    """Compile one (kernel, path, config, arch, M) and measure its code; runs in a worker process."""
    import sass_stats
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    N, K = job["shape"]
    launch = plan(job["kernel"], job["path"], job["M"], N, K, job["activations"])
    config = next(c for c in _configs(job["kernel"], job["path"]) if _config_id(c) == job["config"])
    fn, heuristics = _jit_and_heuristics(launch.kernel)
    kwargs = dict(launch.kwargs, **config.kwargs)
    named = dict(zip(fn.arg_names, launch.args), **kwargs)
    for name, rule in heuristics.items():
        kwargs[name] = rule(named)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    target = GPUTarget("cuda", job["arch"], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs, **options)
    opt, signature, constexprs, attrs = fn._pack_args(backend, {**kwargs, **options}, bound, spec, opts)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opt.__dict__)
    seconds = time.perf_counter() - t0
    sass = sass_stats.disassemble(compiled.asm["cubin"])
    stats = sass_stats.loop_stats(compiled.asm["ptx"], sass, weight_param_indices(fn, job["kernel"]))
    usage = sass_stats.resource_usage(compiled.asm["cubin"])
    if job.get("sass_dir"):
        out = Path(job["sass_dir"]) / f"{job['kernel']}-{job['path']}-{job['config']}-sm_{job['arch']}-M{job['M']}.sass.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.compress(sass.encode(), mtime=0))
    from almak.kernels.common import shared_estimate

    estimate = shared_estimate(config, dict(zip(fn.arg_names, launch.args)))
    return dict(job, registers=usage.get("REG", 0), shared_estimate=estimate, spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0),
                spill_instrs=stats.spill_instrs, shared_bytes=int(compiled.metadata.shared),
                sass_total=stats.sass_total, sass_loop=stats.sass_loop, weight_load_bits=stats.weight_load_bits,
                weight_bytes_per_thread=stats.weight_bytes_per_thread,
                weight_loads={str(k): v for k, v in sorted(stats.weight_loads.items())},
                loop_opcodes=dict(stats.opcodes.most_common(12)), compile_s=round(seconds, 2),
                tile=_tile(config), num_warps=config.num_warps, num_stages=config.num_stages,
                maxnreg=config.maxnreg)


def _configs(kernel: str, path: str):
    from almak.kernels.common import kernel_configs

    return kernel_configs(path, kernel, interpret=False)


def _tile(config) -> dict:
    return {k: v for k, v in config.kwargs.items()}


def _config_id(config) -> str:
    kw = config.kwargs
    parts = [f"{k.replace('BLOCK_SIZE_', '').replace('SPLIT_K', 'S').replace('GROUP_SIZE_M', 'G').lower()}{v}"
             for k, v in kw.items()]
    reg = f"-r{config.maxnreg}" if config.maxnreg else ""
    return "-".join(parts) + f"-w{config.num_warps}-s{config.num_stages}{reg}"


# ------------------------------------------------------------------------------------------- prediction


def occupancy(arch: int, registers: int, shared: int, warps: int) -> dict:
    """Resident blocks and warps per SM under the arch's register, shared-memory, warp and block limits."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_shared = lim["shared_per_sm"] // (shared + 1024)
    blocks = min(lim["max_blocks"], by_regs, by_shared, lim["max_warps"] // warps)
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps)


def predict(rec: dict, gpu: dict, M: int, N: int, K: int) -> dict:
    """Predicted kernel time, fp16 time and speedup on one GPU for one compiled case at one shape."""
    tile, path = rec["tile"], rec["path"]
    layout = weight_layout(rec["kernel"], N, K)
    ctas = _grid(rec, M, N)
    k_tiles = math.ceil(K / tile["BLOCK_SIZE_K"])
    trips = math.ceil(k_tiles / tile.get("SPLIT_K", 1)) if path == "decode" else k_tiles
    per_cta = rec["num_warps"] * (rec["sass_loop"] * trips + (rec["sass_total"] - rec["sass_loop"]))
    bw = gpu["bandwidth_gbps"] * 1e9
    issue = 4 * gpu["clock_ghz"] * 1e9  # warp instructions per second per SM
    bytes_moved = layout["weight"] + layout["side"] + 2 * M * K + 2 * M * N
    t_mem = bytes_moved / (bw * min(1.0, ctas / gpu["sms"]))
    t_issue = math.ceil(ctas / gpu["sms"]) * per_cta / issue
    m_pad = 16 * math.ceil(M / 16) if path == "decode" else tile["BLOCK_SIZE_M"] * math.ceil(M / tile["BLOCK_SIZE_M"])
    t_tc = 2 * m_pad * N * K / (gpu["fp16_tflops"] * 1e12)
    t = max(t_mem, t_issue, t_tc)
    t_fp16 = max((2 * N * K + 2 * M * K + 2 * M * N) / bw, 2 * M * N * K / (gpu["fp16_tflops"] * 1e12))
    bound = ("memory", "issue", "tensor cores")[[t_mem, t_issue, t_tc].index(t)]
    return dict(time_us=round(t * 1e6, 3), fp16_time_us=round(t_fp16 * 1e6, 3), speedup=round(t_fp16 / t, 3),
                bound=bound, ctas=ctas)


def _grid(rec: dict, M: int, N: int) -> int:
    tile = rec["tile"]
    if rec["path"] == "decode":
        return math.ceil(M / 16) * math.ceil(N / tile["BLOCK_SIZE_N"]) * tile["SPLIT_K"]
    return math.ceil(M / tile["BLOCK_SIZE_M"]) * math.ceil(N / tile["BLOCK_SIZE_N"])


def expand(compiled: list[dict]) -> list[dict]:
    """One record per (compiled case, shape, M): the static counts plus predictions for the arch's GPUs."""
    records = []
    for rec in compiled:
        shared_limit = _shared_limit(rec["arch"])
        occ = occupancy(rec["arch"], rec["registers"], rec["shared_bytes"], rec["num_warps"])
        for model, shapes in SHAPES.items():
            for K, N in shapes:
                Ms = [rec["M"]] if rec["path"] == "decode" or rec["M"] != PATH_M["prefill"][0] else list(PATH_M["prefill"])
                for M in Ms:
                    layout = weight_layout(rec["kernel"], N, K)
                    tile = rec["tile"]
                    tile_bytes = tile["BLOCK_SIZE_N"] * tile["BLOCK_SIZE_K"] * layout["bits"] / 8
                    issued = rec["sass_loop"] * rec["num_warps"]
                    out = dict(
                        kernel=rec["kernel"], path=rec["path"], arch=f"sm_{rec['arch']}", model=model, M=M, N=N, K=K,
                        group_size=W4_GROUP if rec["kernel"] in ("w4a16", "sparse24_w4a16") else -1,
                        config=rec["config"], tile=tile, num_warps=rec["num_warps"], num_stages=rec["num_stages"],
                        maxnreg=rec["maxnreg"], registers=rec["registers"], spill_bytes=rec["spill_bytes"],
                        shared_bytes=rec["shared_bytes"], shared_estimate=rec["shared_estimate"],
                        shared_limit=shared_limit, fits_shared=rec["shared_bytes"] <= shared_limit,
                        pruned=rec["shared_estimate"] > shared_limit, **occ,
                        weight_load_bits=rec["weight_load_bits"],
                        weight_requests_per_byte=round(rec["weight_bytes_per_thread"] * 32 * rec["num_warps"] / tile_bytes, 3),
                        sass_loop_instructions=rec["sass_loop"], sass_total_instructions=rec["sass_total"],
                        weight_bytes_per_warp_instr=round(tile_bytes / issued, 3) if issued else 0.0,
                        predicted_speedup={}, predicted_time_us={}, predicted_bound={},
                    )
                    for name, gpu in GPUS.items():
                        if gpu["arch"] == rec["arch"]:
                            p = predict(rec, gpu, M, N, K)
                            out["predicted_speedup"][name] = p["speedup"]
                            out["predicted_time_us"][name] = p["time_us"]
                            out["predicted_bound"][name] = p["bound"]
                            out["ctas"] = p["ctas"]
                    records.append(out)
    _mark_best(records)
    return records


def _shared_limit(arch: int) -> int:
    from almak.kernels.common import ARCH_SHARED_LIMIT

    return ARCH_SHARED_LIMIT[arch]


def _mark_best(records: list[dict]) -> None:
    """``best_for``: the GPUs on which this config has the highest predicted speedup of its (kernel, path, arch,
    shape, M), among the configs the arch keeps (``pruned`` is what kernels.common.prune_by_shared_memory drops
    there) and that do not spill: what a well-informed autotuner would pick."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        r["best_for"] = []
        if r["predicted_speedup"] and not r["pruned"]:
            groups.setdefault((r["kernel"], r["path"], r["arch"], r["N"], r["K"], r["M"]), []).append(r)
    for rs in groups.values():
        for gpu in rs[0]["predicted_speedup"]:
            max(rs, key=lambda r: (r["spill_bytes"] == 0, r["predicted_speedup"][gpu]))["best_for"].append(gpu)


# ------------------------------------------------------------------------------------------------ output


def summary(records: list[dict]) -> list[dict]:
    """Best predicted speedup per (kernel, path, M, GPU): geometric mean over the six ALMA shapes, and the two
    shapes the project's goals name (N x K = 11008 x 4096 and 4096 x 11008)."""
    rows = []
    keys = sorted({(r["kernel"], r["path"], r["M"]) for r in records},
                  key=lambda k: (KERNELS.index(k[0]), ("decode", "prefill").index(k[1]), k[2]))
    for kernel, path, M in keys:
        for gpu, spec in GPUS.items():
            best = [r for r in records if gpu in r["best_for"] and r["kernel"] == kernel and r["path"] == path
                    and r["M"] == M]
            if not best:
                continue
            speed = [r["predicted_speedup"][gpu] for r in best]
            by_shape = {(r["N"], r["K"]): r for r in best}
            rows.append(dict(
                kernel=kernel, path=path, M=M, gpu=gpu,
                geomean_speedup=round(math.exp(sum(map(math.log, speed)) / len(speed)), 2),
                speedup_11008x4096=by_shape[(11008, 4096)]["predicted_speedup"][gpu],
                speedup_4096x11008=by_shape[(4096, 11008)]["predicted_speedup"][gpu],
                weight_bytes_per_warp_instr=by_shape[(11008, 4096)]["weight_bytes_per_warp_instr"],
                config=by_shape[(11008, 4096)]["config"],
            ))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GPUS), figsize=(5 * len(GPUS), 4), sharey=True)
    for ax, gpu in zip(axes, GPUS):
        for kernel in KERNELS:
            pts = sorted((r["M"], r["geomean_speedup"]) for r in rows if r["gpu"] == gpu and r["kernel"] == kernel)
            if pts:
                ax.plot([m for m, _ in pts], [s for _, s in pts], marker="o", label=kernel)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ms = sorted({r["M"] for r in rows})
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_title(f"{gpu} (PREDICTED)")
        ax.set_xlabel("M (rows of x)")
    axes[0].set_ylabel("speedup over fp16 (predicted)")
    axes[0].legend()
    fig.suptitle("almak kernels vs an fp16 GEMV/GEMM, geomean over the ALMA-7B/13B projections: predicted from "
                 "compiled SASS, not measured", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: dict, path: Path) -> None:
    """The report with one record per line (a diff then shows which records changed), written atomically."""
    head = {k: v for k, v in report.items() if k != "records"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "records": [\n'
    text += ",\n".join(json.dumps(r, separators=(",", ":")) for r in report["records"]) + "\n ]\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def jobs(kernels, arches, sass_dir=None, activations: str = "float16", first_config: bool = False) -> list[dict]:
    out = []
    shape = SHAPES["alma-7b"][1]  # any ALMA shape: N and K divisible by 16 specialize the same
    for kernel in kernels:
        for path, Ms in PATH_M.items():
            for config in _configs(kernel, path)[:1] if first_config else _configs(kernel, path):
                for arch in arches:
                    for M in (Ms if path == "decode" else Ms[:1]):
                        out.append(dict(kernel=kernel, path=path, config=_config_id(config), arch=arch, M=M,
                                        shape=shape, sass_dir=sass_dir, activations=activations))
    return out


def _worker_init():
    sys.path.insert(0, str(HERE))
    _ensure_importable()


def _ensure_importable() -> None:
    """Make ``import almak`` work from a checkout that is not installed (the repository root is the package)."""
    try:
        import almak.kernels  # noqa: F401
    except ImportError:
        link_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "almak-import"
        link_dir.mkdir(parents=True, exist_ok=True)
        link = link_dir / "almak"
        if not link.exists():
            link.symlink_to(ROOT)
        sys.path.insert(0, str(link_dir))


def run(kernels=KERNELS, arches=ARCHES, workers: int | None = None, sass_dir: str | None = None,
        progress=None, activations: str = "float16", first_config: bool = False) -> dict:
    """Compile every case and return the report (a dict ready for JSON). Needs a process whose almak kernels
    are JIT functions: TRITON_INTERPRET unset or 0 when almak.kernels is first imported (main() sees to it)."""
    _ensure_importable()
    from almak.kernels.common import INTERPRET

    if INTERPRET:
        raise RuntimeError("almak.kernels was imported under TRITON_INTERPRET=1; run the report in a process "
                           "without it")
    todo = jobs(kernels, arches, sass_dir, activations, first_config)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    compiled = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        for i, rec in enumerate(pool.map(compile_case, todo, chunksize=4)):
            compiled.append(rec)
            if progress:
                progress(i + 1, len(todo), rec)
    records = expand(compiled)
    import triton

    return dict(
        note="PREDICTED from compiled code and published GPU figures; nothing here was measured on a GPU.",
        source_hash=source_hash(),
        kernel_hashes={k: v for k, v in kernel_hashes().items() if k in kernels},
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d"),
        model=__doc__.split("speedup over an fp16 GEMV/GEMM")[1].split("Nothing here")[0].strip(),
        gpus={name: {k: v for k, v in g.items()} for name, g in GPUS.items()},
        arch_limits={f"sm_{a}": dict(v, shared_per_block=_shared_limit(a)) for a, v in ARCH_LIMITS.items()},
        activations=activations,
        schemes=dict(w4a16=f"int4 asymmetric, group {W4_GROUP}, fp16 scales and zeros",
                     w8a16="int8 symmetric per output channel, fp16 scales",
                     sparse24="2:4, fp16 kept values", sparse24_w4a16=f"2:4, int4 kept values, group {W4_GROUP}"),
        compile_seconds=round(time.perf_counter() - t0, 1),
        summary=summary(records),
        # The main loop's most frequent SASS opcodes per compiled kernel (what its issue slots go to).
        loop_opcodes={f"{c['kernel']} {c['path']} {c['config']} sm_{c['arch']} M={c['M']}": c["loop_opcodes"]
                      for c in compiled},
        records=records,
    )


def main(argv=None) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be JIT functions, not interpreted ones
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--arches", default=",".join(map(str, ARCHES)),
                        help="comma-separated compute capabilities (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "static-report.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: beside --out)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--sass-dir", default=None, help="also write each compiled kernel's SASS (gzip) here")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    parser.add_argument("--first-config", action="store_true",
                        help="only the first autotune config of each kernel and path (make test's spot check)")
    parser.add_argument("--activations", choices=("float16", "bfloat16"), default="float16",
                        help="activation dtype the kernels are compiled for (default: %(default)s; the committed "
                             "report is float16)")
    args = parser.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    if unknown := set(kernels) - set(KERNELS):
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {','.join(KERNELS)}")
    try:
        arches = [int(a) for a in args.arches.split(",") if a]
    except ValueError:
        parser.error(f"--arches takes integers such as 80,90, got {args.arches!r}")
    if unknown := set(arches) - set(ARCHES):
        parser.error(f"unknown arches {sorted(unknown)}; choose from {','.join(map(str, ARCHES))}")

    def progress(done, total, rec):
        print(f"[{done}/{total}] {rec['kernel']} {rec['path']} {rec['config']} sm_{rec['arch']} M={rec['M']}: "
              f"{rec['registers']} regs, loop {rec['sass_loop']} instrs", file=sys.stderr)

    report = run(kernels, arches, args.workers, args.sass_dir, progress, args.activations, args.first_config)
    write_json(report, args.out)
    print(f"wrote {args.out} ({len(report['records'])} records)", file=sys.stderr)
    if not args.no_plot:
        plot(report["summary"], args.plot or args.out.with_suffix(".png"))
    for row in report["summary"]:
        print(f"{row['kernel']:>15} {row['path']:>7} M={row['M']:<4} {row['gpu']:<15} predicted "
              f"{row['geomean_speedup']:5.2f}x fp16 (11008x4096: {row['speedup_11008x4096']:.2f}x, "
              f"4096x11008: {row['speedup_4096x11008']:.2f}x) {row['weight_bytes_per_warp_instr']:.2f} B/instr")


if __name__ == "__main__":
    main()
