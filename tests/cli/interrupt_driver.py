"""Runs the almak CLI and sends itself a signal at a chosen point (for tests/cli/test_bad_input.py).

    python interrupt_driver.py POINT SIGNAL almak-args...

POINT: ``load`` (as the model starts loading), ``translate`` (as translating starts), ``calibrate`` (as the
layer-by-layer pass starts), ``write`` (the output's temporary folder has just been made, empty), ``publish``
(the temporary file or folder is complete, not yet renamed into place). The hooks go in before the CLI is imported,
so the names the CLI imports are the hooked ones.
"""
import os
import signal
import sys


def hook(module, name, after=False):
    original = getattr(module, name)

    def fire(*args, **kwargs):
        if after:
            result = original(*args, **kwargs)
            os.kill(os.getpid(), SIGNAL)
            return result
        os.kill(os.getpid(), SIGNAL)
        return original(*args, **kwargs)

    setattr(module, name, fire)


POINT, SIGNAL = sys.argv[1], getattr(signal, sys.argv[2])
# Ctrl-C as a terminal delivers it: a shell without job control (CI's, running this suite in the background) starts
# its background jobs with SIGINT ignored, and Python then leaves it ignored instead of raising KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("TRITON_INTERPRET", "1")
import almak.files as files  # noqa: E402

if POINT == "load":
    import almak.modeling.load as load

    hook(load, "load_model")
elif POINT == "translate":
    import almak.modeling.engines.generate as generate

    hook(generate, "translate")
elif POINT == "calibrate":
    import almak.modeling.pipelines.calibrate as calibrate

    hook(calibrate, "run_layerwise")
elif POINT == "write":
    hook(files, "temp_dir_beside", after=True)
elif POINT == "publish":
    hook(files, "publish_dir")
    hook(files, "ordinary_modes")  # write_text_atomic's last step before its rename
else:
    raise SystemExit(f"unknown point {POINT}")

from almak.cli.main import main  # noqa: E402

main(sys.argv[3:], prog_name="almak")
