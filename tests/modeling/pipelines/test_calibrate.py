"""Calibration samples and the layer-by-layer pass that GPTQ (and the pruners) run on."""
import json

import pytest
import torch

from almak.errors import AlmakError
from almak.modeling.load import load_model
from almak.modeling.pipelines.calibrate import calibration_samples, capture_layer_inputs, run_layerwise


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu")


def decode(tok, sample):
    return tok.decode(sample[0], skip_special_tokens=True)  # transformers 4.x prepends BOS here, 5.x not


def test_default_covers_every_direction(tiny):
    samples = calibration_samples(tiny.tokenizer, "alma", nsamples=10, seqlen=512)
    heads = sorted(decode(tiny.tokenizer, s).split(":")[0] for s in samples)
    langs = ["Chinese", "Czech", "German", "Icelandic", "Russian"]
    expected = sorted([f"Translate this from {x} to English" for x in langs]
                      + [f"Translate this from English to {x}" for x in langs])
    assert heads == expected
    assert all(s.dtype == torch.long and s.shape[0] == 1 for s in samples)


def test_directions_seqlen_and_seed(tiny):
    a = calibration_samples(tiny.tokenizer, "alma:de-en", nsamples=4, seqlen=16, seed=1)
    b = calibration_samples(tiny.tokenizer, "alma:de-en", nsamples=4, seqlen=16, seed=1)
    c = calibration_samples(tiny.tokenizer, "alma:de-en", nsamples=4, seqlen=16, seed=2)
    assert all(s.shape[1] <= 16 for s in a) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    full = calibration_samples(tiny.tokenizer, "alma:de-en", nsamples=1, seqlen=512)[0]
    text = decode(tiny.tokenizer, full)
    assert text.startswith("Translate this from German to English:\nGerman: ") and "\nEnglish: " in text


def test_files(tiny, tmp_path):
    recs = [{"translation": {"de": "Hallo Welt", "en": "Hello world"}}]
    (tmp_path / "mine.de-en.jsonl").write_text(json.dumps(recs), encoding="utf-8")
    samples = calibration_samples(tiny.tokenizer, str(tmp_path / "mine.de-en.jsonl"), nsamples=2, seqlen=512)
    assert {decode(tiny.tokenizer, s).split(":")[0] for s in samples} == {
        "Translate this from German to English", "Translate this from English to German"}
    (tmp_path / "plain.txt").write_text("word " * 400, encoding="utf-8")
    windows = calibration_samples(tiny.tokenizer, str(tmp_path / "plain.txt"), nsamples=3, seqlen=32)
    assert [w.shape for w in windows] == [torch.Size([1, 32])] * 3


@pytest.mark.parametrize("calib, message", [
    ("nope", "neither 'alma'"),
    ("alma:de-fr", "no bundled ALMA calibration pairs for de-fr"),
])
def test_refusals(tiny, calib, message):
    with pytest.raises(AlmakError, match=message):
        calibration_samples(tiny.tokenizer, calib, nsamples=2)


def test_pass_without_compression_reproduces_the_model(tiny):
    """Propagating captured inputs through every layer gives the model's own last hidden state."""
    model = tiny.model
    samples = calibration_samples(tiny.tokenizer, "alma:de-en", nsamples=3, seqlen=40)
    seen = {}

    class Count:
        def __init__(self, name):
            self.name, self.tokens = name, 0

        def add_batch(self, x):
            self.tokens += x.reshape(-1, x.shape[-1]).shape[0]


    def finish(index, layer, observers):
        seen[index] = {n: o.tokens for n, o in observers.items()}

    run_layerwise(model, samples, lambda n, m: Count(n), finish, lambda n, m: n.endswith("proj"))
    tokens = sum(s.shape[1] for s in samples)
    assert sorted(seen) == [0, 1] and all(v == tokens for v in seen[0].values()) and len(seen[0]) == 7

    # Same pass, capturing layer outputs, against output_hidden_states of the full model.
    inputs = capture_layer_inputs(model, samples[:1])
    h, kw = inputs[0]
    with torch.no_grad():
        for layer in model.model.layers:
            out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        ref = model(samples[0], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(h), ref, rtol=1e-5, atol=1e-5)  # same ops, same order


@pytest.mark.parametrize("compress", [False, True], ids=["float", "compressed"])
def test_each_layer_is_calibrated_on_its_inputs_in_the_model(tiny_llama_dir, compress):
    """Layer i's linears are observed on the activations layer i gets in the model, its earlier layers already
    compressed (GPTQ's sequential recipe): the pass must feed each layer the previous layer's outputs."""
    lm = load_model(str(tiny_llama_dir), device="cpu")
    model = lm.model
    samples = calibration_samples(lm.tokenizer, "alma:de-en", nsamples=2, seqlen=32)
    seen: dict[tuple[int, int], torch.Tensor] = {}

    class Record:
        def __init__(self):
            self.batches = []

        def add_batch(self, x):
            self.batches.append(x.detach().clone())

    def finish(index, layer, observers):
        for i, x in enumerate(observers["self_attn.q_proj"].batches):
            seen[index, i] = x
        if compress:  # a stand-in for compression that changes what the layer passes on
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(0.5)
                layer.self_attn.o_proj.weight.mul_(-2.0)

    run_layerwise(model, samples, lambda n, m: Record(), finish, lambda n, m: n == "self_attn.q_proj")
    # The model as the pass left it, run whole: what each layer's q_proj reads.
    expected = {}
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_hook(
            lambda m, args, out, index=index: expected.setdefault(index, []).append(args[0].detach().clone()))
    with torch.no_grad():
        for sample in samples:
            model(sample)
    assert sorted(seen) == [(i, j) for i in range(len(model.model.layers)) for j in range(len(samples))]
    for (index, i), x in seen.items():
        torch.testing.assert_close(x, expected[index][i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[1, 0], seen[0, 0])  # layer 1 does not read what layer 0 reads
