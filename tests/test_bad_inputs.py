"""Bad inputs and faults a new user runs into (issue sweep): each gives one clear error or warning, never a silent
wrong result. The kill-and-resume cases live in benchmarks/fault_sweep.py."""

import logging

import pytest
import torch
from conftest import make_llama, make_lm_trainer
from safetensors.torch import load_file
from test_trainer import TEXTS
from transformers import TrainerCallback


# ----------------------------------------------------------------------------------------------- non-finite teacher
def poison(teacher):
    """Make the teacher's final norm output inf (hidden states inf, logits NaN): an fp16 overflow, in effect."""
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("inf"))
    return teacher


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_nonfinite_teacher_stops_the_run(tmp_path, tokenizer, fused):
    student = make_llama(2, 32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_lm_trainer(
        tmp_path, tokenizer, TEXTS, student=student, teacher=poison(make_llama(4, 64, seed=1)), use_fused_kd_loss=fused
    )
    with pytest.raises(FloatingPointError, match=r"Non-finite teacher outputs at optimizer step 1 .*NaN or inf"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_nonfinite_teacher_names_fp16_overflow():
    from hf_distill.sanity import nonfinite_teacher_problem

    teacher = make_llama(2, 32).half()
    outputs = type("Out", (), {"logits": torch.tensor([[1.0, float("inf")]], dtype=torch.float16)})()
    problem = nonfinite_teacher_problem(outputs, teacher)
    assert "1 of 2 values" in problem and "float16 overflows" in problem and "bfloat16" in problem
    assert nonfinite_teacher_problem(type("Out", (), {"logits": torch.ones(2, 3)})(), teacher) is None


class _PoisonAfter(TrainerCallback):
    def __init__(self, teacher, step):
        self.teacher, self.step = teacher, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            poison(self.teacher)


def test_nonfinite_teacher_leaves_the_last_checkpoint_untouched(tmp_path, tokenizer):
    teacher = make_llama(4, 64, seed=1)
    trainer = make_lm_trainer(
        tmp_path, tokenizer, TEXTS, teacher=teacher, max_steps=3, save_strategy="steps", save_steps=1
    )
    trainer.add_callback(_PoisonAfter(teacher, step=1))
    with pytest.raises(FloatingPointError, match="optimizer step 2"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoint-1" / "model.safetensors").values())


def test_nonfinite_teacher_skip_drops_batches_with_a_count(tmp_path, tokenizer, caplog):
    student = make_llama(2, 32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_lm_trainer(
        tmp_path,
        tokenizer,
        TEXTS,
        student=student,
        teacher=poison(make_llama(4, 64, seed=1)),
        nonfinite_teacher="skip",
        per_device_train_batch_size=2,
    )
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainer"):
        trainer.train()
    assert "Skipped a micro-batch of 2 rows at optimizer step 2 (2 skipped so far" in caplog.text
    for key, value in trainer.model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(before[key], value), key  # no gradient from them


def test_kl_keeps_nan_inputs_nan():
    from hf_distill.losses import logit_divergence

    student, teacher = torch.randn(3, 8), torch.randn(3, 8)
    teacher[1, 2] = float("nan")
    values = logit_divergence(student, teacher, loss_type="forward_kl")
    assert torch.isnan(values[1]) and torch.isfinite(values[[0, 2]]).all()
    assert torch.isfinite(logit_divergence(student, teacher.masked_fill(teacher.isnan(), -1e9))).all()
