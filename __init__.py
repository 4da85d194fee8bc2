"""almak: compression toolkit and Triton kernels for translation LLMs.

The Python API: one call per ``almak`` command, each taking the dataclass config the command builds from its
options and returning a result object, raising :class:`AlmakError` for bad input (README, "Python API")::

    import almak
    r = almak.quantize("smollm2-135m", almak.QuantizeRecipe(method="rtn", bits=8, group_size=-1), "smollm-w8")
    almak.evaluate("smollm-w8", "wmt22:de-en", almak.EvalConfig(metrics=("nll",)), limit=20).report["ppl"]

Importing ``almak`` imports nothing heavy: each name is imported from its package on first use. The packages:
``almak.kernels`` (Triton kernels, standalone), ``almak.quant`` and ``almak.sparse`` (algorithms),
``almak.modeling`` (the model: text, layers, formats, loading, engines, pipelines), ``almak.eval`` (metrics,
evaluation, benchmarks) and ``almak.cli``.
"""

from almak.version import __version__

# name -> the module that defines it
_API = {
    "quantize": "almak.modeling.pipelines.quantize",
    "QuantizeRecipe": "almak.modeling.pipelines.quantize",
    "QuantizeResult": "almak.modeling.pipelines.quantize",
    "prune": "almak.modeling.pipelines.prune",
    "PruneRecipe": "almak.modeling.pipelines.prune",
    "PruneResult": "almak.modeling.pipelines.prune",
    "StructuredRecipe": "almak.modeling.pipelines.structured",
    "StructuredResult": "almak.modeling.pipelines.structured",
    "finetune": "almak.modeling.pipelines.finetune",
    "FinetuneConfig": "almak.modeling.pipelines.finetune",
    "FinetuneResult": "almak.modeling.pipelines.finetune",
    "distill": "almak.modeling.pipelines.distill",
    "DistillConfig": "almak.modeling.pipelines.distill",
    "DistillResult": "almak.modeling.pipelines.distill",
    "translate": "almak.modeling.engines.translate",
    "TranslateResult": "almak.modeling.engines.translate",
    "GenerationConfig": "almak.modeling.engines.generate",
    "EngineConfig": "almak.modeling.engines.engine",
    "open_engine": "almak.modeling.engines.engine",
    "QuantConfig": "almak.modeling.nn.surgery",
    "load_model": "almak.modeling.load",
    "evaluate": "almak.eval.evaluate",
    "EvalConfig": "almak.eval.evaluate",
    "EvalResult": "almak.eval.evaluate",
    "score": "almak.eval.evaluate",
    "ScoreConfig": "almak.eval.evaluate",
    "bench": "almak.eval.bench",
    "BenchConfig": "almak.eval.bench",
    "BenchResult": "almak.eval.bench",
    "AlmakError": "almak.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'almak' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once
    return value


def __dir__():
    return sorted(__all__)
