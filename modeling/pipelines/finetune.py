"""Supervised fine-tuning on human-written parallel data: the second stage of ALMA (Xu et al. 2024, "A Paradigm
Shift in Machine Translation: Boosting Translation Performance of Large Language Models", ICLR 2024).

Every example is the prompt the model family expects, then the reference and what ends an answer
(:meth:`almak.modeling.text.prompts.Prompt.encode` with ``terminate=True``: the same tokens reference perplexity
scores, plus the newline or EOS). The loss is the mean NLL of the target tokens of an optimizer step (prompt and
padding are labelled -100), so gradient accumulation equals one bigger batch. LoRA adapters (peft) by default,
or every weight (``full=True``). Validation is reference perplexity (:func:`almak.eval.metrics.reference_nll`,
comparable with ``almak eval --metrics nll``) on a few sentences of ALMA's valid split.

The output folder is the run's workspace: ``train_log.jsonl`` (one line per step and per validation) and, every
``save_every`` steps, ``checkpoint/`` (trainable weights, AdamW state, scheduler, RNG, step; written beside and
renamed) from which ``resume=True`` continues to the same result as an uninterrupted run. At the end the folder
is replaced, in one rename, by the result: a peft adapter (``adapter_config.json``, ``adapter_model.safetensors``)
or a full safetensors model, the tokenizer, ``train_log.jsonl`` and ``almak_finetune.json``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from almak.errors import AlmakError
from almak.files import check_writable_place, ordinary_modes, temp_dir_beside, write_dir_atomic
from almak.modeling.architecture import PROJECTIONS
from almak.modeling.devices import peak_memory, training_device
from almak.modeling.engines.scoring import NLL, reference_nll, target_logits, teacher_forcing_batch
from almak.modeling.load import DEFAULT_MODEL, load_model
from almak.modeling.text.data import ALMA_DIRECTIONS, TestSet, alma_parallel, load_testset, read_json_records
from almak.modeling.text.languages import parse_lang_pair
from almak.modeling.text.prompts import Prompt, guess_family
from almak.version import __version__

log = logging.getLogger(__name__)
# peft asks transformers 5 through a deprecated name on every forward in training; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

# Learning rates when none is given. LoRA: 2e-4, the usual rate for rank-16 adapters on 7B-13B LLaMAs (QLoRA's
# for 7B/13B; ALMA's own LoRA runs used 2e-3 on q/v only, too high once every projection adapts). Full weights:
# 2e-5, ALMA's rate for its full-weight fine-tune on the same human-written data.
LORA_LR, FULL_LR = 2e-4, 2e-5
# Fields that may change between a run and its --resume: they decide when to validate and save, not the result.
RESUMABLE_CHANGES = ("eval_every", "save_every")
CHECKPOINT = "checkpoint"


@dataclass
class FinetuneConfig:
    """How to fine-tune. ``lr=None`` picks 2e-4 for LoRA and 2e-5 for ``full`` (see :attr:`learning_rate`).

    >>> FinetuneConfig(data="alma:de-en,en-de", steps=200).learning_rate
    0.0002
    """

    data: str = "alma"  # alma (all ten directions), alma:de-en,en-de, or a file (see load_pairs)
    lang_pair: str | None = None  # direction of a .tsv, or of a JSON file whose name holds none
    valid: str | None = None  # None: ALMA's bundled valid split of the training directions, where it has one
    valid_sentences: int = 100  # validation sentences in all, spread over the directions
    full: bool = False  # fine-tune every weight instead of LoRA adapters
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = PROJECTIONS
    steps: int = 1000  # optimizer steps
    lr: float | None = None
    batch_size: int = 8  # sequences per forward pass
    grad_accum: int = 2  # forward passes per optimizer step
    max_len: int = 256  # tokens per example (prompt + target), longer ones lose the end of their target
    warmup: float = 0.01  # fraction of the steps with a linearly rising rate (ALMA: 0.01); then linear decay to 0
    weight_decay: float = 0.01  # AdamW, on matrices only (ALMA: 0.01)
    max_grad_norm: float = 1.0
    bf16: bool = False  # mixed precision: forward and backward under torch.autocast to bfloat16
    group_by_length: bool = False  # micro-batches of similar lengths (less padding), see BatchPlan
    eval_every: int = 100  # steps between validations (0: before and after only)
    save_every: int = 100  # steps between checkpoints (0: none)
    seed: int = 0

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "lora_rank": self.lora_rank}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise AlmakError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every", "valid_sentences"):
            if getattr(self, name) < 0:
                raise AlmakError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_len < 16:
            raise AlmakError(f"max_len must be at least 16 tokens, got {self.max_len}")
        if self.lr is not None and not self.lr > 0:
            raise AlmakError(f"the learning rate must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise AlmakError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.lora_dropout < 1:
            raise AlmakError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_alpha > 0 or self.weight_decay < 0 or not self.max_grad_norm > 0:
            raise AlmakError("lora_alpha and max_grad_norm must be positive and weight_decay >= 0")
        if not self.full and not self.target_modules:
            raise AlmakError("LoRA needs at least one target module")
        if not self.data:
            raise AlmakError("no training data given")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (FULL_LR if self.full else LORA_LR)

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup * self.steps)

    def to_json(self) -> dict:
        """The fields that describe the run (LoRA's only for LoRA), the learning rate resolved."""
        d = dataclasses.asdict(self)
        d["lr"] = self.learning_rate
        d["target_modules"] = list(self.target_modules)
        if self.full:
            for k in ("lora_rank", "lora_alpha", "lora_dropout", "target_modules"):
                del d[k]
        return d


# ---- data -------------------------------------------------------------------------------------------------------

def load_pairs(spec: str, lang_pair: str | None = None) -> list[TestSet]:
    """The parallel data of ``spec``, one TestSet per direction.

    ``alma`` is ALMA's human-written training pairs in all ten directions (cs, de, is, ru, zh <-> en, each file
    both ways), ``alma:de-en,en-de`` chosen directions; a file is read as ``almak eval`` reads test sets (ALMA
    JSON / JSON lines named ``*.xx-yy.*``, course-project JSONL with ``langs``/``src``/``ref`` (every direction
    it holds unless ``lang_pair`` picks one), a ``.tsv`` of source<TAB>reference with ``lang_pair``).
    """
    if spec == "alma" or spec.startswith("alma:"):
        if lang_pair:
            raise AlmakError(f"--lang-pair is for files; name ALMA's directions in the spec (alma:{lang_pair})")
        pairs = spec.split(":", 1)[1] if ":" in spec else ""
        if ":" in spec and not pairs.strip(","):
            raise AlmakError(f"{spec!r} names no direction; write alma:de-en,en-de (or alma for all ten)")
        directions = ([parse_lang_pair(p) for p in pairs.split(",") if p] if pairs
                      else [parse_lang_pair(d) for d in ALMA_DIRECTIONS])
        return [ts for ts in alma_parallel(list(dict.fromkeys(directions)), "train").values() if ts is not None]
    path = Path(spec)
    if lang_pair is None and path.is_file() and path.suffix == ".jsonl":
        records = read_json_records(path)
        if records and "langs" in records[0]:  # course-project JSONL: every direction it holds
            return [load_testset(spec, pair) for pair in sorted({r.get("langs") for r in records})]
    return [load_testset(spec, lang_pair)]


def validation_sets(config: FinetuneConfig, directions: list[tuple[str, str]]) -> list[TestSet]:
    """``config.valid`` (a spec as for :func:`load_pairs`), else ALMA's valid split of the training directions
    that have one; the first ``valid_sentences`` sentences in all, shared evenly between the directions."""
    if config.valid_sentences == 0:
        return []
    if config.valid:
        sets = load_pairs(config.valid, config.lang_pair)
    else:
        bundled = [f"{s}-{t}" for s, t in directions if f"{s}-{t}" in ALMA_DIRECTIONS]
        sets = [ts for ts in alma_parallel([parse_lang_pair(d) for d in bundled], "valid").values() if ts]
        missing = sorted(set(f"{s}-{t}" for s, t in directions) - {ts.lang_pair for ts in sets})
        if missing:
            log.info("no bundled valid split for %s: not validated there", ", ".join(missing))
    if not sets:
        return []
    per = math.ceil(config.valid_sentences / len(sets))
    return [ts.head(per) for ts in sets]


def encode_examples(sets: list[TestSet], tokenizer, family: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) of every pair, the target ending as the family's answers end; an example longer
    than ``max_len`` loses the end of its target, one whose prompt alone fills ``max_len`` is dropped."""
    examples, cut, dropped = [], 0, 0
    for ts in sets:
        for p, t in Prompt(family, ts.src, ts.tgt).encode_many(ts.sources, ts.references, tokenizer, terminate=True):
            if len(p) + len(t) > max_len:
                cut += 1
                t = t[: max_len - len(p)]
                if not t:
                    dropped += 1
                    continue
            examples.append((p, t))
    if cut:
        log.info("%d of %d examples exceed %d tokens: %d cut short, %d dropped (prompt alone too long)",
                 cut, sum(len(ts.sources) for ts in sets), max_len, cut - dropped, dropped)
    if not examples:
        raise AlmakError(f"no training example fits in max_len={max_len} tokens")
    return examples


class ExampleOrder:
    """Example ``g`` of the run (counting over epochs) is ``perm[g // n][g % n]``, each epoch a fresh permutation
    drawn from the seed: the order is a function of the position alone, so a resumed run needs only the step."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch][i]


GROUP_STEPS = 16  # with group_by_length: the steps whose examples are sorted by length together


class BatchPlan:
    """The micro-batches (example indices) of each optimizer step, a function of the step alone, so that a resumed
    run goes on as the uninterrupted one would have.

    Step ``k`` (1-based) takes the next ``batch_size * grad_accum`` examples of :class:`ExampleOrder`. With
    ``group_by_length`` the examples of every ``GROUP_STEPS`` steps are sorted by length and cut into
    micro-batches, which are then dealt out to those steps in a seeded random order: each forward pass pads to
    a similar length, and each step still sees the same examples in expectation.
    """

    def __init__(self, lengths: list[int], config: FinetuneConfig):
        self.lengths, self.config = lengths, config
        self.order = ExampleOrder(len(lengths), config.seed)
        self._chunk: tuple[int, list[list[int]]] | None = None

    def __call__(self, step: int) -> list[list[int]]:
        b, a = self.config.batch_size, self.config.grad_accum
        if not self.config.group_by_length:
            first = (step - 1) * b * a
            return [[self.order[first + m * b + i] for i in range(b)] for m in range(a)]
        c, j = divmod(step - 1, GROUP_STEPS)
        if self._chunk is None or self._chunk[0] != c:
            first = c * GROUP_STEPS * b * a
            chunk = sorted((self.order[g] for g in range(first, first + GROUP_STEPS * b * a)),
                           key=lambda e: (self.lengths[e], e))
            micro = [chunk[i:i + b] for i in range(0, len(chunk), b)]
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + c + 1)
            self._chunk = (c, [micro[i] for i in torch.randperm(len(micro), generator=gen).tolist()])
        return self._chunk[1][j * a:(j + 1) * a]


# ---- model ------------------------------------------------------------------------------------------------------

def _require_peft():
    try:
        import peft
    except ImportError:
        raise AlmakError("LoRA fine-tuning needs the peft package: pip install 'almak[train]'") from None
    return peft


def prepare_model(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """``model`` wrapped in LoRA adapters (peft) or, with ``full``, with every weight trainable."""
    if config.full:
        if next(model.parameters()).dtype == torch.float16:
            raise AlmakError("full fine-tuning needs float32 or bfloat16 weights (AdamW on float16 ones underflows); "
                             "pass --dtype bfloat16 or float32")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
    other = sorted({f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                    if n.rsplit(".", 1)[-1] in config.target_modules and type(m) is not nn.Linear})
    if other:
        raise AlmakError(f"LoRA targets must be float nn.Linear layers; {other[0]} is not: fine-tune the float model")
    missing = [t for t in config.target_modules if t not in linear_names]
    if missing:
        raise AlmakError(f"the model has no {', '.join(missing)} layers to adapt")
    peft = _require_peft()
    lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: nn.Module, config: FinetuneConfig):
    """AdamW (weight decay on matrices, not on norms and biases) and a linear warmup then linear decay to 0."""
    params = list(trainable_parameters(model).values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)
    return optimizer, schedule(optimizer, config)


def schedule(optimizer, config: FinetuneConfig):
    """Linear warmup over ``config.warmup_steps``, then linear decay to 0 at ``config.steps``."""
    warm, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- checkpoints ------------------------------------------------------------------------------------------------

def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.item()
    return obj


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer, scheduler, state: dict) -> None:
    """``out_dir/checkpoint``: written into a folder beside it, then swapped in (the old one is renamed away first,
    so a crash at any moment leaves one complete checkpoint: ``checkpoint`` or ``.checkpoint.old``)."""
    from safetensors.torch import save_file

    tmp = temp_dir_beside(out_dir / CHECKPOINT)
    try:
        save_file({n: p.detach().contiguous() for n, p in trainable_parameters(model).items()},
                  tmp / "weights.safetensors")
        opt = optimizer.state_dict()
        save_file({f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()},
                  tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        state = dict(state, param_groups=_json_safe([{k: v for k, v in g.items() if k != "params"}
                                                     for g in opt["param_groups"]]),
                     scheduler=_json_safe(scheduler.state_dict()))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        ordinary_modes(tmp)
        target, old = out_dir / CHECKPOINT, out_dir / f".{CHECKPOINT}.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(out_dir: Path) -> Path | None:
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):  # the second only if a save died between its two renames
        if (out_dir / name / "trainer_state.json").is_file():
            return out_dir / name
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    params = trainable_parameters(model)
    weights = load_file(path / "weights.safetensors")
    if set(weights) != set(params):
        raise AlmakError(f"{path} holds other trainable weights than this run's model (another model or LoRA setup)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    flat = load_file(path / "optimizer.safetensors")
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = value
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = [dict(g, params=cur["params"]) for g, cur in zip(state["param_groups"], groups)]
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved_groups})
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


