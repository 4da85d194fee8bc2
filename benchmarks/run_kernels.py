"""Microbenchmarks of the weight-only matmuls on the current device; writes benchmarks/results/<device>.json.

    python benchmarks/run_kernels.py                  # every kernel (CPU: the quantized ones), the device's grid
    python benchmarks/run_kernels.py --kernels w4a16 --out /tmp/w4.json
    python benchmarks/run_kernels.py --kernels sparse24,sparse24_w4

GPU: LLaMA-2-7B/13B projection shapes at M in {1, 4, 16, 64, 256, 1024}, fp16 activations, against
torch fp16 (cuBLAS on the dense weight). CPU: ``almak`` is QuantLinear's CPU path (PyTorch's native
weight-only kernels, which round x to bf16) on two 7B shapes at M in {1, 16}, fp32 activations, against
dense fp32. The 2:4 sparse kernels (``sparse24``: fp16 kept values; ``sparse24_w4``: int4 kept values) run on
LLaMA-2-7B shapes at M in {1, 16, 256}; their ``dequant`` provider is decompress + matmul. On the CPU they run
only when asked (``--kernels sparse24``): their ``almak`` there is the auto path, that same decompress + matmul
on every call, whereas almak's 2:4 layers expand the weight once and run the dense matmul. Each record
holds the median time, the speedup over that dense baseline and over dequantize + matmul, and the achieved
weight bandwidth: bytes of the weight as the provider reads it (packed codes + scales + zeros for quantized
providers, kept values + meta for 2:4, the dense matrix for the dense baseline) over the median time. On an
A100, H100 or H200 each almak record also carries what benchmarks/results/static-report.json PREDICTED for it
(``predicted_ms``, ``predicted_speedup``, ``predicted_config``), so that the measurement checks the static
model. Measures and records; judges only correctness: a timed result further than ``--max-rel-err`` from
dequantize + matmul makes the run exit 1 (after writing its report), so that ``make gpu-check`` fails.

The pytest-benchmark files beside this one (test_bench_*.py) run the same cases through pytest-benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from almak.eval.bench import device_name
from almak.kernels import sparse24, w4a16, w8a16
from almak.quant.pack import pack_int4

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (K, N) = (in_features, out_features), labelled "KxN" so that x (M, K) @ W.T gives (M, N).
GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 5120), (5120, 13824), (13824, 5120)]
GPU_M = [1, 4, 16, 64, 256, 1024]
# Reduced CPU grid (about a minute on 2 cores): the 7B attention projection and down_proj.
CPU_SHAPES = [(4096, 4096), (11008, 4096)]
CPU_M = [1, 16]
# The 2:4 kernels: LLaMA-2-7B's projections at one decode, one small-batch and one prefill M (CPU: its two
# CPU_SHAPES; dense fp32 11008x4096 at M = 256 took 0.32 s a call on the 2-core EPYC, measured).
SPARSE_GPU_SHAPES = GPU_SHAPES[:3]
SPARSE_M = [1, 16, 256]
KERNELS = ("w4a16", "w8a16", "sparse24", "sparse24_w4")
SPARSE_KERNELS = ("sparse24", "sparse24_w4")
# Benchmarked schemes: the common GPTQ/AWQ int4 layout, and per-channel symmetric int8.
W4_GROUP_SIZE = 128


def grid(device: str, kernel: str = "w4a16") -> tuple[list[tuple[int, int]], list[int]]:
    if kernel in SPARSE_KERNELS:
        return (SPARSE_GPU_SHAPES, SPARSE_M) if device == "cuda" else (CPU_SHAPES, SPARSE_M)
    return (GPU_SHAPES, GPU_M) if device == "cuda" else (CPU_SHAPES, CPU_M)


def providers(kernel: str, M: int, device: str) -> list[str]:
    """Provider names for one case; the first is the dense baseline."""
    if device != "cuda":
        return ["torch_fp32", "dequant", "almak"]
    names = ["torch_fp16", "dequant", "almak"]
    if M >= w4a16.DENSE_MIN_M:
        names.append("triton")  # auto dispatch goes dense here; time the Triton kernel to place DENSE_MIN_M
    return names


def random_meta(N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """2:4 metadata with one of the 6 position pairs per group, uniformly (nibble = first | second << 2)."""
    nibbles = torch.tensor([0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2, 1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2])
    return pack_int4(nibbles[torch.randint(0, 6, (N, K // 4), generator=gen)])


def make_weights(kernel: str, N: int, K: int, device: str, seed: int = 0) -> dict:
    """Random quantized or 2:4 operands (codes need not come from a real W to time the kernels)."""
    gen = torch.Generator().manual_seed(seed)
    if kernel == "sparse24":
        return dict(
            values=(torch.randn(N, K // 2, generator=gen) * 0.02).to(device, torch.float16),
            meta=random_meta(N, K, gen).to(device),
        )
    if kernel == "sparse24_w4":
        groups = -(-K // W4_GROUP_SIZE)
        return dict(
            qvalues=torch.randint(-(2**31), 2**31 - 1, (N, K // 16), generator=gen, dtype=torch.int32).to(device),
            meta=random_meta(N, K, gen).to(device),
            scales=(torch.rand(N, groups, generator=gen) * 0.01).to(device, torch.float16),
            zeros=torch.full((N, groups), 8.0, dtype=torch.float16, device=device),
            group_size=W4_GROUP_SIZE,
        )
    if kernel == "w4a16":
        groups = -(-K // W4_GROUP_SIZE)
        return dict(
            qweight=torch.randint(-(2**31), 2**31 - 1, (N, K // 8), generator=gen, dtype=torch.int32).to(device),
            scales=(torch.rand(N, groups, generator=gen) * 0.01).to(device, torch.float16),
            zeros=torch.full((N, groups), 8.0, dtype=torch.float16, device=device),
            group_size=W4_GROUP_SIZE,
        )
    return dict(
        qweight=torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8).to(device),
        scales=(torch.rand(N, 1, generator=gen) * 1e-3).to(device, torch.float16),
        zeros=None,
        group_size=-1,
    )


def weight_bytes(ops: dict) -> int:
    return sum(t.numel() * t.element_size() for t in ops.values() if isinstance(t, torch.Tensor))


def kernel_fns(kernel: str, ops: dict):
    """``(matmul(x, path=...), dequant(dtype))`` on one kernel's operands."""
    if kernel == "sparse24":
        return (lambda x, **kw: sparse24.sparse24_matmul(x, ops["values"], ops["meta"], **kw),
                lambda dtype: sparse24.decompress_24(ops["values"], ops["meta"], dtype=dtype))
    if kernel == "sparse24_w4":
        args = (ops["qvalues"], ops["meta"], ops["scales"], ops["zeros"], ops["group_size"])
        return (lambda x, **kw: sparse24.sparse24_w4a16_matmul(x, *args, **kw),
                lambda dtype: sparse24.dequantize_sparse24_w4(*args, dtype=dtype))
    matmul = w4a16.w4a16_matmul if kernel == "w4a16" else w8a16.w8a16_matmul
    dequant = w4a16.dequantize_w4 if kernel == "w4a16" else w8a16.dequantize_w8
    args = (ops["qweight"], ops["scales"], ops["zeros"], ops["group_size"])
    return (lambda x, **kw: matmul(x, *args, **kw)), (lambda dtype: dequant(*args, dtype=dtype))


