"""Bad input, systematically (issue 18): every row drives the CLI and must end with a non-zero exit code, one
``Error:`` line on stderr that names the problem (pinned here), no traceback, and nothing at the output path nor
a temporary file or folder beside it.

Rows: broken model folders, bad data, every numeric option at 0, negative, non-finite and absurd values, outputs
that would replace an input or cannot be written, and SIGINT / SIGKILL at several points of ``quantize``,
``prune`` and ``translate -o``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from almak.cli.main import main

FAST = ["--num-beams", "1", "--max-new-tokens", "4", "--device", "cpu"]
RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu"]
NO_MODEL = "./no-such-model"


def run(args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def stderr_lines(text: str) -> list[str]:
    """Non-blank stderr lines, progress bars' carriage-return redraws split apart."""
    return [seg.strip() for line in text.split("\n") for seg in line.split("\r") if seg.strip()]


def leftovers(out: Path) -> list[str]:
    """Entries beside ``out`` that a write of it made: itself, or a temporary ``.name.*``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def assert_refused(result, fragment: str, early: bool = True, out: Path | None = None, code: int | None = None):
    """Non-zero exit, no exception escaped (the CLI would print its traceback), exactly one ``Error:`` line, which
    holds ``fragment`` and comes last; ``early``: nothing else on stderr (refused before any work)."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = stderr_lines(result.stderr)
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], lines
    assert lines[-1] == errors[0], lines
    if early:
        assert lines == errors, lines
    if out is not None:
        assert leftovers(out) == [], leftovers(out)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- model folders

@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_llama_dir):
    """Copies of the tiny LLaMA folder, each broken one way, and an almak int4 checkpoint of it with its
    config.json made to disagree with its tensors."""
    import torch
    from safetensors import safe_open

    root = tmp_path_factory.mktemp("broken")

    def variant(name: str) -> Path:
        d = root / name
        shutil.copytree(tiny_llama_dir, d)
        return d

    def edit_config(d: Path, change) -> None:
        config = json.loads((d / "config.json").read_text())
        change(config)
        (d / "config.json").write_text(json.dumps(config))

    (root / "empty").mkdir()
    (root / "config_only").mkdir()
    shutil.copy(tiny_llama_dir / "config.json", root / "config_only")
    (variant("corrupt") / "model.safetensors").write_bytes(os.urandom(4096))
    d = variant("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    d = variant("missing_shard")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    with safe_open(str(d / "model-00001-of-00002.safetensors"), "pt") as f:
        keys = list(f.keys())
    weight_map = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    d = variant("no_tokenizer")
    for f in list(d.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            f.unlink()
    edit_config(variant("unknown_type"), lambda c: c.update(model_type="frobnicator"))
    (variant("bad_json") / "config.json").write_text('{"model_type": "llama",')
    d = variant("bin_only")
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    edit_config(variant("gpt2_type"), lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    d = variant("mistral_window")  # a model_type transformers knows, which almak's own loop does not run
    edit_config(d, lambda c: c.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16))

    q = root / "int4"
    result = run(["quantize", tiny_llama_dir, *RTN, "--out", q])
    assert result.exit_code == 0, result.output
    for name, change in [("q_bits", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                          .update(num_bits=8)),
                         ("q_group", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
                          .update(group_size=96)),
                         ("q_shape", lambda c: c.update(intermediate_size=512))]:
        shutil.copytree(q, root / name)
        edit_config(root / name, change)
    return root


FOLDERS = [
    ("empty", "is a folder without config.json, not a Hugging Face model folder"),
    ("config_only", "holds no model weights (*.safetensors)"),
    ("corrupt", "model.safetensors is not a readable safetensors file (Error while deserializing header: header too "
                "large): the download is incomplete or the file is corrupt"),
    ("truncated", "model.safetensors is not a readable safetensors file"),
    ("missing_shard", "its shard index names model-00002-of-00002.safetensors, which is not in the folder"),
    ("no_tokenizer", "holds no tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model)"),
    ("unknown_type", "model_type 'frobnicator' is not a model transformers"),
    ("bad_json", "config.json is not valid JSON"),
    ("bin_only", "holds only pickle weights (pytorch_model.bin); almak loads safetensors only, since unpickling "
                 "can run code"),
    ("q_bits", "do not fit int8"),
    ("q_group", "model.layers.0.mlp.down_proj: group size 96 does not divide in_features=256"),
    ("q_shape", "model.layers.0.mlp.down_proj.weight_shape is [96, 256], the model's layer is [96, 512]"),
]


@pytest.mark.parametrize("name, message", FOLDERS)
def test_broken_model_folder_translate(broken, tmp_path, name, message):
    src = tmp_path / "in.txt"
    src.write_text("Hallo Welt\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert_refused(run(["translate", broken / name, "--src", "de", "--tgt", "en", *FAST, "-i", src, "-o", out]),
                   message, out=out)


@pytest.mark.parametrize("name, message", [row for row in FOLDERS if not row[0].startswith("q_")])
def test_broken_model_folder_quantize(broken, tmp_path, name, message):
    out = tmp_path / "q"
    assert_refused(run(["quantize", broken / name, *RTN, "--out", out]), message, out=out)


def test_model_type_almak_does_not_run_is_refused_before_loading(broken):
    assert_refused(run(["translate", broken / "gpt2_type", "--src", "de", "--tgt", "en", *FAST], input="Hallo\n"),
                   "almak's generation loop runs LLaMA-family models (llama, mistral), not 'gpt2'; use --engine hf")
    assert_refused(run(["translate", broken / "mistral_window", "--src", "de", "--tgt", "en", *FAST], input="Hallo\n"),
                   "this model uses sliding-window attention (window 16)", early=False)
    result = run(["translate", broken / "bin_only", "--src", "de", "--tgt", "en", *FAST, "--engine", "hf"],
                 input="Hallo\n")
    assert_refused(result, "holds only pickle weights")  # no engine reads pickles


# ------------------------------------------------------------------------------------------------------- data

def write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n \n\n", "holds only empty lines"),
    (b"Hallo\n\xff\xfeWelt\n", "is not UTF-8 text: line 2 has the byte 0xff"),
])
def test_translate_bad_input_file(tiny_llama_dir, tmp_path, content, message):
    src = write(tmp_path / "in.txt", content)
    out = tmp_path / "out.txt"
    assert_refused(run(["translate", tiny_llama_dir, "--src", "de", "--tgt", "en", *FAST, "-i", src, "-o", out]),
                   message, out=out)


