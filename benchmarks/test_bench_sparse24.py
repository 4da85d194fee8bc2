"""pytest-benchmark: 2:4 sparse (fp16 and int4 kept values) against dense and decompress + matmul (cases
from run_kernels.py)."""

import pytest
import run_kernels as rk
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(kernel, K, N, M, p) for kernel in rk.SPARSE_KERNELS for K, N in rk.grid(DEVICE, kernel)[0]
         for M in rk.grid(DEVICE, kernel)[1] for p in rk.providers(kernel, M, DEVICE)]


@pytest.mark.parametrize("kernel,K,N,M,provider", CASES, ids=lambda v: str(v))
def test_bench_sparse24(benchmark, kernel, K, N, M, provider):
    fn, nbytes = rk.make_call(kernel, N, K, M, provider, DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def call():
        fn()
        sync()

    benchmark.extra_info.update(kernel=kernel, shape=f"{K}x{N}", M=M, provider=provider, weight_bytes=nbytes)
    benchmark(call)
