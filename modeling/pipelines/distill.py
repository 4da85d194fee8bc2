"""Recovery of a compressed student from its float teacher by knowledge distillation (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network"), on teacher-forced reference translations.

The loss of each target token is ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(reference)``,
``p^T`` the softmax of the logits over ``T``; the ``T^2`` keeps the KD gradients' scale independent of T.

The student keeps its structure, so that the result is a checkpoint of the same kind as the student:

- pruned projections (2:4 ``Sparse24Linear`` or unstructured zeros in ``nn.Linear``) train their kept weights
  only: the gradients of pruned weights are masked to zero, and the mask is applied again after every step;
- quantized projections (``QuantLinear``) keep their integer codes and zero points and train their scales, as
  in PEQA (Kim et al. 2023, "Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit
  Integer Quantization"): the dequantized weight ``(q - z) * s`` is differentiable in ``s``. A LoRA merged
  into the float weight and quantized again would mostly be rounded away (its update is far below half a
  quantization step), so almak trains what the checkpoint stores;
- 2:4 + int4 projections (``Sparse24QuantLinear``) train their scales the same way; a pruned code equals the
  zero point, so it stays zero whatever the scale.

Everything else (embeddings, norms, ``lm_head``) stays frozen. A float student with no pruned projections (an
``almak prune --method structured`` model, or any causal LM with the teacher's tokenizer, whatever its shape) trains
every weight: logits are compared position by position over the shared vocabulary, so the shapes need not match.

With ``targets="teacher"`` the references are replaced by the teacher's own greedy translations of the same sources
(sequence-level knowledge distillation, Kim and Rush 2016, "Sequence-Level Knowledge Distillation"): the student
learns the outputs it is meant to reproduce, which for a small student is easier than the human references. The
translations are made once and cached (``$ALMAK_CACHE/teacher-targets/``), for every student of the same teacher and
data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from almak.errors import AlmakError
from almak.files import write_dir_atomic, write_text_atomic
from almak.modeling.checkpoint import (
    SPARSITY_REPORT_FILE,
    STRUCTURE_REPORT_FILE,
    read_recipe,
    save_float,
    save_pruned,
    save_quantized,
)
from almak.modeling.devices import peak_memory, training_device
from almak.modeling.engines.scoring import target_logits
from almak.modeling.load import DEFAULT_MODEL, load_model
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear, Sparse24QuantLinear
from almak.modeling.nn.surgery import set_module, sparsify_, target_linears
from almak.modeling.pipelines.finetune import FinetuneConfig, _base_ref, check_output, load_pairs, schedule, train
from almak.modeling.text.prompts import guess_family
from almak.quant.pack import dequantize_groupwise

# Full-weight rate for pruned students (ALMA's full fine-tune rate is 2e-5; a recovery run is short and starts
# close to the teacher, so it can go faster) and the scale rate for quantized ones (PEQA used 5e-5 to 5e-4).
PRUNED_LR, SCALES_LR = 5e-5, 2e-4
# Every weight of a structured-pruned student: it starts further from its teacher (whole layers, heads and channels
# gone) and is small; Minitron's distillation of 4B-8B students ran at 1e-4 (peak, cosine decay).
STUDENT_LR = 1e-4
TARGETS = ("reference", "teacher")


@dataclass
class DistillConfig(FinetuneConfig):
    """How to distill: :class:`FinetuneConfig`'s data and schedule, plus the KD weight and temperature.

    >>> DistillConfig(data="alma:de-en", alpha=0.5, temperature=2.0).alpha
    0.5
    """

    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to the references' cross-entropy
    temperature: float = 2.0
    lr_pruned: float | None = None  # None: PRUNED_LR; lr (if given) applies to every kind
    lr_scales: float | None = None  # None: SCALES_LR
    lr_student: float | None = None  # None: STUDENT_LR (every weight of a float student)
    targets: str = "reference"  # reference: the data's translations; teacher: the teacher's (sequence-level KD)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise AlmakError(f"alpha weighs KD against cross-entropy and must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise AlmakError(f"the temperature must be positive, got {self.temperature}")
        if self.full:
            raise AlmakError("--full does not apply to distill: a float student trains every weight, a compressed "
                             "one what its structure allows (kept weights, scales)")
        if self.targets not in TARGETS:
            raise AlmakError(f"targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")

    def rate(self, kind: str) -> float:
        if self.lr is not None:
            return self.lr
        if kind == "pruned":
            return self.lr_pruned if self.lr_pruned is not None else PRUNED_LR
        if kind == "full":
            return self.lr_student if self.lr_student is not None else STUDENT_LR
        return self.lr_scales if self.lr_scales is not None else SCALES_LR

    def to_json(self) -> dict:
        d = super().to_json()
        for k in ("full", "lora_rank", "lora_alpha", "lora_dropout", "target_modules"):
            d.pop(k, None)
        d["lr"], d["lr_pruned"], d["lr_scales"] = self.lr, self.rate("pruned"), self.rate("scales")
        d["lr_student"] = self.rate("full")
        return d


class TrainableScales(nn.Module):
    """A quantized projection whose scales train while its codes and zero points stay: ``y = x @ ((q - z) * s).T``.

    Wraps a ``QuantLinear`` or ``Sparse24QuantLinear``; :meth:`finish` writes the trained scales back (in the
    layer's scale dtype) and returns the layer.
    """

    def __init__(self, layer: QuantLinear | Sparse24QuantLinear):
        super().__init__()
        codes = layer.dense_codes() if isinstance(layer, Sparse24QuantLinear) else layer.codes()
        self.layer = layer
        # q - z, once: dequantize_groupwise with unit scales
        centered = dequantize_groupwise(codes, torch.ones_like(layer.weight_scale), layer.zeros(), layer.group_size)
        self.register_buffer("centered", centered, persistent=False)
        self.scale = nn.Parameter(layer.weight_scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = dequantize_groupwise(self.centered, self.scale, None, self.layer.group_size)  # stored column order
        perm = getattr(self.layer, "input_perm", None)
        if perm is not None:
            x = x.index_select(-1, perm)
        bias = self.layer.bias
        return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def finish(self) -> QuantLinear | Sparse24QuantLinear:
        self.layer.weight_scale.copy_(self.scale.to(self.layer.weight_scale.dtype))
        self.layer._cpu_cache = {}
        return self.layer


@dataclass
class Student:
    """What :func:`prepare_student` made trainable: masks of pruned layers (True = pruned), scale wrappers; or, for
    a float student, every weight (``full``)."""

    masks: dict[str, torch.Tensor]
    scales: dict[str, TrainableScales]
    stored_24: list[str]  # layers that were Sparse24Linear and go back to it
    full: bool = False

    @property
    def kind(self) -> str:
        if self.full:
            return "every weight"
        return " + ".join(k for k, v in (("pruned", self.masks), ("quantized", self.scales)) if v)


def is_float_student(model: nn.Module, pruned: Iterable[str] = ()) -> bool:
    """Whether ``model`` has nothing a compression left to keep (no quantized or 2:4 layers, no pruned projections
    listed): it trains every weight."""
    kinds = (QuantLinear, Sparse24QuantLinear, Sparse24Linear)
    compressed = any(isinstance(m, kinds) for _, m in target_linears(model))
    return not compressed and not set(pruned)


def prepare_student(model: nn.Module, pruned: Iterable[str] = ()) -> Student:
    """Freeze ``model`` except the kept weights of its pruned projections (its 2:4 layers and the dense ones named
    in ``pruned``, as a checkpoint's sparsity report lists them) and the scales of its quantized ones; a float
    student (:func:`is_float_student`) trains every weight."""
    pruned = set(pruned)
    if is_float_student(model, pruned):
        for p in model.parameters():
            p.requires_grad_(True)
        if any(p.dtype == torch.float16 for p in model.parameters()):
            raise AlmakError("training float16 weights underflows in AdamW; load the student in float32 or bfloat16 "
                             "(--dtype)")
        return Student({}, {}, [], full=True)
    for p in model.parameters():
        p.requires_grad_(False)
    masks, scales, stored_24 = {}, {}, []
    for name, module in target_linears(model):
        if isinstance(module, Sparse24Linear):
            stored_24.append(name)
            module = module.to_linear()
            set_module(model, name, module)
        if type(module) is nn.Linear:
            if name not in pruned and name not in stored_24:
                continue  # a projection the pruner skipped: the teacher's own, frozen
            mask = module.weight.detach() == 0
            masks[name] = mask
            module.weight.requires_grad_(True)
            module.weight.register_hook(lambda g, keep=~mask: g * keep.to(g.dtype))
        elif isinstance(module, (QuantLinear, Sparse24QuantLinear)):
            wrapper = TrainableScales(module)
            set_module(model, name, wrapper)
            scales[name] = wrapper
    if any(model.get_submodule(n).weight.dtype == torch.float16 for n in masks):
        raise AlmakError("training float16 weights underflows in AdamW; load the student in float32 or bfloat16 "
                         "(--dtype)")
    return Student(masks, scales, stored_24)


@torch.no_grad()
def reapply_masks(model: nn.Module, student: Student) -> None:
    for name, pruned in student.masks.items():
        model.get_submodule(name).weight.masked_fill_(pruned, 0)


def finish_student(model: nn.Module, student: Student) -> None:
    """Undo :func:`prepare_student`'s wrappers: scales written back, 2:4 layers compressed again."""
    for name, wrapper in student.scales.items():
        set_module(model, name, wrapper.finish())
    reapply_masks(model, student)
    for p in model.parameters():
        p.requires_grad_(False)
    if student.stored_24:
        done = sparsify_(model, names=student.stored_24)
        if sorted(done) != sorted(student.stored_24):
            raise AlmakError("a 2:4 layer lost its pattern in training; this is a bug in almak distill")


def kd_loss(teacher: nn.Module, alpha: float, temperature: float) -> Callable[..., torch.Tensor]:
    """The summed loss of a batch's target tokens (see the module docstring) as :func:`finetune.train` takes it."""
    T = temperature

    def batch_loss(student: nn.Module, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, target = target_logits(student, ids, attn, labels)
        logits = logits.float()
        loss = (1 - alpha) * F.cross_entropy(logits, target, reduction="sum") if alpha < 1 else 0.0
        if alpha > 0:
            with torch.no_grad():
                t_logits = target_logits(teacher, ids, attn, labels)[0].float()
            kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                          reduction="sum")
            loss = loss + alpha * T * T * kl
        return loss

    return batch_loss


@dataclass
class DistillResult:
    model: nn.Module  # the student, its structure restored, trained
    summary: dict
    out: Path | None = None
    student: str | None = None
    teacher: str | None = None  # resolved
    prompt: str | None = None
    peak_memory: tuple[int, str] | None = None


def distill(student: str, teacher: str | None, config: DistillConfig, out: str | Path, *, device: str = "auto",
            dtype: str = "auto", prompt: str | None = None, resume: bool = False, overwrite: bool = False,
            progress: Callable[[dict], None] | None = None) -> DistillResult:
    """``almak distill``: recover ``student`` by distilling ``teacher`` (any model reference; the embedded model when
    None) on ``config.data``; the result, written to ``out``, is a checkpoint of the student's kind. ``student`` is an
    almak prune or quantize checkpoint (it keeps its structure), or any causal LM with the teacher's tokenizer,
    structured-pruned or not (every weight trains). Devices, prompt, resume and progress as :func:`finetune`;
    ``progress`` also gets ``{"event": "targets", "done": n, "total": N}`` while the teacher translates
    (``config.targets == "teacher"``).

    >>> distill("runs/smollm-24", "smollm2-135m", DistillConfig(data="alma:de-en", steps=90), "runs/smollm-24-kd")
    ... # doctest: +SKIP
    """
    out = Path(out)
    check_output(out, resume, overwrite, inputs=(student, teacher, config.data, config.valid))
    if Path(student).expanduser().exists() and Path(student).expanduser().resolve() == out.resolve():
        raise AlmakError("--out must not be the student's own folder")
    load_pairs(config.data, config.lang_pair)  # refuse unknown directions and bad files before loading models
    device, dtype = training_device(device, dtype)
    s = load_model(student, device=device, dtype=dtype)
    t = load_model(teacher or DEFAULT_MODEL, device=device, dtype=dtype)
    check_same_tokenizer(s.tokenizer, t.tokenizer, s.model, t.model)
    family = prompt or guess_family(t.ref, t.tokenizer)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_config = config
    if config.targets == "teacher":
        targets = teacher_targets(t, family, config, progress)
        run_config = dataclasses.replace(config, data=str(targets), lang_pair=None)
    result = distill_model(s.model, t.model, s.tokenizer, family, run_config, out, student_ref=student,
                           teacher_ref=t.ref, resume=resume, progress=progress, overwrite=overwrite)
    return dataclasses.replace(result, out=out, student=student, teacher=t.ref, prompt=family,
                               peak_memory=peak_memory(device))


def check_same_tokenizer(student_tok, teacher_tok, student: nn.Module | None = None,
                         teacher: nn.Module | None = None) -> None:
    """Refuse a student whose tokenizer (or output vocabulary) is not the teacher's, naming the first difference:
    the KD loss compares their next-token distributions entry by entry."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if len(sv) != len(tv):
        raise AlmakError(f"the student's tokenizer has {len(sv)} tokens and the teacher's {len(tv)}: distillation "
                         "compares their distributions token by token, so both need the same tokenizer")
    for token, i in sorted(tv.items(), key=lambda kv: kv[1]):
        if sv.get(token) != i:
            raise AlmakError(f"the student's tokenizer differs from the teacher's: token {token!r} is id {i} for the "
                             f"teacher and {sv.get(token)} for the student")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if a != b:
            raise AlmakError(f"the student's tokenizer differs from the teacher's: {name} is {a} for the student and "
                             f"{b} for the teacher")
    if student is not None and teacher is not None:
        a, b = student.config.vocab_size, teacher.config.vocab_size
        if a != b:
            raise AlmakError(f"the student's output vocabulary has {a} entries and the teacher's {b}: distillation "
                             "needs the same")


def teacher_targets(teacher, family: str, config: DistillConfig,
                    progress: Callable[[dict], None] | None = None) -> Path:
    """A course-project JSONL (``langs``, ``src``, ``ref``) of the teacher's greedy translations of the sources a run
    of ``config`` sees (``steps x batch_size x grad_accum`` of the data's pairs, drawn by ``config.seed``, or all of
    them), made once and cached: ``$ALMAK_CACHE/teacher-targets/<key>.jsonl``, the key a hash of the teacher, the
    data, the draw and the prompt."""
    from almak.modeling.engines.generate import GenerationConfig, translate
    from almak.modeling.load import cache_dir
    from almak.modeling.text.prompts import Prompt

    sets = load_pairs(config.data, config.lang_pair)
    pairs = [(ts, i) for ts in sets for i in range(len(ts.sources))]
    n = min(len(pairs), config.steps * config.batch_size * config.grad_accum)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed)).tolist()[:n]
    chosen = [pairs[k] for k in order]
    key = hashlib.sha256(json.dumps([teacher.ref, config.data, config.lang_pair, config.seed, n, family,
                                     config.max_len], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "teacher-targets" / f"{key}.jsonl"
    if path.is_file():
        return path
    by_direction: dict[str, list] = {}
    for ts, i in chosen:
        by_direction.setdefault(ts.lang_pair, []).append((ts, i))
    records, done = [], 0
    gen = GenerationConfig(num_beams=1, max_new_tokens=config.max_len, batch_size=max(config.batch_size, 8))
    for pair, items in by_direction.items():
        ts = items[0][0]
        sources = [ts.sources[i] for _, i in items]

        def tick(k: int) -> None:
            nonlocal done
            done += k
            if progress:
                progress({"event": "targets", "done": done, "total": n})

        prompt = Prompt(family, ts.src, ts.tgt)
        hyps = translate(teacher.model, teacher.tokenizer, sources, prompt, gen, tick).hypotheses
        records += [{"langs": pair, "src": s, "ref": h} for s, h in zip(sources, hyps) if s.strip() and h.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def distill_model(student: nn.Module, teacher: nn.Module, tokenizer, prompt_family: str, config: DistillConfig,
            out_dir: str | Path, student_ref: str, teacher_ref: str, resume: bool = False,
            progress: Callable[[dict], None] | None = None, overwrite: bool = False) -> DistillResult:
    """Distill ``teacher`` into ``student`` (an almak quantize / prune checkpoint, loaded) on ``config.data`` and
    write the student to ``out_dir`` as a checkpoint of its own kind, its recipe extended by a ``distill`` entry.

    >>> s, t = load_model("runs/smollm-24"), load_model("smollm2-135m")                       # doctest: +SKIP
    >>> distill_model(s.model, t.model, t.tokenizer, "alma", DistillConfig(data="alma:de-en", steps=100),
    ...         "runs/smollm-24-kd", "runs/smollm-24", "smollm2-135m")                       # doctest: +SKIP
    """

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    source = Path(student_ref)
    base_recipe = read_recipe(source) if source.is_dir() else None
    state: dict = {}

    report = _sparsity_report(source, SPARSITY_REPORT_FILE)

    def prepare(model: nn.Module) -> nn.Module:
        state["student"] = prepare_student(model, report.get("pruned", ()))
        return model

    run = train(student, tokenizer, prompt_family, config, out_dir, prepare, kd_loss(teacher, config.alpha,
                config.temperature), resume=resume, progress=progress, overwrite=overwrite,
                base_ref=_base_ref(student, student_ref), optimizer=lambda m: _optimizer(m, state["student"], config),
                after_step=lambda m: reapply_masks(m, state["student"]))
    info = state["student"]
    finish_student(run.model, info)
    recipe = dict(base_recipe or {})
    recipe["distill"] = {"student": student_ref, "teacher": teacher_ref, "trains": info.kind,
                         "pruned_layers": len(info.masks), "quantized_layers": len(info.scales),
                         **run.recipe_fields}
    out = Path(out_dir)

    structure = _sparsity_report(source, STRUCTURE_REPORT_FILE)

    def fill(tmp: Path) -> None:  # tmp is an empty folder: the checkpoint writers replace it (overwrite)
        if info.scales:
            save_quantized(run.model, tokenizer, tmp, recipe, overwrite=True)
        elif info.full:
            save_float(run.model, tokenizer, tmp, recipe, overwrite=True,
                       extra_json={STRUCTURE_REPORT_FILE: structure} if structure else None)
        else:
            save_pruned(run.model, tokenizer, tmp, recipe, report, overwrite=True)
        shutil.copyfile(out / "train_log.jsonl", tmp / "train_log.jsonl")

    write_dir_atomic(out, fill)  # the run's workspace (checkpoint, log) gives way to the result in one rename
    return DistillResult(run.model, {**run.summary, "trains": info.kind})


def _optimizer(model: nn.Module, student: Student, config: DistillConfig):
    """AdamW with the kept weights at the pruned rate and the scales at the scales rate, no weight decay on
    scales (they are the weight's magnitude, not a free parameter), the finetune schedule."""

    if student.full:  # as almak finetune --full: decay on matrices only
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.rate("full"))
        return optimizer, schedule(optimizer, config)
    groups = []
    weights = [model.get_submodule(n).weight for n in student.masks]
    scales = [w.scale for w in student.scales.values()]
    if weights:
        groups.append({"params": weights, "weight_decay": config.weight_decay, "lr": config.rate("pruned")})
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "lr": config.rate("scales")})
    optimizer = torch.optim.AdamW(groups)
    return optimizer, schedule(optimizer, config)


def _sparsity_report(source: Path, name: str) -> dict:
    path = source / name
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {}