@pytest.mark.parametrize("content, message", [
    (b"", "stdin is empty"), (b"\n\n", "stdin holds only empty lines"), (b"ok\n\xc3\x28\n", "stdin is not UTF-8")])
def test_translate_bad_stdin(tiny_llama_dir, content, message):
    assert_refused(run(["translate", tiny_llama_dir, "--src", "de", "--tgt", "en", *FAST], input=content), message)


def test_line_longer_than_the_context(tiny_llama_dir, tmp_path):
    src = write(tmp_path / "in.txt", "Hallo.\n" + "Wort " * 2000 + "\n")
    out = tmp_path / "out.txt"
    result = run(["translate", tiny_llama_dir, "--src", "de", "--tgt", "en", *FAST, "-i", src, "-o", out])
    assert_refused(result, "line 2: its prompt is", early=False, out=out)
    assert "past the model's context of 512 positions (max_position_embeddings)" in result.stderr
    tsv = write(tmp_path / "long.tsv", "Hallo\tHello\n" + "Wort " * 2000 + "\tword\n")
    assert_refused(run(["eval", tiny_llama_dir, "--testset", tsv, "--lang-pair", "de-en", "--metrics", "nll",
                        "--device", "cpu"]), "pair 2: its prompt and reference are", early=False)


@pytest.mark.parametrize("name, content, extra, message", [
    ("t.tsv", "a\tb\nno tab here\n", ["--lang-pair", "de-en"], "line 2 does not have exactly two tab-separated fields"),
    ("t.tsv", b"a\tb\n\xff\tc\n", ["--lang-pair", "de-en"], "is not UTF-8 text: line 2"),
    ("test.de-en.jsonl", '{"translation": {"de": "a", "en": "b"}}\n{"translation": \n', [], "line 2 is not JSON"),
    ("test.de-en.json", '[{"translation": {"de": "a", "en": "b"}}', [], "is not valid JSON"),
    ("test.de-en.jsonl", '["not", "an", "object"]\n', [], "record 1 is not a JSON object"),
    ("test.de-en.jsonl", '{"translation": {"de": "a", "en": "b"}}\n', ["--lang-pair", "cs-en"],
     "a record has no 'cs' field"),
    ("course.jsonl", '{"langs": "en-de", "src": "a", "ref": "b"}\n', ["--lang-pair", "de-en"],
     "holds no de-en records (it has en-de)"),
    ("t.tsv", "", ["--lang-pair", "de-en"], "is empty"),
    ("t.tsv", "\n\n", ["--lang-pair", "de-en"], "holds only empty lines"),
])
def test_eval_bad_test_sets(tmp_path, name, content, extra, message):
    testset = write(tmp_path / name, content)
    out = tmp_path / "run"
    assert_refused(run(["eval", NO_MODEL, "--testset", testset, *extra, "--out", out]), message, out=out)


