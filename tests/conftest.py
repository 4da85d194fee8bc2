"""Shared pytest setup for almak's tests."""

import os

# Must happen before anything imports triton: triton.jit decides at decoration time whether kernels are
# interpreted. setdefault lets a GPU run opt out with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (make test runs one worker per core) each worker computes on one thread: torch's default of one
# thread per core in every worker oversubscribes the cores, and its OpenMP threads then wait on each other (the
# embedded model's generation tests ran 2-4x slower that way on 2 cores). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import re

import pytest

# ------------------------------------------------------------------------- what a test depends on (issue 29)
# `make test-core` runs every test; `make test-comet` (transformers 4.x, COMET, compressed-tensors 0.14) runs again
# only the tests marked `transformers`: those that load, save or run a model or tokenizer through transformers, or
# through compressed-tensors, peft or COMET, directly or in an almak subprocess. A test gets the mark from
# `pytestmark`/a decorator, or from using a fixture below. A test that uses transformers without the mark fails
# (the probes below), so that no version-dependent test silently runs in one environment only.
TRANSFORMERS_FIXTURES = {"smollm", "tiny_llama_dir", "transformers_load"}
_TOUCHED: list[str] = []
# Subprocesses that load a model: almak's CLI (module, script or the interrupt driver) and vLLM.
_MODEL_PROCESS = re.compile(r"almak\.cli|(^|/)almak$|interrupt_driver|vllm")


def _probe(cls, name: str, label: str) -> None:
    original = getattr(cls, name)

    def probed(*args, **kwargs):
        _TOUCHED.append(label)
        return original(*args, **kwargs)

    setattr(cls, name, probed)


