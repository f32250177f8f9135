"""Several teachers: mixture in probability space vs float64 reference, weights (1, 0) equal the single teacher, `sum`
mode, config list of teacher paths, bad inputs."""

import copy

import pytest
import torch
from conftest import distill_config, make_llama, make_lm_trainer, make_tokenizer, tokenized_texts
from transformers import DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer
from hf_distill.losses import logit_divergence
from hf_distill.teachers.ensemble import mixture_log_probs


TEXTS = ["the cat sat on the mat", "a dog ran fast", "the big red dog is slow and the cat is small", "one plus two"]


def tokenized(tok):
    return tokenized_texts(tok, TEXTS)


MULTI = {"max_steps": 1, "temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.3}


def config(tmp_path, **kw):
    return distill_config(tmp_path, **{**MULTI, **kw})


def make(tmp_path, tok, teachers, student=None, **kw):
    return make_lm_trainer(tmp_path, tok, TEXTS, student=student, teacher=teachers, **{**MULTI, **kw})


def test_mixture_log_probs_vs_float64():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g, dtype=torch.float64)
    got = mixture_log_probs([a, b], [3.0, 1.0], temperature=1.5)
    ref = (0.75 * torch.softmax(a / 1.5, -1) + 0.25 * torch.softmax(b / 1.5, -1)).log()
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(mixture_log_probs([a, b], [1.0, 0.0]), torch.log_softmax(a, -1), atol=1e-12)
    with pytest.raises(ValueError, match="positive sum"):
        mixture_log_probs([a, b], [0.0, 0.0])


@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_weights_one_zero_equal_single_teacher(tmp_path, tokenizer, mode):
    student = make_llama(2, 32)
    first, second = make_llama(4, 64, seed=1), make_llama(3, 48, seed=2)
    single = make(
        tmp_path / "single", tokenizer, copy.deepcopy(first), copy.deepcopy(student), use_fused_kd_loss=False
    )
    multi = make(
        tmp_path / "multi",
        tokenizer,
        [copy.deepcopy(first), second],
        copy.deepcopy(student),
        teacher_weights=[1.0, 0.0],
        multi_teacher_mode=mode,
    )
    assert multi.teacher is multi.teachers[0] and len(multi.teachers) == 2
    batch = next(iter(single.get_train_dataloader()))
    loss_single = single.compute_loss(single.model, batch)
    loss_multi = multi.compute_loss(multi.model, batch)
    assert torch.allclose(loss_single, loss_multi, atol=1e-6)
    loss_single.backward()
    loss_multi.backward()
    for p, q in zip(single.model.parameters(), multi.model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert {"kd_teacher0_loss", "kd_teacher1_loss"} <= set(multi._metrics["train"])


def manual_kd(student, teachers, batch, weights, mode, temperature):
    with torch.no_grad():
        t_logits = [t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for t in teachers]
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    s = s_logits[:, :-1][mask].double()
    ts = [t[:, :-1][mask].double() for t in t_logits]
    if mode == "sum":
        return sum(w * logit_divergence(s, t, temperature=temperature).sum() for w, t in zip(weights, ts))
    p_mix = sum(w / sum(weights) * torch.softmax(t / temperature, -1) for w, t in zip(weights, ts))
    log_s = torch.log_softmax(s / temperature, -1)
    return (p_mix * (p_mix.log() - log_s)).sum()


@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_two_teachers_match_reference(tmp_path, tokenizer, mode):
    teachers = [make_llama(4, 64, seed=1), make_llama(3, 48, seed=2)]
    t = make(tmp_path, tokenizer, teachers, teacher_weights=[0.6, 0.9], multi_teacher_mode=mode)
    batch = next(iter(t.get_train_dataloader()))
    t.compute_loss(t.model, batch)
    kd_sum, _ = t._metrics["train"]["kd_loss"][-1]
    expected = manual_kd(t.model, t.teachers, batch, [0.6, 0.9], mode, 2.0)
    assert abs(kd_sum - expected.item()) < 1e-4
    t.train()
    logs = [e for e in t.state.log_history if "kd_loss" in e]
    assert logs and {"kd_teacher0_loss", "kd_teacher1_loss", "top1_agreement"} <= set(logs[0])


def test_teachers_from_config_paths(tmp_path, tokenizer):
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"teacher{seed}"
        make_llama(3, 48, seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    t = DistillationTrainer(
        model=make_llama(2, 32),
        args=config(tmp_path, teacher_model_name_or_path=paths),
        train_dataset=tokenized(tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    assert len(t.teachers) == 2 and t.teacher_source.name != "live-fused"
    t.train()


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="`teacher_weights` has 3 entries for 2 teachers"):
        config(tmp_path, teacher_model_name_or_path=["a", "b"], teacher_weights=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="teacher_models_name_or_path"):  # gone: a list in teacher_model_name_or_path
        config(tmp_path, teacher_models_name_or_path=["a", "b"])
    with pytest.raises(ValueError, match="a name or a list of names"):
        config(tmp_path, teacher_model_name_or_path=[])
    with pytest.raises(ValueError, match="positive sum"):
        config(tmp_path, teacher_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="must be 'mixture' or 'sum'"):
        config(tmp_path, multi_teacher_mode="max")
    with pytest.raises(ValueError, match="`teacher_weights` has 1 entries for 2 teachers"):
        make(tmp_path, tokenizer, [make_llama(4, 64, seed=1), make_llama(4, 64, seed=2)], teacher_weights=[1.0])
    other = make_tokenizer(words=list(reversed(make_tokenizer().get_vocab())))
    with pytest.raises(ValueError, match="tokenizers differ"):
        DistillationTrainer(
            model=make_llama(2, 32),
            teacher_model=[make_llama(4, 64, seed=1), make_llama(4, 64)],
            args=config(tmp_path),
            train_dataset=tokenized(tokenizer),
            processing_class=tokenizer,
            teacher_processing_class=[tokenizer, other],
        )
    with pytest.raises(ValueError, match="need one teacher"):
        make(tmp_path, tokenizer, [make_llama(4, 64, seed=1), make_llama(4, 64, seed=2)], hint_layers="uniform")
