"""One small interface for everything that runs a model on text, and the call that opens one.

An engine translates lists of sentences under a prompt and scores references (teacher-forced NLL), and says what it
holds (weight bytes, peak memory, device, dtype). ``almak.eval`` and the commands use engines only through this
interface, so a new engine (llama.cpp, say) is one class:

- :class:`LocalEngine` runs a model loaded in this process, with almak's generation loop (``"almak"``:
  :mod:`almak.modeling.engines.decoder`) or transformers' ``generate`` (``"hf"``);
- :class:`almak.modeling.engines.vllm.VllmEngine` runs a model folder in vLLM.

>>> engine = open_engine("smollm2-135m-mt", EngineConfig(name="almak", device="cpu"))   # doctest: +SKIP
>>> engine.translate(["Hallo Welt"], Prompt("alma", "de", "en"), GenerationConfig(num_beams=1)).hypotheses
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from almak.errors import AlmakError
from almak.modeling.architecture import SUPPORTED
from almak.modeling.devices import check_device, inference_dtype, peak_memory
from almak.modeling.engines.generate import ENGINES, GenerationConfig, TranslationResult, translate
from almak.modeling.engines.scoring import NLL, reference_nll
from almak.modeling.load import DEFAULT_MODEL, LoadedModel, load_model, weight_bytes
from almak.modeling.nn.surgery import QuantConfig
from almak.modeling.text.prompts import Prompt, guess_family


class Engine(Protocol):
    """What runs a model: translation, reference scoring, and what it holds."""

    name: str  # one of ENGINES
    ref: str  # the model reference it runs, resolved (a folder, an alias)
    tokenizer: object
    device: str
    dtype: str  # "float32", "bfloat16", ...

    def prepare(self, jobs: list[tuple[list[str], list[str] | None, Prompt]], config: GenerationConfig) -> None:
        """Get ready for these (sources, references or None, prompt) jobs (vLLM sizes its engine once)."""

    def translate(self, sources: list[str], prompt: Prompt, config: GenerationConfig,
                  progress: Callable[[int], None] | None = None) -> TranslationResult: ...

    def reference_nll(self, sources: list[str], refs: list[str], prompt: Prompt, batch_size: int = 8,
                      progress: Callable[[int], None] | None = None) -> NLL: ...

    def weight_bytes(self) -> int | None: ...

    def peak_memory(self) -> tuple[int, str]:
        """(bytes, what was measured: "cuda_max_allocated" or "cpu_max_rss")."""


class LocalEngine:
    """A model loaded in this process, run by almak's generation loop (``name="almak"``) or transformers'
    ``generate`` (``"hf"``)."""

    def __init__(self, lm: LoadedModel, name: str = "almak"):
        if name not in ("almak", "hf"):
            raise AlmakError(f"a model loaded in this process runs on almak or hf, not {name!r}")
        self.lm, self.name = lm, name
        self.model, self.tokenizer, self.ref = lm.model, lm.tokenizer, lm.ref
        first = next(self.model.parameters())
        self._device = first.device
        self.device = str(first.device)
        self.dtype = str(first.dtype).replace("torch.", "")

    def prepare(self, jobs, config: GenerationConfig) -> None:
        """Nothing to start; on CUDA the peak memory counts from here (each direction of an eval its own)."""
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def translate(self, sources, prompt, config, progress=None) -> TranslationResult:
        return translate(self.model, self.tokenizer, sources, prompt, dataclasses.replace(config, engine=self.name),
                         progress)

    def reference_nll(self, sources, refs, prompt, batch_size=8, progress=None) -> NLL:
        return reference_nll(self.model, self.tokenizer, sources, refs, prompt, batch_size=batch_size,
                             progress=progress)

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    def peak_memory(self) -> tuple[int, str]:
        return peak_memory(self._device)


@dataclass
class EngineConfig:
    """Which engine runs a model, where, and how it is loaded (the options every command that runs one shares).

    ``device``/``dtype`` "auto": cuda where torch sees a GPU; bfloat16 on a CPU that computes it natively, float32
    on other CPUs, float16 on GPUs (vLLM: bfloat16). ``quant`` quantizes the loaded model round-to-nearest (almak
    and hf only); ``prompt`` is the prompt family, guessed from the model's name when None.
    """

    name: str = "almak"
    device: str = "auto"
    dtype: str = "auto"
    quant: QuantConfig | None = None
    prompt: str | None = None
    tensor_parallel_size: int = 1  # vLLM only: GPUs to split the model over
    cuda_graphs: bool = True  # almak on CUDA: decode steps replayed as CUDA graphs; vLLM: its own graphs

    def __post_init__(self):
        if self.name not in ENGINES:
            raise AlmakError(f"unknown engine {self.name!r}; choose {' or '.join(ENGINES)}")
        if self.tensor_parallel_size < 1:
            raise AlmakError(f"tensor parallel size must be at least 1, got {self.tensor_parallel_size}")
        if self.name != "vllm" and self.tensor_parallel_size != 1:
            raise AlmakError("--tensor-parallel-size goes with --engine vllm")
        if self.name == "vllm" and self.quant:
            raise AlmakError("--quant quantizes almak's in-memory model, which vLLM does not run: write a checkpoint "
                             "with almak quantize and pass its folder")


@dataclass
class OpenedEngine:
    engine: Engine
    prompt: str  # the prompt family settled (given, or guessed from the model)
    dtype_choice: str  # why the engine computes in its dtype ("auto: this CPU has avx512_bf16", "asked for")
    quantized: dict | None = None  # what --quant did: {"quantized": [...], "skipped": {...}}


def open_engine(model: str | None, config: EngineConfig = EngineConfig()) -> OpenedEngine:
    """Load ``model`` (any model reference; the embedded model when None) into the engine ``config`` names.

    A local folder whose model_type almak's loop does not run is refused before loading (use ``name="hf"``)."""
    ref = model or DEFAULT_MODEL
    if config.name == "vllm":
        from almak.modeling.engines.vllm import VllmEngine

        engine = VllmEngine(ref, config.dtype, config.tensor_parallel_size, config.cuda_graphs)
        if config.device != "auto" and check_device(config.device).type != engine.device:
            raise AlmakError(f"this vLLM build runs on {engine.device}, not {config.device}: drop --device (vLLM's "
                             "build decides where it runs)")
        choice = "auto: bfloat16 with --engine vllm" if config.dtype == "auto" else "asked for"
        return OpenedEngine(engine, config.prompt or guess_family(ref, engine.tokenizer), choice)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, choice = inference_dtype(config.dtype, check_device(device).type)
    lm = load_model(ref, device=device, dtype=dtype, quant=config.quant,
                    model_types=SUPPORTED if config.name == "almak" else None)
    return OpenedEngine(LocalEngine(lm, config.name), config.prompt or guess_family(lm.ref, lm.tokenizer), choice,
                        lm.quantized if config.quant else None)
