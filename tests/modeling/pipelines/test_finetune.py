"""almak.modeling.pipelines.finetune on a tiny random LLaMA: masking, learning, adapter round trip, resume, refusals."""
import json

import pytest
import torch

from almak.errors import AlmakError
from almak.modeling.engines.scoring import target_nll, teacher_forcing_batch
from almak.modeling.load import load_model
from almak.modeling.pipelines.finetune import (
    GROUP_STEPS,
    BatchPlan,
    ExampleOrder,
    FinetuneConfig,
    encode_examples,
    finetune_model,
    load_pairs,
    trainable_parameters,
)
from almak.modeling.text.prompts import Prompt

pytest.importorskip("peft")


def small(pairs_file, **kw):
    """A fast run: 16 pairs, short examples, validated on the training pairs themselves."""
    fields = dict(data=str(pairs_file), valid=str(pairs_file), valid_sentences=8, steps=4, batch_size=4, grad_accum=1,
                  max_len=96, eval_every=0, save_every=0, lr=1e-2)
    fields.update(kw)
    return FinetuneConfig(**fields)


def fresh(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu", dtype="float32")


def test_examples_end_as_the_family_answers_and_labels_mask_the_prompt(tiny_llama_dir):
    tok = fresh(tiny_llama_dir).tokenizer
    (p, t), = Prompt("alma", "de", "en").encode_many(["Guten Morgen."], ["Good morning."], tok, terminate=True)
    assert tok.decode(t) == " Good morning.\n"  # ALMA's answer is one line
    assert tok.decode(p).endswith("German: Guten Morgen.\nEnglish:")
    (_, t_chat), = Prompt("chat", "de", "en").encode_many(["Guten Morgen."], ["Good morning."], tok, terminate=True)
    assert t_chat[-1] == tok.eos_token_id and tok.decode(t_chat[:-1]) == "Good morning."
    # reference perplexity scores the same tokens without the terminator
    assert Prompt("alma", "de", "en").encode("Guten Morgen.", "Good morning.", tok) == (p, t[:-1])

    short = (p[:3], t[:2])
    ids, attn, labels = teacher_forcing_batch([(p, t), short], tok.pad_token_id)
    assert labels[0].tolist() == [-100] * len(p) + t
    assert labels[1].tolist() == [-100] * 3 + t[:2] + [-100] * (len(p) + len(t) - 5)  # prompt and padding masked
    assert attn[1].sum() == 5 and ids[0].tolist() == p + t


def test_a_step_loss_is_the_mean_nll_of_its_target_tokens(tiny_llama_dir, pairs_file, tmp_path):
    """The first logged loss (LoRA starts as the identity: B = 0) equals the per-token mean NLL of the step's
    examples' targets, scored one example at a time: padding, prompt and accumulation do not leak in."""
    lm = fresh(tiny_llama_dir)
    config = small(pairs_file, lora_dropout=0.0, batch_size=3, grad_accum=2, steps=1)
    examples = encode_examples(load_pairs(config.data), lm.tokenizer, "alma", config.max_len)
    order = ExampleOrder(len(examples), config.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for g in range(6):
            p, t = examples[order[g]]
            ids, _, labels = teacher_forcing_batch([(p, t)], lm.tokenizer.pad_token_id)
            nll, n = target_nll(lm.model(input_ids=ids).logits, labels)
            total, count = total + float(nll), count + n
    finetune_model(lm.model, lm.tokenizer, "alma", config, tmp_path / "ft")
    logged = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    step1 = next(e for e in logged if "loss" in e)
    assert step1["target_tokens"] == count
    assert step1["loss"] == pytest.approx(total / count, rel=1e-5)


# Measured: LoRA 51810 -> 45241, full 51810 -> 20324 (a random model starts near ln(vocab) = 10.8 nats; LoRA
# cannot touch lm_head, where most of a random model's easy gains are).
@pytest.mark.parametrize("full, lr, ratio", [(False, 1e-2, 0.9), (True, 3e-3, 0.5)])
def test_a_few_steps_lower_the_loss(tiny_llama_dir, pairs_file, tmp_path, full, lr, ratio):
    lm = fresh(tiny_llama_dir)
    config = small(pairs_file, full=full, steps=6, lr=lr)
    result = finetune_model(lm.model, lm.tokenizer, "alma", config, tmp_path / "ft")
    s = result.summary
    assert s["val_ppl_after"] < ratio * s["val_ppl_before"], s
    assert s["train_loss_last"] < s["train_loss_first"]
    n_all = sum(p.numel() for p in result.model.parameters())
    if full:
        assert s["trainable_parameters"] == n_all
        assert (tmp_path / "ft" / "model.safetensors").is_file() and (tmp_path / "ft" / "config.json").is_file()
    else:
        # rank 16 on q/k/v/o (96 -> 96, 96 -> 32) and gate/up/down (96 <-> 256), 2 layers
        per_layer = 16 * ((96 + 96) * 2 + (96 + 32) * 2 + (96 + 256) * 3)
        assert s["trainable_parameters"] == 2 * per_layer
    assert not (tmp_path / "ft" / "checkpoint").exists()
    recipe = json.loads((tmp_path / "ft" / "almak_finetune.json").read_text())
    assert recipe["method"] == ("full" if full else "lora") and recipe["data"]["train"] == {"de-en": 16}
    assert recipe["val_ppl_after"] == s["val_ppl_after"] and recipe["almak_version"]
    assert recipe["config"]["lr"] == config.learning_rate


def test_adapter_loads_merged_with_the_same_logits(tiny_llama_dir, pairs_file, tmp_path, monkeypatch):
    """The adapter loads merged into its base, the merge cached: the second load reads the merged folder, and an
    adapter written again is merged again."""
    from peft import PeftModel

    monkeypatch.setenv("ALMAK_CACHE", str(tmp_path / "cache"))
    lm = fresh(tiny_llama_dir)
    out = tmp_path / "ft"
    result = finetune_model(lm.model, lm.tokenizer, "alma", small(pairs_file), out)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_llama_dir.resolve()) and adapter["r"] == 16
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    ids = torch.tensor([lm.tokenizer("Translate this from German to English:\nGerman: Hallo\nEnglish:")["input_ids"]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids).logits
        base = fresh(tiny_llama_dir).model(input_ids=ids).logits
        merged = load_model(str(out), device="cpu").model(input_ids=ids).logits
        peft_loaded = PeftModel.from_pretrained(fresh(tiny_llama_dir).model, str(out)).eval()(input_ids=ids).logits
    assert not torch.allclose(trained, base, atol=1e-3)  # the adapter changed the model
    torch.testing.assert_close(peft_loaded, trained, rtol=0, atol=1e-6)  # same computation, reloaded
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)  # merging into W reorders fp32 sums
    cached = list((tmp_path / "cache" / "merged").iterdir())
    assert len(cached) == 1 and load_model(str(out), device="cpu").path == str(cached[0])
    with torch.no_grad():  # a changed adapter (here: its LoRA B doubled) is merged anew, not read from the cache
        from safetensors.torch import load_file, save_file

        tensors = load_file(out / "adapter_model.safetensors")
        save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, out / "adapter_model.safetensors")
        again = load_model(str(out), device="cpu")
        assert again.path != str(cached[0]) and len(list((tmp_path / "cache" / "merged").iterdir())) == 2
        assert not torch.allclose(again.model(input_ids=ids).logits, merged, atol=1e-4)


