"""``almak translate``: translate lines of text with a model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from almak.cli.common import generation_options, load_for_engine, model_options, progress_bar, quant_config
from almak.eval.evaluate import check_new_output
from almak.files import write_text_atomic
from almak.modeling.engines.generate import GenerationConfig
from almak.modeling.engines.generate import translate as run_translate
from almak.modeling.text.data import decode_text, read_lines, split_lines
from almak.modeling.text.languages import language_name
from almak.modeling.text.prompts import Prompt


@click.command()
@model_options
@click.option("--src", required=True,
              help="Source language: an ISO 639-1 or 639-3 code (de, yo, yor) or a FLORES-200 code (yor_Latn, "
                   "zho_Hant); every FLORES-200 language is known.")
@click.option("--tgt", required=True, help="Target language, coded as --src.")
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False), default="-",
              show_default=True, help="Source sentences, one per line ('-' is stdin).")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), default="-",
              show_default=True, help="Translations, one per input line ('-' is stdout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@generation_options
def translate(model, quant, group_size, device, dtype, prompt_family, src, tgt, input_path, output_path, overwrite,
              num_beams, max_new_tokens, batch_size, engine, tensor_parallel_size, cuda_graphs):
    """Translate lines from SRC to TGT with MODEL, one output line per input line.

    MODEL: smollm2-135m (the default), a Hugging Face folder, a .gguf file, or a hub id.

    Empty lines stay empty. The output file is written only when all lines are done.

    \b
    Example:
      echo "Die Ware hat unter 20 Euro gekostet." | almak translate --src de --tgt en
      almak translate LLaMAX/LLaMAX3-8B-Alpaca --src yor_Latn --tgt eng_Latn -i in.yo -o out.en
    """

    language_name(src), language_name(tgt)  # refuse unknown codes before anything is loaded
    if output_path != "-":
        check_new_output(Path(output_path), overwrite, inputs=(model, None if input_path == "-" else input_path))
    if input_path == "-":
        lines = split_lines(decode_text(sys.stdin.buffer.read(), "stdin"), "stdin")
    else:
        lines = read_lines(input_path, "input file")
    gen = GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           engine=engine, cuda_graphs=cuda_graphs)
    lm, family = load_for_engine(model, device, dtype, prompt_family, quant_config(quant, group_size), gen,
                                 tensor_parallel_size)
    click.echo(f"{lm.ref}: {getattr(lm.model, 'dtype', '')} ({lm.dtype_choice})".replace("torch.", ""), err=True)
    with progress_bar("translate", len(lines)) as bar:
        result = run_translate(lm.model, lm.tokenizer, lines, Prompt(family, src, tgt), gen, bar.update)
    text = "".join(h + "\n" for h in result.hypotheses)
    if output_path == "-":
        click.echo(text, nl=False)
    else:
        write_text_atomic(Path(output_path), text)
