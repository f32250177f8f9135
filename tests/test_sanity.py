"""First-step KD warning and the mixed-precision mismatch warning."""

import copy
import logging
import types

import pytest
import torch
from conftest import make_llama, make_lm_trainer
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.sanity import check_first_step_kd, kd_signal_problem, mixed_precision_mismatch


TEXTS = ["the cat sat on the mat", "a dog ran fast", "the big red dog is slow", "one plus two equals three"]


@pytest.fixture(autouse=True)
def fresh_warnings():
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings (sanity uses them)


def sanity_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hf_distill.sanity" and r.levelno == logging.WARNING]


def train_one_step(tmp_path, tok, student, teacher, collator=None, **kw):
    trainer = make_lm_trainer(tmp_path, tok, TEXTS, student, teacher, collator, **kw)
    trainer.train()
    return trainer


def test_no_warning_for_a_real_teacher(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = train_one_step(tmp_path, tokenizer, make_llama(2, 32), make_llama(4, 64, seed=1))
    assert sanity_warnings(caplog) == []
    assert trainer.state.log_history[0]["kd_loss"] > 0


def test_student_copy_of_teacher_warns_once(tmp_path, tokenizer, caplog):
    teacher = make_llama(2, 32, seed=1)
    with caplog.at_level(logging.WARNING):
        train_one_step(tmp_path, tokenizer, copy.deepcopy(teacher), teacher)
    messages = sanity_warnings(caplog)
    assert len(messages) == 1  # first step only, although step 2 has KD > 0 again
    assert "KD term is" in messages[0] and "LoRA" in messages[0]  # "exactly 0" without logits (chunked loss)


def test_lora_student_on_the_teachers_weights_warns(tmp_path, tokenizer, caplog):
    teacher = make_llama(2, 32, seed=1)
    student = get_peft_model(
        copy.deepcopy(teacher), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with caplog.at_level(logging.WARNING):
        trainer = train_one_step(tmp_path, tokenizer, student, teacher, learning_rate=1e-2)
    assert any("B matrices start at zero" in m for m in sanity_warnings(caplog))
    first, second = (e["kd_loss"] for e in trainer.state.log_history[:2])
    assert first == 0 and second > 0  # the adapters move the student away from the teacher


def test_no_supervised_tokens_warns(tmp_path, tokenizer, caplog):
    base = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def collator(rows):
        batch = base(rows)
        batch["labels"] = torch.full_like(batch["labels"], -100)
        return batch

    with caplog.at_level(logging.WARNING):
        train_one_step(tmp_path, tokenizer, make_llama(2, 32), make_llama(4, 64, seed=1), collator=collator)
    assert any("no supervised tokens (every label is -100)" in m for m in sanity_warnings(caplog))


def test_kd_signal_problem_directly():
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    kd, zero = torch.tensor(0.7), torch.tensor(0.0)
    assert kd_signal_problem(kd, 3, a, b, s, t) is None
    assert kd_signal_problem(zero, 3, a, a, s, s.clone()) is None  # the same object: intended
    assert "equal the teacher's" in kd_signal_problem(zero, 3, a, b, s, s.clone())
    assert "exactly 0" in kd_signal_problem(zero, 3, a, b, s, s + 3.0)  # shifted logits, same distributions
    assert "exactly 0" in kd_signal_problem(zero, 3, a, b)  # chunked loss: no logits
    assert kd_signal_problem(kd, 3, a, b) is None
    assert "no supervised tokens" in kd_signal_problem(zero, 0, a, b, s[:0], t[:0])


def test_check_first_step_kd_only_once_and_only_in_training():
    trainer = types.SimpleNamespace(model=torch.nn.Linear(1, 1), teacher=torch.nn.Linear(1, 1))
    trainer.model.eval()
    assert check_first_step_kd(trainer, torch.tensor(0.0), 3) is None  # evaluation: not the first training step
    trainer.model.train()
    assert "exactly 0" in check_first_step_kd(trainer, torch.tensor(0.0), 3)
    assert check_first_step_kd(trainer, torch.tensor(0.0), 3) is None


class Args:
    def __init__(self, bf16=False, fp16=False):
        self.bf16, self.fp16, self.process_index = bf16, fp16, 0


@pytest.mark.parametrize(
    "launcher, args, expected",
    [
        (None, Args(bf16=True), None),  # not under `accelerate launch`
        ("bf16", Args(bf16=True), None),
        ("fp16", Args(), None),  # the recipe says nothing: accelerate's setting is used
        ("fp16", Args(bf16=True), "mixed_precision='fp16' but the training config sets bf16=True"),
        ("no", Args(fp16=True), "mixed_precision='no' but the training config sets fp16=True"),
        ("BF16", Args(fp16=True), "this run uses fp16"),
    ],
)
def test_mixed_precision_mismatch_table(launcher, args, expected):
    message = mixed_precision_mismatch(args, launcher_precision=launcher)
    assert message is None if expected is None else expected in message


def test_mixed_precision_mismatch_warned_once(tmp_path, tokenizer, caplog, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` exports from its config
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tokenizer(r["text"]), remove_columns=["text"])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            args = DistillationConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[])
            trainer = DistillationTrainer(
                model=make_llama(2, 32),
                teacher_model=make_llama(4, 64, seed=1),
                args=args,
                train_dataset=data,
                processing_class=tokenizer,
            )
    assert trainer.accelerator.mixed_precision == "bf16"  # the training config won, as the warning says
    assert [m for m in sanity_warnings(caplog) if "Mixed precision disagrees" in m] == [mixed_precision_mismatch(args)]


def test_warn_if_too_long_names_the_model_and_the_limit():
    from hf_distill.sanity import warn_if_too_long

    short = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=8))
    long = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=64))
    assert warn_if_too_long(8, {"student": long, "teacher": short}) is None
    message = warn_if_too_long(9, {"student": long, "teacher": short, "none": None})
    assert "teacher's max_position_embeddings (8)" in message and "`max_length` (<= 8)" in message
