"""almak's generation loop against transformers' generate on the embedded model, its stopping rule token by
token, and its beam search against exhaustive search on a model small enough to enumerate."""
import itertools
import math

import pytest
import torch

from almak.errors import AlmakError
from almak.modeling.engines.generate import GenerationConfig, LineStop, _beam_search, translate
from almak.modeling.text.prompts import Prompt

pytestmark = pytest.mark.transformers  # tests here build, load or run transformers models (tests/conftest.py)


@pytest.fixture(scope="module")
def sources():
    from almak.modeling.text.data import load_testset

    return load_testset("wmt22:de-en").sources[:6]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_equals_transformers_generate(smollm, sources, batch_size):
    runs = {}
    for engine in ("almak", "hf"):
        ticks = []
        config = GenerationConfig(num_beams=1, max_new_tokens=40, batch_size=batch_size, engine=engine)
        runs[engine] = translate(smollm.model, smollm.tokenizer, sources + [""], Prompt("alma", "de", "en"), config,
                                 ticks.append)
        assert sum(ticks) == len(sources) + 1
    assert runs["almak"].raw == runs["hf"].raw
    assert runs["almak"].generated_tokens == runs["hf"].generated_tokens > 0
    assert runs["almak"].hypotheses[-1] == ""


def test_beam_search_equals_transformers_on_the_embedded_model(smollm, sources):
    """Measured: equal on the first 8 WMT22 de-en sentences with 5 beams (transformers 5.24)."""
    runs = [translate(smollm.model, smollm.tokenizer, sources[:3], Prompt("alma", "de", "en"),
                      GenerationConfig(num_beams=3, max_new_tokens=40, batch_size=2, engine=engine)).raw
            for engine in ("almak", "hf")]
    assert runs[0] == runs[1]


def test_static_step_translates_like_the_dynamic_step(smollm, sources, monkeypatch):
    """The static step that CUDA graphs replay, run eagerly on the CPU inside translate: greedy with rows
    leaving and joining, and beam search over two groups in one decoder, give the same text as before."""
    from almak.modeling.engines.decoder import Decoder

    configs = [GenerationConfig(num_beams=1, max_new_tokens=40, batch_size=4),
               GenerationConfig(num_beams=3, max_new_tokens=40, batch_size=2)]
    prompt = Prompt("alma", "de", "en")
    want = [translate(smollm.model, smollm.tokenizer, sources[:5], prompt, c).raw for c in configs]
    init, static_steps = Decoder.__init__, []

    def static_init(self, *args, **kwargs):
        init(self, *args, **kwargs, static=True)
        static_steps.append(self)

    monkeypatch.setattr(Decoder, "__init__", static_init)
    got = [translate(smollm.model, smollm.tokenizer, sources[:5], prompt, c).raw for c in configs]
    assert len(static_steps) == 2  # one decoder per run, beam search's two groups included
    assert got == want


