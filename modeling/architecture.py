"""The shape of the models almak runs: LLaMA-family causal LMs (LLaMA, Mistral, Qwen2) and their parts' names.

What every layer above needs to know about a model without running it: where its decoder layers are, what its
projections are called, which model types almak's own generation loop reproduces, and its context length.
"""
from __future__ import annotations

import torch.nn as nn

from almak.errors import AlmakError

# The decoder-layer projections of LLaMA, Mistral and Qwen2 (all name them alike).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The projections that read one input (the attention's normed input; the MLP's normed input).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# The model types almak's generation loop (almak.modeling.engines.decoder) reproduces.
SUPPORTED = ("llama", "mistral")
HINT = "use --engine hf (transformers' generate) for it"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA / Mistral / Qwen2-style causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise AlmakError(f"{type(model).__name__} has no model.layers: not a LLaMA-style decoder")
    return layers


def context_limit(model) -> int | None:
    """The positions the model was trained for (``max_position_embeddings``), where its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_model_type(kind: str | None, supported: tuple[str, ...] = SUPPORTED) -> None:
    """Refuse a ``model_type`` almak's generation loop does not reproduce (before any weight is read, where the
    caller has the config), naming the way out."""
    if kind not in supported:
        raise AlmakError(f"almak's generation loop runs LLaMA-family models ({', '.join(supported)}), "
                         f"not {kind!r}; {HINT}")
