"""What almak's weight-only kernels share: operand checks, path dispatch, autotuning configs, and the launch.

Every matmul in this package (W4A16, W8A16, 2:4, 2:4 + W4A16) has the same three paths, chosen by the
number of rows M of ``x``:

- decode (M <= ``DECODE_MAX_M``): split-K. Program (n-block, k-split) dequantizes its weight tiles in
  registers and multiplies them on the tensor cores against x padded to 16 rows (``tl.dot``'s smallest M
  tile: at M = 1 the tensor cores are idle anyway, and they take the multiply-adds off the issue slots);
  partial sums meet in a float32 buffer through atomics, so that a 4096-wide layer at M = 1 still launches
  several programs per SM.
- prefill (``DECODE_MAX_M`` < M < ``DENSE_MIN_M``): the tiled matmul of Triton's tutorial with the same
  in-register dequantization.
- dense (M >= ``DENSE_MIN_M``, and every CPU tensor unless ``TRITON_INTERPRET=1``): dequantize the whole
  weight, then ``F.linear`` (cuBLAS on GPU). At large M the matmul is compute bound, the weight is read once
  whatever its format, and cuBLAS wins.

Under ``TRITON_INTERPRET=1`` the Triton paths also run on CPU tensors (slowly; for tests), with one fixed
config per path instead of autotuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ._triton import HAVE_TRITON, TritonMissing, triton

__all__ = [
    "DECODE_MAX_M",
    "DENSE_MIN_M",
    "SUPPORTED_GROUP_SIZES",
    "INTERPRET",
    "AUTOTUNE",
    "HAVE_TRITON",
    "TritonMissing",
    "ARCH_SHARED_LIMIT",
    "Launch",
    "kernel_configs",
    "check_activation",
    "check_scales",
    "choose_path",
    "dot_setup",
]

# Rows of x up to which the split-K decode kernel is used: it pads M to 16 (the smallest tl.dot tile), so
# beyond 16 rows a tiled kernel wastes nothing and no longer needs split-K to fill the GPU.
DECODE_MAX_M = 16
# Rows of x from which dequantize + cuBLAS replaces the Triton prefill kernel. UNMEASURED: chosen without a
# GPU as a conservative guess (the fp16 GEMM is compute bound well before 256 rows on an H100, so the 4x
# smaller weight read stops paying). Measure with `python benchmarks/run_kernels.py` on the target GPU and
# set it to the first M where the "dequant" provider beats "triton".
DENSE_MIN_M = 256
# Group sizes the kernels are compiled for (a power of two keeps `k // group` a shift and lets a K tile sit
# inside one group); -1 means one group per output channel.
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
# Same parsing as Triton's own TRITON_INTERPRET knob; read once because triton.jit also decides at import
# time whether the kernels are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# ALMAK_AUTOTUNE=0 gives the GPU the interpreter's single config per path instead of autotuning (the GPU test
# run uses it: hundreds of test shapes x every config would compile for minutes).
AUTOTUNE = not INTERPRET and os.environ.get("ALMAK_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")
# Largest shared memory one block may use, by compute capability (cudaDevAttrMaxSharedMemoryPerBlockOptin;
# CUDA C Programming Guide, "Technical Specifications per Compute Capability"). Configs that need more are
# pruned on that GPU (see kernel_configs); benchmarks/kernel_report.py checks every config against them.
ARCH_SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PATHS = ("auto", "decode", "prefill", "dense")


# ------------------------------------------------------------------------------------------------ configs


def _decode_shapes(kernel: str) -> list[tuple[int, int, int, int, int, int | None]]:
    """(BLOCK_SIZE_N, BLOCK_SIZE_K, SPLIT_K, num_warps, num_stages, maxnreg) of the decode autotune list.

    Chosen with benchmarks/kernel_report.py (predicted, sm_90, M = 1, ALMA-7B shapes; no GPU measured them):
    128 x 128 tiles with 4 warps (or 256 x 128 with 8) keep ~128 weights per thread, enough to amortize
    loading x and the per-tile scale; one stage because the loop has no loads that feed tl.dot through
    shared memory worth pipelining, and every warp already has 4 (W4) or 8 (W8) 128-bit weight loads in
    flight. ``maxnreg=160``: without it ptxas caps the W4 kernel at 128 registers and spills 24-32 bytes a
    thread. SPLIT_K spans 2..16 so that 4096- to 13824-wide layers all reach ~2-4 programs per SM.
    """
    if kernel in ("sparse24", "sparse24_w4a16"):
        return [(n, k, s, w, 1, None) for n, k, s, w in
                ((64, 128, 4, 4), (64, 128, 8, 4), (128, 128, 4, 4))]
    return [(n, k, s, w, 1, 192) for n, k, s, w in
            ((128, 128, 2, 4), (128, 128, 4, 4), (128, 128, 8, 4), (128, 128, 16, 4),
             (256, 128, 4, 8), (256, 128, 8, 8), (64, 128, 8, 4))]


def _prefill_shapes(kernel: str) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, num_warps) of the prefill autotune list: the
    tutorial's fp16 list cut to BLOCK_SIZE_K <= 128 (tiles then sit inside one group of 128 or more) and to
    tiles whose pipelined buffers fit the smallest shared memory (99 KiB on sm_86/89/120)."""
    if kernel in ("sparse24", "sparse24_w4a16"):
        # The 2:4 expansion keeps ~2x the registers per weight; a pipelined (num_stages=3) variant crashes
        # Triton 3.9's OptimizeDotOperands pass ("Illegal shared layout") for int4 kept values.
        return [(32, 64, 128, 1, 4), (64, 64, 128, 1, 8), (64, 128, 128, 1, 8)]
    return [(32, 64, 128, 1, 4), (32, 128, 128, 1, 4), (64, 64, 128, 1, 8), (64, 128, 128, 1, 8)]


