"""almak.modeling.pipelines.distill on a tiny random LLaMA: the loss, structure kept (2:4 masks, int4 codes), recovery."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from almak.errors import AlmakError
from almak.modeling.checkpoint import save_pruned, save_quantized
from almak.modeling.engines.scoring import target_nll, teacher_forcing_batch
from almak.modeling.load import load_model
from almak.modeling.nn.quant_linear import QuantLinear
from almak.modeling.nn.sparse_linear import Sparse24Linear
from almak.modeling.nn.surgery import QuantConfig, quantize_, sparsify_, target_linears
from almak.modeling.pipelines.distill import DistillConfig, distill_model, kd_loss, prepare_student
from almak.modeling.text.data import read_json_records
from almak.modeling.text.prompts import Prompt
from almak.sparse.masks import apply_mask_, nm_mask


@pytest.fixture(scope="module")
def teacher(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), device="cpu", dtype="float32")


def config(pairs_file, **kw):
    fields = dict(data=str(pairs_file), valid=str(pairs_file), valid_sentences=8, steps=6, batch_size=4,
                  grad_accum=1, max_len=96, eval_every=0, save_every=0, lr=2e-3)
    fields.update(kw)
    return DistillConfig(**fields)


def pruned_student(teacher, folder, only=("gate_proj", "up_proj")):
    """Magnitude 2:4 on the MLP's gate/up projections, stored 2:4; the rest dense (skipped by the pruner)."""
    model = copy.deepcopy(teacher.model)
    names = [n for n, _ in target_linears(model) if n.rsplit(".", 1)[-1] in only]
    for name in names:
        linear = model.get_submodule(name)
        apply_mask_(linear, nm_mask(linear.weight.abs(), 2, 4))
    sparsify_(model, names=names)
    save_pruned(model, teacher.tokenizer, folder, {"method": "magnitude", "pattern": "2:4"}, {"pruned": names})
    return load_model(str(folder), device="cpu", dtype="float32"), names


def quantized_student(teacher, folder):
    model = copy.deepcopy(teacher.model)
    quantize_(model, QuantConfig(bits=4, group_size=32))
    save_quantized(model, teacher.tokenizer, folder, {"method": "rtn", "bits": 4, "group_size": 32})
    return load_model(str(folder), device="cpu", dtype="float32")


def batch(teacher, pairs_file):
    ts = read_json_records(pairs_file)[:3]
    seqs = Prompt("alma", "de", "en").encode_many([r["translation"]["de"] for r in ts],
                                                  [r["translation"]["en"] for r in ts], teacher.tokenizer)
    return teacher_forcing_batch(seqs, teacher.tokenizer.pad_token_id)


def test_kd_loss_is_cross_entropy_at_alpha_0_and_zero_against_itself(teacher, pairs_file):
    ids, attn, labels = batch(teacher, pairs_file)
    model = teacher.model
    with torch.no_grad():
        ce = target_nll(model(input_ids=ids, attention_mask=attn).logits, labels)[0]
        assert torch.allclose(kd_loss(model, 0.0, 2.0)(model, ids, attn, labels), ce)
        assert abs(float(kd_loss(model, 1.0, 2.0)(model, ids, attn, labels))) < 1e-3  # KL of a model to itself
        mixed = kd_loss(model, 0.25, 1.0)(model, ids, attn, labels)
        assert torch.allclose(mixed, 0.75 * ce, atol=1e-3)


def test_pruned_student_recovers_and_stays_2_to_4(teacher, pairs_file, tmp_path):
    student, names = pruned_student(teacher, tmp_path / "s24")
    before = {n: student.model.get_submodule(n).dense_weight().clone() for n in names}
    result = distill_model(student.model, teacher.model, teacher.tokenizer, "alma",
                     config(pairs_file, lr=None, lr_pruned=3e-3), tmp_path / "kd", str(tmp_path / "s24"), "tiny")
    s = result.summary
    assert s["val_ppl_after"] < s["val_ppl_before"] and s["trains"] == "pruned"
    out = load_model(str(tmp_path / "kd"), device="cpu", dtype="float32").model
    for name, module in target_linears(out):
        if name in names:
            assert isinstance(module, Sparse24Linear)
            W, W0 = module.dense_weight(), before[name]
            assert torch.equal(W == 0, W0 == 0)  # the same pattern: pruned weights stayed zero, none was added
            assert not torch.equal(W, W0)  # the kept ones trained
        else:  # skipped by the pruner: the teacher's own, frozen
            assert torch.equal(module.weight, teacher.model.get_submodule(name).weight)
    recipe = json.loads((tmp_path / "kd" / "almak_recipe.json").read_text())
    assert recipe["method"] == "magnitude" and recipe["distill"]["teacher"] == "tiny"
    assert json.loads((tmp_path / "kd" / "sparsity_report.json").read_text())["pruned"] == names
    assert (tmp_path / "kd" / "train_log.jsonl").is_file()