def check_output(out_dir: Path, resume: bool, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse what cannot go on, before anything is loaded or written; ``inputs`` (models, data) must survive."""
    check_writable_place(out_dir, inputs)
    if resume and overwrite:
        raise AlmakError("--resume continues the run in --out, --overwrite starts it over: pass one of them")
    if resume:
        if find_checkpoint(out_dir) is None:
            done = " (it holds a finished fine-tune)" if (out_dir / "almak_finetune.json").is_file() else ""
            raise AlmakError(f"--resume: no checkpoint in {str(out_dir)!r}{done}")
        return
    if out_dir.exists() and not overwrite:
        raise AlmakError(f"{str(out_dir)!r} exists; pass --overwrite to replace it, or --resume to continue its "
                         "checkpoint")


def _base_ref(model: nn.Module, base_ref: str | None) -> str | None:
    """What the adapter names as its base: an alias or hub id as given, a local folder as an absolute path."""
    ref = base_ref or getattr(model, "name_or_path", None)
    if ref and Path(ref).expanduser().exists():
        return str(Path(ref).expanduser().resolve())
    return ref


# ---- training ---------------------------------------------------------------------------------------------------

def validate(model: nn.Module, tokenizer, family: str, sets: list[TestSet], batch_size: int) -> NLL | None:
    """Reference NLL of the validation sets (target tokens only, as ``almak eval --metrics nll``)."""
    if not sets:
        return None
    was_training = model.training
    model.eval()
    total = NLL(0.0, 0)
    for ts in sets:
        nll = reference_nll(model, tokenizer, ts.sources, ts.references, Prompt(family, ts.src, ts.tgt),
                            batch_size=batch_size)
        total = NLL(total.total + nll.total, total.tokens + nll.tokens)
    model.train(was_training)
    return total


@dataclass
class FinetuneResult:
    model: nn.Module  # the trained model: a peft model around the (changed in place) base for LoRA
    summary: dict  # steps, train losses, validation perplexities, parameters, seconds
    out: Path | None = None
    base: str | None = None  # the model fine-tuned, resolved
    prompt: str | None = None  # the prompt family trained on
    peak_memory: tuple[int, str] | None = None


def finetune(model: str | None, config: FinetuneConfig, out: str | Path, *, device: str = "auto",
             dtype: str = "auto", prompt: str | None = None, resume: bool = False, overwrite: bool = False,
             progress: Callable[[dict], None] | None = None) -> FinetuneResult:
    """``almak finetune``: fine-tune ``model`` (any model reference; the embedded model when None) on
    ``config.data`` with LoRA (or every weight, ``config.full``) and write the adapter (or model) to ``out``.

    ``device``/``dtype`` auto: cuda if present, bfloat16 where that GPU has it, float32 otherwise; ``prompt`` is the
    prompt family (guessed from the model when None); ``resume`` continues the checkpoint in ``out``. ``progress``
    gets the events of :func:`finetune_model`. Bad output folders and data are refused before the model loads.

    >>> finetune("smollm2-135m", FinetuneConfig(data="alma:de-en", steps=50), "smollm-ft")   # doctest: +SKIP
    """
    out = Path(out)
    check_output(out, resume, overwrite, inputs=(model, config.data, config.valid))
    load_pairs(config.data, config.lang_pair)  # refuse unknown directions and bad files before loading the model
    device, dtype = training_device(device, dtype)
    lm = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
    family = prompt or guess_family(lm.ref, lm.tokenizer)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = finetune_model(lm.model, lm.tokenizer, family, config, out, resume=resume, progress=progress,
                            overwrite=overwrite, base_ref=lm.ref)
    return dataclasses.replace(result, out=out, base=lm.ref, prompt=family, peak_memory=peak_memory(device))


def finetune_model(model: nn.Module, tokenizer, prompt_family: str, config: FinetuneConfig, out_dir: str | Path,
             resume: bool = False, progress: Callable[[dict], None] | None = None, overwrite: bool = False,
             base_ref: str | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on ``config.data`` and write the result to ``out_dir``.

    ``progress`` gets ``{"event": "start", "step": s}`` once (s > 0 on resume), then ``{"event": "step", "step",
    "loss", "lr"}`` after each optimizer step and ``{"event": "valid", "step", "ppl"}`` after each validation.
    ``base_ref`` is how the adapter names its base model (default: the model's ``name_or_path``).

    >>> lm = load_model("smollm2-135m")                                                    # doctest: +SKIP
    >>> finetune_model(lm.model, lm.tokenizer, "alma", FinetuneConfig(data="alma:de-en", steps=50),
    ...          "smollm-ft", base_ref="smollm2-135m").summary["val_ppl_after"]          # doctest: +SKIP
    """
    base_ref = _base_ref(model, base_ref)
    run = train(model, tokenizer, prompt_family, config, out_dir, lambda m: prepare_model(m, config), nll_loss,
                resume=resume, progress=progress, overwrite=overwrite, base_ref=base_ref)
    recipe = {"command": "finetune", "method": "full" if config.full else "lora", "base_model": base_ref,
              **run.recipe_fields}
    _write_result(Path(out_dir), run.model, tokenizer, config, base_ref, recipe)
    return FinetuneResult(run.model, run.summary)


def nll_loss(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the target tokens: the fine-tuning loss of one batch."""
    logits, target = target_logits(model, ids, attn, labels)
    return F.cross_entropy(logits.float(), target, reduction="sum")


@dataclass
class TrainRun:
    model: nn.Module  # as ``prepare`` returned it, trained
    summary: dict
    recipe_fields: dict  # prompt, config, data, the summary, almak's version, date: for the result's recipe


def train(model: nn.Module, tokenizer, prompt_family: str, config: FinetuneConfig, out_dir: str | Path,
          prepare: Callable[[nn.Module], nn.Module], batch_loss: Callable[..., torch.Tensor], resume: bool = False,
          progress: Callable[[dict], None] | None = None, overwrite: bool = False, base_ref: str | None = None,
          optimizer: Callable[[nn.Module], tuple] | None = None,
          after_step: Callable[[nn.Module], None] | None = None) -> TrainRun:
    """The training loop :func:`finetune` and :func:`almak.modeling.pipelines.distill.distill` share: ``prepare(model)``
    makes the trainable model (its parameters with ``requires_grad`` are what trains, is checkpointed and resumed),
    ``batch_loss(model, ids, attn, labels)`` returns the summed loss of a batch's target tokens; ``optimizer(model)``
    (default :func:`make_optimizer`) returns (optimizer, scheduler), ``after_step(model)`` runs after each
    optimizer step. Writes ``train_log.jsonl`` and checkpoints into ``out_dir``; the caller writes the result."""

    out_dir = Path(out_dir)
    check_output(out_dir, resume, overwrite)
    emit = progress or (lambda event: None)
    train_sets = load_pairs(config.data, config.lang_pair)
    if not train_sets:
        raise AlmakError(f"{config.data!r} holds no training pairs")
    examples = encode_examples(train_sets, tokenizer, prompt_family, config.max_len)
    valid_sets = validation_sets(config, [(ts.src, ts.tgt) for ts in train_sets])
    ckpt = find_checkpoint(out_dir) if resume else None
    if ckpt is not None:  # refuse a different run before anything is built
        saved = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        _check_same_run(saved, config, base_ref, prompt_family)

    torch.manual_seed(config.seed)  # LoRA's initial A matrices
    model = prepare(model)
    optimizer, scheduler = optimizer(model) if optimizer else make_optimizer(model, config)
    device = next(model.parameters()).device
    if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise AlmakError(f"--bf16: {torch.cuda.get_device_name(device)} has no bfloat16; train without it")
    log_path = out_dir / "train_log.jsonl"
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.is_file() else []
        kept = [line for line in lines if json.loads(line)["step"] <= state["step"]]  # drop steps after the save
        log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    else:
        torch.manual_seed(config.seed)  # dropout draws
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir()
        state = {"step": 0, "examples_seen": 0, "seconds": 0.0, "losses": [], "valid": [],
                 "config": config.to_json(), "base_model": base_ref, "prompt": prompt_family}
        log_path.write_text("", encoding="utf-8")
        nll = validate(model, tokenizer, prompt_family, valid_sets, config.batch_size)
        if nll is not None:
            _record_valid(state, log_path, 0, nll, emit)

    plan = BatchPlan([len(p) + len(t) for p, t in examples], config)
    n_trainable = sum(p.numel() for p in trainable_parameters(model).values())
    n_total = sum(p.numel() for p in model.parameters())
    log.info("training %d of %d parameters on %d examples (%s), from step %d of %d", n_trainable, n_total,
             len(examples), ", ".join(ts.lang_pair for ts in train_sets), state["step"], config.steps)
    emit({"event": "start", "step": state["step"]})
    model.train()
    started = time.perf_counter() - state["seconds"]
    with open(log_path, "a", encoding="utf-8") as log_file:
        for step in range(state["step"] + 1, config.steps + 1):
            micro = [[examples[e] for e in batch] for batch in plan(step)]
            state["examples_seen"] += config.batch_size * config.grad_accum
            n_target = sum(len(t) for batch in micro for _, t in batch)
            loss = 0.0
            for batch in micro:
                ids, attn, labels = teacher_forcing_batch(batch, tokenizer.pad_token_id)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    summed = batch_loss(model, ids.to(device), attn.to(device), labels.to(device))
                (summed / n_target).backward()  # the step's loss is the mean over all its target tokens
                loss += float(summed.detach()) / n_target
            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable_parameters(model).values()),
                                                       config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step:
                after_step(model)
            if not math.isfinite(loss):
                raise AlmakError(f"the training loss became {loss} at step {step}; lower --lr or use float32")
            state["step"] = step
            state["losses"].append(loss)
            log_file.write(json.dumps({"step": step, "loss": round(loss, 6), "lr": lr, "target_tokens": n_target,
                                       "grad_norm": round(float(grad_norm), 6)}) + "\n")
            log_file.flush()
            emit({"event": "step", "step": step, "loss": loss, "lr": lr})
            if step == config.steps or (config.eval_every and step % config.eval_every == 0):
                nll = validate(model, tokenizer, prompt_family, valid_sets, config.batch_size)
                if nll is not None:
                    _record_valid(state, log_path, step, nll, emit, log_file)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                state["seconds"] = time.perf_counter() - started
                save_checkpoint(out_dir, model, optimizer, scheduler, state)
    seconds = time.perf_counter() - started
    model.eval()

    valid = state["valid"]
    summary = {
        "steps": config.steps, "examples": len(examples), "examples_seen": state["examples_seen"],
        "epochs": round(state["examples_seen"] / len(examples), 3),
        "train_loss_first": state["losses"][0] if state["losses"] else None,
        "train_loss_last": state["losses"][-1] if state["losses"] else None,
        "val_ppl_before": valid[0]["ppl"] if valid and valid[0]["step"] == 0 else None,
        "val_ppl_after": valid[-1]["ppl"] if valid and valid[-1]["step"] == config.steps else None,
        "val_sentences": sum(len(ts.sources) for ts in valid_sets),
        "trainable_parameters": n_trainable, "parameters": n_total, "seconds": round(seconds, 1),
    }
    fields = {
        "prompt": prompt_family, "config": config.to_json(),
        "data": {"train": {ts.lang_pair: len(ts.sources) for ts in train_sets},
                 "valid": {ts.lang_pair: len(ts.sources) for ts in valid_sets}},
        **summary, "almak_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return TrainRun(model, summary, fields)


def _check_same_run(saved: dict, config: FinetuneConfig, base_ref: str | None, family: str) -> None:
    now = config.to_json()
    diff = [f"{k}={saved['config'].get(k)!r} (now {now.get(k)!r})" for k in sorted(set(now) | set(saved["config"]))
            if k not in RESUMABLE_CHANGES and saved["config"].get(k) != now.get(k)]
    if saved.get("base_model") != base_ref:
        diff.append(f"base model {saved.get('base_model')!r} (now {base_ref!r})")
    if saved.get("prompt") != family:
        diff.append(f"prompt {saved.get('prompt')!r} (now {family!r})")
    if diff:
        raise AlmakError("--resume: the checkpoint was made with " + "; ".join(diff) + ". Resume with the same "
                         "settings (only --eval-every and --save-every may change)")


def _record_valid(state: dict, log_path: Path, step: int, nll: NLL, emit, log_file=None) -> None:
    entry = {"step": step, "val_nll": round(nll.mean, 6), "val_ppl": round(nll.ppl, 4), "val_tokens": nll.tokens}
    state["valid"].append({"step": step, "ppl": nll.ppl, "nll": nll.mean})
    line = json.dumps(entry) + "\n"
    if log_file is None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line)
    else:
        log_file.write(line)
        log_file.flush()
    log.info("step %d: validation ppl %.3f (%d target tokens)", step, nll.ppl, nll.tokens)
    emit({"event": "valid", "step": step, "ppl": nll.ppl})


def _write_result(out_dir: Path, model: nn.Module, tokenizer, config: FinetuneConfig, base_ref: str | None,
                  recipe: dict) -> None:
    """Replace the workspace (checkpoint and all) with the result in one rename."""
    def fill(tmp: Path) -> None:
        if config.full:
            model.save_pretrained(tmp)
        else:
            model.peft_config["default"].base_model_name_or_path = base_ref
            # save_embedding_layers=False: peft would otherwise look the base model up (on the hub, for an alias)
            # to see whether the vocabulary changed; it did not, only the projections adapt.
            model.save_pretrained(tmp, save_embedding_layers=False)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(out_dir / "train_log.jsonl", tmp / "train_log.jsonl")
        (tmp / "almak_finetune.json").write_text(json.dumps(recipe, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")

    write_dir_atomic(out_dir, fill)

