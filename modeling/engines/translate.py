"""``almak translate`` as a library call: lines of text in, one translation per line out.

>>> r = translate("smollm2-135m-mt", ["Die Ware hat unter 20 Euro gekostet."], "de", "en",  # doctest: +SKIP
...               GenerationConfig(num_beams=1))
>>> r.hypotheses
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from almak.modeling.engines.engine import EngineConfig, open_engine
from almak.modeling.engines.generate import GenerationConfig
from almak.modeling.text.languages import language_name
from almak.modeling.text.prompts import Prompt


@dataclass
class TranslateResult:
    hypotheses: list[str]  # one per input line; empty lines stay empty
    model: str  # the model reference, resolved
    prompt: str  # the prompt family used
    engine: str
    dtype: str
    dtype_choice: str  # why that dtype ("auto: this CPU has avx512_bf16", "asked for")
    seconds: float  # translating only, the load not counted
    generated_tokens: int
    quantized: dict | None = None  # what engine.quant did, where it was given


def translate(model: str | None, lines: list[str], src: str, tgt: str, generation: GenerationConfig | None = None,
              engine: EngineConfig | None = None,
              progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
              on_loaded: Callable[[TranslateResult], None] | None = None) -> TranslateResult:
    """Translate ``lines`` from ``src`` to ``tgt`` (language codes as ``--src``/``--tgt`` take them) with ``model``
    (any model reference; the embedded model when None).

    Once the model is loaded, ``on_loaded`` gets the result's fields known then (hypotheses still empty) and
    ``progress("translate", len(lines))`` may return a callback that is fed the count of finished lines."""
    language_name(src), language_name(tgt)  # refuse unknown codes before anything is loaded
    generation = generation or GenerationConfig()
    engine = engine or EngineConfig(name=generation.engine)
    opened = open_engine(model, engine)
    e = opened.engine
    result = TranslateResult([], e.ref, opened.prompt, e.name, e.dtype, opened.dtype_choice, 0.0, 0, opened.quantized)
    if on_loaded:
        on_loaded(result)
    tick = progress("translate", len(lines)) if progress else None
    done = e.translate(lines, Prompt(opened.prompt, src, tgt), generation, tick)
    result.hypotheses, result.seconds, result.generated_tokens = done.hypotheses, done.seconds, done.generated_tokens
    return result
