"""The static compile report (benchmarks/kernel_report.py): its SASS accounting, and the CI checks on every
kernel config compiled for every GPU architecture without a GPU.

The compile runs once per test session in a subprocess (the kernels must be JIT functions there, not the
interpreter's). It compiles every config of every kernel whose sources (or Triton) changed since the committed
report was written, and the first config of each other kernel and path for sm_90, which must reproduce the committed
records exactly; the checks then run on the committed records with the recompiled ones in place. The full compile
(a few minutes on two cores) is `make kernel-report`. `make test-comet` skips these tests (same kernels, same Triton).
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import sass_stats  # noqa: E402

# A loop that loads a 128-bit weight vector through a pointer derived from parameter 1 and a 16-bit activation
# through parameter 0, written as Triton emits it (inline-asm loads, a backward branch to the loop header).
PTX = """
.visible .entry k(.param .u64 k_param_0, .param .u64 k_param_1)
{
	ld.param.u64 	%rd1, [k_param_0];
	ld.param.u64 	%rd2, [k_param_1];
	mov.u64 	%rd7, %rd2;
$L__BB0_2:
	add.s64 	%rd8, %rd7, 16;
	// begin inline asm
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd8 + 0 ];
	// end inline asm
	add.s64 	%rd9, %rd1, %rd5;
	// begin inline asm
	@%p2 ld.global.b16 { %rs1 }, [ %rd9 + 0 ];
	// end inline asm
	add.s64 	%rd10, %rd1, %rd2;
	mov.u64 	%rd7, %rd8;
	@%p3 bra 	$L__BB0_2;
	ret;
}
"""

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R10.64] ;
        /*0030*/                   LOP3.LUT R5, R4, 0xf, RZ, 0xc0, !PT ;
        /*0040*/              @!P0 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
"""


def test_ptx_taint_finds_weight_loads_only():
    weight, other = sass_stats.ptx_weight_loads(PTX, {1})
    assert weight == {"$L__BB0_2": Counter({128: 1})}
    assert other == {"$L__BB0_2": Counter({16: 1})}


def test_loop_stats_counts_the_loop_body():
    stats = sass_stats.loop_stats(PTX, SASS, {1})
    assert (stats.sass_total, stats.sass_loop) == (6, 4)
    assert stats.weight_load_bits == 128 and stats.weight_bytes_per_thread == 16
    assert stats.opcodes == Counter({"LDG": 2, "LOP3": 1, "BRA": 1})


COMMITTED = BENCH / "results" / "static-report.json"
SPOT_ARCH = 90
# What a spot compile must reproduce of a committed record (the predictions follow from these).
SPOT_FIELDS = ("registers", "spill_bytes", "shared_bytes", "sass_loop_instructions", "sass_total_instructions",
               "weight_load_bits", "weight_requests_per_byte")


def compile_report(out: Path, *args) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(BENCH / "kernel_report.py"), "--out", str(out), "--no-plot", *args],
                          env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def compiled_now(tmp_path_factory) -> dict:
    """``{"changed": [...], "full": report of the changed kernels or None, "spot": report of the others' first
    configs on sm_90 or None}``."""
    import kernel_report

    committed = json.loads(COMMITTED.read_text())
    old = committed.get("kernel_hashes", {})
    changed = [k for k, h in kernel_report.kernel_hashes().items() if old.get(k) != h]
    same = [k for k in kernel_report.KERNELS if k not in changed]
    tmp = tmp_path_factory.mktemp("static")
    full = compile_report(tmp / "full.json", "--kernels", ",".join(changed)) if changed else None
    spot = compile_report(tmp / "spot.json", "--kernels", ",".join(same), "--arches", str(SPOT_ARCH),
                          "--first-config") if same else None
    return dict(changed=changed, full=full, spot=spot, committed=committed)


