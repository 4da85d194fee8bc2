"""``almak finetune``: LoRA or full supervised fine-tuning on parallel data."""

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
from almak.errors import AlmakError
from almak.modeling.devices import describe_memory
from almak.modeling.pipelines.finetune import FinetuneConfig
from almak.modeling.pipelines.finetune import finetune as run_finetune

# The CLI takes finetune's defaults from the library's config.
FINETUNE_DEFAULTS = FinetuneConfig()


@click.command()
@click.argument("model", required=False)
@click.option("--data", default=FINETUNE_DEFAULTS.data, show_default=True,
              help="Training pairs: alma (ALMA's human-written pairs, cs/de/is/ru/zh <-> en, both ways), "
                   "alma:de-en,en-de (chosen directions), or a file: ALMA JSON/JSONL named *.xx-yy.*, "
                   "course-project JSONL (langs/src/ref) or a .tsv of source<TAB>reference (needs --lang-pair).")
@click.option("--lang-pair", help="Direction of a .tsv --data file (or of a JSON file whose name holds none; "
                                  "picks one direction of a course-project file).")
@click.option("--valid", "valid", help="Validation pairs, written as --data [default: ALMA's bundled valid split of "
                                       "the training directions, where it has one (is-en has none)].")
@click.option("--valid-sentences", type=click.IntRange(min=0), default=FINETUNE_DEFAULTS.valid_sentences,
              show_default=True, help="Validation sentences in all, shared between the directions; 0: none.")
@click.option("--full", is_flag=True, help="Fine-tune every weight instead of LoRA adapters (AdamW keeps two more "
                                           "copies of the weights) and write a full model folder.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None,
              help=f"Rank of the LoRA adapters [default: {FINETUNE_DEFAULTS.lora_rank}].")
@click.option("--lora-alpha", type=Finite(0, 4096, min_open=True), default=None,
              help=f"LoRA scale: updates are multiplied by alpha / rank [default: {FINETUNE_DEFAULTS.lora_alpha:g}].")
@click.option("--lora-dropout", type=Finite(0, 1, max_open=True), default=None,
              help=f"Dropout on the adapters' input [default: {FINETUNE_DEFAULTS.lora_dropout}].")
@click.option("--steps", type=click.IntRange(min=1), default=FINETUNE_DEFAULTS.steps, show_default=True,
              help="Optimizer steps.")
@click.option("--lr", type=Finite(0, 1, min_open=True), default=None, help="Peak learning rate, after a linear warmup and before a linear "
                                                     "decay to 0 [default: 2e-4 for LoRA, 2e-5 with --full].")
@click.option("--batch-size", type=click.IntRange(min=1), default=FINETUNE_DEFAULTS.batch_size, show_default=True,
              help="Sequences per forward pass.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=FINETUNE_DEFAULTS.grad_accum, show_default=True,
              help="Forward passes per optimizer step (a step sees batch-size x grad-accum examples).")
@click.option("--max-len", type=click.IntRange(min=16), default=FINETUNE_DEFAULTS.max_len, show_default=True,
              help="Tokens per example, prompt and target; longer targets are cut.")
@training_speed_options
@click.option("--warmup", type=Finite(0, 1), default=FINETUNE_DEFAULTS.warmup, show_default=True,
              help="Fraction of the steps over which the learning rate rises linearly.")
@click.option("--eval-every", type=click.IntRange(min=0), default=FINETUNE_DEFAULTS.eval_every, show_default=True,
              help="Steps between validations (also before the first and after the last step); 0: only those.")
@click.option("--save-every", type=click.IntRange(min=0), default=FINETUNE_DEFAULTS.save_every, show_default=True,
              help="Steps between checkpoints in --out/checkpoint (for --resume); 0: none.")
@click.option("--seed", type=SEED, default=FINETUNE_DEFAULTS.seed, show_default=True,
              help="Seed of the example order, the adapters' initialisation and dropout.")
