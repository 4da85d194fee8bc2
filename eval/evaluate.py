"""``almak eval`` and ``almak score`` as library calls: translate a test set (or several, one direction each), score
it, build a report."""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from almak.errors import AlmakError
from almak.eval import metrics as M
from almak.eval.compare import check_baseline, compare, mean_report, read_report, report_path
from almak.files import check_new_output, write_dir_atomic
from almak.modeling.engines.engine import Engine, EngineConfig, open_engine
from almak.modeling.engines.generate import GenerationConfig
from almak.modeling.text.data import TestSet, load_testsets
from almak.modeling.text.prompts import Prompt
from almak.version import __version__

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
    """``almak score``: score existing translations (one per source line) from ``src`` to ``tgt`` against
    references, as sacrebleu and comet-score do. COMET that cannot be had is reported as ``comet_error``.

    >>> score(["Das Haus."], ["The house."], ["The house."], "de", "en")["chrf"]   # doctest: +SKIP
    """
    config = config or ScoreConfig()
    if "nll" in config.metrics:
        raise AlmakError("nll needs a model; use almak eval for it")
    M.check_metrics(list(config.metrics), tgt, config.bleu_tokenize)
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


def evaluate_testset(engine: Engine, testset: TestSet, config: EvalConfig,
                     progress: Callable[[str, int], Callable[[int], None]] | None = None) -> tuple[dict, list[str]]:
    """Translate and score ``testset`` with ``engine``; returns the report and the hypotheses.

    ``progress(stage, total)`` may return a callback that is fed the count of finished sentences.
    """
    prompt = Prompt(config.prompt, testset.src, testset.tgt)
    refs = testset.references if "nll" in config.metrics else None
    engine.prepare([(testset.sources, refs, prompt)], config.generation)  # vLLM: room for both jobs at once
    tick = (lambda stage: progress(stage, len(testset.sources))) if progress else (lambda stage: None)
    report: dict = {
        "testset": testset.name,
        "lang_pair": testset.lang_pair,
        "n": len(testset.sources),
        "prompt": config.prompt,
        "num_beams": config.generation.num_beams,
        "max_new_tokens": config.generation.max_new_tokens,
        "engine": engine.name,
        "cuda_graphs": config.generation.cuda_graphs and engine.device.startswith("cuda"),
    }
    hyps: list[str] = []
    if set(config.metrics) - {"nll"}:
        result = engine.translate(testset.sources, prompt, config.generation, tick("translate"))
        hyps = result.hypotheses
        report.update(score(testset.sources, hyps, testset.references, testset.src, testset.tgt,
                            ScoreConfig(tuple(m for m in config.metrics if m != "nll"), config.comet_model,
                                        config.bleu_tokenize)))
        report["sentences_per_s"] = len(hyps) / result.seconds if result.seconds else None
        report["generated_tokens_per_s"] = result.generated_tokens / result.seconds if result.seconds else None
        report["translate_seconds"] = result.seconds
    if "nll" in config.metrics:
        nll = engine.reference_nll(testset.sources, testset.references, prompt,
                                   batch_size=config.generation.batch_size, progress=tick("nll"))
        report.update(nll=nll.mean, ppl=nll.ppl, nll_tokens=nll.tokens)
    report["peak_memory_bytes"], report["peak_memory_kind"] = engine.peak_memory()
    report["weight_bytes"] = engine.weight_bytes()
    report.update(device=engine.device, dtype=engine.dtype, almak_version=__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return report, hyps


# What every direction of one run shares, lifted to the top of a multi-direction report.
RUN_FIELDS = ("prompt", "num_beams", "max_new_tokens", "engine", "cuda_graphs", "device", "dtype", "weight_bytes",
              "almak_version")


def evaluate_testsets(engine: Engine, testsets: list[TestSet], config: EvalConfig,
                      progress: Callable[[str, int], Callable[[int], None]] | None = None
                      ) -> tuple[dict, dict[str, list[str]]]:
    """:func:`evaluate_testset` on each of ``testsets`` (one direction each) with the one engine; returns the report
    ``{"directions": {pair: evaluate_testset's report}, "mean": mean_report(...), ...}`` (the fields every direction
    shares, and the largest peak memory, at the top) and the hypotheses of each direction. Progress stages are
    named for their direction (``de-en translate``).

    >>> report, hyps = evaluate_testsets(engine, load_testsets("wmt22:all"), EvalConfig(metrics=("nll",)))  # doctest: +SKIP
    >>> report["mean"]["ppl"], report["directions"]["de-en"]["ppl"]                                        # doctest: +SKIP
    """
    refs = (lambda ts: ts.references) if "nll" in config.metrics else (lambda ts: None)
    engine.prepare([(ts.sources, refs(ts), Prompt(config.prompt, ts.src, ts.tgt)) for ts in testsets],
                   config.generation)  # vLLM: started once, with room for every direction
    directions, hyps = {}, {}
    for ts in testsets:
        step = None
        if progress:
            def step(stage, total, pair=ts.lang_pair):
                return progress(f"{pair} {stage}", total)
        directions[ts.lang_pair], hyps[ts.lang_pair] = evaluate_testset(engine, ts, config, step)
    reports = list(directions.values())
    peak = max(reports, key=lambda r: r["peak_memory_bytes"])
    report = {key: reports[0][key] for key in RUN_FIELDS}
    report.update(peak_memory_bytes=peak["peak_memory_bytes"], peak_memory_kind=peak["peak_memory_kind"],
                  date=reports[-1]["date"], directions=directions, mean=mean_report(directions))
    return report, hyps


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


@dataclass
class EvalResult:
    """What :func:`evaluate` returns: the report (as ``--format json`` prints it), the hypotheses (a list, or one per
    direction), the test sets, and where the baseline report and the output folder are, where there are."""

    report: dict
    hypotheses: list[str] | dict[str, list[str]]
    testsets: list[TestSet]
    baseline_file: Path | None = None
    out: Path | None = None


def evaluate(model: str | None = None, testset: str = "wmt22:de-en", config: EvalConfig | None = None,
             engine: EngineConfig | None = None, *, lang_pair: str | None = None, flores_dir: str | None = None,
             limit: int | None = None, baseline: str | None = None, out: str | Path | None = None,
             overwrite: bool = False, progress: Callable[[str, int], Callable[[int], None]] | None = None
             ) -> EvalResult:
    """``almak eval``: translate ``testset`` (any spec ``--testset`` takes, a comma-separated list for several
    directions) with ``model`` and score it; against ``baseline`` (an earlier ``out`` folder or report, or a model
    evaluated after ``model`` with the same settings) when given; ``out`` gets the report and the hypotheses.

    Everything that can be refused is refused before a model loads. ``config.prompt`` is replaced by the engine's
    prompt family (``engine.prompt``, or guessed from the model).

    >>> r = evaluate("smollm2-135m-mt", "wmt22:de-en", EvalConfig(metrics=("nll",)), limit=20)   # doctest: +SKIP
    >>> r.report["ppl"]
    """
    config = config or EvalConfig()
    engine = engine or EngineConfig(name=config.generation.engine)
    if engine.name != config.generation.engine:
        config = dataclasses.replace(config, generation=dataclasses.replace(config.generation, engine=engine.name))
    testsets = [ts.head(limit) for ts in load_testsets(testset, lang_pair, flores_dir)]
    for ts in testsets:  # a missing tokenizer fails now, not after translating
        M.check_metrics(list(config.metrics), ts.tgt, config.bleu_tokenize)
    base_file = report_path(baseline) if baseline else None
    base_report = None
    if base_file:  # a report that does not match fails now, not after evaluating
        base_report = read_report(base_file)
        check_baseline(base_report, {ts.lang_pair: len(ts.sources) for ts in testsets}, list(config.metrics),
                       repr(baseline))
    elif baseline and engine.name == "vllm":
        raise AlmakError("--baseline with a model runs two models in one process, which --engine vllm does not: "
                         "evaluate the baseline on its own with --out DIR and pass --baseline DIR")
    out = Path(out) if out else None
    if out:
        check_new_output(out, overwrite, inputs=(model, *testset.split(","), flores_dir, baseline))

    def run(ref, engine_config, label=""):
        """Open ``ref`` and evaluate it on every test set; the model is freed on return."""
        nonlocal config
        opened = open_engine(ref, engine_config)
        config = dataclasses.replace(config, prompt=opened.prompt)
        labelled = (lambda stage, total: progress(label + stage, total)) if progress else None
        if len(testsets) > 1:
            report, hyps = evaluate_testsets(opened.engine, testsets, config, labelled)
        else:
            report, hyps = evaluate_testset(opened.engine, testsets[0], config, labelled)
        run_fields = {"model": opened.engine.ref, "dtype_choice": opened.dtype_choice}
        if engine_config.name == "vllm":
            run_fields["tensor_parallel_size"] = engine_config.tensor_parallel_size
        if engine_config.quant:
            run_fields["quant"] = {**dataclasses.asdict(engine_config.quant), "method": "rtn-on-load"}
        # a single direction's report keeps its fields first, as before there were several
        return ({**run_fields, **report} if len(testsets) > 1 else {**report, **run_fields}), hyps

    report, hyps = run(model, engine)
    if baseline and base_report is None:
        base_report, _ = run(baseline, dataclasses.replace(engine, quant=None, prompt=config.prompt), "baseline ")
    if base_report is not None:
        report = compare(report, base_report)
    if out:
        write_eval_dir(out, report, hyps, overwrite)
    return EvalResult(report, hyps, testsets, base_file, out)