def test_quantized_student_keeps_codes_and_trains_scales(teacher, pairs_file, tmp_path):
    student = quantized_student(teacher, tmp_path / "w4")
    codes = {n: m.codes().clone() for n, m in target_linears(student.model)}
    scales = {n: m.weight_scale.clone() for n, m in target_linears(student.model)}
    result = distill_model(student.model, teacher.model, teacher.tokenizer, "alma", config(pairs_file, lr=1e-2),
                     tmp_path / "kd", str(tmp_path / "w4"), "tiny")
    assert result.summary["val_ppl_after"] < result.summary["val_ppl_before"]
    assert result.summary["trains"] == "quantized"
    out = load_model(str(tmp_path / "kd"), device="cpu", dtype="float32").model
    changed = 0
    for name, module in target_linears(out):
        assert isinstance(module, QuantLinear) and module.bits == 4 and module.group_size == 32
        assert torch.equal(module.codes(), codes[name])
        changed += not torch.equal(module.weight_scale, scales[name])
    assert changed == len(codes)
    assert all(torch.equal(p, q) for p, q in zip(out.model.embed_tokens.parameters(),
                                                 teacher.model.model.embed_tokens.parameters()))


def test_trainable_scales_compute_the_quantized_layer(teacher):
    """The training forward (q - z) * s equals QuantLinear's own, asymmetric and per-channel included."""
    from almak.modeling.pipelines.distill import TrainableScales

    linear = nn.Linear(96, 64)
    x = torch.randn(5, 96)
    for bits, group, sym in ((4, 32, True), (4, 64, False), (8, -1, True)):
        layer = QuantLinear.from_float(linear, bits=bits, group_size=group, sym=sym)
        with torch.no_grad():
            torch.testing.assert_close(TrainableScales(layer)(x), F_linear(x, layer), rtol=1e-4, atol=1e-4)


def F_linear(x, layer):
    return torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias)


def test_a_float_student_trains_every_weight(teacher):
    model = copy.deepcopy(teacher.model)
    student = prepare_student(model)
    assert student.full and student.kind == "every weight" and not student.masks and not student.scales
    assert all(p.requires_grad for p in model.parameters())