@pytest.fixture
def base_report(tmp_path) -> Path:
    """An ``almak eval --out`` folder of wmt22:de-en,wmt22:en-de at --limit 3 --metrics nll."""
    directions = {pair: {"testset": f"wmt22:{pair}", "lang_pair": pair, "n": 3, "nll": 2.0, "ppl": 7.39}
                  for pair in ("de-en", "en-de")}
    folder = tmp_path / "base"
    folder.mkdir()
    write(folder / "report.json", json.dumps({"model": "m", "directions": directions}))
    return folder


@pytest.mark.parametrize("testset, extra, message", [
    ("wmt22:de-en,wmt22:xx-en", [], "no bundled WMT22 set 'xx-en'"),
    ("wmt22:de-en,{tmp}/missing.tsv", [], "is neither a bundled set (wmt22:de-en, ...) nor an existing file"),
    ("wmt22:all,wmt22:en-zh", [], "--testset names the direction en-zh twice (wmt22:en-zh and wmt22:en-zh); a run "
                                  "evaluates each direction once"),
    ("wmt22:de-en,", [], "--testset 'wmt22:de-en,' has an empty item"),
    ("wmt22:de-en,wmt22:en-de", ["--limit", "3", "--metrics", "nll", "--baseline", "{base}"],
     f"unknown model '{NO_MODEL}'"),  # a baseline that matches: refused no earlier than the model
    ("wmt22:de-en", ["--limit", "3", "--metrics", "nll", "--baseline", "{base}"],
     "the baseline '{base}' covers de-en, en-de, this run de-en: evaluate both with the same --testset"),
    ("wmt22:de-en,wmt22:en-de", ["--limit", "2", "--metrics", "nll", "--baseline", "{base}/report.json"],
     "has 3 sentences of de-en, this run 2: evaluate both with the same --limit"),
    ("wmt22:en-de,wmt22:de-en", ["--limit", "3", "--baseline", "{base}"],
     "has the metrics nll for en-de, this run bleu,chrf,nll: evaluate both with the same --metrics"),
    ("wmt22:de-en", ["--baseline", "{tmp}/none.json"], "baseline report '{tmp}/none.json' does not exist"),
    ("wmt22:de-en", ["--baseline", "{tmp}/base/../t.tsv.json"], "is not JSON"),
    ("wmt22:de-en", ["--engine", "vllm", "--baseline", NO_MODEL],
     "--baseline with a model runs two models in one process, which --engine vllm does not"),
])
def test_eval_bad_testset_lists_and_baselines(tmp_path, base_report, testset, extra, message):
    write(tmp_path / "t.tsv.json", "not json")
    fill = {"tmp": tmp_path, "base": base_report}
    out = tmp_path / "run"
    args = ["eval", NO_MODEL, "--testset", testset.format(**fill), *[a.format(**fill) for a in extra], "--out", out]
    assert_refused(run(args), message.format(**fill), out=out)


def test_score_mismatched_line_counts(tmp_path):
    a, b = write(tmp_path / "a", "x\ny\n"), write(tmp_path / "b", "x\n")
    assert_refused(run(["score", "--src", a, "--hyp", a, "--ref", b, "--lang-pair", "de-en"]),
                   "line counts differ: 2 sources, 2 hypotheses, 1 references")


# ---------------------------------------------------------------------------------------------------- options

BASE = {  # what each command needs besides the option under test; the model does not exist, so an option that
    # passes validation meets "unknown model" (before any work), and one that does not is refused first
    "translate": [NO_MODEL, "--src", "de", "--tgt", "en"],
    "eval": [NO_MODEL],
    "quantize": [NO_MODEL, "--out", "{tmp}/out"],
    "prune": [NO_MODEL, "--out", "{tmp}/out"],
    "bench": [NO_MODEL],
    "finetune": [NO_MODEL, "--out", "{tmp}/out"],
    "distill": [NO_MODEL, "--teacher", NO_MODEL, "--out", "{tmp}/out"],
}
ABSURD = "1000000000000"
# Values that are not bad input: 0 turns a periodic action off or is a seed; an absurdly large count is only long
# or is checked against the model, the data or the memory once they are known (the rows below the table).
VALID = {("--seed", "0"), ("--valid-sentences", "0"), ("--eval-every", "0"), ("--save-every", "0"),
         ("--alpha", "0"), ("--lora-dropout", "0"), ("--warmup", "0")}