def test_batch_plan_deals_each_steps_examples_once(tiny_llama_dir):
    lengths = [(i * 37) % 101 for i in range(50)]
    plain = BatchPlan(lengths, FinetuneConfig(batch_size=3, grad_accum=2))
    order = ExampleOrder(50, 0)
    assert plain(1) == [[order[0], order[1], order[2]], [order[3], order[4], order[5]]]
    assert plain(4)[1] == [order[21], order[22], order[23]]

    config = FinetuneConfig(batch_size=3, grad_accum=2, group_by_length=True)
    plan = BatchPlan(lengths, config)
    for chunk in range(2):  # the steps of a chunk see the chunk's examples (as without grouping), 6 per step
        steps = [plan(chunk * GROUP_STEPS + j + 1) for j in range(GROUP_STEPS)]
        assert all(len(s) == 2 and all(len(m) == 3 for m in s) for s in steps)
        dealt = sorted(e for s in steps for m in s for e in m)
        first = chunk * GROUP_STEPS * 6
        assert dealt == sorted(order[g] for g in range(first, first + GROUP_STEPS * 6))
        # each micro-batch holds neighbours in length order: no example of another micro-batch lies strictly inside
        ranges = [(min(lengths[e] for e in m), max(lengths[e] for e in m)) for s in steps for m in s]
        micro_lengths = [[lengths[e] for e in m] for s in steps for m in s]
        for i, (lo, hi) in enumerate(ranges):
            assert not any(lo < x < hi for j, m in enumerate(micro_lengths) if j != i for x in m)
    assert sorted(len(set(map(tuple, plan(j + 1)))) for j in range(GROUP_STEPS)) == [2] * GROUP_STEPS
    lengths_of_steps = [sum(lengths[e] for m in plan(j + 1) for e in m) for j in range(GROUP_STEPS)]
    assert lengths_of_steps != sorted(lengths_of_steps)  # micro-batches are dealt at random, not shortest first
    again = BatchPlan(lengths, config)
    assert [again(k) for k in (20, 3, 17)] == [plan(k) for k in (20, 3, 17)]  # a function of the step alone


