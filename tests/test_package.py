"""The package as a whole: its layers (import-linter contracts), and almak where Triton is not installed."""

import os
import re
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


# ------------------------------------------------------------------------------- the package-level import graph

PACKAGE_DIRS = ("kernels", "quant", "sparse", "modeling", "eval", "cli")


def package_modules() -> dict[str, Path]:
    """Every module of the almak package: dotted name -> file (``almak.x`` for ``x/__init__.py``)."""
    mods = {"almak": ROOT / "__init__.py"}
    mods.update({f"almak.{p.stem}": p for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "setup.py")})
    for top in PACKAGE_DIRS:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("almak", *parts))
            mods[name.removesuffix(".__init__")] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The almak modules ``name`` imports anywhere in its file (function-level imports too)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import almak.modeling.load` names the module; trim to a known one
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
    return found


def graph_levels() -> dict[str, dict[str, set[str]]]:
    """For every package, the import graph among its direct children (sub-packages and modules, each with all it
    contains), the package's own __init__ left out: {package: {child: {children it imports}}}."""
    mods = package_modules()
    known = set(mods)
    edges = {(a, b) for a, path in mods.items() for b in imports_of(a, path, known) if a != b}
    packages = {m for m, p in mods.items() if p.name == "__init__.py"}
    levels = {}
    for pkg in packages:
        def child(m, pkg=pkg):
            rest = m[len(pkg) + 1:]
            return f"{pkg}.{rest.split('.')[0]}" if m.startswith(pkg + ".") else None
        children = {child(m) for m in mods if child(m)}
        graph = {c: set() for c in children}
        for a, b in edges:
            ca, cb = child(a), child(b)
            if ca and cb and ca != cb:
                graph[ca].add(cb)
        levels[pkg] = graph
    return levels


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_package_level_import_graph_has_no_cycle():
    levels = graph_levels()
    assert "almak.modeling" in levels and "almak.modeling.engines" in levels["almak.modeling"]
    for pkg, graph in sorted(levels.items()):
        cycle = find_cycle(graph)
        assert cycle is None, f"import cycle among the parts of {pkg}: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_top_level_order_is_the_readme_picture():
    """The top-level packages import only downwards in the order the README's Layout picture draws them."""
    order = ["almak.cli", "almak.eval", "almak.modeling", "almak.sparse", "almak.quant", "almak.kernels",
             "almak.files", "almak.errors", "almak.version"]
    graph = graph_levels()["almak"]
    rank = {name: i for i, name in enumerate(order)}
    assert set(graph) == set(order), sorted(set(graph) ^ set(order))
    upward = [(a, b) for a, targets in graph.items() for b in targets if rank[b] <= rank[a]]
    assert not upward, f"imports against the layering: {upward}"


def test_readme_layout_names_every_package():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    folders = {str(p.parent.relative_to(ROOT)) for top in PACKAGE_DIRS for p in (ROOT / top).rglob("__init__.py")}
    for folder in sorted(folders):
        leaf = folder.rsplit("/", 1)[-1]
        assert re.search(rf"(^|\s){re.escape(leaf)}/", layout, flags=re.M), f"README's Layout does not show {folder}/"
