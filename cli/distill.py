"""``almak distill``: recover a pruned, quantized or smaller student from its float teacher."""

from __future__ import annotations

import click

from almak.cli.common import (
    SEED,
    Finite,
    fmt,
    print_table,
    training_bar,
    training_speed_options,
)
from almak.modeling.devices import describe_memory
from almak.modeling.pipelines.distill import PRUNED_LR, SCALES_LR, STUDENT_LR, DistillConfig
from almak.modeling.pipelines.distill import distill as run_distill

DISTILL_DEFAULTS = DistillConfig(steps=200)


@click.command()
@click.argument("student")
@click.option("--teacher", required=True, help="The float model the student was made from, or any model with the "
                                               "student's tokenizer (a model reference: smollm2-135m-mt, a folder, "
                                               "a hub id).")
@click.option("--data", default=DISTILL_DEFAULTS.data, show_default=True,
              help="Training pairs, as almak finetune --data takes them (alma, alma:de-en,en-de, or a file).")
@click.option("--lang-pair", help="Direction of a .tsv --data file (as almak finetune).")
@click.option("--valid", "valid", help="Validation pairs, written as --data [default: ALMA's bundled valid split of "
                                       "the training directions].")
@click.option("--valid-sentences", type=click.IntRange(min=0), default=DISTILL_DEFAULTS.valid_sentences,
              show_default=True, help="Validation sentences in all, shared between the directions; 0: none.")
@click.option("--alpha", type=Finite(0, 1), default=DISTILL_DEFAULTS.alpha, show_default=True,
              help="Weight of the KD term (KL to the teacher at --temperature); 1 - alpha weighs the references' "
                   "cross-entropy.")
@click.option("--temperature", type=Finite(0, 100, min_open=True), default=DISTILL_DEFAULTS.temperature,
              show_default=True, help="Softmax temperature of both distributions in the KD term (scaled by T^2).")
@click.option("--steps", type=click.IntRange(min=1), default=DISTILL_DEFAULTS.steps, show_default=True,
              help="Optimizer steps.")
@click.option("--lr", type=Finite(0, 1, min_open=True), default=None,
              help=f"Peak learning rate of everything that trains [default: {PRUNED_LR:g} for the kept weights of "
                   f"pruned layers, {SCALES_LR:g} for the scales of quantized ones, {STUDENT_LR:g} for every weight "
                   "of a float student].")
@click.option("--targets", type=click.Choice(["reference", "teacher"]), default=DISTILL_DEFAULTS.targets,
              show_default=True,
              help="What the student learns to write: reference: the data's human translations (KD on each of "
                   "their tokens); teacher: the teacher's own greedy translations of the same sources "
                   "(sequence-level KD, Kim and Rush 2016), made before training (for the steps x batch-size x "
                   "grad-accum examples the run sees) and cached for later runs with the same teacher and data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DISTILL_DEFAULTS.batch_size, show_default=True,
              help="Sequences per forward pass (the teacher runs on the same batch).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=DISTILL_DEFAULTS.grad_accum, show_default=True,
              help="Forward passes per optimizer step.")
@click.option("--max-len", type=click.IntRange(min=16), default=DISTILL_DEFAULTS.max_len, show_default=True,
              help="Tokens per example, prompt and target; longer targets are cut.")
@training_speed_options
@click.option("--warmup", type=Finite(0, 1), default=DISTILL_DEFAULTS.warmup, show_default=True,
              help="Fraction of the steps over which the learning rate rises linearly.")
@click.option("--eval-every", type=click.IntRange(min=0), default=DISTILL_DEFAULTS.eval_every, show_default=True,
              help="Steps between validations (also before the first and after the last step); 0: only those.")
@click.option("--save-every", type=click.IntRange(min=0), default=DISTILL_DEFAULTS.save_every, show_default=True,
              help="Steps between checkpoints in --out/checkpoint (for --resume); 0: none.")
@click.option("--seed", type=SEED, default=DISTILL_DEFAULTS.seed, show_default=True, help="Seed of the example order.")
@click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
              help="Prompt family of the examples; guessed from the teacher's name when omitted.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...; auto: cuda if present.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]),
              help="Dtype of both models; auto is float32 on CPU and bfloat16 on a GPU that has it.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Result: a checkpoint of the student's kind (quantized or pruned); during the run it holds the "
                   "checkpoint and train_log.jsonl.")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out (same settings).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def distill(student, teacher, data, lang_pair, valid, valid_sentences, alpha, temperature, steps, lr, targets,
            batch_size, grad_accum, max_len, bf16, group_by_length, warmup, eval_every, save_every, seed, prompt_family,
            device, dtype, out_dir, resume, overwrite):
    """Recover a pruned, quantized or smaller STUDENT by distilling its float --teacher on parallel data.

    The loss on each target token mixes the KL divergence to the teacher's next-token distribution (at
    --temperature) with cross-entropy on the target. A smaller student (almak prune --method structured, or any
    causal LM with the teacher's tokenizer, whatever its shape) trains every weight. An almak prune or almak
    quantize checkpoint keeps its structure: pruned layers train their kept weights only (2:4 stays 2:4), quantized
    layers keep their integer codes and train their scales; embeddings, norms and lm_head stay frozen. The
    result is a checkpoint of the same kind: almak eval / translate / bench take it, and transformers
    loads it as it loads the student.

    \b
    Examples:
      almak distill runs/smollm-24 --teacher smollm2-135m --data alma:de-en --steps 90 --batch-size 8 \\
          --grad-accum 1 --out runs/smollm-24-kd
      almak distill runs/smollm-w4g64 --teacher smollm2-135m --data alma:de-en,en-de --out runs/smollm-w4-kd
      almak distill smollm-small --teacher smollm2-135m-mt --data alma:de-en,en-de --steps 400 --out smollm-small-kd
    """
    config = DistillConfig(data=data, lang_pair=lang_pair, valid=valid, valid_sentences=valid_sentences, alpha=alpha,
                           temperature=temperature, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                           max_len=max_len, bf16=bf16, group_by_length=group_by_length, warmup=warmup,
                           eval_every=eval_every, save_every=save_every, seed=seed, targets=targets)
    with training_bar("distill", config.steps) as events:
        result = run_distill(student, teacher, config, out_dir, device=device, dtype=dtype, prompt=prompt_family,
                             resume=resume, overwrite=overwrite, progress=events)
    r = result.summary
    per_step = config.batch_size * config.grad_accum
    print_table([
        ("student / teacher", f"{student} / {result.teacher}"),
        ("trains", f"{r['trains']}; KD alpha {config.alpha:g} at T={config.temperature:g}, prompt {result.prompt}"),
        ("data", f"{config.data}: {r['examples']} examples"),
        ("steps", f"{r['steps']} x {per_step} examples ({r['epochs']:g} epochs)"),
        ("train loss first / last", f"{fmt(r['train_loss_first'], 4)} / {fmt(r['train_loss_last'], 4)}"),
        ("valid ppl before / after", f"{fmt(r['val_ppl_before'], 3)} / {fmt(r['val_ppl_after'], 3)}"
         + (f" ({r['val_sentences']} sentences)" if r["val_sentences"] else " (no validation set)")),
        ("trainable parameters", f"{r['trainable_parameters'] / 1e6:.2f}M of {r['parameters'] / 1e6:.1f}M"),
        ("time", f"{r['seconds']:.1f} s"),
        ("peak memory", describe_memory(result.peak_memory)),
        ("written to", out_dir),
    ])
