"""Translation metrics: sacrebleu BLEU, spBLEU and chrF, COMET (unbabel-comet), reference NLL under the prompt."""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from almak.errors import AlmakError
from almak.modeling.engines.decoder import context_limit
from almak.modeling.text.languages import language_name, language_subtag
from almak.modeling.text.prompts import Prompt

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


@dataclass
class NLL:
    """Teacher-forced negative log-likelihood of the references, in nats per reference token."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)


def teacher_forcing_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int | None):
    """(input_ids, attention_mask, labels) of (prompt ids, target ids) pairs, right-padded so that positions start
    at 0 in every row; labels are -100 on the prompt and the padding, the target ids elsewhere."""
    pad = pad_id if pad_id is not None else 0
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[row, :n] = torch.tensor(p + c)
        attn[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(c, dtype=torch.long)
    return ids, attn, labels


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL (fp32) of the labelled tokens, each predicted from the position before it, and their count."""
    target = labels[:, 1:].to(logits.device)
    mask = target != -100
    return F.cross_entropy(logits[:, :-1][mask].float(), target[mask], reduction="sum"), int(mask.sum())


def target_logits(model, ids: torch.Tensor, attn: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict the labelled tokens, (n, vocab), and those tokens, (n,).

    The vocabulary projection runs only over the positions between the first and the last that predict a target in
    some row (``logits_to_keep``): in training batches the prompts are about half the tokens, and on a 49k
    vocabulary the projection and its logits are a large part of the cost. The logits are the same.
    """
    target = labels[:, 1:].to(ids.device)
    mask = target != -100
    cols = mask.any(0).nonzero().flatten()
    if not len(cols):
        raise ValueError("the batch has no labelled tokens")
    a, b = int(cols[0]), int(cols[-1]) + 1
    try:
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=torch.arange(a, b, device=ids.device)).logits
    except TypeError:  # a model without logits_to_keep: all positions, then the same span
        logits = model(input_ids=ids, attention_mask=attn).logits[:, a:b]
    keep = mask[:, a:b]
    return logits[keep], target[:, a:b][keep]


@torch.inference_mode()
def reference_nll(model, tokenizer, sources: list[str], refs: list[str], prompt: Prompt,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None) -> NLL:
    """NLL of each reference given its prompt; the prompt's tokens are not scored.

    Prompt and continuation are tokenized separately and concatenated (:meth:`Prompt.encode_many`), so the scored
    tokens are exactly the reference's (``prompt.continuation(ref)``), whatever the tokenizer merges. What
    ends the answer (ALMA's newline, EOS) is not scored.
    """
    device = next(model.parameters()).device
    seqs = prompt.encode_many(sources, refs, tokenizer)
    limit = context_limit(model)
    too_long = [i for i, (p, c) in enumerate(seqs) if limit is not None and len(p) + len(c) > limit]
    if too_long:
        i = too_long[0]
        raise AlmakError(f"pair {i + 1}: its prompt and reference are {len(seqs[i][0]) + len(seqs[i][1])} tokens, "
                         f"past the model's context of {limit} positions (max_position_embeddings)")
    total, count = 0.0, 0
    for b in range(0, len(seqs), batch_size):
        batch = seqs[b : b + batch_size]
        ids, attn, labels = teacher_forcing_batch(batch, tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        nll, n = target_nll(logits, labels)
        total += float(nll)
        count += n
        if progress:
            progress(len(batch))
    if count == 0:
        raise AlmakError("no reference tokens to score")
    if not math.isfinite(total):
        raise AlmakError("the model produced a non-finite reference NLL (NaN or inf in its logits)")
    return NLL(total, count)
