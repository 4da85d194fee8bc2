"""``almak translate``: translate lines of text with a model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from almak.cli.common import generation_options, model_options, quant_config, stage_bars
from almak.files import check_new_output, write_text_atomic
from almak.modeling.engines.engine import EngineConfig
from almak.modeling.engines.generate import GenerationConfig
from almak.modeling.engines.translate import translate as run_translate
from almak.modeling.text.data import decode_text, read_lines, split_lines
from almak.modeling.text.languages import language_name


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

    language_name(src), language_name(tgt)  # refuse unknown codes before anything is read
    if output_path != "-":
        check_new_output(Path(output_path), overwrite, inputs=(model, None if input_path == "-" else input_path))
    if input_path == "-":
        lines = split_lines(decode_text(sys.stdin.buffer.read(), "stdin"), "stdin")
    else:
        lines = read_lines(input_path, "input file")
    gen = GenerationConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           engine=engine, cuda_graphs=cuda_graphs)
    engine_config = EngineConfig(name=engine, device=device, dtype=dtype, quant=quant_config(quant, group_size),
                                 prompt=prompt_family, tensor_parallel_size=tensor_parallel_size,
                                 cuda_graphs=cuda_graphs)
    with stage_bars() as progress:
        result = run_translate(model, lines, src, tgt, gen, engine_config, progress,
                               on_loaded=lambda r: report_load(r, engine_config))
    text = "".join(h + "\n" for h in result.hypotheses)
    if output_path == "-":
        click.echo(text, nl=False)
    else:
        write_text_atomic(Path(output_path), text)


def report_load(result, engine_config) -> None:
    """What was loaded, on stderr, before the translations start."""
    if result.quantized:
        kept = result.quantized["skipped"]
        click.echo(f"quantized {len(result.quantized['quantized'])} linears to {engine_config.quant.describe()}"
                   + (f"; kept {', '.join(kept)}" if kept else ""), err=True)
    click.echo(f"{result.model}: {result.dtype} ({result.dtype_choice})", err=True)
