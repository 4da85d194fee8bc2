"""The static-cache forward pass against transformers' forward: prompts of mixed lengths, steps, dropped,
reordered and added rows, compressed layers, and the architectures it refuses."""
import copy
from types import SimpleNamespace

import pytest
import torch

from almak.errors import AlmakError
from almak.modeling.engines.decoder import Decoder, check_supported

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)

# fp32 on the CPU: the same math in another order (SDPA over a masked static cache vs transformers'
# dynamic cache) agrees to ~1e-5 on logits of size ~10; 1e-4 leaves room for other CPUs' kernels.
TOL = dict(atol=1e-4, rtol=1e-4)


def tiny(kind: str, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    dims = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    dims.update(overrides)
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**dims, sliding_window=None)).eval()
    return LlamaForCausalLM(LlamaConfig(**dims)).eval()


def reference(model, sequences: list[list[int]]) -> torch.Tensor:
    """transformers' next-token logits for each whole sequence, run alone (no padding at all)."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[:, -1] for s in sequences])


@pytest.mark.parametrize("kind, overrides", [
    ("llama", {}),  # GQA, as the embedded model
    ("llama", dict(num_key_value_heads=4)),  # MHA, as LLaMA-2 / ALMA
    ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32))),  # Llama-3 / LLaMAX3 rope
    ("mistral", {}),
])
def test_matches_transformers_through_add_step_keep(kind, overrides):
    model = tiny(kind, **overrides)
    seqs = [[5, 7, 9, 11, 13, 2, 3], [4, 8], [6, 6, 6, 1]]
    dec = Decoder(model, batch=4, max_len=40)
    with torch.no_grad():
        torch.testing.assert_close(dec.add(seqs), reference(model, seqs), **TOL)
        for token in (17, 19, 23):  # three steps, every row its own length
            seqs = [s + [token] for s in seqs]
            torch.testing.assert_close(dec.step(torch.tensor([token] * 3)), reference(model, seqs), **TOL)
        dec.keep(torch.tensor([2, 0, 0]))  # drop row 1, duplicate row 0 (a beam reorder)
        seqs = [seqs[2], seqs[0], seqs[0]]
        seqs = [s + [t] for s, t in zip(seqs, (29, 31, 37))]
        torch.testing.assert_close(dec.step(torch.tensor([29, 31, 37])), reference(model, seqs), **TOL)
        new = [[9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8]]  # a row joins, longer than the others
        torch.testing.assert_close(dec.add(new), reference(model, new), **TOL)
        seqs = [s + [41] for s in seqs + new]
        torch.testing.assert_close(dec.step(torch.tensor([41] * 4)), reference(model, seqs), **TOL)


def test_static_step_matches_transformers_across_buckets():
    """The static step (what a CUDA graph replays) over buckets of 1, 2, 4 and 5 rows: live rows grow and shrink,
    rows past the live ones compute on stale inputs, and every live row still gets transformers' logits."""
    model = tiny("llama")
    dec = Decoder(model, batch=5, max_len=40, static=True)
    assert dec.buckets == [1, 2, 4, 5]
    seqs = [[5, 7, 9, 11, 13, 2, 3]]
    with torch.no_grad():
        dec.add(seqs)
        for rows_after, token in ((1, 17), (3, 19), (5, 23), (2, 29), (4, 31)):
            if rows_after > len(seqs):  # new rows join, shorter and longer than the live ones
                new = [[3 + i] * (2 + 4 * i) for i in range(rows_after - len(seqs))]
                dec.add(new)
                seqs += new
            elif rows_after < len(seqs):  # the last rows leave, the first two swap
                order = [1, 0] + list(range(2, rows_after))
                dec.keep(torch.tensor(order))
                seqs = [seqs[i] for i in order]
            seqs = [s + [token] for s in seqs]
            got = dec.step(torch.tensor([token] * len(seqs)))
            torch.testing.assert_close(got, reference(model, seqs), **TOL)


def test_cuda_graphs_need_cuda():
    with pytest.raises(AlmakError, match="CUDA graphs need the model on a CUDA device"):
        Decoder(tiny("llama"), batch=1, max_len=8, graphs=True)
    assert not Decoder(tiny("llama"), batch=1, max_len=8).graphs  # off by default on the CPU


def fake_cuda_graphs(monkeypatch, decoder, fail=False) -> list[int]:
    """torch.cuda's stream and graph calls, faked for a CPU run of ``decoder`` (with ``graphs`` on): recording
    runs nothing and returns an output full of NaN, and a replay recomputes the recorded bucket's step from the
    decoder's fixed buffers into that output, in place, as a CUDA graph does; with ``fail`` recording raises,
    as an operation that cannot be captured does. Returns the list of buckets recorded, in order."""
    import contextlib

    recorded = []
    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    class Graph:
        def replay(self):
            self.out.copy_(Decoder._bucket_forward(decoder, self.bucket))

        def pool(self):
            return None

    @contextlib.contextmanager
    def graph(g, pool=None):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        monkeypatch.setattr(decoder, "_bucket_forward", lambda bucket: torch.full((bucket, 101), float("nan")))
        yield
        monkeypatch.delattr(decoder, "_bucket_forward")

    def capture(bucket):
        g, out = Decoder._capture(decoder, bucket)
        g.out, g.bucket = out, bucket
        recorded.append(bucket)
        return g, out

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(decoder, "_capture", capture)
    return recorded


