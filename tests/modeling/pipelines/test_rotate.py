"""Rotations fused into the weights: the function is kept (logits equal within fp32 rounding), outliers are
spread (per-channel int4 loses less), and models the rotation cannot keep equal are refused."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from almak.errors import AlmakError
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.surgery import QuantConfig, quantize_
from almak.modeling.pipelines.rotate import rotate_

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)

SIZES = dict(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128)


def _model(cls=LlamaForCausalLM, config_cls=LlamaConfig, tied=True, outliers=False, **extra):
    torch.manual_seed(0)
    model = cls(config_cls(**SIZES, tie_word_embeddings=tied, **extra)).eval()
    with torch.no_grad():  # norm scales as trained models have them: far from 1, a few channels large
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
                if outliers:
                    p[:3] *= 50
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls, config_cls, tied, extra", [
    (LlamaForCausalLM, LlamaConfig, True, {}),
    (LlamaForCausalLM, LlamaConfig, False, {}),
    (Qwen2ForCausalLM, Qwen2Config, False, {}),  # q/k/v biases, the v bias rotated per head
])
def test_rotation_keeps_the_function(cls, config_cls, tied, extra):
    model = _model(cls, config_cls, tied, **extra)
    before = _logits(model, IDS)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    info = rotate_(model, seed=3)
    after = _logits(model, IDS)
    # fp32 weights, rotation computed in fp64: what remains is fp32 rounding through two layers
    torch.testing.assert_close(after, before, rtol=0, atol=2e-4 * before.abs().max().item())
    assert info["untied"] is tied and info["final_norm"] == "folded"
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr() or not tied
    assert not model.config.tie_word_embeddings
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name  # folded into the next linears
        elif name in weights and name.endswith("proj.weight"):
            assert not torch.allclose(p, weights[name], atol=1e-3), name  # really rotated
    # different seeds, different weights, the same function
    other = _model(cls, config_cls, tied, **extra)
    rotate_(other, seed=4)
    assert not torch.allclose(other.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(_logits(other, IDS), before, rtol=0, atol=2e-4 * before.abs().max().item())


def test_keep_tied_approximates_the_final_norm():
    model = _model(tied=True)
    before = _logits(model, IDS)
    g = model.model.norm.weight.detach().clone()
    info = rotate_(model, seed=0, untie=False)
    assert info == {**info, "untied": False, "final_norm": "mean"}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(model.model.norm.weight, torch.full_like(g, g.mean().item()))
    assert not torch.allclose(_logits(model, IDS), before, atol=1e-2)  # not the same function: measured, not exact


def test_rotation_spreads_outliers_for_per_channel_int4():
    """Norm scales with a few large channels make per-channel int4 lose much; after the rotation, less."""
    base = _model(tied=False, outliers=True)
    ref = _logits(base, IDS)
    err = {}
    for rotate in (False, True):
        model = _model(tied=False, outliers=True)
        if rotate:
            rotate_(model, seed=0)
        quantize_(model, QuantConfig(bits=4, group_size=-1, sym=False))
        err[rotate] = float((_logits(model, IDS) - ref).pow(2).mean())
    # measured 0.61 of the unrotated error (seed 0); 0.75 leaves room for other torch builds' rounding
    assert err[True] < 0.75 * err[False], err


def test_refusals():
    model = _model()
    quantize_(model, QuantConfig(bits=4, group_size=32))
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    with pytest.raises(AlmakError, match="rotate the float model before quantizing"):
        rotate_(model)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(AlmakError, match="not 'gpt2'"):
        rotate_(gpt2)