VALID |= {(name, ABSURD) for name in ("--limit", "--steps", "--repeats", "--nsamples", "--seqlen", "--max-len",
                                      "--eval-every", "--save-every", "--valid-sentences", "--batch-size",
                                      "--max-new-tokens", "--num-beams", "--prompt-len", "--gen-len", "--layers",
                                      "--grad-accum", "--lora-rank", "--heads", "--kv-heads", "--mlp", "--hidden")}


def numeric_rows():
    rows = []
    for command, base in BASE.items():
        for param in main.commands[command].params:
            if not isinstance(param, click.Option) or param.is_flag or isinstance(param.type, click.Choice):
                continue
            kind = param.type.name
            if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
                values = ["0", "-1", "nan", "inf", "1e30"]
            elif isinstance(param.type, (click.types.IntParamType, click.IntRange)):
                values = ["0", "-1", ABSURD]
            elif param.name == "batch_sizes":
                values = ["0", "-1", "1,0", "x"]
            else:
                continue
            rows += [(command, param.opts[0], v) for v in values]
            assert kind
    return rows


ROWS = numeric_rows()


def test_the_option_table_covers_every_numeric_option():
    names = {(c, o) for c, o, _ in ROWS}
    assert ("quantize", "--damp") in names and ("finetune", "--lr") in names and ("bench", "--batch-sizes") in names
    assert len(names) >= 45


# The first refusal after the options for a value that passes them (the model, or what the option needs).
PASSED = {("bench", "--layers"): "--layers goes with --shape",
          "--tensor-parallel-size": "--tensor-parallel-size goes with --engine vllm"}
PASSED |= {("prune", o): f"{o} go with --method structured" for o in ("--layers", "--heads", "--kv-heads", "--mlp",
                                                                      "--hidden")}


@pytest.mark.parametrize("command, option, value", ROWS)
def test_numeric_option(tmp_path, command, option, value):
    args = [a.format(tmp=tmp_path) for a in BASE[command]] + [option, value]
    result = run([command, *args], input="Hallo\n")
    if (option, value) in VALID or (option == "--tensor-parallel-size" and value == ABSURD):
        assert_refused(result, PASSED.get((command, option)) or PASSED.get(option) or f"unknown model '{NO_MODEL}'")
    elif option == "--batch-sizes":
        assert_refused(result, "--batch-sizes takes comma-separated integers" if value == "x"
                       else "batch sizes must be positive integers")
    else:  # refused as a bad option value, naming the option
        assert_refused(result, f"Invalid value for '{option}'", code=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["translate", "--src", "de", "--tgt", "en", "--max-new-tokens", ABSURD],
     f"--max-new-tokens adds {ABSURD}, past the model's context of 512 positions"),
    (["translate", "--src", "de", "--tgt", "en", "--num-beams", ABSURD], f"--num-beams {ABSURD} is more than the model's"),
    (["translate", "--src", "de", "--tgt", "en", "--num-beams", "40000", "--batch-size", "100000"],
     "GiB are free on cpu: lower --batch-size, --num-beams or --max-new-tokens"),
    (["bench", "--prompt-len", ABSURD, "--batch-sizes", "1"], f"--prompt-len {ABSURD} and --gen-len 128 need"),
    (["bench", "--batch-sizes", ABSURD, "--prompt-len", "8", "--gen-len", "8"],
     "GiB are free on cpu: lower --batch-sizes, --prompt-len or --gen-len"),
    (["quantize", *RTN[:-2], "--method", "gptq", "--nsamples", ABSURD, "--out", "{tmp}/out"],
     f"--nsamples {ABSURD} is more than the 5000 pairs of the calibration set 'alma'"),
    (["prune", "--method", "structured", "--heads", ABSURD, "--out", "{tmp}/out"],
     f"--heads {ABSURD}: the model has 6; give 1 to 6"),
    (["prune", "--method", "structured", "--mlp", ABSURD, "--out", "{tmp}/out"],
     f"--mlp {ABSURD}: the model has 256; give 1 to 256"),
])
def test_absurd_values_checked_against_the_model(tiny_llama_dir, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = run([args[0], tiny_llama_dir, *args[1:], "--device", "cpu"], input="Hallo\nWelt\n" * 50)
    assert_refused(result, message, early=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- outputs

def test_out_naming_the_input_folder(tiny_llama_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    before = digest(model)
    assert_refused(run(["quantize", model, *RTN, "--out", model]), "exists; pass --overwrite to replace it")
    assert_refused(run(["quantize", model, *RTN, "--out", model, "--overwrite"]),
                   f"'{model}' is the input '{model}'; writing there would replace it")
    assert_refused(run(["prune", model, "--method", "magnitude", "--out", tmp_path, "--overwrite"]),
                   f"'{tmp_path}' is a folder holding the input")
    assert digest(model) == before


def test_translate_output_naming_its_input(tiny_llama_dir, tmp_path):
    src = write(tmp_path / "in.txt", "Hallo\n")
    assert_refused(run(["translate", tiny_llama_dir, "--src", "de", "--tgt", "en", *FAST, "-i", src, "-o", src,
                        "--overwrite"]), "is the input")
    assert src.read_text(encoding="utf-8") == "Hallo\n"


def test_output_folder_missing(tiny_llama_dir, tmp_path):
    out = tmp_path / "no" / "such" / "q"
    assert_refused(run(["quantize", tiny_llama_dir, *RTN, "--out", out]), "the folder of", out=None)
    assert not (tmp_path / "no").exists()
    assert_refused(run(["eval", "--testset", "wmt22:de-en", "--out", out]), "does not exist")


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written in: mode 0555, and for root (whom modes do not stop) immutable."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder]).returncode != 0:
            folder.chmod(0o755)
            pytest.skip("running as root without chattr +i: no folder is read-only to this process")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", folder])
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["quantize", "translate", "eval"])
def test_read_only_output_folder(tiny_llama_dir, read_only, command):
    out = read_only / "out"
    args = {"quantize": ["quantize", tiny_llama_dir, *RTN, "--out", out],
            "translate": ["translate", tiny_llama_dir, "--src", "de", "--tgt", "en", *FAST, "-o", out],
            "eval": ["eval", tiny_llama_dir, "--limit", "1", "--out", out]}[command]
    assert_refused(run(args, input="Hallo\n"), f"cannot write in '{read_only}'")
    assert list(read_only.iterdir()) == []


# ------------------------------------------------------------------------------------------------ interruption

DRIVER = Path(__file__).resolve().parent / "interrupt_driver.py"


def drive(point: str, sig: str, args: list, cwd: Path, stdin: str | None = None):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(DRIVER), point, sig, *map(str, args)], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=600)