def cpu_layer(kernel: str, N: int, K: int, ops: dict):
    """The QuantLinear that real CPU inference runs (PyTorch's native weight-only kernels on these shapes)."""
    from almak.modeling.nn.quant_linear import QuantLinear

    layer = QuantLinear(K, N, bits=4 if kernel == "w4a16" else 8, group_size=ops["group_size"], sym=True,
                        dtype=ops["scales"].dtype)
    layer.weight_packed.copy_(ops["qweight"])
    layer.weight_scale.copy_(ops["scales"].reshape(layer.weight_scale.shape))
    return layer


def make_call(kernel: str, N: int, K: int, M: int, provider: str, device: str):
    """Return (fn, bytes of weight that fn reads); fn() computes one (M, K) x (K, N) product."""
    act_dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(device, act_dtype)
    ops = make_weights(kernel, N, K, device)
    matmul, dequant = kernel_fns(kernel, ops)
    if provider in ("torch_fp16", "torch_fp32"):
        W = dequant(act_dtype)
        return (lambda: F.linear(x, W)), W.numel() * W.element_size()
    if provider == "dequant":
        return (lambda: F.linear(x, dequant(act_dtype))), weight_bytes(ops)
    if provider == "almak" and device != "cuda" and kernel not in SPARSE_KERNELS:
        layer = cpu_layer(kernel, N, K, ops)
        return (lambda: layer(x)), weight_bytes(ops)
    if provider == "almak":
        return (lambda: matmul(x)), weight_bytes(ops)
    if provider == "triton":
        path = "decode" if M <= w4a16.DECODE_MAX_M else "prefill"
        return (lambda: matmul(x, path=path)), weight_bytes(ops)
    raise ValueError(f"unknown provider {provider!r}")


