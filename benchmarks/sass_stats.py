"""What a compiled Triton kernel does per main-loop iteration, read from its PTX and SASS (no GPU needed).

Used by ``kernel_report.py``. Two sources, each for what it shows reliably:

- PTX names which global loads stream the weight: a taint pass marks every virtual register derived from the
  weight pointer parameters (address arithmetic only: a load's result is data, never a pointer), and a
  ``ld.global`` / ``cp.async`` whose address is tainted reads the weight. (Source line info cannot do this:
  Triton attributes a load's ``ld`` to the line after the ``tl.load`` when it is written as inline asm.)
- SASS gives what the hardware issues: the main loop is the backward branch whose body holds the weight loads,
  and its instruction count is the issue cost of one iteration per warp.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import triton

BIN_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

_PTX_LABEL = re.compile(r"^(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")
_PTX_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+)_param_(\d+)\]")
_PTX_REG = re.compile(r"%[a-z]+\d+")
_PTX_GLOBAL_LOAD = re.compile(r"\b(ld\.global[\w.]*)\s+(.*?),\s*\[\s*(%\w+)[^\]]*\]")
_PTX_CP_ASYNC = re.compile(r"\bcp\.async[\w.]*\s+\[[^\]]*\],\s*\[\s*(%\w+)[^\]]*\],\s*(0x[0-9a-f]+|\d+)")
_SASS_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):\s*$")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


@dataclass
class LoopStats:
    """One compiled kernel's main loop: what it loads and issues per iteration, per thread and per warp."""

    sass_total: int  # SASS instructions in the whole kernel (an upper bound on the instructions outside the loop)
    sass_loop: int  # SASS instructions in one main-loop iteration (issued once per warp)
    weight_loads: Counter = field(default_factory=Counter)  # {bits: count} per thread per iteration
    other_loads: Counter = field(default_factory=Counter)  # non-weight global loads, same units
    opcodes: Counter = field(default_factory=Counter)  # SASS opcode (first dotted part) -> count in the loop
    spill_instrs: int = 0  # STL/LDL in the whole kernel

    @property
    def weight_load_bits(self) -> int:
        """Widest load of the weight stream (0 when the loop has none)."""
        return max(self.weight_loads, default=0)

    @property
    def weight_bytes_per_thread(self) -> float:
        return sum(bits // 8 * n for bits, n in self.weight_loads.items())


def _ptx_width_bits(op: str, dests: str) -> int:
    """Bits one ``ld.global`` moves per thread: vector length x element width."""
    m = re.search(r"\.v(\d)", op)
    vec = int(m.group(1)) if m else 1
    m = re.search(r"\.[bsuf](8|16|32|64)\b", op)
    return vec * (int(m.group(1)) if m else 32)


def _ptx_lines(ptx: str) -> list[str]:
    """Statements of the kernel body, comments dropped, one per line."""
    lines = []
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].strip()
        if line and not line.startswith("."):
            lines.append(line)
    return lines


def ptx_weight_loads(ptx: str, weight_params: set[int]) -> tuple[dict[str, Counter], dict[str, Counter]]:
    """Global loads per PTX loop, split into weight-stream loads and the rest.

    Returns ``(weight, other)``, each ``{loop label: Counter({bits: count})}``; loads outside every loop are
    under the key ``""``. ``weight_params`` are the indices of the kernel's pointer parameters that hold weights.
    """
    lines = _ptx_lines(ptx)
    tainted: set[str] = set()
    for line in lines:
        m = _PTX_PARAM.search(line)
        if m and int(m.group(3)) in weight_params:
            tainted.add(m.group(1))
    # Fixed point: registers assigned from tainted registers (loops feed values back through movs).
    changed = True
    while changed:
        changed = False
        for line in lines:
            if line.startswith("@"):
                line = line.split(None, 1)[1] if " " in line else line
            if re.match(r"(st|cp|setp|bra|mov\.u32 %r\d+, 0x0)\b", line) and not line.startswith("ld.param"):
                continue
            regs = _PTX_REG.findall(line)
            if len(regs) < 2 or regs[0] in tainted:
                continue
            if any(r in tainted for r in regs[1:]):
                tainted.add(regs[0])
                changed = True
    # Loops: a label followed later by a branch back to it.
    label_at = {}
    for i, line in enumerate(lines):
        m = _PTX_LABEL.match(line)
        if m:
            label_at[m.group(1)] = i
    spans = []
    for i, line in enumerate(lines):
        m = _PTX_BRANCH.search(line)
        if m and label_at.get(m.group(1), i + 1) <= i:
            spans.append((label_at[m.group(1)], i, m.group(1)))
    weight: dict[str, Counter] = {}
    other: dict[str, Counter] = {}
    for i, line in enumerate(lines):
        loads = []
        m = _PTX_GLOBAL_LOAD.search(line)
        if m:
            loads.append((m.group(3), _ptx_width_bits(m.group(1), m.group(2))))
        m = _PTX_CP_ASYNC.search(line)
        if m:
            loads.append((m.group(1), int(m.group(2), 0) * 8))
        for addr, bits in loads:
            inner = [s for s in spans if s[0] <= i <= s[1]]
            key = min(inner, key=lambda s: s[1] - s[0])[2] if inner else ""
            target = weight if addr in tainted else other
            target.setdefault(key, Counter())[bits] += 1
    return weight, other


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(BIN_DIR, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout


def sass_instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """``([(offset, text)], {label: offset})`` from nvdisasm's output."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_INSTR.search(line)
        if m:
            off = int(m.group(1), 16)
            for label in pending:
                labels[label] = off
            pending = []
            instrs.append((off, m.group(2)))
    return instrs, labels


def _opcode(text: str) -> str:
    words = text.split()
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def loop_stats(ptx: str, sass: str, weight_params: set[int]) -> LoopStats:
    """Main-loop statistics of one kernel: the SASS loop with the most global loads (ties: the longest)."""
    weight, other = ptx_weight_loads(ptx, weight_params)
    # The PTX loop that streams the weight (the one with the most weight bytes).
    loop_key = max((k for k in weight if k), key=lambda k: sum(b * n for b, n in weight[k].items()), default=None)
    instrs, labels = sass_instructions(sass)
    loops = []
    for off, text in instrs:
        m = _SASS_BRANCH.search(text)
        if m and labels.get(m.group(1), off + 1) <= off:
            body = [t for o, t in instrs if labels[m.group(1)] <= o <= off]
            loads = sum(_opcode(t) in ("LDG", "LDGSTS") for t in body)
            loops.append((loads, len(body), body))
    body = max(loops, key=lambda l: (l[0], l[1]))[2] if loops and loop_key else []
    return LoopStats(
        sass_total=len(instrs),
        sass_loop=len(body),
        weight_loads=weight.get(loop_key, Counter()) if loop_key else Counter(),
        other_loads=other.get(loop_key, Counter()) if loop_key else Counter(),
        opcodes=Counter(_opcode(t) for t in body),
        spill_instrs=sum(_opcode(t) in ("STL", "LDL") for _, t in instrs),
    )


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``cuobjdump -res-usage``: REG, STACK, SHARED, LOCAL of the kernel (bytes, registers per thread)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN_DIR, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in usage.items()}