@click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
              help="Prompt family the examples are written in (alma ends answers with a newline, the others with "
                   "EOS); guessed from the model name when omitted. Translate with the same one.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...; auto: cuda if present.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="Weight dtype; auto is float32 on CPU and bfloat16 on a GPU that has it (LoRA adapters stay "
                   "float32).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Result folder: a LoRA adapter (peft format) or, with --full, a model folder; during the run it "
                   "holds the checkpoint and train_log.jsonl.")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out (same settings).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def finetune(model, data, lang_pair, valid, valid_sentences, full, lora_rank, lora_alpha, lora_dropout, steps, lr,
             batch_size, grad_accum, max_len, bf16, group_by_length, warmup, eval_every, save_every, seed,
             prompt_family, device, dtype, out_dir, resume, overwrite):
    """Fine-tune MODEL on human-written parallel data (ALMA's second stage), with LoRA or --full.

    The loss is on the reference's tokens only, after the prompt the model family expects. The result is a
    MODEL like any other: almak translate OUT, almak eval OUT (a LoRA adapter loads its base model and merges
    into it). MODEL: smollm2-135m (default), a Hugging Face folder, a .gguf file or a hub id.

    \b
    Examples:
      almak finetune --data alma:de-en,en-de --steps 200 --out smollm-ft
      almak finetune ~/models/ALMA-7B-Pretrain --data alma --steps 2000 --batch-size 16 --grad-accum 4 --out alma-ft
      almak finetune --data alma:de-en,en-de --steps 200 --out smollm-ft --resume   # after an interruption
    """
    if full and (lora_rank, lora_alpha, lora_dropout) != (None, None, None):
        raise AlmakError("--lora-rank, --lora-alpha and --lora-dropout configure LoRA; drop them with --full")
    d = FINETUNE_DEFAULTS
    config = FinetuneConfig(
        data=data, lang_pair=lang_pair, valid=valid, valid_sentences=valid_sentences, full=full,
        lora_rank=d.lora_rank if lora_rank is None else lora_rank,
        lora_alpha=d.lora_alpha if lora_alpha is None else lora_alpha,
        lora_dropout=d.lora_dropout if lora_dropout is None else lora_dropout,
        steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_len=max_len, bf16=bf16,
        group_by_length=group_by_length, warmup=warmup, eval_every=eval_every, save_every=save_every, seed=seed)
    with training_bar("finetune", config.steps) as events:
        result = run_finetune(model, config, out_dir, device=device, dtype=dtype, prompt=prompt_family,
                              resume=resume, overwrite=overwrite, progress=events)
    s = result.summary
    if full:
        method = "full (every weight)"
    else:
        method = (f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g}, dropout {config.lora_dropout} on "
                  + "/".join(m.removesuffix("_proj") for m in config.target_modules))
    per_step = config.batch_size * config.grad_accum
    print_table([
        ("model", result.base),
        ("method", f"{method}; prompt {result.prompt}"),
        ("data", f"{config.data}: {s['examples']} examples"),
        ("steps", f"{s['steps']} x {per_step} examples ({s['epochs']:g} epochs), lr {config.learning_rate:g}"),
        ("train loss first / last", f"{fmt(s['train_loss_first'], 4)} / {fmt(s['train_loss_last'], 4)}"),
        ("valid ppl before / after", f"{fmt(s['val_ppl_before'], 3)} / {fmt(s['val_ppl_after'], 3)}"
         + (f" ({s['val_sentences']} sentences)" if s["val_sentences"] else " (no validation set)")),
        ("trainable parameters", f"{s['trainable_parameters'] / 1e6:.2f}M of {s['parameters'] / 1e6:.1f}M "
                                 f"({s['trainable_parameters'] / s['parameters']:.2%})"),
        ("time", f"{s['seconds']:.1f} s"),
        ("peak memory", describe_memory(result.peak_memory)),
        ("written to", out_dir),
    ])