def _install_probes() -> None:
    import subprocess

    import torch
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    _probe(PreTrainedModel, "__init__", "a transformers model was built")
    _probe(PreTrainedModel, "save_pretrained", "a transformers model was saved")
    # A model's own forward, and its decoder layers' (which almak's loop calls one by one).
    PreTrainedModel.__call__ = torch.nn.Module.__call__
    _probe(PreTrainedModel, "__call__", "a transformers model ran")
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        pass
    else:
        GradientCheckpointingLayer.__call__ = torch.nn.Module.__call__
        _probe(GradientCheckpointingLayer, "__call__", "a transformers decoder layer ran")
    for name in ("__init__", "__call__", "encode", "decode", "batch_decode", "apply_chat_template"):
        _probe(PreTrainedTokenizerBase, name, f"a transformers tokenizer's {name}")
    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        argv = [str(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
        if any(_MODEL_PROCESS.search(a) for a in argv[:4]):
            _TOUCHED.append(f"a subprocess that loads a model ({' '.join(argv[:4])})")
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = popen


def pytest_configure(config):
    _install_probes()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRANSFORMERS_FIXTURES & set(item.fixturenames):
            item.add_marker("transformers")
        if item.get_closest_marker("static_report"):  # one compile, in one pytest-xdist worker (--dist loadgroup)
            item.add_marker(pytest.mark.xdist_group("static_report"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _TOUCHED.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # A test skipped for a package this environment lacks (COMET here, say) runs only in another environment;
    # unmarked, make test-comet would deselect it there too and it would run nowhere.
    report = yield
    if (report.skipped and isinstance(report.longrepr, tuple) and "could not import" in report.longrepr[2]
            and item.get_closest_marker("transformers") is None):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} is skipped here ({report.longrepr[2]}), so it runs only in another "
                           "environment, but it is not marked: add @pytest.mark.transformers so that it runs there")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    if _TOUCHED and item.get_closest_marker("transformers") is None:
        pytest.fail(f"{item.nodeid} uses transformers ({_TOUCHED[0]}) but is not marked: add "
                    "@pytest.mark.transformers (or pytestmark) so that make test-comet runs it on transformers 4.x too",
                    pytrace=False)
    return result


@pytest.fixture(scope="session")
def smollm():
    """The embedded model (SmolLM2-135M-Instruct), loaded once per test session on the CPU in fp32."""
    from almak.modeling.load import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random-weight 2-layer LLaMA (GQA, K=96) saved with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from almak.modeling.load import materialize_alias

    tok = AutoTokenizer.from_pretrained(materialize_alias("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    """16 ALMA de-en training pairs, as a file named for its direction (finetune and distill runs)."""
    import json

    from almak.modeling.text.data import DATA_DIR, read_json_records

    records = read_json_records(DATA_DIR / "calib" / "train.de-en.jsonl")[:16]
    path = tmp_path_factory.mktemp("data") / "train.de-en.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tsv(tmp_path_factory):
    """The first 12 WMT22 de-en pairs as a source<TAB>reference file."""
    from almak.modeling.text.data import load_testset

    ts = load_testset("wmt22:de-en").head(12)
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    path.write_text("".join(f"{s}\t{r}\n" for s, r in zip(ts.sources, ts.references)), encoding="utf-8")
    return path


def _reference_rtn(W, bits: int, group_size: int, sym: bool = True):
    """Round-to-nearest fake quantization as compressed-tensors defines it, written here independently of
    almak's quantizer (quant/pack.py) so that tests can check it: symmetric steps max|W| / (2**bits - 1) * 2 with
    codes in [-2**(bits-1), 2**(bits-1) - 1]; asymmetric steps over [min(W, 0), max(W, 0)] in 2**bits - 1 steps
    with zero round(-min / step) and codes in [0, 2**bits - 1]. Returns the dequantized weight, computed in
    float32 as quantizers do (float64 would round a few weights that sit on .5 the other way)."""
    import torch

    W = W.detach().float()
    N, K = W.shape
    g = K if group_size == -1 else group_size
    Wg = torch.nn.functional.pad(W, (0, (-K) % g)).reshape(N, -1, g)
    if sym:
        step = Wg.abs().amax(-1, keepdim=True) / (2**bits - 1) * 2
        q = torch.clamp(torch.round(Wg / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out = q * step
    else:
        lo, hi = Wg.amin(-1, keepdim=True).clamp(max=0), Wg.amax(-1, keepdim=True).clamp(min=0)
        step = (hi - lo) / (2**bits - 1)
        zero = torch.clamp(-torch.round(lo / step), 0, 2**bits - 1)
        q = torch.clamp(torch.round(Wg / step) + zero, 0, 2**bits - 1)
        out = (q - zero) * step
    return out.reshape(N, -1)[:, :K]


@pytest.fixture(scope="session")
def reference_rtn():
    """The test suite's own RTN (see _reference_rtn), as a function."""
    return _reference_rtn


def _major_minor(package: str) -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version(package).split(".")[:2])


@pytest.fixture(scope="session")
def transformers_load():
    """transformers' own load of a compressed-tensors folder, ``load(folder, dequantize)``; ``dequantize`` for
    asymmetric checkpoints, which transformers 5.x + compressed-tensors 0.20 can only read through its
    dequantize-on-load path (building asymmetric pack-quantized layers on the meta device mismatches the packed
    zero point's shape, for llm-compressor's own checkpoints too)."""
    import warnings

    import torch

    def load(folder, dequantize: bool):
        if _major_minor("transformers") < (5, 0):
            if dequantize and _major_minor("compressed-tensors") >= (0, 15):
                # transformers 4.x + compressed-tensors 0.15-0.20 cannot load asymmetric pack-quantized
                # checkpoints (zero-point shape mismatch, llm-compressor's own too; upstream #1618/#1704).
                pytest.xfail("asymmetric pack-quantized checkpoints do not load in transformers 4.x + "
                             "compressed-tensors >= 0.15")
            dequantize = False  # 4.x + compressed-tensors 0.14 reads them as they are
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": as intended
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()

    return load
