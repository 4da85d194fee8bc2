"""Triton, or a stand-in where it is not installed (macOS, or any machine without it).

The CPU paths of almak's kernels (dequantize + ``F.linear``) need no Triton, so the kernel modules import
``triton`` and ``tl`` from here: the real packages when installed; otherwise a stand-in under which the
``@triton.jit`` functions are defined but never compiled, and launching one raises :class:`TritonMissing`.
(The kernels' annotations are strings, ``from __future__ import annotations``, so ``tl.constexpr`` is never
evaluated.)
"""

from __future__ import annotations

__all__ = ["HAVE_TRITON", "TritonMissing", "triton", "tl"]

MESSAGE = ("almak's GPU kernels need Triton, which is not installed here: pip install triton (Linux with an "
           "NVIDIA GPU); on the CPU almak needs none")


class TritonMissing(RuntimeError):
    """A Triton kernel was asked for where Triton is not installed."""

    def __init__(self, what: str = ""):
        super().__init__(f"{what}: {MESSAGE}" if what else MESSAGE)


try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    import types

    HAVE_TRITON = False

    class _Kernel:
        """What ``@triton.jit`` gives without Triton: a function that refuses to launch."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise TritonMissing(self.__name__)

        def __call__(self, *args, **kwargs):
            raise TritonMissing(self.__name__)

    class _Config:
        def __init__(self, kwargs, num_warps=4, num_stages=3, maxnreg=None, **_):
            self.kwargs, self.num_warps, self.num_stages, self.maxnreg = dict(kwargs), num_warps, num_stages, maxnreg

    def _jit(fn=None, **_):
        return _Kernel(fn) if fn is not None else _Kernel

    def _next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    triton = types.SimpleNamespace(
        jit=_jit, autotune=lambda *a, **k: (lambda fn: fn), heuristics=lambda *a, **k: (lambda fn: fn),
        Config=_Config, cdiv=lambda a, b: -(-a // b), next_power_of_2=_next_power_of_2)
    tl = types.SimpleNamespace(constexpr=object)
