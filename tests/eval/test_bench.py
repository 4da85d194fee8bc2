"""eval.bench: every (model, batch) measured, interleaved, and summarized against the baseline."""
import pytest
import torch

from almak.errors import AlmakError
from almak.eval.bench import BenchConfig, run_bench, summarize

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from almak.modeling.load import load_model

    return load_model(str(tiny_llama_dir), device="cpu", dtype="float32").model


@pytest.mark.parametrize("engine", ["almak", "hf"])
def test_run_bench_measures_every_model_and_batch(tiny, engine):
    import copy

    other = copy.deepcopy(tiny)  # the same weights, counted through its first layer's q_proj
    calls = []
    handle = other.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[:2]))
    config = BenchConfig(batch_sizes=(1, 3), prompt_len=5, gen_len=4, repeats=2, engine=engine)
    try:
        records = summarize(run_bench({"a": tiny, "b": other}, config), baseline="a")
    finally:
        handle.remove()
    assert [(r["model"], r["batch"]) for r in records] == [("a", 1), ("b", 1), ("a", 3), ("b", 3)]
    for r in records:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ms_per_token"] > 0
    assert all(r["decode_speedup"] == 1.0 for r in records if r["model"] == "a")
    # b: one warm-up (1 prefill + 1 step) then, per repeat and batch size, 1 prefill + gen_len - 1 steps.
    assert len(calls) == 2 + 2 * 2 * 4
    assert calls[2] == (1, 5) and calls[3] == (1, 1) and calls[6] == (3, 5) and calls[7] == (3, 1)


@pytest.mark.parametrize("kw, message", [
    (dict(batch_sizes=()), "batch sizes must be positive"),
    (dict(batch_sizes=(0,)), "batch sizes must be positive"),
    (dict(gen_len=1), "generated length >= 2"),
    (dict(repeats=0), "repeats must be at least 1"),
    (dict(engine="tgi"), "unknown engine 'tgi'"),
])
def test_config_refusals(kw, message):
    with pytest.raises(AlmakError, match=message):
        BenchConfig(**kw)


@pytest.mark.parametrize("shape, params", [("alma-7b", 6_738_415_616), ("alma-13b", 13_015_864_320)])
def test_random_model_has_alma_shapes(shape, params):
    from almak.eval.bench import random_model

    model = random_model(shape, torch.float16, "meta")  # shapes only, nothing allocated
    assert sum(p.numel() for p in model.parameters()) == params  # LLaMA-2-7B / 13B
    assert len(random_model(shape, torch.float16, "meta", layers=2).model.layers) == 2
    with pytest.raises(AlmakError, match="--layers must be between 1 and"):
        random_model(shape, torch.float16, "meta", layers=99)


@pytest.mark.parametrize("variant, kind", [("int8", "QuantLinear"), ("int4", "QuantLinear"),
                                           ("2:4", "Sparse24Linear"), ("2:4-int4", "Sparse24QuantLinear")])
def test_make_variant_swaps_every_projection(tiny, variant, kind):
    """Every projection becomes the variant's module, and the model still computes close to the float one."""
    import copy

    from almak.eval.bench import make_variant
    from almak.modeling.nn.surgery import target_linears

    ids = torch.tensor([[1, 5, 9, 3, 7]])
    model = make_variant(copy.deepcopy(tiny), variant)
    assert {type(m).__name__ for _, m in target_linears(model)} == {kind}
    with torch.no_grad():
        ref, got = tiny(ids).logits, model(ids).logits
    assert torch.isfinite(got).all() and not torch.equal(ref, got)
    if variant == "int8":  # RTN int8 is near-lossless; the others change the function a lot on random weights
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=100, max_position_embeddings=64)


