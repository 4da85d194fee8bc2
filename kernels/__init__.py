"""almak.kernels: Triton weight-only matmuls, each with its pure-torch reference.

Public API (stable: other projects import it; the quantized layouts are compressed-tensors' ``pack-quantized``,
the 2:4 layout is almak's own and converts to and from compressed-tensors' ``sparse-24-bitmask``):

- ``w4a16_matmul(x, qweight, scales, zeros, group_size) -> y``: ``x`` (..., K) fp16/bf16/fp32;
  ``qweight`` (N, K // 8) int32, nibble j of ``qweight[n, i]`` is the unsigned code of ``W[n, 8i + j]``;
  ``scales``, ``zeros`` (N, ceil(K / group_size)), ``W = (q - zeros) * scales`` per group of K;
  ``group_size`` in {32, 64, 128, 256} or -1 (per output channel); ``y`` (..., N) in x's dtype.
- ``w8a16_matmul(x, qweight, scales, zeros=None, group_size=-1) -> y``: ``qweight`` (N, K) int8,
  symmetric (``W = q * scales``) when ``zeros`` is None.
- ``w4a16_reference``, ``w8a16_reference``: the same results by dequantize + ``F.linear`` in float32.
- ``dequantize_w4``, ``dequantize_w8``: materialize W (N, K).
- ``pack_int4(codes)`` / ``unpack_int4(qweight)``: (N, K) codes in [0, 15] <-> the (N, K // 8) int32 layout.
- ``sparse24_matmul(x, values, meta) -> y`` for 2:4-sparse W (every 4 consecutive weights along K hold at
  most 2 non-zeros; K a multiple of 32): ``values`` (N, K // 2) fp16/bf16/fp32, the two kept weights of each
  group of four in order of position; ``meta`` (N, K // 32) int32, nibble j of ``meta[n, i]`` describes group
  ``8i + j`` with bits 0-1 = first kept position, bits 2-3 = second (first < second).
- ``sparse24_w4a16_matmul(x, qvalues, meta, scales, zeros, group_size) -> y``: the kept values as int4,
  ``qvalues`` (N, K // 16) int32, nibble j of ``qvalues[n, i]`` = code of ``values[n, 8i + j]``; scales and
  zeros as for ``w4a16_matmul``, indexed by the group of the value's original column.
- ``sparse24_reference``, ``sparse24_w4a16_reference``, ``dequantize_sparse24_w4``; ``compress_24`` /
  ``decompress_24`` (dense W <-> values, meta); ``to_bitmask_24`` / ``from_bitmask_24`` (<-> compressed-tensors'
  ``sparse-24-bitmask`` ``compressed``, ``bitmask``).

All four matmuls pick a split-K decode kernel for M <= 16 rows, a tiled prefill kernel above, and dequantize
(or decompress) + ``F.linear`` from ``DENSE_MIN_M`` rows and for CPU tensors (unless ``TRITON_INTERPRET=1``,
which runs the Triton kernels on the CPU for tests). ``path=`` forces one of "decode", "prefill", "dense".
Dispatch, checks and autotuning configs live in :mod:`almak.kernels.common`; what each config compiles to on
each GPU generation is in benchmarks/results/static-report.json (``python benchmarks/kernel_report.py``).

Triton is needed only for the Triton paths: where it is not installed (``HAVE_TRITON`` False) CPU tensors
still take the dense path, and a CUDA tensor or a forced decode/prefill path raises ``TritonMissing``.

Example:
    >>> from almak.kernels import w4a16_matmul
    >>> y = w4a16_matmul(x, qweight, scales, zeros, group_size=128)
    >>> from almak.kernels import compress_24, sparse24_matmul
    >>> y = sparse24_matmul(x, *compress_24(W_24))   # W_24 (N, K) 2:4 sparse
"""

from .common import HAVE_TRITON, TritonMissing
from .sparse24 import (
    compress_24,
    decompress_24,
    dequantize_sparse24_w4,
    from_bitmask_24,
    sparse24_matmul,
    sparse24_reference,
    sparse24_w4a16_matmul,
    sparse24_w4a16_reference,
    to_bitmask_24,
)
from .w4a16 import DECODE_MAX_M, DENSE_MIN_M, dequantize_w4, pack_int4, unpack_int4, w4a16_matmul, w4a16_reference
from .w8a16 import dequantize_w8, w8a16_matmul, w8a16_reference

__all__ = [
    "HAVE_TRITON",
    "TritonMissing",
    "DECODE_MAX_M",
    "DENSE_MIN_M",
    "w4a16_matmul",
    "w4a16_reference",
    "dequantize_w4",
    "pack_int4",
    "unpack_int4",
    "w8a16_matmul",
    "w8a16_reference",
    "dequantize_w8",
    "sparse24_matmul",
    "sparse24_reference",
    "sparse24_w4a16_matmul",
    "sparse24_w4a16_reference",
    "dequantize_sparse24_w4",
    "compress_24",
    "decompress_24",
    "to_bitmask_24",
    "from_bitmask_24",
]
