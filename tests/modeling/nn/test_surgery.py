"""quantize_ on the embedded model: every projection swapped, logits close to the dequantized reference."""
import copy
import logging

import pytest
import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.architecture import PROJECTIONS
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.surgery import QuantConfig, quantize_


@pytest.fixture(scope="module")
def batch(smollm):
    from almak.modeling.text.prompts import Prompt

    text = Prompt("alma", "de", "en").build("Die Ware hat unter 20 Euro gekostet.") + " The goods cost less."
    return smollm.tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("config, min_cos", [
    (QuantConfig(bits=8, group_size=-1), 0.999),  # int8: logits nearly unchanged
    (QuantConfig(bits=4, group_size=64), 0.85),  # int4 RTN on a 135M model is damaged: 0.89 measured
])
def test_embedded_model(smollm, batch, caplog, config, min_cos, reference_rtn):
    model = copy.deepcopy(smollm.model)
    with torch.no_grad():
        float_logits = model(batch).logits
    with caplog.at_level(logging.INFO, logger="almak.modeling.nn.surgery"):
        summary = quantize_(model, config)
    assert len(summary["quantized"]) == 30 * len(PROJECTIONS) and not summary["skipped"]
    assert "quantized 210/210 linears" in caplog.text and "kept lm_head" in caplog.text
    assert not isinstance(model.lm_head, QuantLinear) and isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)

    # The reference: the float model with every projection's weight replaced by what the suite's own RTN makes of it
    # (independent of almak's quantizer and of QuantLinear).
    ref = copy.deepcopy(smollm.model)
    for name, module in list(ref.named_modules()):
        if isinstance(model.get_submodule(name), QuantLinear):
            module.weight.data = reference_rtn(module.weight, config.bits, config.group_size).float()
    with torch.no_grad():
        q_logits, ref_logits = model(batch).logits, ref(batch).logits
    # A 30-token prompt is above CPU_NATIVE_MAX_M: the chunked path on the dequantized weight, equal up to fp32 rounding.
    torch.testing.assert_close(q_logits, ref_logits, rtol=1e-4, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(q_logits.flatten(), float_logits.flatten(), dim=0)
    assert cos > min_cos


def test_filter_and_skips(tiny_llama_dir, caplog):
    from almak.modeling.load import load_model

    model = load_model(str(tiny_llama_dir), device="cpu").model
    with caplog.at_level(logging.INFO, logger="almak.modeling.nn.surgery"):
        summary = quantize_(model, QuantConfig(bits=4, group_size=32, include_lm_head=True),
                            filter_fn=lambda name, m: "layers.0." in name or name == "lm_head")
    assert len(summary["quantized"]) == len(PROJECTIONS)
    assert summary["skipped"] == {"lm_head": "its weight is tied to the input embeddings"}
    assert "kept lm_head: its weight is tied" in caplog.text


def test_no_targets_is_refused():
    with pytest.raises(AlmakError, match="no decoder-layer projections"):
        quantize_(nn.Sequential(nn.Linear(8, 8)), QuantConfig())


@pytest.mark.parametrize("kwargs, message", [(dict(bits=2), "bits must be 4 or 8"),
                                             (dict(group_size=96), "group size must be one of")])
def test_config_refusals(kwargs, message):
    with pytest.raises(AlmakError, match=message):
        QuantConfig(**kwargs)