@pytest.mark.parametrize("variant", ["int4", "2:4-int4"])
def test_random_variants_are_built_projection_by_projection(monkeypatch, variant):
    """random_model turns each projection into the variant as soon as it is drawn: never more than two drawn
    float projections alive at once (14 in all), and the same weights as the float model of the same seed made
    into that variant afterwards."""
    import gc

    from torch.utils._python_dispatch import TorchDispatchMode

    from almak.eval import bench
    from almak.modeling.nn.surgery import target_linears

    monkeypatch.setitem(bench.SHAPES, "toy", TOY)
    float_model = bench.random_model("toy", torch.float32, "cpu")
    shapes = {tuple(m.weight.shape) for _, m in target_linears(float_model)}
    gc.collect()
    before = {id(m) for m in gc.get_objects() if type(m) is torch.nn.Linear}  # this test's float model, others'

    class Live(TorchDispatchMode):
        """At each projection drawn, counts the float nn.Linear projections alive (gc-tracked modules)."""

        def __init__(self):
            super().__init__()
            self.most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.randn.generator and tuple(out.shape) in shapes:
                gc.collect()  # reachable ones only
                alive = [m for m in gc.get_objects() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
                         and id(m) not in before]
                self.most = max(self.most, len(alive))
            return out

    with Live() as live:
        model = bench.random_model("toy", torch.float32, "cpu", variant=variant)
    assert live.most <= 2
    expected = bench.make_variant(float_model, variant)
    for (name, got), (_, want) in zip(target_linears(model), target_linears(expected)):
        assert type(got) is type(want)
        for (key, a), (_, b) in zip(sorted(got.state_dict().items()), sorted(want.state_dict().items())):
            assert torch.equal(a, b), (name, key)
    assert torch.equal(model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)


def test_make_variant_refuses_unknown():
    with pytest.raises(AlmakError, match="unknown variant 'int3'"):
        from almak.eval.bench import make_variant
        make_variant(torch.nn.Linear(4, 4), "int3")


def test_speedups_are_the_model_over_the_baseline():
    records = [dict(model="float", batch=1, decode_tok_s=100.0, prefill_tok_s=1000.0),
               dict(model="int4", batch=1, decode_tok_s=250.0, prefill_tok_s=800.0),
               dict(model="int4", batch=4, decode_tok_s=300.0, prefill_tok_s=900.0)]
    out = summarize(records, baseline="float")
    assert out[1]["decode_speedup"] == 2.5 and out[1]["prefill_speedup"] == 0.8
    assert "decode_speedup" not in out[2]  # no baseline measured at batch 4


@pytest.mark.parametrize("variant", ["int8", "int4", "2:4", "2:4-int4"])
def test_variant_layers_hold_the_expected_weights(variant, reference_rtn):
    """Each projection of a variant holds what the variant says (int8 per channel, int4 group 128, the 2 largest
    |w| of each group of 4) and computes close to its float layer: a wrong group size, doubled scales or a
    wrong mask fail here."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from almak.eval.bench import make_variant
    from almak.modeling.nn.surgery import target_linears

    torch.manual_seed(0)  # in_features 256 and 512: two and four groups of 128
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    float_model = LlamaForCausalLM(config).eval()
    model = make_variant(copy.deepcopy(float_model), variant)
    x_gen = torch.Generator().manual_seed(1)
    floats = dict(target_linears(float_model))
    # Output error of a layer relative to its float layer: RTN int8 ~0.01, int4 g128 ~0.1, magnitude 2:4 ~0.4
    # on Gaussian weights; a doubled scale gives >= 1.
    bound = {"int8": 0.02, "int4": 0.15, "2:4": 0.5, "2:4-int4": 0.55}[variant]
    for name, layer in target_linears(model):
        W = floats[name].weight.detach()
        if variant.startswith("2:4"):
            keep = torch.zeros_like(W, dtype=torch.bool).reshape(W.shape[0], -1, 4)
            keep.scatter_(-1, W.abs().reshape(W.shape[0], -1, 4).topk(2, dim=-1).indices, True)
            W = W * keep.reshape(W.shape)
        if variant == "int8":
            expected = reference_rtn(W, 8, -1).float()
        elif variant.endswith("int4"):
            expected = reference_rtn(W, 4, 128).float() * (W != 0)  # 2:4 + int4 keeps the pruned weights at 0
        else:
            expected = W
        got = layer.dense_weight() if variant == "2:4" else layer.dequantize()
        torch.testing.assert_close(got.float(), expected, rtol=1e-3, atol=1e-6, msg=f"{variant} {name}")
        x = torch.randn(8, W.shape[1], generator=x_gen)
        with torch.no_grad():
            ref, out = floats[name](x), layer(x)
        assert (out - ref).norm() / ref.norm() < bound, f"{variant} {name}"