def interrupt_args(command: str, model: Path, tmp_path: Path) -> tuple[list, Path]:
    if command == "translate":
        src = write(tmp_path / "in.txt", "Hallo Welt\nGuten Morgen\n")
        out = tmp_path / "out.txt"
        return ["translate", model, "--src", "de", "--tgt", "en", *FAST, "-i", src, "-o", out], out
    out = tmp_path / "out"
    if command == "quantize":
        return ["quantize", model, *RTN, "--out", out], out
    return ["prune", model, "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32",
            "--device", "cpu", "--out", out], out


INTERRUPTS = [("quantize", "load"), ("quantize", "write"), ("quantize", "publish"), ("prune", "calibrate"),
              ("prune", "write"), ("prune", "publish"), ("translate", "translate"), ("translate", "publish")]


@pytest.mark.parametrize("command, point", INTERRUPTS)
def test_sigint_leaves_nothing(tiny_llama_dir, tmp_path, command, point):
    args, out = interrupt_args(command, tiny_llama_dir, tmp_path)
    proc = drive(point, "SIGINT", args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and stderr_lines(proc.stderr)[-1] == "Aborted!", proc.stderr[-2000:]
    assert leftovers(out) == []


@pytest.mark.parametrize("command, point", INTERRUPTS)
def test_sigkill_leaves_only_what_the_next_run_cleans(tiny_llama_dir, tmp_path, command, point):
    """A killed process cannot clean up: it may leave its temporary ``.out.tmp-<pid>-*`` (or ``.old-``), never the
    output itself; the next write of the same output deletes it (almak.files.clean_stale)."""
    args, out = interrupt_args(command, tiny_llama_dir, tmp_path)
    proc = drive(point, "SIGKILL", args, tmp_path)
    assert proc.returncode == -signal.SIGKILL
    left = leftovers(out)
    assert out.name not in left
    assert all(re.match(rf"^\.{re.escape(out.name)}\.(tmp|old)-\d+-", name) for name in left), left
    if point in ("write", "publish"):
        assert left, "the kill came after the temporary output was made"
    again = CliRunner().invoke(main, [str(a) for a in args])
    assert again.exit_code == 0, again.output
    assert leftovers(out) == [out.name]
