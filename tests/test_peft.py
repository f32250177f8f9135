"""PEFT teachers (a LoRA adapter model, merged or not, as an object or a saved adapter folder) and LoRA students."""

import copy

import pytest
import torch
from conftest import make_llama
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

from hf_distill import DistillationConfig, DistillationTrainer


TEXTS = ["the cat sat on the mat", "a dog ran fast", "the big red dog is slow", "one plus two equals three"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.0}


def lora_teacher() -> PeftModel:
    """A tiny LoRA-wrapped teacher whose adapters are large enough to change its distributions clearly."""
    config = LoraConfig(**{**LORA, "target_modules": [*LORA["target_modules"], "lm_head"]})
    model = get_peft_model(make_llama(4, 64, seed=1), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def make_trainer(tmp_path, tok, teacher, student=None, **kw):
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
        "kd_weight": 0.7,
        "ce_weight": 0.3,
    }
    args.update(kw)
    return DistillationTrainer(
        model=student if student is not None else make_llama(2, 32),
        teacher_model=teacher,
        args=DistillationConfig(**args),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )


def first_loss(trainer) -> torch.Tensor:
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer.compute_loss(trainer.model, batch)


def test_unmerged_lora_teacher_equals_merged(tmp_path, tokenizer):
    teacher = lora_teacher()
    merged = copy.deepcopy(teacher).merge_and_unload()
    kd_only = {"kd_weight": 1.0, "ce_weight": 0.0, "temperature": 0.5}
    loss_peft = first_loss(make_trainer(tmp_path / "a", tokenizer, teacher, **kd_only))
    loss_merged = first_loss(make_trainer(tmp_path / "b", tokenizer, merged, **kd_only))
    loss_base = first_loss(make_trainer(tmp_path / "c", tokenizer, make_llama(4, 64, seed=1), **kd_only))
    torch.testing.assert_close(loss_peft, loss_merged, rtol=1e-4, atol=1e-7)
    assert (loss_peft - loss_base).abs() > 0.1 * loss_base  # the adapter really takes part in the teacher's forward


def test_lora_teacher_stays_frozen_and_out_of_checkpoints(tmp_path, tokenizer):
    teacher = lora_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = make_trainer(tmp_path, tokenizer, teacher, save_strategy="steps", save_steps=2)
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.teacher.parameters()}
    assert set(load_file(tmp_path / "out/checkpoint-2/model.safetensors")) == set(trainer.model.state_dict())


def test_teacher_from_a_saved_adapter_folder(tmp_path, tokenizer):
    make_llama(4, 64, seed=1).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # records the base path in the adapter config
    adapter = get_peft_model(base, LoraConfig(init_lora_weights=False, **LORA))  # random, non-zero B
    adapter.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    trainer = make_trainer(tmp_path, tokenizer, str(tmp_path / "adapter"))
    ids = torch.tensor([[6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        expected = adapter(input_ids=ids).logits
        got = trainer.teacher(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


@pytest.mark.parametrize("teacher_kind", ["plain", "lora"])
def test_lora_student_trains_adapters_only(tmp_path, tokenizer, teacher_kind):
    student = get_peft_model(make_llama(2, 32), LoraConfig(**LORA))
    frozen = {k: v.clone() for k, v in student.state_dict().items() if "lora_" not in k}
    teacher = lora_teacher() if teacher_kind == "lora" else make_llama(4, 64, seed=1)
    trainer = make_trainer(tmp_path, tokenizer, teacher, student=student, learning_rate=1e-2)
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss"] > 0
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