def kernel_configs(path: str, kernel: str = "w4a16", interpret: bool = not AUTOTUNE) -> list[triton.Config]:
    """Autotuning space of one kernel's decode or prefill path.

    Under the interpreter (and with ALMAK_AUTOTUNE=0) one config per path: blocks of 128 along K (3x faster
    there than 64, measured on the tests' shapes) that still leave every test shape a ragged N or K edge
    (192, 576, 1000, 64), group sizes on both sides of BLOCK_SIZE_K (32, 64 < 128 <= 128, per-channel), and
    SPLIT_K = 2 so that the atomic reduction runs. The GPU lists come from the two functions above.
    """
    if path == "decode":
        if interpret:
            return [triton.Config({"BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "SPLIT_K": 2}, num_warps=4)]
        return [triton.Config({"BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st,
                              maxnreg=r) for n, k, s, w, st, r in _decode_shapes(kernel)]
    if path == "prefill":
        if interpret:
            return [triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 4},
                                  num_warps=4)]
        return [triton.Config({"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": 8},
                              num_stages=st, num_warps=w) for m, n, k, st, w in _prefill_shapes(kernel)]
    raise ValueError(f"unknown kernel path {path!r}; expected 'decode' or 'prefill'")


def prune_by_shared_memory(configs, named_args, **kwargs):
    """``prune_configs_by`` hook: drop configs that need more shared memory than this GPU gives a block.

    The requirement of each config on each architecture is what benchmarks/kernel_report.py compiles and
    records (``shared_bytes``); ``_shared_estimate`` is an upper bound of it that the CI checks, so that the
    pruning needs no compile.
    """
    if INTERPRET or not torch.cuda.is_available():
        return configs
    major, minor = torch.cuda.get_device_capability()
    limit = ARCH_SHARED_LIMIT.get(10 * major + minor, min(ARCH_SHARED_LIMIT.values()))
    kept = [c for c in configs if shared_estimate(c, named_args) <= limit]
    return kept or configs[:1]


def shared_estimate(config: triton.Config, named_args: dict) -> int:
    """Upper bound of the shared memory (bytes) one config's kernel allocates.

    Shared memory holds tl.dot's operands on their way from registers to the tensor cores: x's tile
    (BLOCK_SIZE_M rows; 16 on the decode path) and the dequantized weight tile, in the activations' dtype,
    ``num_stages`` copies of them when the loop is pipelined, plus 1 KiB for reduction scratch and barriers
    (sm_100 adds 8 bytes to some kernels). tests/kernels/test_compile_report.py checks the bound against every
    compiled config on every architecture.
    """
    kw = config.kwargs
    x = named_args.get("a_ptr")
    elem = x.element_size() if isinstance(x, torch.Tensor) else 2
    rows = kw.get("BLOCK_SIZE_M", 16) + kw["BLOCK_SIZE_N"]
    return rows * kw["BLOCK_SIZE_K"] * elem * max(1, config.num_stages) + 1024


# ------------------------------------------------------------------------------------------------- checks


def check_activation(x: torch.Tensor, K: int, name: str) -> None:
    """Raise ValueError unless x is a floating (..., K) activation of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACTIVATION_DTYPES:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{name}: x of shape {tuple(x.shape)} does not end in K={K} (the weight's in_features)")


def check_scales(scales: torch.Tensor, zeros: torch.Tensor | None, N: int, K: int, group_size: int,
                 device: torch.device, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate scales/zeros for (N, K) weights; return them as 2-D (N, groups) views."""
    if group_size != -1 and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{name}: group_size must be one of {SUPPORTED_GROUP_SIZES} or -1 (per output "
                         f"channel), got {group_size}")
    groups = 1 if group_size == -1 else triton.cdiv(K, group_size)
    out = []
    for label, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if label == "scales" and not t.is_floating_point():
            raise ValueError(f"{name}: scales must be floating point, got {t.dtype}")
        if label == "zeros" and (t.is_complex() or t.dtype == torch.bool):
            raise ValueError(f"{name}: zeros must be floating point or integer, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: {label} is on {t.device} but qweight is on {device}")
        if group_size == -1 and t.shape in ((N,), (N, 1)):
            t = t.reshape(N, 1)
        if tuple(t.shape) != (N, groups):
            want = f"({N},) or ({N}, 1)" if group_size == -1 else f"({N}, {groups}) = (N, ceil(K / group_size))"
            raise ValueError(f"{name}: {label} of shape {tuple(t.shape)} should be {want} for N={N}, K={K}, "
                             f"group_size={group_size}")
        out.append(t)
    return out[0], out[1]


def choose_path(x2: torch.Tensor, path: str, name: str) -> str:
    """Resolve ``path="auto"`` from the device and the number of rows; refuse Triton paths without Triton (a
    CUDA tensor, or a forced decode/prefill path, where Triton is not installed: :class:`TritonMissing`)."""
    if path not in _PATHS:
        raise ValueError(f"{name}: path must be one of {_PATHS}, got {path!r}")
    if not HAVE_TRITON and (x2.device.type == "cuda" or path in ("decode", "prefill")):
        raise TritonMissing(name if path == "auto" else f"{name}: path={path!r}")
    triton_ok = HAVE_TRITON and (x2.device.type == "cuda" or (INTERPRET and x2.device.type == "cpu"))
    if path == "auto":
        M = x2.shape[0]
        if not triton_ok or M >= DENSE_MIN_M:
            return "dense"
        return "decode" if M <= DECODE_MAX_M else "prefill"
    if path != "dense" and not triton_ok:
        raise ValueError(f"{name}: path={path!r} needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got x on {x2.device}")
    return path


# ------------------------------------------------------------------------------------------------- launch


@dataclass
class Launch:
    """One kernel call, built before it runs, so that benchmarks/kernel_report.py compiles exactly what the
    launchers run (same arguments, so the same specialization) without a GPU.

    ``kernel`` is the autotuned Triton kernel, ``grid(meta)`` its grid for a config's meta-parameters, and
    ``out`` the buffer it writes (float32 for the split-K decode path, which the caller casts).
    """

    kernel: object
    args: tuple
    kwargs: dict
    grid: Callable[[dict], tuple]
    out: torch.Tensor

    def run(self) -> torch.Tensor:
        self.kernel[self.grid](*self.args, **self.kwargs)
        return self.out


def run_config(launch: Launch, config) -> torch.Tensor:
    """Run ``launch`` with one autotune ``config``, bypassing the autotuner (the tests check every config of
    every kernel this way, on the GPU and under the interpreter); returns the output buffer."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    fn, heuristics = launch.kernel, {}
    while isinstance(fn, (Autotuner, Heuristics)):
        heuristics.update(getattr(fn, "values", None) or {})
        fn = fn.fn
    kwargs = dict(launch.kwargs, **config.kwargs)
    named = dict(zip(fn.arg_names, launch.args), **kwargs)
    for name, rule in heuristics.items():
        kwargs[name] = rule(named)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    if "SPLIT_K" in kwargs:  # the decode path accumulates into its buffer with atomics
        launch.out.zero_()
    fn[launch.grid(kwargs)](*launch.args, **kwargs, **options)
    return launch.out


def dot_setup(x2: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x as the kernels take it, and tl.dot's input precision.

    The interpreter's bf16 tl.dot is wrong, so there the bf16 case is computed in float32 (a GPU runs bf16).
    fp32 activations get true fp32 products, matching torch's default (TF32 off for matmuls).
    """
    if INTERPRET and x2.dtype == torch.bfloat16:
        x2 = x2.float()
    return x2, "ieee" if x2.dtype == torch.float32 else "tf32"


def output_buffer(path: str, M: int, N: int, x2: torch.Tensor) -> torch.Tensor:
    """Zero-filled float32 (split-K decode accumulates into it with atomics), or the output in x's dtype."""
    if path == "decode":
        return torch.zeros((M, N), device=x2.device, dtype=torch.float32)
    return torch.empty((M, N), device=x2.device, dtype=x2.dtype)


def grid_for(path: str, M: int, N: int) -> Callable[[dict], tuple]:
    if path == "decode":
        return lambda META: (triton.cdiv(M, 16) * triton.cdiv(N, META["BLOCK_SIZE_N"]), META["SPLIT_K"])
    return lambda META: (triton.cdiv(M, META["BLOCK_SIZE_M"]) * triton.cdiv(N, META["BLOCK_SIZE_N"]),)


def autotuned(fn, path: str, kernel: str, key: list[str]):
    """``fn`` wrapped in Triton's autotuner over ``kernel_configs(path, kernel)``, with K-evenness derived
    per config and configs that do not fit this GPU's shared memory pruned."""
    even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_SIZE_K"] == 0})(fn)
    extra = dict(reset_to_zero=["c_ptr"]) if path == "decode" else {}  # atomics need a zeroed output per trial
    return triton.autotune(configs=kernel_configs(path, kernel), key=key,
                           prune_configs_by={"early_config_prune": prune_by_shared_memory}, **extra)(even_k)


def apply_groups_(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """In place on float32 codes W (N, K): ``(W - z) * s`` with (N, groups) scales/zeros, ragged tail included.

    Broadcasting over (N, groups, group_size) views instead of repeating the scales K times: on CPU the
    dequantization is bound by memory traffic and fresh allocations.
    """
    N, K = W.shape
    G = K if group_size == -1 else group_size
    full = K // G  # complete groups; a ragged last group, if any, has K - full * G columns
    s, z = scales.float().unsqueeze(-1), None if zeros is None else zeros.float().unsqueeze(-1)
    parts = [(W[:, :full * G].view(N, full, G), slice(0, full))] if full else []
    if full * G < K:
        parts.append((W[:, full * G:].view(N, 1, K - full * G), slice(full, full + 1)))
    for part, g in parts:
        if z is not None:
            part.sub_(z[:, g])
        part.mul_(s[:, g])
    return W
