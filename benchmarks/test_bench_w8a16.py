"""pytest-benchmark: w8a16 against dense and dequantize + matmul (cases from run_kernels.py)."""

import pytest
import run_kernels as rk
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES, MS = rk.grid(DEVICE)
CASES = [(K, N, M, p) for K, N in SHAPES for M in MS for p in rk.providers("w8a16", M, DEVICE)]


@pytest.mark.parametrize("K,N,M,provider", CASES, ids=lambda v: str(v))
def test_bench_w8a16(benchmark, K, N, M, provider):
    fn, nbytes = rk.make_call("w8a16", N, K, M, provider, DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def call():
        fn()
        sync()

    benchmark.extra_info.update(kernel="w8a16", shape=f"{K}x{N}", M=M, provider=provider, weight_bytes=nbytes)
    benchmark(call)