def median_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        # do_bench flushes L2 between runs, so small-M times are weight-bandwidth honest.
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up: first-call allocations
    times, start = [], time.perf_counter()
    # At least 5 runs and about a second per case: enough for a stable median on a quiet 2-core machine.
    while len(times) < 5 or (time.perf_counter() - start < 1.0 and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# Kernel names of benchmarks/kernel_report.py, whose static report puts a predicted time beside each measurement.
_REPORT_KERNEL = {"sparse24_w4": "sparse24_w4a16"}
_STATIC: dict = {}


def static_prediction(kernel: str, N: int, K: int, M: int) -> dict:
    """What benchmarks/results/static-report.json PREDICTED for this case on this GPU (its best config), to sit
    beside the measurement: empty when the report has no such GPU or M (it models A100, H100 and H200 at M = 1,
    16, 64 and 128)."""
    if not _STATIC:
        path = RESULTS_DIR / "static-report.json"
        _STATIC["report"] = json.loads(path.read_text()) if path.exists() else {"records": [], "gpus": {}}
    name = torch.cuda.get_device_name()
    gpu = next((g for g in _STATIC["report"]["gpus"] if g.split("-")[0] in name), None)
    match = [r for r in _STATIC["report"]["records"] if gpu in r.get("best_for", ())
             and r["kernel"] == _REPORT_KERNEL.get(kernel, kernel) and (r["N"], r["K"], r["M"]) == (N, K, M)]
    if not match:
        return {}
    r = match[0]
    return dict(predicted_gpu=gpu, predicted_ms=round(r["predicted_time_us"][gpu] / 1e3, 5),
                predicted_speedup=r["predicted_speedup"][gpu], predicted_config=r["config"])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| over max |ref|: the check that a timed kernel computed the product it was timed on."""
    return (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)


def run(kernels=KERNELS, device: str | None = None, on_kernel=None) -> dict:
    """Time every case of ``kernels``; ``on_kernel(report)`` gets the report so far after each kernel."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = []
    report = dict(
        device=device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        activations="float16" if device == "cuda" else "float32",
        baseline="torch_fp16" if device == "cuda" else "torch_fp32",
        w4a16_scheme=f"int4 symmetric (zeros 8), group {W4_GROUP_SIZE}, fp16 scales",
        w8a16_scheme="int8 symmetric per output channel, fp16 scales",
        sparse24_scheme="2:4 sparse, fp16 kept values, uniform random position pairs",
        sparse24_w4_scheme=f"2:4 sparse, int4 symmetric kept values (zeros 8), group {W4_GROUP_SIZE}, fp16 scales",
        dense_min_m=w4a16.DENSE_MIN_M,
        rel_err="max |almak - dequant| / max |dequant| on the timed inputs",
        results=records,
    )
    for kernel in kernels:
        shapes, Ms = grid(device, kernel)
        for K, N in shapes:
            for M in Ms:
                times, ref = {}, None
                for provider in providers(kernel, M, device):
                    fn, nbytes = make_call(kernel, N, K, M, provider, device)
                    times[provider] = ms = median_ms(fn, device)
                    rec = dict(kernel=kernel, shape=f"{K}x{N}", K=K, N=N, M=M, provider=provider,
                               median_ms=round(ms, 5), weight_gbps=round(nbytes / ms / 1e6, 2))
                    if provider == "dequant":
                        ref = fn()
                    elif provider in ("almak", "triton"):
                        rec["rel_err"] = float(f"{relative_error(fn(), ref):.3g}")
                    records.append(rec)
                    err = f"  rel_err {rec['rel_err']:.2g}" if "rel_err" in rec else ""
                    print(f"{kernel} {K}x{N} M={M:<5} {provider:<11} {ms:9.3f} ms{err}", file=sys.stderr)
                baseline = providers(kernel, M, device)[0]
                for rec in records[-len(times):]:
                    rec["speedup_vs_baseline"] = round(times[baseline] / rec["median_ms"], 3)
                    rec["speedup_vs_dequant"] = round(times["dequant"] / rec["median_ms"], 3)
                    if rec["provider"] == "almak" and device == "cuda":
                        rec.update(static_prediction(kernel, N, K, M))
        if on_kernel:
            on_kernel(report)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=None,
                        help=f"comma-separated subset of {','.join(KERNELS)} (default: all on a GPU; on the CPU "
                             "the quantized ones only, since almak's 2:4 layers run a dense matmul there)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>.json)")
    parser.add_argument("--max-rel-err", type=float, default=1e-2,
                        help="exit 1 (after writing the report) if a timed kernel's result is further than this from "
                             "dequantize + matmul (max |diff| / max |ref|; fp16 kernels land near 1e-3)")
    args = parser.parse_args(argv)
    if w4a16.INTERPRET:
        parser.error("unset TRITON_INTERPRET: the benchmarks time real kernels, not the interpreter")
    default = KERNELS if torch.cuda.is_available() else tuple(k for k in KERNELS if k not in SPARSE_KERNELS)
    kernels = [k for k in (args.kernels or ",".join(default)).split(",") if k]
    if unknown := set(kernels) - set(KERNELS):
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    out = args.out or RESULTS_DIR / f"{device_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(report: dict) -> None:  # after each kernel, so that a run cut short keeps what it measured
        done = sorted({r["kernel"] for r in report["results"]}, key=KERNELS.index)
        report["kernels_done"] = done
        report["complete"] = done == sorted(kernels, key=KERNELS.index)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)

    report = run(kernels, on_kernel=write)
    print(f"wrote {out}", file=sys.stderr)
    wrong = [r for r in report["results"] if r.get("rel_err", 0.0) > args.max_rel_err]
    if wrong:
        for r in wrong:
            print(f"WRONG RESULT: {r['kernel']} {r['shape']} M={r['M']} {r['provider']}: rel_err {r['rel_err']:.3g} > "
                  f"{args.max_rel_err:g}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
