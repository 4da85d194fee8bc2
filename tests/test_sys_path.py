"""The repository root stays off sys.path (issue 28).

The root is the ``almak`` package, so on sys.path its ``kernels/`` folder answers ``import kernels``, which
transformers >= 5.25 does for Hugging Face's ``kernels`` package (a dependency it now requires): every import of
transformers then fails. ``python -m X`` and ``python -c`` put the working directory first on sys.path; console
scripts (``pytest``, ``almak``) and ``python -P`` (3.11+) do not, and running a script puts the script's own folder
there instead. These tests hold every way almak starts Python to that.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Interpreters as the Makefile, CI and the shell scripts spell them, then their options up to the first
# non-option. Only `python -m venv` may go without -P: venv imports nothing from the working directory.
SHELL_PYTHON = re.compile(r"""(?:^|[\s;&|(`'"])(?:[\w./${}()-]*/)?(?:python3?(?:\.\d+)?|"?\$\{?PY(?:THON)?\}?"?|\$\(PYTHON\))"""
                          r"""((?:\s+-[A-Za-z]+)*)\s+(?:-m\s+(\S+)|-c\b)""")
# In Python: a list that starts Python with -m/-c (or with unknown *args) right after sys.executable.
PY_LAUNCH = re.compile(r"""sys\.executable\s*,\s*(?:["']-[mc]["']|\*)""")


def launchers() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / ".ci" / "run", ROOT / "README.md"]
    files += sorted((ROOT / "benchmarks").glob("*.sh")) + sorted((ROOT / "benchmarks").glob("*.py"))
    files += sorted((ROOT / "tests").rglob("*.py"))
    # This file spells the hazard on purpose (the scan's own test and the last test below).
    return [f for f in files if f.is_file() and f != Path(__file__).resolve()]


def shell_violations(text: str) -> list[str]:
    bad = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):  # a comment, in the Makefile or a shell script
            continue
        for m in SHELL_PYTHON.finditer(line):
            options, module = m.group(1).split(), m.group(2)
            if "-P" not in options and module != "venv":
                bad.append(line.strip())
    return bad


def test_the_suite_runs_without_the_repository_root_on_sys_path():
    # `make test` starting `python -m pytest` again would put the root (or '' for it) first here.
    entries = {Path(p or os.getcwd()).resolve() for p in sys.path}
    assert ROOT not in entries, [p for p in sys.path if Path(p or os.getcwd()).resolve() == ROOT]


@pytest.mark.parametrize("path", launchers(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_command_starts_python_with_its_working_directory_on_sys_path(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":  # the commands a user copies: fenced code blocks (the prose explains the hazard)
        text = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M))
    bad = shell_violations(text) if path.suffix != ".py" else []
    bad += [line.strip() for line in text.splitlines() if PY_LAUNCH.search(line)]
    if path.suffix == ".py":  # shell commands quoted in docstrings and comments count too
        bad += shell_violations("\n".join(line for line in text.splitlines() if not PY_LAUNCH.search(line)))
    assert not bad, f"start Python with -P (or a console script) in {path.relative_to(ROOT)}: {bad}"


def test_the_scan_finds_what_it_guards():
    assert shell_violations("\t$(VENV)/bin/python -m pytest") == ["$(VENV)/bin/python -m pytest"]
    assert shell_violations('step x 10 "$PY" -m almak.cli.main bench')
    assert shell_violations("python3 -c 'import x'")
    assert not shell_violations("\t$(VENV)/bin/python -P -m pytest")
    assert not shell_violations("\t$(PYTHON) -m venv $(VENV)")
    assert not shell_violations("python benchmarks/frontier.py --limit 20")
    assert PY_LAUNCH.search('subprocess.run([sys.executable, "-m", "almak.cli.main"])')
    assert PY_LAUNCH.search("subprocess.run([sys.executable, *args])")
    assert not PY_LAUNCH.search('subprocess.run([sys.executable, "-P", "-m", "almak.cli.main"])')


@pytest.fixture(scope="module")
def impostor(tmp_path_factory) -> Path:
    """A folder holding a top-level ``kernels`` package that fails on import, as almak's root is for
    transformers, and a one-test probe of which ``kernels`` the running Python finds."""
    folder = tmp_path_factory.mktemp("impostor")
    (folder / "kernels").mkdir()
    (folder / "kernels" / "__init__.py").write_text('raise ImportError("the impostor kernels package was imported")\n')
    (folder / "probe").mkdir()
    (folder / "probe" / "test_probe.py").write_text(
        "import importlib.util\n\n\ndef test_probe():\n"
        "    spec = importlib.util.find_spec('kernels')\n"
        "    print('KERNELS', spec.origin if spec else None)\n")
    return folder


def found_kernels(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return re.search(r"KERNELS (\S+)", proc.stdout).group(1)


@pytest.mark.parametrize("where", ["impostor", "root"])
def test_entry_points_never_import_a_kernels_package_from_the_working_directory(impostor, where, tiny_llama_dir,
                                                                                tmp_path):
    """From a folder whose ``kernels/`` would shadow the real one (a stand-in, and the repository root itself),
    the commands the suite and its subprocesses run find the installed ``kernels`` (or none), never that one."""
    cwd = impostor if where == "impostor" else ROOT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = dict(cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    shadow = str(cwd / "kernels")

    code = "import importlib.util; s = importlib.util.find_spec('kernels'); print('KERNELS', s.origin if s else None)"
    assert not found_kernels(subprocess.run([sys.executable, "-P", "-c", code], **run)).startswith(shadow)

    probe = subprocess.run([str(BIN / "pytest"), "-q", "-s", "-p", "no:cacheprovider", "--import-mode=importlib",
                            str(impostor / "probe")], **run)
    assert not found_kernels(probe).startswith(shadow)

    # The almak command imports transformers, which imports `kernels` where it is installed.
    out = tmp_path / "out.txt"
    proc = subprocess.run([str(BIN / "almak"), "translate", str(tiny_llama_dir), "--src", "de", "--tgt", "en",
                           "--device", "cpu", "--num-beams", "1", "--max-new-tokens", "2", "-o", str(out)],
                          input="Hallo\n", **run)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_python_dash_m_from_the_impostor_folder_does_import_it(impostor):
    """The hazard is real: without -P, ``python -c`` from that folder picks up its ``kernels``."""
    proc = subprocess.run([sys.executable, "-c", "import kernels"], cwd=impostor, capture_output=True, text=True)
    assert proc.returncode != 0 and "the impostor kernels package was imported" in proc.stderr
