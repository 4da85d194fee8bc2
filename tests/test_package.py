"""The package as a whole: its layers (import-linter contracts), and almak where Triton is not installed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_triton(tmp_path_factory) -> dict:
    """An environment in which ``import triton`` fails, as on a machine without it."""
    shadow = tmp_path_factory.mktemp("no-triton")
    (shadow / "triton").mkdir()
    (shadow / "triton" / "__init__.py").write_text('raise ImportError("no triton on this machine (test)")\n')
    env = dict(os.environ, PYTHONPATH=str(shadow), TRITON_INTERPRET="0")
    return env


def run(args, env=None, cwd=None, input=None):
    """Python with ``args``; ``-P`` keeps the working directory off sys.path (see tests/test_sys_path.py)."""
    return subprocess.run([sys.executable, "-P", *args], env=env, cwd=cwd, input=input, capture_output=True,
                          text=True, timeout=600)


def test_layer_contracts_hold():
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert lint, "import-linter is not installed (pip install -e '.[dev]')"
    proc = subprocess.run([lint, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_kernels_without_triton(no_triton):
    code = """
import torch
import almak.kernels as k
assert not k.HAVE_TRITON
W = torch.randn(64, 128)
q = torch.randint(0, 16, (64, 128))
y = k.w4a16_matmul(torch.randn(2, 128), k.pack_int4(q), torch.ones(64, 1), torch.full((64, 1), 8.0), -1)
assert y.shape == (2, 64)
try:
    k.w4a16_matmul(torch.randn(2, 128), k.pack_int4(q), torch.ones(64, 1), torch.full((64, 1), 8.0), -1, path="decode")
except k.TritonMissing as e:
    print("refused:", e)
"""
    proc = run(["-c", code], env=no_triton)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: w4a16_matmul: path='decode': almak's GPU kernels need Triton" in proc.stdout


def test_cli_on_the_cpu_without_triton(no_triton, tiny_llama_dir, tmp_path):
    # int8 at load time: QuantLinear layers, which import the kernels, run their CPU path.
    out = tmp_path / "out.txt"
    proc = run(["-m", "almak.cli.main", "translate", str(tiny_llama_dir), "--quant", "int8", "--src", "de", "--tgt",
                "en", "--device", "cpu", "--num-beams", "1", "--max-new-tokens", "4", "-o", str(out)],
               env=no_triton, input="Hallo Welt\nGuten Morgen\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 2


def test_transformers_imports_from_the_repository_root_without_triton(no_triton):
    # Started as the suite starts Python, from the root, transformers finds Hugging Face's `kernels` package (a
    # dependency of transformers >= 5.25) or none, never almak's kernels/ folder, and needs no Triton.
    code = ("import importlib.util, sys\n"
            "from transformers import LlamaForCausalLM\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else None)\n")
    proc = run(["-c", code], env=no_triton, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stdout.strip().startswith(str(ROOT / "kernels")), proc.stdout
