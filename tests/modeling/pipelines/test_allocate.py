"""Mixed precision: bits counted as stored, the budget respected, the sensitive projections given int8, and the
choice the best a brute force finds on small instances."""
import itertools
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from almak.errors import AlmakError
from almak.modeling.pipelines.allocate import (
    Format,
    allocate_bits,
    candidate_formats,
    choose_formats,
    fisher_diagonal,
    projection_groups,
)

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)


def test_stored_bits_count_codes_scales_and_zeros():
    # 192 x 96, int4 g32 asym, fp16 scales: 4-bit codes, per (row, group) one 16-bit scale and one 4-bit zero
    assert Format(4, 32).stored_bits(192, 96, sym=False, scale_bits=16) == 192 * (96 * 4 + 3 * (16 + 4))
    assert Format(4, -1).stored_bits(192, 96, sym=True, scale_bits=32) == 192 * (96 * 4 + 32)
    assert Format(8, -1).stored_bits(192, 96, sym=False, scale_bits=16) == 192 * (96 * 8 + 16 + 8)
    assert candidate_formats(128) == [Format(4, -1), Format(4, 128), Format(8, -1)]
    assert candidate_formats(-1) == [Format(4, -1), Format(8, -1)]


def _brute(loss, bits, budget):
    best = None
    for choice in itertools.product(*[list(b) for b in bits]):
        if sum(b[f] for b, f in zip(bits, choice)) <= budget:
            total = sum(l[f] for l, f in zip(loss, choice))
            best = total if best is None else min(best, total)
    return best


def test_choice_respects_the_budget_and_matches_brute_force():
    rng = random.Random(0)
    formats = candidate_formats(64)
    for trial in range(40):
        n = rng.randint(2, 6)
        sizes = [rng.choice([1, 2, 3]) for _ in range(n)]
        bits = [{Format(4, -1): 41 * s, Format(4, 64): 45 * s, Format(8, -1): 81 * s} for s in sizes]
        loss = []
        for s in sizes:  # int4 per channel loses most, int8 least, scaled per group
            w = rng.uniform(0.1, 10) * s
            loss.append({Format(4, -1): w * rng.uniform(2, 4), Format(4, 64): w, Format(8, -1): w / 16})
        floor, top = sum(b[formats[0]] for b in bits), sum(b[formats[-1]] for b in bits)
        budget = rng.uniform(floor, top)
        choice = choose_formats(loss, bits, budget)
        assert sum(b[f] for b, f in zip(bits, choice)) <= budget
        got, best = sum(l[f] for l, f in zip(loss, choice)), _brute(loss, bits, budget)
        # exact up to the DP's resolution (1/20000 of the spare budget), which no random budget here comes near
        assert got == pytest.approx(best, rel=1e-9), (trial, got, best)


def test_choice_edges():
    bits = [{Format(4, -1): 10, Format(8, -1): 20}] * 3
    loss = [{Format(4, -1): 5.0, Format(8, -1): 0.1}, {Format(4, -1): 50.0, Format(8, -1): 0.1},
            {Format(4, -1): 1.0, Format(8, -1): 0.1}]
    assert choose_formats(loss, bits, 30) == [Format(4, -1)] * 3
    assert choose_formats(loss, bits, 60) == [Format(8, -1)] * 3
    assert choose_formats(loss, bits, 45) == [Format(4, -1), Format(8, -1), Format(4, -1)]  # one fits: the worst
    assert choose_formats(loss, bits, 50) == [Format(8, -1), Format(8, -1), Format(4, -1)]  # two: the two worst
    with pytest.raises(AlmakError, match="budget below"):
        choose_formats(loss, bits, 29)


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


SAMPLES = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_groups_follow_shared_inputs():
    groups = projection_groups(_model())
    assert groups[0] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
    assert ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] in groups
    assert ["model.layers.1.mlp.down_proj"] in groups and len(groups) == 8


def test_fisher_is_the_mean_squared_gradient():
    model = _model()
    name = "model.layers.1.mlp.down_proj"
    fisher = fisher_diagonal(model, SAMPLES, [name])
    expect = torch.zeros_like(fisher[name])
    for ids in SAMPLES:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        expect += model.get_submodule(name).weight.grad.square()
    torch.testing.assert_close(fisher[name], expect / len(SAMPLES))
    assert all(not p.requires_grad or p.grad is not None for p in model.parameters())


def test_sensitive_projection_gets_int8_within_budget(monkeypatch):
    import almak.modeling.pipelines.allocate as A

    model = _model()
    measured = A.fisher_diagonal

    def one_sensitive(*args, **kwargs):  # the loss reacts 10^4 times more to this projection than measured
        fisher = measured(*args, **kwargs)
        fisher["model.layers.1.mlp.down_proj"] *= 1e4
        return fisher

    monkeypatch.setattr(A, "fisher_diagonal", one_sensitive)
    plan = allocate_bits(model, SAMPLES, target_bits=5.0, group_size=32, sym=False)
    assert plan.average_bits <= 5.0
    assert plan.formats["model.layers.1.mlp.down_proj"] == Format(8, -1)
    assert len(plan.formats) == 14 and set(plan.counts()) <= {"int4 per-channel", "int4 g32", "int8 per-channel"}
    for group in projection_groups(model):
        assert len({plan.formats[n] for n in group}) == 1  # one format per shared input
    record = plan.record()
    assert record["formats"]["model.layers.1.mlp.down_proj"] == "int8 per-channel"
    # more bits, estimated loss no higher
    assert allocate_bits(model, SAMPLES, 6.0, 32, False).estimated_loss <= plan.estimated_loss
    with pytest.raises(AlmakError, match="below the smallest model"):
        allocate_bits(model, SAMPLES, 4.1, 32, False)  # int4 per channel with fp32 scales: 4 + 36/96 at best


def test_recipe_checks_target_bits():
    from almak.modeling.pipelines.quantize import QuantizeRecipe

    assert QuantizeRecipe(target_bits=4.5).bits == 4
    with pytest.raises(AlmakError, match="leave bits at 4, got bits=8"):
        QuantizeRecipe(bits=8, target_bits=5)
    with pytest.raises(AlmakError, match="between 4 and 9"):
        QuantizeRecipe(target_bits=3.5)
