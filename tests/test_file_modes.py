"""Files and folders almak writes end with the modes plain open() / mkdir() give under the current umask,
although each is written under a private temporary name first (mkstemp 0600, mkdtemp 0700, safetensors 0600)."""

import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from almak.cli.main import main
from almak.files import write_dir_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def assert_ordinary(path: Path, mask: int) -> None:
    """``path`` (and everything under it) has mode 0666 (files) / 0777 (folders) minus ``mask``."""
    paths = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    assert len(paths) > 0
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        got = stat.S_IMODE(p.lstat().st_mode)
        assert got == want, f"{p} is {oct(got)}, a plain {'mkdir' if p.is_dir() else 'open'} gives {oct(want)}"


def invoke(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output
    return result


def test_atomic_helpers(umask, tmp_path):
    from safetensors.torch import save_file

    write_text_atomic(tmp_path / "out.txt", "hello\n")
    assert_ordinary(tmp_path / "out.txt", umask)

    def fill(tmp: Path) -> None:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors writes 0600 on its own
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("{}")

    write_dir_atomic(tmp_path / "folder", fill)
    write_dir_atomic(tmp_path / "folder", fill)  # replacing an existing folder
    assert_ordinary(tmp_path / "folder", umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.txt"]  # no temporary left


def test_quantize_and_prune_checkpoints(umask, tiny_llama_dir, tmp_path):
    invoke("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu",
           "--out", tmp_path / "w4")
    assert_ordinary(tmp_path / "w4", umask)
    invoke("prune", tiny_llama_dir, "--method", "magnitude", "--pattern", "2:4", "--device", "cpu",
           "--out", tmp_path / "s24")
    assert_ordinary(tmp_path / "s24", umask)


def test_translation_eval_and_bench_outputs(umask, tiny_llama_dir, tmp_path):
    common = ["--device", "cpu", "--num-beams", "1", "--max-new-tokens", "4"]
    invoke("translate", tiny_llama_dir, "--src", "de", "--tgt", "en", *common, "-o", tmp_path / "out.en",
           input="Hallo Welt\n")
    assert_ordinary(tmp_path / "out.en", umask)
    invoke("eval", tiny_llama_dir, "--limit", "2", "--metrics", "bleu,nll", *common, "--out", tmp_path / "eval")
    assert_ordinary(tmp_path / "eval", umask)
    invoke("bench", tiny_llama_dir, "--batch-sizes", "1", "--prompt-len", "4", "--gen-len", "2", "--repeats", "1",
           "--device", "cpu", "--no-plot", "--out", tmp_path / "bench")
    assert_ordinary(tmp_path / "bench", umask)


def test_finetune_and_distill_outputs(umask, tiny_llama_dir, tsv, tmp_path):
    train = ["--data", tsv, "--lang-pair", "de-en", "--valid", tsv, "--valid-sentences", "2", "--steps", "2",
             "--batch-size", "2", "--grad-accum", "1", "--max-len", "64", "--device", "cpu", "--save-every", "1"]
    invoke("finetune", tiny_llama_dir, *train, "--out", tmp_path / "ft")
    assert_ordinary(tmp_path / "ft", umask)
    invoke("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu",
           "--out", tmp_path / "student")
    invoke("distill", tmp_path / "student", "--teacher", tiny_llama_dir, *train, "--out", tmp_path / "kd")
    assert_ordinary(tmp_path / "kd", umask)


def test_model_cache(umask, tiny_llama_dir, tmp_path, monkeypatch):
    # The embedded model's first use converts its GGUF into ALMAK_CACHE; a tiny model stands in for the slow
    # conversion, through the same write path.
    from transformers import AutoTokenizer, LlamaForCausalLM

    from almak.modeling import load

    monkeypatch.setenv("ALMAK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(load, "alias_gguf", lambda alias: tmp_path / "unused.gguf")
    monkeypatch.setattr(load, "_plain_model_from_gguf", lambda gguf: (
        LlamaForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)))
    folder = load.materialize_alias("smollm2-135m")
    assert folder.is_relative_to(tmp_path / "cache") and (folder / "config.json").is_file()
    assert_ordinary(folder, umask)
