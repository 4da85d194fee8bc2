"""almak: compression toolkit and Triton kernels for translation LLMs.

Subpackages: ``almak.kernels`` (Triton weight-only and sparse matmuls), ``almak.quant``
(packing, RTN, GPTQ), ``almak.sparse`` (pruners), ``almak.modeling`` (loading, surgery,
checkpoints), ``almak.eval`` (data, prompts, generation, metrics) and ``almak.cli``.
Importing ``almak`` imports nothing heavy.
"""

__version__ = "0.1.0"
