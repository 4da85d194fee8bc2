"""How ``--dtype auto`` picks the dtype translation and evaluation run in."""
from pathlib import Path

import pytest

from almak.modeling import devices

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 4000\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    def set_text(text):
        monkeypatch.setattr(devices.platform, "system", lambda: "Linux")
        monkeypatch.setattr(Path, "read_text", lambda self, errors=None: text)
        devices.cpu_bf16_support.cache_clear()

    yield set_text
    devices.cpu_bf16_support.cache_clear()


@pytest.mark.parametrize("text, feature", [
    (FLAGS.format(extra="avx512_bf16 avx512_vnni"), "avx512_bf16"),
    (FLAGS.format(extra="amx_tile amx_bf16 avx512_bf16"), "amx_bf16"),
    (FLAGS.format(extra="avx512_vnni"), None),  # AVX-512 alone: PyTorch emulates bf16 there
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", "bf16"),  # Arm
    ("", None),
])
def test_cpu_bf16_support_reads_the_cpu_flags(cpuinfo, text, feature):
    cpuinfo(text)
    assert devices.cpu_bf16_support() == feature


def test_auto_dtype(cpuinfo):
    cpuinfo(FLAGS.format(extra="avx512_bf16"))
    assert devices.inference_dtype("auto", "cpu") == ("bfloat16", "auto: this CPU has avx512_bf16")
    assert devices.inference_dtype("float32", "cpu") == ("float32", "asked for")
    assert devices.inference_dtype("auto", "cuda") == ("float16", "auto on a GPU")
    cpuinfo(FLAGS.format(extra=""))
    assert devices.inference_dtype("auto", "cpu") == ("float32", "auto: this CPU has no native bfloat16")
