"""eval.bench: every (model, batch) measured, interleaved, and summarized against the baseline."""
import pytest
import torch

from almak.errors import AlmakError
from almak.eval.bench import BenchConfig, run_bench, summarize


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
    (dict(engine="vllm"), "unknown engine 'vllm'"),
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
    from almak.modeling.surgery import target_linears

    ids = torch.tensor([[1, 5, 9, 3, 7]])
    model = make_variant(copy.deepcopy(tiny), variant)
    assert {type(m).__name__ for _, m in target_linears(model)} == {kind}
    with torch.no_grad():
        ref, got = tiny(ids).logits, model(ids).logits
    assert torch.isfinite(got).all() and not torch.equal(ref, got)
    if variant == "int8":  # RTN int8 is near-lossless; the others change the function a lot on random weights
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


def test_make_variant_refuses_unknown():
    with pytest.raises(AlmakError, match="unknown variant 'int3'"):
        from almak.eval.bench import make_variant
        make_variant(torch.nn.Linear(4, 4), "int3")