def byte_tokenizer():
    """A byte-level tokenizer built here (no files): 256 byte tokens, then </s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"</s>": len(vocab), "<pad>": len(vocab) + 1})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")


def random_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval()


def test_hf_engine_pads_left_whatever_the_tokenizer_says(sources):
    """transformers' generate continues each row's last column: a tokenizer that pads on the right (as
    Llama-3's does) must still be padded on the left, and is left as it was."""
    tok = byte_tokenizer()
    assert tok.padding_side == "right"
    model = random_llama(tok)
    runs = [translate(model, tok, sources, Prompt("alma", "de", "en"),
                      GenerationConfig(num_beams=1, max_new_tokens=12, batch_size=4, engine=engine)).raw
            for engine in ("almak", "hf")]
    assert runs[0] == runs[1]
    assert tok.padding_side == "right"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_translate_like_eager_steps_and_generate(sources):
    """On a random-weight LLaMA with a byte tokenizer (nothing to download on a GPU machine): greedy with rows
    joining, and beam search over two groups, give the same text with and without CUDA graphs; greedy also
    equals transformers' generate."""
    tok = byte_tokenizer()
    model = random_llama(tok).cuda()
    prompt = Prompt("alma", "de", "en")
    for beams, engines in ((1, ("almak", "hf")), (3, ("almak",))):
        runs = []
        for engine, graphs in [("almak", True), ("almak", False)] + [(e, False) for e in engines if e == "hf"]:
            config = GenerationConfig(num_beams=beams, max_new_tokens=24, batch_size=4 if beams == 1 else 2,
                                      engine=engine, cuda_graphs=graphs)
            runs.append(translate(model, tok, sources, prompt, config).raw)
        assert all(r == runs[0] for r in runs[1:]), beams
        assert all(runs[0])


class PieceTokenizer:
    """Just enough tokenizer for LineStop: token i decodes to PIECES[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def batch_decode(self, ids, skip_special_tokens=True):
        return [self.pieces[i[0]] for i in ids]


def test_line_stop_matches_the_text_rule():
    pieces = ["\n", " ", "Hi", "\n\n", " there\n", "x", "<eos>"]
    stop = LineStop(PieceTokenizer(pieces), eos=[6], vocab_size=len(pieces), device="cpu")
    for seq in itertools.product(range(len(pieces)), repeat=3):
        has_text, done_at = torch.zeros(1, dtype=torch.bool), None
        for n, t in enumerate(seq):
            done, has_text = stop(torch.tensor([t]), has_text)
            if done.item() and done_at is None:
                done_at = n
        # the rule generate's _LineComplete applies to the decoded text, prefix by prefix
        text_done = [6 in seq[: n + 1] or "\n" in "".join(pieces[i] for i in seq[: n + 1] if i != 6).lstrip()
                     for n in range(3)]
        assert done_at == (text_done.index(True) if True in text_done else None), seq


def test_beam_search_finds_the_exhaustive_optimum():
    """With beams enough to hold every prefix, beam search is exact: the best complete sequence by
    log-probability over length, among those that end their line or emit EOS and those cut by the budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pieces = ["a", "b", "\n", "c", "d", "<eos>"]
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with torch.no_grad():  # sharpen the random model so the sequences' scores differ clearly
        model.lm_head.weight.mul_(40)
    prompt, budget, eos = [0, 3], 3, [5]
    tokenizer = PieceTokenizer(pieces)
    found = _beam_search(model, LineStop(tokenizer, eos, 6, "cpu"), [0], {0: prompt},
                         GenerationConfig(num_beams=36, max_new_tokens=budget), None)[0]

    def logprob(seq):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + seq])).logits[0].double(), -1)
        return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))

    stop = LineStop(tokenizer, eos, 6, "cpu")
    best, best_score = None, -math.inf
    for n in range(1, budget + 1):
        for seq in itertools.product(range(6), repeat=n):
            has_text, ends = torch.zeros(1, dtype=torch.bool), []
            for t in seq:
                done, has_text = stop(torch.tensor([t]), has_text)
                ends.append(done.item())
            if any(ends[:-1]) or (n < budget and not ends[-1]):
                continue  # stopped earlier, or neither finished nor cut by the budget
            score = logprob(list(seq)) / n
            if score > best_score:
                best, best_score = list(seq), score
    assert found == best, (found, best)


def test_unsupported_model_names_the_hf_engine(smollm):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(smollm.tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    gpt2.generation_config.pad_token_id = smollm.tokenizer.pad_token_id
    prompt = Prompt("alma", "de", "en")
    with pytest.raises(AlmakError, match="--engine hf"):
        translate(gpt2, smollm.tokenizer, ["Hallo"], prompt, GenerationConfig(num_beams=1, max_new_tokens=3))
    out = translate(gpt2, smollm.tokenizer, ["Hallo"], prompt,
                    GenerationConfig(num_beams=1, max_new_tokens=3, engine="hf"))
    assert len(out.hypotheses) == 1


def test_unknown_engine_is_refused():
    with pytest.raises(AlmakError, match="unknown engine 'tgi'"):
        GenerationConfig(engine="tgi")
