"""The ``almak`` command line: thin click commands that build a config and call one library function.

One module per command (``almak prune`` is :mod:`almak.cli.prune`), their shared options and printing in
:mod:`almak.cli.common`; this module is the group that gathers them and turns bad input into one line.
"""
from __future__ import annotations

import logging
import sys

import click

from almak.cli.bench import bench
from almak.cli.distill import distill
from almak.cli.eval import eval_cmd
from almak.cli.finetune import finetune
from almak.cli.prune import prune
from almak.cli.quantize import quantize
from almak.cli.score import score
from almak.cli.translate import translate
from almak.errors import AlmakError
from almak.kernels import TritonMissing


class OneLineUsageError(click.UsageError):
    """click's usage error (exit code 2) printed as one line that names the problem and where help is, instead
    of the usage block, a hint and the error on three."""

    def show(self, file=None) -> None:
        where = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{where}", file=file or sys.stderr)


class AlmakGroup(click.Group):
    """Turns AlmakError (bad input) and a missing Triton into a one-line error and exit code 1, and a bad option
    into a one-line usage error and exit code 2; never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (AlmakError, TritonMissing) as e:
            raise click.ClickException(str(e)) from None
        except click.UsageError as e:
            if isinstance(e, OneLineUsageError):
                raise
            raise OneLineUsageError(e.format_message(), e.ctx) from None
        except KeyboardInterrupt:
            raise click.Abort() from None


@click.group(cls=AlmakGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="almak")
@click.option("-v", "--verbose", is_flag=True, help="Log what almak does (loading, conversions).")
def main(verbose: bool):
    """almak: compress translation LLMs (ALMA, LLaMAX, Tower) and run them on Triton kernels.

    Every command that takes a MODEL defaults to the embedded smollm2-135m.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:  # COMET's pytorch-lightning logs tips and device banners at INFO
        for name in ("lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


for command in (translate, eval_cmd, score, quantize, prune, bench, finetune, distill):
    main.add_command(command)


if __name__ == "__main__":
    main()
