"""``almak eval`` and ``almak score`` as library calls: translate a test set (or several, one direction each), score
it, build a report."""
from __future__ import annotations

import datetime
import json
import logging
import resource
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import almak
from almak.errors import AlmakError
from almak.eval import metrics as M
from almak.eval.compare import mean_report
from almak.files import write_dir_atomic
from almak.modeling.engines.generate import GenerationConfig, translate
from almak.modeling.load import weight_bytes
from almak.modeling.text.data import TestSet
from almak.modeling.text.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    metrics: tuple[str, ...] = ("bleu", "chrf")
    comet_model: str = M.DEFAULT_COMET
    bleu_tokenize: str = "auto"  # sacrebleu's tokenizer for BLEU; auto: by target language (metrics.bleu_tokenizer)


@dataclass
class EvalConfig:
    metrics: tuple[str, ...] = ("bleu", "chrf", "nll")
    comet_model: str = M.DEFAULT_COMET
    bleu_tokenize: str = "auto"
    prompt: str = "alma"
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        M.parse_metrics(",".join(self.metrics))


def score(sources: list[str], hyps: list[str], refs: list[str], src: str, tgt: str,
          config: ScoreConfig | None = None) -> dict:
    """Score existing translations. COMET that cannot be had is reported as ``comet_error``."""
    config = config or ScoreConfig()
    if not (len(sources) == len(hyps) == len(refs)):
        raise AlmakError(
            f"line counts differ: {len(sources)} sources, {len(hyps)} hypotheses, {len(refs)} references"
        )
    report: dict = {"lang_pair": f"{src}-{tgt}", "n": len(hyps)}
    if "bleu" in config.metrics:
        report["bleu"], report["bleu_signature"] = M.bleu(hyps, refs, tgt, config.bleu_tokenize)
    if "spbleu" in config.metrics:
        report["spbleu"], report["spbleu_signature"] = M.spbleu(hyps, refs, tgt)
    if "chrf" in config.metrics:
        report["chrf"], report["chrf_signature"] = M.chrf(hyps, refs)
    if "comet" in config.metrics:
        report["comet_model"] = config.comet_model
        try:
            report["comet"] = M.comet(sources, hyps, refs, config.comet_model)
        except AlmakError as e:
            log.warning("COMET skipped: %s", e)
            report["comet"], report["comet_error"] = None, str(e)
    return report


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def evaluate(model, tokenizer, testset: TestSet, config: EvalConfig,
             progress: Callable[[str, int], Callable[[int], None]] | None = None) -> tuple[dict, list[str]]:
    """Translate and score ``testset``; returns the report and the hypotheses.

    ``progress(stage, total)`` may return a callback that is fed the count of finished sentences. With
    ``config.generation.engine == "vllm"``, ``model`` is a :class:`~almak.modeling.engines.vllm.VllmEngine` (and
    ``tokenizer`` is unused: the engine has its own).
    """
    vllm = config.generation.engine == "vllm"
    device = torch.device(model.device) if vllm else next(model.parameters()).device
    if device.type == "cuda" and not vllm:
        torch.cuda.reset_peak_memory_stats(device)
    prompt = Prompt(config.prompt, testset.src, testset.tgt)
    if vllm:  # started once, with room for both the translations and the references
        refs = testset.references if "nll" in config.metrics else None
        model.prepare([(testset.sources, refs, prompt)], config.generation)
    tick = (lambda stage: progress(stage, len(testset.sources))) if progress else (lambda stage: None)
    report: dict = {
        "testset": testset.name,
        "lang_pair": testset.lang_pair,
        "n": len(testset.sources),
        "prompt": config.prompt,
        "num_beams": config.generation.num_beams,
        "max_new_tokens": config.generation.max_new_tokens,
        "engine": config.generation.engine,
        "cuda_graphs": config.generation.cuda_graphs and device.type == "cuda",
    }
    hyps: list[str] = []
    if set(config.metrics) - {"nll"}:
        result = translate(model, tokenizer, testset.sources, prompt, config.generation, tick("translate"))
        hyps = result.hypotheses
        report.update(score(testset.sources, hyps, testset.references, testset.src, testset.tgt,
                            ScoreConfig(tuple(m for m in config.metrics if m != "nll"), config.comet_model,
                                        config.bleu_tokenize)))
        report["sentences_per_s"] = len(hyps) / result.seconds if result.seconds else None
        report["generated_tokens_per_s"] = result.generated_tokens / result.seconds if result.seconds else None
        report["translate_seconds"] = result.seconds
    if "nll" in config.metrics:
        if vllm:
            nll = model.reference_nll(testset.sources, testset.references, prompt,
                                      batch_size=config.generation.batch_size, progress=tick("nll"))
        else:
            nll = M.reference_nll(model, tokenizer, testset.sources, testset.references, prompt,
                                  batch_size=config.generation.batch_size, progress=tick("nll"))
        report.update(nll=nll.mean, ppl=nll.ppl, nll_tokens=nll.tokens)
    report["peak_memory_bytes"], report["peak_memory_kind"] = model.peak_memory() if vllm else _peak_memory(device)
    report["weight_bytes"] = model.weight_bytes() if vllm else weight_bytes(model)
    dtype = model.dtype if vllm else str(next(model.parameters()).dtype).replace("torch.", "")
    report.update(device=str(device), dtype=dtype,
                  almak_version=almak.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return report, hyps


# What every direction of one run shares, lifted to the top of a multi-direction report.
RUN_FIELDS = ("prompt", "num_beams", "max_new_tokens", "engine", "cuda_graphs", "device", "dtype", "weight_bytes",
              "almak_version")


def evaluate_testsets(model, tokenizer, testsets: list[TestSet], config: EvalConfig,
                      progress: Callable[[str, int], Callable[[int], None]] | None = None
                      ) -> tuple[dict, dict[str, list[str]]]:
    """:func:`evaluate` on each of ``testsets`` (one direction each) with the one loaded model; returns the report
    ``{"directions": {pair: evaluate's report}, "mean": mean_report(...), ...}`` (the fields every direction
    shares, and the largest peak memory, at the top) and the hypotheses of each direction. Progress stages are
    named for their direction (``de-en translate``).

    >>> report, hyps = evaluate_testsets(lm.model, lm.tokenizer, load_testsets("wmt22:all"),  # doctest: +SKIP
    ...                                  EvalConfig(metrics=("nll",)))
    >>> report["mean"]["ppl"], report["directions"]["de-en"]["ppl"]                             # doctest: +SKIP
    """
    if config.generation.engine == "vllm":  # started once, with room for every direction
        refs = (lambda ts: ts.references) if "nll" in config.metrics else (lambda ts: None)
        model.prepare([(ts.sources, refs(ts), Prompt(config.prompt, ts.src, ts.tgt)) for ts in testsets],
                      config.generation)
    directions, hyps = {}, {}
    for ts in testsets:
        step = None
        if progress:
            def step(stage, total, pair=ts.lang_pair):
                return progress(f"{pair} {stage}", total)
        directions[ts.lang_pair], hyps[ts.lang_pair] = evaluate(model, tokenizer, ts, config, step)
    reports = list(directions.values())
    peak = max(reports, key=lambda r: r["peak_memory_bytes"])
    report = {key: reports[0][key] for key in RUN_FIELDS}
    report.update(peak_memory_bytes=peak["peak_memory_bytes"], peak_memory_kind=peak["peak_memory_kind"],
                  date=reports[-1]["date"], directions=directions, mean=mean_report(directions))
    return report, hyps


def check_new_output(path: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse, before any work is done, an output that cannot or must not be written: one that exists (unless
    ``overwrite``), in a folder that does not exist or cannot be written, or one whose replacing would delete one of
    ``inputs`` (the same path, or a folder holding it)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise AlmakError(f"{str(path)!r} exists; pass --overwrite to replace it")
    check_writable_place(path, inputs)


def check_writable_place(path: Path, inputs: tuple = ()) -> None:
    """The parts of :func:`check_new_output` that hold with or without ``--overwrite`` (and for a resumed run)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AlmakError(f"the folder of {str(path)!r} does not exist")
    target = path.resolve()
    for item in inputs:
        if not item or not Path(item).expanduser().exists():
            continue  # an alias or a hub id: nothing local to protect
        source = Path(item).expanduser().resolve()
        if source == target or target in source.parents:
            raise AlmakError(f"{str(path)!r} is {'' if source == target else 'a folder holding '}the input "
                             f"{str(item)!r}; writing there would replace it: choose another output path")
    try:  # the writes happen at the end: find out now whether they can
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise AlmakError(f"cannot write in {str(path.parent)!r} ({e.strerror or e})") from None


def write_eval_dir(out: Path, report: dict, hyps: list[str] | dict[str, list[str]], overwrite: bool) -> None:
    """``out/hyps.txt`` (``out/hyps.de-en.txt`` ... for hypotheses given by direction) and ``out/report.json``,
    written into a temporary folder renamed at the end."""
    check_new_output(out, overwrite)
    files = {f"hyps.{pair}.txt": h for pair, h in hyps.items()} if isinstance(hyps, dict) else {"hyps.txt": hyps}

    def fill(tmp: Path) -> None:
        for name, lines in files.items():
            if lines:
                (tmp / name).write_text("".join(h + "\n" for h in lines), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_dir_atomic(out, fill)
