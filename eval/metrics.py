"""Translation metrics: sacrebleu BLEU, spBLEU and chrF, COMET (unbabel-comet), reference NLL under the prompt."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from almak.errors import AlmakError
from almak.modeling.text.languages import language_name, language_subtag

log = logging.getLogger(__name__)

METRICS = ("bleu", "spbleu", "chrf", "comet", "nll")
DEFAULT_COMET = "Unbabel/wmt22-comet-da"
# sacrebleu's tokenizers that --bleu-tokenize offers ("auto": bleu_tokenizer's choice for the target language).
BLEU_TOKENIZERS = ("auto", "13a", "intl", "char", "zh", "ja-mecab", "ko-mecab", "flores200", "none")
# What each tokenizer needs beyond sacrebleu, and how to install it.
_TOKENIZER_EXTRAS = {"ja-mecab": ("MeCab", "sacrebleu[ja]", "ja"), "ko-mecab": ("MeCab-ko", "sacrebleu[ko]", "ko"),
                     "flores200": ("sentencepiece", "sentencepiece", "spbleu")}
FLORES200_SPM_URL = "https://tinyurl.com/flores200sacrebleuspm"


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip().lower() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise AlmakError(f"unknown metric(s) {', '.join(unknown) or spec!r}; choose from {', '.join(METRICS)}")
    return names


def bleu_tokenizer(tgt: str, choice: str = "auto") -> str:
    """sacrebleu's tokenizer for a target language, by sacrebleu's and WMT's conventions: ``zh`` for Chinese,
    ``ja-mecab`` for Japanese, ``ko-mecab`` for Korean, ``13a`` otherwise; ``choice`` other than auto wins.

    >>> bleu_tokenizer("zho_Hant"), bleu_tokenizer("ja"), bleu_tokenizer("kor_Hang"), bleu_tokenizer("yo")
    ('zh', 'ja-mecab', 'ko-mecab', '13a')
    """
    if choice != "auto":
        if choice not in BLEU_TOKENIZERS:
            raise AlmakError(f"unknown BLEU tokenizer {choice!r}; choose from {', '.join(BLEU_TOKENIZERS)}")
        return choice
    return {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}.get(language_subtag(tgt), "13a")


def flores200_spm_path() -> Path:
    """Where sacrebleu reads FLORES-200's SentencePiece model from (``$SACREBLEU/models``, ~/.sacrebleu by
    default), the file it would otherwise download."""
    from sacrebleu.tokenizers import tokenizer_spm

    return Path(tokenizer_spm.SACREBLEU_DIR) / "models" / Path(tokenizer_spm.SPM_MODELS["flores200"]["url"]).name


def _bleu_metric(tokenize: str, tgt: str):
    """A sacrebleu BLEU with ``tokenize``, or an AlmakError saying how to get what the tokenizer needs."""
    from sacrebleu.metrics import BLEU

    if tokenize == "flores200" and importlib.util.find_spec("sentencepiece") is None:
        raise AlmakError("spBLEU needs sentencepiece: pip install sentencepiece (or 'almak[spbleu]')")
    if tokenize == "flores200" and not flores200_spm_path().is_file():
        path = flores200_spm_path()
        raise AlmakError(
            f"spBLEU needs FLORES-200's SentencePiece model at {path} (sacrebleu's cache; set SACREBLEU to move "
            f"it), and almak downloads nothing: fetch it with  mkdir -p {path.parent} && curl -L -o {path} "
            f"{FLORES200_SPM_URL}  (NLLB-200's sentencepiece.bpe.model is the same file)")
    try:
        return BLEU(tokenize=tokenize)
    except (ImportError, RuntimeError) as e:  # sacrebleu raises these when MeCab or sentencepiece is missing
        what, package, extra = _TOKENIZER_EXTRAS.get(tokenize, (tokenize, "sacrebleu", ""))
        language = f" for {language_name(tgt)}" if tokenize != "flores200" else ""
        raise AlmakError(
            f"BLEU's {tokenize} tokenizer{language} needs {what}: pip install '{package}'"
            + (f" (or 'almak[{extra}]')" if extra else "")
            + ("; or pick another tokenizer with --bleu-tokenize (13a, char, ...)" if tokenize != "flores200" else "")
            + f" [{type(e).__name__}]") from None


def check_metrics(names: list[str], tgt: str, bleu_tokenize: str = "auto") -> None:
    """Raise now, before any translating, if a BLEU tokenizer the metrics need cannot be had."""
    if "bleu" in names:
        _bleu_metric(bleu_tokenizer(tgt, bleu_tokenize), tgt)
    if "spbleu" in names:
        _bleu_metric("flores200", tgt)


def bleu(hyps: list[str], refs: list[str], tgt: str, tokenize: str = "auto") -> tuple[float, str]:
    """Corpus BLEU and its sacrebleu signature; ``tokenize`` as :func:`bleu_tokenizer` takes it."""
    metric = _bleu_metric(bleu_tokenizer(tgt, tokenize), tgt)
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def spbleu(hyps: list[str], refs: list[str], tgt: str) -> tuple[float, str]:
    """spBLEU as FLORES-200 and LLaMAX report it: BLEU over FLORES-200's SentencePiece pieces (sacrebleu's
    ``flores200`` tokenizer), the same for every language."""
    metric = _bleu_metric("flores200", tgt)
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def chrf(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    """Corpus chrF (character 6-grams, beta 2, sacrebleu's defaults) and its signature."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def comet(sources: list[str], hyps: list[str], refs: list[str], model: str = DEFAULT_COMET,
          batch_size: int = 16, gpus: int | None = None) -> float:
    """System-level COMET (mean of segment scores) with unbabel-comet.

    ``model`` is a hub name (downloaded once into the hub cache) or a local folder holding
    ``checkpoints/model.ckpt``.
    """
    try:
        from comet import download_model, load_from_checkpoint
    except ImportError:
        raise AlmakError("COMET needs the comet extra: pip install 'almak[comet]'") from None

    folder = Path(model)
    if folder.is_dir():
        ckpt = folder / "checkpoints" / "model.ckpt"
        if not ckpt.is_file():
            raise AlmakError(f"COMET model folder {model!r} has no checkpoints/model.ckpt")
    else:
        try:
            ckpt = Path(download_model(model))
        except Exception as e:  # the hub client raises many types; all mean "could not get it"
            raise AlmakError(
                f"COMET model {model!r} could not be downloaded ({type(e).__name__}); download it where "
                f"there is network (comet's download_model) and pass its folder with --comet-model"
            ) from None
    scorer = load_from_checkpoint(str(ckpt))
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hyps, refs)]
    out = scorer.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=False)
    return float(out.system_score)