def test_bf16_autocast_trains_float32_adapters(tiny_llama_dir, pairs_file, tmp_path):
    logs = {}
    for bf16 in (False, True):
        lm = fresh(tiny_llama_dir)
        result = finetune_model(lm.model, lm.tokenizer, "alma", small(pairs_file, steps=6, bf16=bf16, lora_dropout=0.0),
                          tmp_path / f"ft-{bf16}")
        assert all(p.dtype == torch.float32 for p in trainable_parameters(result.model).values())
        assert result.summary["val_ppl_after"] < 0.9 * result.summary["val_ppl_before"]
        logs[bf16] = [json.loads(line) for line in (tmp_path / f"ft-{bf16}" / "train_log.jsonl").read_text().splitlines()]
    first = [next(e["loss"] for e in logs[b] if "loss" in e) for b in (False, True)]
    assert first[1] == pytest.approx(first[0], rel=2e-2) and first[1] != first[0]  # bfloat16 matmuls, same model


@pytest.mark.parametrize("fast", [{}, {"bf16": True, "group_by_length": True}])
def test_resume_gives_the_uninterrupted_result(tiny_llama_dir, pairs_file, tmp_path, fast):
    """6 steps straight == 3 steps, a crash during step 4, --resume from the step-3 checkpoint (dropout on)."""
    from safetensors.torch import load_file

    config = small(pairs_file, steps=6, save_every=3, eval_every=2, batch_size=2, grad_accum=2, lora_dropout=0.1,
                   **fast)
    straight = tmp_path / "straight"
    lm = fresh(tiny_llama_dir)
    finetune_model(lm.model, lm.tokenizer, "alma", config, straight)

    class Crash(Exception):
        pass

    def crash_at_step_4(event):
        if event["event"] == "step" and event["step"] == 4:
            raise Crash

    resumed = tmp_path / "resumed"
    lm = fresh(tiny_llama_dir)
    with pytest.raises(Crash):
        finetune_model(lm.model, lm.tokenizer, "alma", config, resumed, progress=crash_at_step_4)
    state = json.loads((resumed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["examples_seen"] == 12
    at_3 = load_file(resumed / "checkpoint" / "weights.safetensors")

    events = []
    lm = fresh(tiny_llama_dir)
    finetune_model(lm.model, lm.tokenizer, "alma", config, resumed, resume=True, progress=events.append)
    assert events[0] == {"event": "start", "step": 3}

    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    moved = [k for k in at_3 if "lora_B" in k]
    assert moved and any(not torch.equal(at_3[k], a[k.replace(".default", "")]) for k in moved)
    assert (resumed / "train_log.jsonl").read_text() == (straight / "train_log.jsonl").read_text()


def test_resume_refuses_other_settings(tiny_llama_dir, pairs_file, tmp_path):
    lm = fresh(tiny_llama_dir)
    out = tmp_path / "ft"

    def stop(event):
        if event["event"] == "step" and event["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_model(lm.model, lm.tokenizer, "alma", small(pairs_file, save_every=2), out, progress=stop)
    with pytest.raises(AlmakError, match=r"made with lr=0.01 \(now 0.001\)"):
        finetune_model(fresh(tiny_llama_dir).model, lm.tokenizer, "alma", small(pairs_file, save_every=2, lr=1e-3), out,
                 resume=True)
    with pytest.raises(AlmakError, match="exists; pass --overwrite to replace it, or --resume"):
        finetune_model(fresh(tiny_llama_dir).model, lm.tokenizer, "alma", small(pairs_file), out)


def test_gradient_accumulation_equals_one_bigger_batch(tiny_llama_dir, pairs_file, tmp_path):
    """Token-weighted accumulation: 2 x 2 examples give the gradient of 1 x 4 (the examples differ in length, so
    averaging per forward pass would not). Compared through the logged pre-clipping gradient norm, since Adam's
    first update is close to lr * sign(gradient) whatever the gradient's scale."""
    logs = []
    for i, (bs, ga) in enumerate([(4, 1), (2, 2), (1, 4)]):
        lm = fresh(tiny_llama_dir)
        config = small(pairs_file, full=True, steps=1, batch_size=bs, grad_accum=ga, valid_sentences=0)
        finetune_model(lm.model, lm.tokenizer, "alma", config, tmp_path / str(i))
        logs.append(json.loads((tmp_path / str(i) / "train_log.jsonl").read_text().splitlines()[0]))
    lengths = [len(t) for _, t in encode_examples(load_pairs(str(pairs_file)), lm.tokenizer, "alma", 96)]
    assert len(set(lengths)) > 1
    for log in logs[1:]:
        assert log["target_tokens"] == logs[0]["target_tokens"]
        assert log["loss"] == pytest.approx(logs[0]["loss"], rel=1e-5)
        assert log["grad_norm"] == pytest.approx(logs[0]["grad_norm"], rel=1e-4)


def test_alma_spec_and_refusals():
    sets = load_pairs("alma:de-en,en-de")
    assert [(ts.src, ts.tgt) for ts in sets] == [("de", "en"), ("en", "de")]
    assert len(sets[0].sources) == 14211 and sets[1].sources == sets[0].references
    assert len(load_pairs("alma")) == 10
    with pytest.raises(AlmakError, match="no bundled ALMA pairs for de-fr"):
        load_pairs("alma:de-fr")
    with pytest.raises(AlmakError, match="names no direction"):
        load_pairs("alma:")
    with pytest.raises(AlmakError, match="steps must be a positive integer"):
        FinetuneConfig(steps=0)
    with pytest.raises(AlmakError, match="warmup is a fraction"):
        FinetuneConfig(warmup=1.5)
    assert FinetuneConfig(full=True).learning_rate == 2e-5 and FinetuneConfig().learning_rate == 2e-4
    assert "lora_rank" not in FinetuneConfig(full=True).to_json()


def test_validation_uses_the_bundled_valid_split_where_there_is_one():
    from almak.modeling.pipelines.finetune import validation_sets

    sets = validation_sets(FinetuneConfig(valid_sentences=5), [("de", "en"), ("en", "de"), ("is", "en")])
    assert [(ts.name, len(ts.sources)) for ts in sets] == [("alma-valid:de-en", 3), ("alma-valid:en-de", 3)]


def test_shipped_translator_beats_its_base_on_reference_perplexity(smollm):
    """smollm2-135m-mt (data/adapters, made by `make smollm2-135m-mt`) loads by name with its base merged in, and
    is the better de-en and en-de model by reference perplexity on WMT22 sentences it was not trained on."""
    from almak.modeling.engines.scoring import reference_nll
    from almak.modeling.load import ADAPTERS
    from almak.modeling.text.data import load_testset

    recipe = json.loads((ADAPTERS["smollm2-135m-mt"] / "almak_finetune.json").read_text())
    assert recipe["base_model"] == "smollm2-135m" and recipe["data"]["train"] == {"de-en": 14211, "en-de": 14211}
    mt = load_model("smollm2-135m-mt", device="cpu", dtype="float32")
    for pair in ("de-en", "en-de"):
        ts = load_testset(f"wmt22:{pair}").head(20)
        prompt = Prompt("alma", ts.src, ts.tgt)
        base = reference_nll(smollm.model, smollm.tokenizer, ts.sources, ts.references, prompt)
        tuned = reference_nll(mt.model, mt.tokenizer, ts.sources, ts.references, prompt)
        assert tuned.ppl < 0.9 * base.ppl, (pair, tuned.ppl, base.ppl)
