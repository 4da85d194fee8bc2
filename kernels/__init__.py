"""almak.kernels: Triton weight-only matmuls, each with its pure-torch reference.

Public API (stable: other projects import it; layouts are compressed-tensors' ``pack-quantized``):

- ``w4a16_matmul(x, qweight, scales, zeros, group_size) -> y``: ``x`` (..., K) fp16/bf16/fp32;
  ``qweight`` (N, K // 8) int32, nibble j of ``qweight[n, i]`` is the unsigned code of ``W[n, 8i + j]``;
  ``scales``, ``zeros`` (N, ceil(K / group_size)), ``W = (q - zeros) * scales`` per group of K;
  ``group_size`` in {32, 64, 128, 256} or -1 (per output channel); ``y`` (..., N) in x's dtype.
- ``w8a16_matmul(x, qweight, scales, zeros=None, group_size=-1) -> y``: ``qweight`` (N, K) int8,
  symmetric (``W = q * scales``) when ``zeros`` is None.
- ``w4a16_reference``, ``w8a16_reference``: the same results by dequantize + ``F.linear`` in float32.
- ``dequantize_w4``, ``dequantize_w8``: materialize W (N, K).

Both matmuls pick a split-K decode kernel for M <= 16 rows, a tiled prefill kernel above, and dequantize +
``F.linear`` from ``DENSE_MIN_M`` rows and for CPU tensors (unless ``TRITON_INTERPRET=1``, which runs the
Triton kernels on the CPU for tests). ``path=`` forces one of "decode", "prefill", "dense".

Example:
    >>> from almak.kernels import w4a16_matmul
    >>> y = w4a16_matmul(x, qweight, scales, zeros, group_size=128)
"""

from .w4a16 import DECODE_MAX_M, DENSE_MIN_M, dequantize_w4, w4a16_matmul, w4a16_reference
from .w8a16 import dequantize_w8, w8a16_matmul, w8a16_reference

__all__ = [
    "DECODE_MAX_M",
    "DENSE_MIN_M",
    "w4a16_matmul",
    "w4a16_reference",
    "dequantize_w4",
    "w8a16_matmul",
    "w8a16_reference",
    "dequantize_w8",
]