def test_config_refusals():
    with pytest.raises(AlmakError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(AlmakError, match="temperature"):
        DistillConfig(temperature=0)


def test_resume_gives_the_uninterrupted_result(teacher, pairs_file, tmp_path):
    """Stopped after its step-2 checkpoint and resumed, a 4-step run ends with the same scales as a run that was
    never stopped (the optimizer's per-group rates and state come back too)."""
    student = quantized_student(teacher, tmp_path / "w4")
    cfg = dict(steps=4, save_every=2, lr=None, lr_scales=1e-2)
    whole = distill_model(copy.deepcopy(student.model), teacher.model, teacher.tokenizer, "alma", config(pairs_file, **cfg),
                    tmp_path / "whole", str(tmp_path / "w4"), "tiny").model

    class Stop(Exception):
        pass

    def stop_after_2(event):
        if event["event"] == "step" and event["step"] == 3:
            raise Stop
    with pytest.raises(Stop):
        distill_model(copy.deepcopy(student.model), teacher.model, teacher.tokenizer, "alma", config(pairs_file, **cfg),
                tmp_path / "cut", str(tmp_path / "w4"), "tiny", progress=stop_after_2)
    resumed = distill_model(copy.deepcopy(student.model), teacher.model, teacher.tokenizer, "alma",
                      config(pairs_file, **cfg), tmp_path / "cut", str(tmp_path / "w4"), "tiny", resume=True).model
    for (name, a), (_, b) in zip(target_linears(whole), target_linears(resumed)):
        assert torch.equal(a.weight_scale, b.weight_scale), name


def test_kd_term_is_kl_of_teacher_to_student_at_temperature(teacher, pairs_file):
    """With a student that differs from its teacher, kd_loss equals an independent computation of
    (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T) over the target tokens, and depends on the teacher."""
    ids, attn, labels = batch(teacher, pairs_file)
    student = copy.deepcopy(teacher.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std())
        # The random model's logits are nearly flat; sharpen the student's so that it is far from the teacher
        # and KL(teacher || student) != KL(student || teacher).
        student.model.norm.weight.mul_(40)
    T, alpha = 2.0, 0.7
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
        t = teacher.model(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
        target = labels[:, 1:]
        keep = target != -100
        s, t, target = s[keep], t[keep], target[keep]
        ce = torch.nn.functional.cross_entropy(s, target, reduction="sum")
        log_pt, log_ps = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        reverse = (log_ps.exp() * (log_ps - log_pt)).sum()
        assert abs(float(reverse - kl)) > 0.05 * float(kl)  # so that a reversed KL cannot pass
        expected = (1 - alpha) * ce + alpha * T * T * kl
        got = kd_loss(teacher.model, alpha, T)(student, ids, attn, labels)
        assert kl > 1.0  # the two models really differ
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)
        # Another teacher (the student itself: KL 0) gives another loss.
        assert float(kd_loss(student, alpha, T)(student, ids, attn, labels)) < 0.5 * float(got)


# ---------------------------------------------------------------------------- students of another shape (issue 36)


def kd_of(student_model, teacher, pairs_file) -> float:
    ids, attn, labels = batch(teacher, pairs_file)
    with torch.no_grad():
        return float(kd_loss(teacher.model, 1.0, 2.0)(student_model, ids, attn, labels))


def test_a_smaller_student_trains_every_weight_and_its_kd_loss_falls(teacher, pairs_file, tmp_path):
    """A structured-pruned student (one layer, fewer heads, a narrower MLP and hidden size) learns its teacher:
    every weight moves, the KD loss on held data falls, and the result is a plain model of the student's shape."""
    from almak.modeling.pipelines.distill import distill
    from almak.modeling.pipelines.structured import StructuredRecipe, prune_structured

    small = tmp_path / "small"
    prune_structured(teacher.ref,
                     StructuredRecipe(layers=1, heads=4, kv_heads=2, mlp=128, hidden=64, nsamples=4, seqlen=32),
                     small, device="cpu")
    before = load_model(str(small), device="cpu", dtype="float32").model
    kd_before = kd_of(before, teacher, pairs_file)
    result = distill(str(small), teacher.ref, config(pairs_file, steps=8, alpha=1.0, lr=3e-3), tmp_path / "kd",
                     device="cpu", dtype="float32")
    assert result.summary["trains"] == "every weight"
    after = load_model(str(tmp_path / "kd"), device="cpu", dtype="float32").model
    assert after.config.hidden_size == 64 and after.config.num_hidden_layers == 1
    moved = {n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])}
    assert moved == set(before.state_dict()), sorted(set(before.state_dict()) - moved)
    assert kd_of(after, teacher, pairs_file) < 0.9 * kd_before
    recipe = json.loads((tmp_path / "kd" / "almak_recipe.json").read_text())
    assert recipe["method"] == "structured" and recipe["distill"]["trains"] == "every weight"
    assert (tmp_path / "kd" / "structure_report.json").is_file()


def test_a_student_with_another_tokenizer_is_refused(teacher, pairs_file, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from almak.modeling.pipelines.distill import distill

    tok = copy.deepcopy(teacher.tokenizer)
    tok.add_tokens(["<almak-extra>"])
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(AlmakError, match=r"the student's tokenizer has \d+ tokens and the teacher's \d+"):
        distill(str(other), teacher.ref, config(pairs_file), tmp_path / "kd", device="cpu")
    assert not (tmp_path / "kd").exists()


def test_sequence_level_targets_are_the_teachers_translations(teacher, pairs_file, tmp_path, monkeypatch):
    """--targets teacher: the run trains on the teacher's own greedy translations of the sources it sees, made once
    (cached) and equal to what almak translate gives."""
    from almak.modeling.engines.generate import GenerationConfig, translate
    from almak.modeling.pipelines.distill import teacher_targets

    monkeypatch.setenv("ALMAK_CACHE", str(tmp_path / "cache"))
    cfg = config(pairs_file, targets="teacher", steps=2, batch_size=2, max_len=24)
    events = []
    path = teacher_targets(teacher, "alma", cfg, events.append)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert 0 < len(records) <= 4 and events[-1]["done"] == 4 == events[-1]["total"]
    sources = [r["src"] for r in records]
    want = translate(teacher.model, teacher.tokenizer, sources, Prompt("alma", "de", "en"),
                     GenerationConfig(num_beams=1, max_new_tokens=24, batch_size=8)).hypotheses
    assert [r["ref"] for r in records] == want and all(r["langs"] == "de-en" for r in records)
    again = []
    assert teacher_targets(teacher, "alma", cfg, again.append) == path and not again  # cached: nothing translated
