"""Rotations fused into the weights: the same function, weights with their outliers spread out.

QuaRot (Ashkboos et al. 2024, arXiv:2404.00456) and SpinQuant (Liu et al. 2024, arXiv:2405.16406), offline part:

1. Each RMSNorm's scale ``g`` is folded into the linears that read the norm's output (``W ← W diag(g)``:
   q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``, ``lm_head`` after the final
   norm), and the norm's weight becomes 1. RMSNorm without a scale commutes with any orthogonal ``Q``:
   ``‖xQ‖ = ‖x‖``.
2. The residual stream is rotated by a randomized Hadamard ``Q`` (:func:`almak.quant.hadamard.random_hadamard`):
   the embeddings become ``E Q``; every linear reading the stream ``W Q``; every linear writing to it
   (o_proj, down_proj) ``Qᵀ W``.
3. Per attention head, v_proj's outputs are rotated by a head-sized ``Q_h`` and o_proj's inputs undo it
   (attention mixes tokens, never dimensions within a head, so the rotation passes through it).

The result is a plain LLaMA / Mistral / Qwen2 model (norm weights of 1) that every loader and engine runs, whose
logits equal the original's up to floating-point rounding; GPTQ and RTN then quantize weights without the
input-channel outliers that make per-channel int4 fail. The rotation of down_proj's input that QuaRot applies
at run time needs an online Hadamard kernel and is not done.

Tied embeddings: the final norm's scale cannot be folded into a head that is also the embedding table.
``untie=True`` (the default, and what ``almak quantize --rotate`` does) stores the head separately: exact, at
the cost of one more vocab × hidden tensor. ``untie=False`` keeps them tied and gives the final norm the one
scale a rotation lets it keep, ``mean(g)``: the diagonal of ``Qᵀ diag(g) Q`` for any Hadamard ``Q``. Measured on
SmolLM2-135M (fp32, reference perplexity of the first 50 WMT22 de-en sentences under the ALMA prompt,
2026-12-02): float 35.157, rotated and untied 35.157, rotated and kept tied 7.2e11: its final norm's scales
are far from constant, so the approximation destroys the model, and the CLI offers only untying.

>>> rotate_(model, seed=0)            # doctest: +SKIP
{'hidden': 576, 'head_dim': 64, 'untied': True, 'seed': 0}
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.quant.hadamard import random_hadamard

__all__ = ["ROTATABLE", "check_rotatable", "rotate_"]

log = logging.getLogger(__name__)

# The model types whose decoder layers are pre-norm RMSNorm (weight · x / rms(x)) with q/k/v/o and gate/up/down.
ROTATABLE = ("llama", "mistral", "qwen2")


def _parts(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    head = getattr(model, "lm_head", None)
    if layers is None or head is None or getattr(inner, "norm", None) is None:
        raise AlmakError(f"{type(model).__name__} is not a causal LM with model.layers, model.norm and lm_head; "
                         "it cannot be rotated")
    return inner, layers, head


def check_rotatable(model: nn.Module) -> None:
    """Refuse, before any change, a model the rotation would not leave with the same function."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROTATABLE:
        raise AlmakError(f"rotation is implemented for {', '.join(ROTATABLE)} models (pre-norm RMSNorm), not "
                         f"{model_type!r}")
    inner, layers, head = _parts(model)
    norms = [inner.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for norm in norms:
        if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
            raise AlmakError(f"rotation needs RMSNorm layers without bias; found {type(norm).__name__}")
    if not isinstance(head, nn.Linear):
        raise AlmakError(f"rotation needs a float nn.Linear lm_head; found {type(head).__name__}")
    for layer in layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not isinstance(m, nn.Linear):
                raise AlmakError(f"rotation needs float nn.Linear projections; found {type(m).__name__} (rotate "
                                 "the float model before quantizing or pruning it)")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.data.double()
    for linear in readers:
        _set(linear.weight, linear.weight.data.double() * g)
    norm.weight.data.fill_(1.0)


def _untie(model: nn.Module) -> None:
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=head.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    # transformers 5 re-ties from this mapping when saving and loading; untied, there is nothing to tie.
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        model._tied_weights_keys = {}


@torch.no_grad()
def rotate_(model: nn.Module, seed: int = 0, untie: bool = True) -> dict:
    """Fold every RMSNorm scale into the linears after it and rotate the residual stream and each attention
    head's values by randomized Hadamard matrices (seeded by ``seed``), in place. See the module docstring.

    ``untie``: for a model with tied embeddings, give lm_head its own weight (exact) or keep the tie (the final
    norm's scale approximated by its mean). Returns what was done, for the checkpoint's recipe.
    """
    check_rotatable(model)
    inner, layers, head = _parts(model)
    embed = inner.embed_tokens
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    d = embed.weight.shape[1]
    attn = layers[0].self_attn
    head_dim = getattr(attn, "head_dim", None) or getattr(model.config, "head_dim", None) \
        or d // model.config.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    Q = random_hadamard(d, gen).to(embed.weight.device)
    Qh = random_hadamard(head_dim, gen).to(embed.weight.device)

    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        _fold_norm(layer.post_attention_layernorm, [m.gate_proj, m.up_proj])
    g = inner.norm.weight.data.double()
    if tied and untie:
        _untie(model)
    if tied and not untie:
        inner.norm.weight.data.fill_(g.mean().item())
    else:
        _fold_norm(inner.norm, [model.lm_head])

    _set(embed.weight, embed.weight.data.double() @ Q)
    if not tied or untie:
        _set(model.lm_head.weight, model.lm_head.weight.data.double() @ Q)
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for reader in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _set(reader.weight, reader.weight.data.double() @ Q)
        for writer in (a.o_proj, m.down_proj):
            _set(writer.weight, Q.T @ writer.weight.data.double())
            if writer.bias is not None:
                _set(writer.bias, writer.bias.data.double() @ Q)
        # values per head: rows of v_proj (n_kv heads × head_dim) by Q_hᵀ, columns of o_proj by Q_h
        v = a.v_proj.weight.data.double()
        _set(a.v_proj.weight, (Qh.T @ v.reshape(-1, head_dim, d)).reshape(v.shape))
        if a.v_proj.bias is not None:
            _set(a.v_proj.bias, (a.v_proj.bias.data.double().reshape(-1, head_dim) @ Qh).reshape(-1))
        o = a.o_proj.weight.data.double()
        _set(a.o_proj.weight, (o.reshape(o.shape[0], -1, head_dim) @ Qh).reshape(o.shape))
    done = {"hidden": d, "head_dim": head_dim, "seed": seed, "tied": bool(tied),
            "untied": bool(tied and untie), "final_norm": "folded" if not tied or untie else "mean"}
    log.info("rotated the residual stream (%d) and the attention heads (%d)%s", d, head_dim,
             "; lm_head untied from the embeddings" if tied and untie else "")
    return done