@pytest.fixture(scope="session")
def report(compiled_now) -> dict:
    """The committed report's records, those of changed kernels replaced by what they compile to now."""
    changed = set(compiled_now["changed"])
    records = [r for r in compiled_now["committed"]["records"] if r["kernel"] not in changed]
    if compiled_now["full"]:
        records += compiled_now["full"]["records"]
    return dict(compiled_now["committed"], records=records)


@pytest.mark.static_report
def test_unchanged_kernels_compile_to_the_committed_records(compiled_now):
    import kernel_report

    if not compiled_now["spot"]:
        pytest.skip("every kernel changed: all were compiled in full")
    key = ("kernel", "path", "config", "arch", "model", "M", "N", "K")
    committed = {tuple(r[k] for k in key): r for r in compiled_now["committed"]["records"]}
    spot = compiled_now["spot"]["records"]
    assert {r["kernel"] for r in spot} == set(kernel_report.KERNELS) - set(compiled_now["changed"])
    for r in spot:
        old = committed[tuple(r[k] for k in key)]
        assert {f: r[f] for f in SPOT_FIELDS} == {f: old[f] for f in SPOT_FIELDS}, (
            f"{r['kernel']} {r['path']} {r['config']} {r['arch']} no longer compiles to the committed report's "
            "record with the same sources: run `make kernel-report` and commit the result")


def _compiled(report):
    """One entry per compiled (kernel, path, config, arch, M) (the records repeat it per shape)."""
    return {(r["kernel"], r["path"], r["config"], r["arch"], r["M"] if r["path"] == "decode" else 0): r
            for r in report["records"]}


@pytest.mark.static_report
def test_every_config_compiles_for_every_arch(report):
    import kernel_report

    from almak.kernels.common import kernel_configs

    compiled = _compiled(report)
    for kernel in kernel_report.KERNELS:
        for path, Ms in kernel_report.PATH_M.items():
            for config in kernel_configs(path, kernel, interpret=False):
                for arch in kernel_report.ARCHES:
                    for M in (Ms if path == "decode" else (0,)):
                        assert (kernel, path, kernel_report._config_id(config), f"sm_{arch}", M) in compiled


@pytest.mark.static_report
def test_no_config_spills(report):
    spills = sorted({(r["kernel"], r["path"], r["config"], r["arch"], r["spill_bytes"])
                     for r in report["records"] if r["spill_bytes"] or r["registers"] > 255})
    assert not spills, f"configs that spill registers (kernel, path, config, arch, bytes): {spills}"


@pytest.mark.static_report
def test_shared_memory_bound_prunes_what_does_not_fit(report):
    for r in _compiled(report).values():
        # The estimate the runtime prunes by is an upper bound of what the compiler allocated...
        assert r["shared_estimate"] >= r["shared_bytes"], r
        # ...so a config it keeps on an arch fits that arch.
        assert r["pruned"] or r["shared_bytes"] <= r["shared_limit"], r
    kept = Counter((r["kernel"], r["path"], r["arch"]) for r in _compiled(report).values() if not r["pruned"])
    every = {(r["kernel"], r["path"], r["arch"]) for r in report["records"]}
    assert every == set(kept), f"paths left with no config on some arch: {sorted(every - set(kept))}"


@pytest.mark.static_report
def test_weights_stream_once_through_wide_loads(report):
    # The decode paths' design: each packed weight byte requested once per CTA, by 128-bit loads.
    bad = sorted({(r["kernel"], r["config"], r["arch"], r["weight_requests_per_byte"], r["weight_load_bits"])
                  for r in report["records"] if r["path"] == "decode"
                  and (r["weight_requests_per_byte"] != 1.0 or r["weight_load_bits"] != 128)})
    assert not bad, f"(kernel, config, arch, requests per byte, widest load): {bad}"


def test_committed_report_describes_the_kernels():
    import kernel_report

    committed = json.loads((BENCH / "results" / "static-report.json").read_text())
    assert committed["source_hash"] == kernel_report.source_hash(), (
        "kernels/ changed since benchmarks/results/static-report.json was written: run "
        "`python benchmarks/kernel_report.py` and commit the result")
    assert "PREDICTED" in committed["note"]
