"""Every autotune config of every kernel, forced one at a time (``kernels.common.run_config``), against the
reference, on every scheme each kernel branches on (symmetric and asymmetric, a group smaller than the K tile,
one group per tile, per channel; 16-bit and other 2:4 values).

The other kernel tests run one config per path (the interpreter's, and ALMAK_AUTOTUNE=0 on a GPU); these run
the GPU's whole autotune list, so a config that computes something wrong cannot hide behind the autotuner.
Under the interpreter in fp16 on a small ragged shape (N = 200 against tiles of 64..256, K = 576 against
tiles of 128); on a GPU also in bf16.
"""

import pytest
import torch

from almak.kernels import sparse24, w4a16, w8a16
from almak.kernels.common import INTERPRET, kernel_configs, run_config

DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
N, K = 200, 576
DTYPES = [torch.float16] + ([] if INTERPRET else [torch.bfloat16])
# (scheme, group size, asymmetric) per kernel; sparse24 varies the kept values' dtype instead.
SCHEMES = {
    "w4a16": [("g128-asym", 128, True), ("g32-sym", 32, False), ("channel-asym", -1, True)],
    "w8a16": [("channel-sym", -1, False), ("g64-asym", 64, True)],
    "sparse24": [("values-as-x", None, None), ("values-fp32", None, None)],
    "sparse24_w4a16": [("g128-asym", 128, True), ("g32-sym", 32, False)],
}
PATH_M = {"decode": (1, 5), "prefill": (40,)}


def _config_id(config) -> str:
    kw = "-".join(f"{k.replace('BLOCK_SIZE_', '').lower()}{v}" for k, v in config.kwargs.items())
    return f"{kw}-w{config.num_warps}-s{config.num_stages}"


CASES = [pytest.param(kernel, path, config, scheme, M, id=f"{kernel}-{path}-{_config_id(config)}-{scheme[0]}-M{M}")
         for kernel, schemes in SCHEMES.items() for path, Ms in PATH_M.items()
         for config in kernel_configs(path, kernel, interpret=False) for scheme in schemes for M in Ms]


def operands(kernel, scheme, dtype):
    """(plan(path, x2) -> Launch, reference(x2) -> y) for random operands of one scheme."""
    gen = torch.Generator().manual_seed(0)
    name, group, asym = scheme
    G = 1 if group in (-1, None) else -(-K // group)
    # Weights of magnitude ~0.1, as in a trained layer: int4 steps of 0.005..0.025, int8 steps 16x smaller.
    step = 1 / 16 if kernel == "w8a16" else 1.0
    scales = ((torch.rand(N, G, generator=gen) * 0.02 + 0.005) * step).to(DEVICE, dtype)
    if kernel == "w4a16":
        qw = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), generator=gen, dtype=torch.int32).to(DEVICE)
        z = (torch.randint(0, 16, (N, G), generator=gen).float() if asym else torch.full((N, G), 8.0)).to(DEVICE)
        return (lambda path, x: w4a16.plan_w4a16(path, x, qw, scales, z, group),
                lambda x: w4a16.w4a16_reference(x, qw, scales, z, group))
    if kernel == "w8a16":
        qw = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8).to(DEVICE)
        z = torch.randint(-20, 20, (N, G), generator=gen).float().to(DEVICE) if asym else None
        return (lambda path, x: w8a16.plan_w8a16(path, x, qw, scales, z, group),
                lambda x: w8a16.w8a16_reference(x, qw, scales, z, group))
    W = torch.randn(N, K // 4, 4, generator=gen) * 0.05
    keep = torch.rand(N, K // 4, 4, generator=gen).argsort(dim=-1) < 2
    values, meta = sparse24.compress_24((W * keep).reshape(N, K))
    meta = meta.to(DEVICE)
    if kernel == "sparse24":
        values = values.to(DEVICE, dtype if name == "values-as-x" else torch.float32)
        return (lambda path, x: sparse24.plan_sparse24(path, x, values, meta, None, None, -1),
                lambda x: sparse24.sparse24_reference(x, values, meta))
    qv = torch.randint(-(2**31), 2**31 - 1, (N, K // 16), generator=gen, dtype=torch.int32).to(DEVICE)
    z = (torch.randint(0, 16, (N, G), generator=gen).float() if asym else torch.full((N, G), 8.0)).to(DEVICE)
    return (lambda path, x: sparse24.plan_sparse24(path, x, qv, meta, scales, z, group),
            lambda x: sparse24.sparse24_w4a16_reference(x, qv, meta, scales, z, group))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kernel, path, config, scheme, M", CASES)
def test_config_matches_reference(kernel, path, config, scheme, M, dtype):
    plan, reference = operands(kernel, scheme, dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y = run_config(plan(path, x), config).to(dtype)
    # As tests/kernels/test_w4a16.py: one 16-bit output ulp plus 16-bit-rounded weights summed over K.
    tol = dict(rtol=2e-3, atol=1e-2) if dtype == torch.float16 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(y, reference(x), **tol)