def test_graph_orchestration_with_faked_cuda(monkeypatch):
    """Buckets are recorded once, ahead of time or on first use, then replayed; what a step returns survives
    the next replay; a failed recording names --no-cuda-graphs. (The real capture runs in make gpu-check.)"""
    model = tiny("llama")
    dec = Decoder(model, batch=4, max_len=40, static=True)
    dec.graphs = True
    recorded = fake_cuda_graphs(monkeypatch, dec)
    dec.capture(3)
    seqs = [[5, 7, 9], [4, 8, 1, 2], [6]]
    with torch.no_grad():
        dec.add(seqs)
        steps = []
        for token in (17, 19, 23):  # 3 rows: bucket 4, recorded ahead of time
            seqs = [s + [token] for s in seqs]
            steps.append((dec.step(torch.tensor([token] * 3)), reference(model, seqs)))
        for got, want in steps:  # each step's logits are its own, not the graph's output buffer
            torch.testing.assert_close(got, want, **TOL)
        dec.keep(torch.tensor([2]))
        seqs = [seqs[2] + [29]]
        torch.testing.assert_close(dec.step(torch.tensor([29])), reference(model, seqs), **TOL)  # bucket 1
    assert recorded == [4, 1]
    with pytest.raises(AlmakError, match="capture before adding rows"):
        dec.capture(2)

    failing = Decoder(model, batch=2, max_len=40, static=True)
    failing.graphs = True
    fake_cuda_graphs(monkeypatch, failing, fail=True)
    with torch.no_grad(), pytest.raises(AlmakError, match="as a CUDA graph failed .*--no-cuda-graphs"):
        failing.add([[1, 2]])
        failing.step(torch.tensor([3]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("quantized", [False, True])
def test_cuda_graph_steps_equal_eager_steps(quantized):
    """Replayed graphs (captured on first use of each bucket, and ahead of time) give the eager step's logits."""
    from almak.modeling.nn.surgery import QuantConfig, quantize_

    model = tiny("llama").half()
    if quantized:
        quantize_(model, QuantConfig(bits=4, group_size=32))
    model.cuda()
    eager = Decoder(model, batch=4, max_len=64, graphs=False)
    graphed = Decoder(model, batch=4, max_len=64)
    assert graphed.graphs
    graphed.capture(4)
    tokens = torch.tensor([11, 12, 13], device="cuda")
    with torch.no_grad():
        for dec in (eager, graphed):
            dec.add([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])
        for step in range(6):
            if step == 3:  # a row leaves: the 2-row bucket is captured on first use
                for dec in (eager, graphed):
                    dec.keep(torch.tensor([2, 0]))
                tokens = tokens[:2]
            want, got = eager.step(tokens), graphed.step(tokens)
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
            tokens = want.argmax(-1)
    assert sorted(graphed._captured) == [2, 4]
    with pytest.raises(AlmakError, match="capture before adding rows"):
        graphed.capture(1)


def test_runs_quantized_layers(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    from almak.modeling.nn.surgery import QuantConfig, quantize_

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    quantize_(model, QuantConfig(bits=4, group_size=32))
    seqs = [[1, 2, 3, 4, 5], [6, 7]]
    dec = Decoder(copy.deepcopy(model), batch=2, max_len=16)
    with torch.no_grad():
        torch.testing.assert_close(dec.add(seqs), reference(model, seqs), **TOL)
        seqs = [s + [9] for s in seqs]
        torch.testing.assert_close(dec.step(torch.tensor([9, 9])), reference(model, seqs), **TOL)


def test_refuses_what_it_cannot_hold():
    model = tiny("llama")
    with pytest.raises(AlmakError, match="the model has 128"):
        Decoder(model, batch=1, max_len=129)
    dec = Decoder(model, batch=1, max_len=4)
    with pytest.raises(AlmakError, match="do not fit the cache"):
        dec.add([[1, 2, 3, 4]])
    with torch.no_grad():
        dec.add([[1, 2, 3]])
        dec.step(torch.tensor([4]))
        with pytest.raises(AlmakError, match="KV cache is full"):
            dec.step(torch.tensor([5]))


@pytest.mark.parametrize("change, message", [
    (dict(config=SimpleNamespace(model_type="gpt2")), "not 'gpt2'"),
    (dict(config=SimpleNamespace(model_type="mistral", sliding_window=4096)), "sliding-window"),
    (dict(generation_config=SimpleNamespace(repetition_penalty=1.2)), "repetition_penalty"),
])
def test_refusals_name_the_hf_engine(change, message):
    model = SimpleNamespace(config=SimpleNamespace(model_type="llama"), generation_config=SimpleNamespace())
    for k, v in change.items():
        setattr(model, k, v)
    with pytest.raises(AlmakError, match=message) as err:
        check_supported(model)
    assert "--engine hf" in str(err.value)
