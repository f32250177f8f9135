"""DistillationTrainer / DistillationSFTTrainer on tiny seeded Llamas."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    distill_config,
    distill_sft_config,
    make_llama,
    make_lm_trainer,
    make_tokenizer,
    one_sgd_step,
    tokenized_texts,
    trained_weights,
)
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

from hf_distill import DistillationSFTConfig, DistillationSFTTrainer, DistillationTrainer
from hf_distill.losses import logit_divergence


TEXTS = [
    "the cat sat on the mat",
    "a dog ran fast",
    "the big red dog is slow and the cat is small",
    "one plus two equals three",
]


def make_trainer(tmp_path, tok, student=None, teacher=None, **kw):
    return make_lm_trainer(tmp_path, tok, TEXTS, student=student, teacher=teacher, **kw)


def manual_loss(student, teacher, batch, kd_weight, ce_weight, temperature, kd_loss="forward_kl"):
    """Independent re-computation: ce_w * CE_sum + kd_w * T^2 * KD_sum over shifted supervised tokens / count."""
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    s, t, y = s_logits[:, :-1][mask], t_logits[:, :-1][mask], labels[mask]
    ce = F.cross_entropy(s, y, reduction="sum")
    kd = logit_divergence(s, t, loss_type=kd_loss, temperature=temperature).sum()
    return (ce_weight * ce + kd_weight * temperature**2 * kd) / mask.sum()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
@pytest.mark.parametrize("kd_loss", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_loss_equals_weighted_sum(tmp_path, tokenizer, fused, kd_loss):
    trainer = make_trainer(
        tmp_path, tokenizer, kd_weight=0.7, ce_weight=0.2, temperature=2.0, use_fused_kd_loss=fused, kd_loss=kd_loss
    )
    assert (trainer.teacher_source.name == "live-fused") is fused
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    expected = manual_loss(trainer.model, trainer.teacher, batch, 0.7, 0.2, 2.0, kd_loss)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_trains_logs_and_saves_student_only(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=3, save_strategy="steps", save_steps=3)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert logs and {"kd_loss", "ce_loss", "total_loss", "top1_agreement", "loss"} <= set(logs[0])
    assert not trainer.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher.state_dict().items())
    metrics = trainer.evaluate(tokenized_texts(tokenizer, TEXTS))
    assert {"eval_kd_loss", "eval_ce_loss", "eval_top1_agreement", "eval_loss"} <= set(metrics)

    ckpt = tmp_path / "out" / "checkpoint-3"
    keys = set(load_file(ckpt / "model.safetensors"))
    assert keys == set(trainer.model.state_dict())  # student keys only (2 layers), no teacher
    assert not any(".layers.3." in k for k in keys)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert reloaded.config.num_hidden_layers == 2
    assert not any(name.startswith("teacher") for name in os.listdir(tmp_path / "final"))


def _final_weights(tmp_path, tok, name, batch_size, accumulation, fused=True):
    texts = ["the cat sat on the mat and the dog sat too", "a dog", "the big red dog is slow", "one plus two"]
    trainer = make_lm_trainer(
        tmp_path / name,
        tok,
        texts,
        **one_sgd_step(batch_size, accumulation),
        kd_weight=0.6,
        ce_weight=0.4,
        temperature=2.0,
        use_fused_kd_loss=fused,
    )
    assert (trainer.teacher_source.name == "live-fused") is fused
    return trained_weights(trainer)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_gradient_accumulation_equals_full_batch(tmp_path, tokenizer, fused):
    """2 micro-batches of 2 (ragged lengths) must give the same SGD update as one batch of 4."""
    start = make_llama(2, 32).state_dict()
    full = _final_weights(tmp_path, tokenizer, "full", 4, 1, fused)
    accumulated = _final_weights(tmp_path, tokenizer, "ga", 2, 2, fused)
    moved = max((full[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the step really changed the weights
    for key in full:
        assert torch.allclose(full[key], accumulated[key], atol=1e-5), key


def test_padded_vocab_is_sliced(tmp_path, tokenizer):
    # teacher embedding padded to 96 rows, student to 64; the tokenizer has 55 real tokens
    trainer = make_trainer(tmp_path, tokenizer, teacher=make_llama(4, 64, vocab_size=96, seed=1))
    assert trainer.teacher_source.vocab_size == len(tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        t_logits = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    n = len(tokenizer)
    s, t, y = s_logits[:, :-1][mask][:, :n], t_logits[:, :-1][mask][:, :n], batch["labels"][:, 1:][mask]
    expected = (0.5 * F.cross_entropy(s, y, reduction="sum") + 0.5 * logit_divergence(s, t).sum()) / mask.sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    trainer.train()


def test_vocab_mismatch_not_explained_by_padding(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"Student vocab size 64 and teacher vocab size 40"):
        make_trainer(tmp_path, tokenizer, teacher=make_llama(4, 64, vocab_size=40, seed=1))


def test_different_tokenizers_rejected(tmp_path, tokenizer):
    other = make_tokenizer(words=list(reversed(make_tokenizer().get_vocab())))
    with pytest.raises(ValueError, match=r"tokenizers differ \(student vocab size 55, teacher vocab size"):
        DistillationTrainer(
            model=make_llama(2, 32),
            teacher_model=make_llama(4, 64, seed=1),
            args=distill_config(tmp_path),
            train_dataset=tokenized_texts(tokenizer, TEXTS),
            processing_class=tokenizer,
            teacher_processing_class=other,
        )


def test_no_teacher_and_bad_dataset(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="No teacher given"):
        DistillationTrainer(
            model=make_llama(2, 32), args=distill_config(tmp_path), train_dataset=tokenized_texts(tokenizer, TEXTS)
        )
    bad = Dataset.from_dict({"sentence": TEXTS})
    with pytest.raises(ValueError, match=r"columns \['sentence'\].*needs one of input_ids"):
        DistillationTrainer(
            model=make_llama(2, 32), teacher_model=make_llama(4, 64), args=distill_config(tmp_path), train_dataset=bad
        )
    with pytest.raises(ValueError, match=r"needs one of text \| messages \| prompt\+completion"):
        DistillationSFTTrainer(
            model=make_llama(2, 32),
            teacher_model=make_llama(4, 64),
            train_dataset=bad,
            args=DistillationSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
        )
    with pytest.raises(TypeError, match="needs `args` of type DistillationConfig"):
        from transformers import TrainingArguments

        DistillationTrainer(
            model=make_llama(2, 32),
            teacher_model=make_llama(4, 64),
            args=TrainingArguments(output_dir=str(tmp_path), report_to=[]),
        )


def test_ce_only_needs_no_teacher(tmp_path, tokenizer):
    trainer = DistillationTrainer(
        model=make_llama(2, 32),
        args=distill_config(tmp_path, kd_weight=0.0, ce_weight=1.0),
        train_dataset=tokenized_texts(tokenizer, TEXTS),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    plain = trainer.model(**batch).loss  # the model's own mean CE
    assert torch.allclose(trainer.compute_loss(trainer.model, batch), plain, atol=1e-6)


def sft_config(tmp_path, **kw):
    return distill_sft_config(tmp_path, **{"max_length": 32, **kw})


def test_sft_completion_only_supervises_completion(tmp_path, tokenizer):
    ds = Dataset.from_dict({"prompt": ["the cat sat on", "one plus two equals"], "completion": [" the mat", " three"]})
    trainer = DistillationSFTTrainer(
        model=make_llama(2, 32),
        teacher_model=make_llama(4, 64, seed=1),
        args=sft_config(tmp_path),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    supervised = (batch["labels"] != -100).sum().item()
    # completions: "the mat" + eos, "three" + eos -> 5 supervised tokens; prompts never count
    assert supervised == 5
    trainer.compute_loss(trainer.model, batch)
    assert trainer._metrics["train"]["kd_loss"][-1][1] == 5
    trainer.train()


def test_sft_conversational_assistant_only(tmp_path, tokenizer):
    msgs = [
        [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}],
        [{"role": "user", "content": "is the cat big"}, {"role": "assistant", "content": "no the cat is small"}],
    ]
    trainer = DistillationSFTTrainer(
        model=make_llama(2, 32),
        teacher_model=make_llama(4, 64, seed=1),
        args=sft_config(tmp_path, assistant_only_loss=True),
        train_dataset=Dataset.from_dict({"messages": msgs}),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    supervised = batch["input_ids"][batch["labels"] != -100].tolist()
    # only the assistant turns ("four <|im_end|>", "no the cat is small <|im_end|>") are supervised
    assert sorted(supervised) == sorted(tokenizer("four <|im_end|> no the cat is small <|im_end|>").input_ids)
    trainer.train()
    assert any("kd_loss" in e for e in trainer.state.log_history)


def test_sft_lora_student_trains_adapters_only(tmp_path, tokenizer):
    from peft import LoraConfig

    student = make_llama(2, 32)
    base_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationSFTTrainer(
        model=student,
        teacher_model=make_llama(4, 64, seed=1),
        args=sft_config(tmp_path, learning_rate=1e-2),
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    state = trainer.model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # adapters moved away from their zero init
    for key, value in base_before.items():
        peft_key = "base_model.model." + key.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        assert torch.equal(state[peft_key], value), key


def test_sft_packing(tmp_path, tokenizer):
    """Packed (padding-free) batches: the KD term equals the one computed on each packed sequence on its own, so
    no position predicts across a sequence boundary and no sequence attends to its neighbour."""
    trainer = DistillationSFTTrainer(
        model=make_llama(2, 32),
        teacher_model=make_llama(4, 64, seed=1),
        args=sft_config(tmp_path, packing=True, max_length=16, kd_weight=1.0, ce_weight=0.0, temperature=2.0),
        train_dataset=Dataset.from_dict({"text": TEXTS * 3}),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert batch["input_ids"].shape[0] == 1 and len(starts) >= 2  # one row holding several sequences
    kd_sum, count = 0.0, 0
    for start, end in zip(starts, starts[1:] + [batch["input_ids"].shape[1]]):
        ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
        with torch.no_grad():
            t_logits = trainer.teacher(input_ids=ids).logits[:, :-1]
            s_logits = trainer.model(input_ids=ids).logits[:, :-1]
        mask = labels[:, 1:] != -100
        kd_sum += logit_divergence(s_logits[mask], t_logits[mask], temperature=2.0).sum()
        count += int(mask.sum())
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert torch.allclose(loss, 2.0**2 * kd_sum / count, atol=1e-5)
    trainer.train()
    assert trainer.state.global_step == 2


def test_model_card_written_by_trainer_mechanism(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    trainer.train()
    trainer.evaluate(tokenized_texts(tokenizer, TEXTS))
    trainer.create_model_card(model_name="tiny-student")  # what push_to_hub calls before uploading
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- hf-distill" in card and "- distillation" in card
    assert "# tiny-student" in card and "| `kd_loss` | forward_kl |" in card and "eval_kd_loss" in card
    assert "LlamaForCausalLM" in card  # the teacher (a model object) is named by its class when it has no path


def test_fused_and_materialised_paths_take_the_same_step(tmp_path, tokenizer):
    fused = _final_weights(tmp_path, tokenizer, "f", 4, 1, fused=True)
    materialised = _final_weights(tmp_path, tokenizer, "m", 4, 1, fused=False)
    for key in fused:
        assert torch.allclose(fused[key], materialised[key], atol=1e-5), key


def test_teacher_not_kept_when_nothing_needs_it(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, kd_weight=0.0, ce_weight=1.0)
    assert trainer.teacher is None
