"""EMA self-distillation (`hf_distill.teachers.ema`): the update against a hand computation, the source's terms equal
a live teacher's on the same weights (dense and fused), checkpoints restore the EMA bit-exactly, it is never
exported."""

import copy
import math
import os

import pytest
import torch
from conftest import distill_config, make_llama, tokenized_texts
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer
from hf_distill.heads import detect_head
from hf_distill.teachers.base import SourceContext
from hf_distill.teachers.ema import EMA_FILENAME, EMATeacher, ema_update_
from hf_distill.teachers.live import FusedLiveTeacher, LiveTeacher
from hf_distill.terms import SupervisedView


TEXTS = ["the cat sat on the mat and the dog sat too", "a dog", "the big red dog is slow", "one plus two"]


def test_update_matches_hand_computation():
    student, ema = make_llama(2, 32, seed=0), make_llama(2, 32, seed=1)
    before = {k: v.double().clone() for k, v in ema.state_dict().items()}
    ema_update_(ema, student, 0.9)
    for name, value in ema.state_dict().items():
        if value.is_floating_point():
            expected = 0.9 * before[name] + 0.1 * student.state_dict()[name].double()
            assert torch.allclose(value.double(), expected, rtol=0, atol=1e-6), name
    ema_update_(ema, student, 0.5)  # a second step moves it further towards the student
    w = "model.layers.0.mlp.up_proj.weight"
    expected = (
        0.5 * (0.9 * before[w] + 0.1 * student.state_dict()[w].double()) + 0.5 * student.state_dict()[w].double()
    )
    assert torch.allclose(ema.state_dict()[w].double(), expected, atol=1e-6)


def test_tied_weights_update_once():
    student, ema = make_llama(2, 32, seed=0), make_llama(2, 32, seed=1)
    for model in (student, ema):
        model.lm_head.weight = model.model.embed_tokens.weight
    before = ema.lm_head.weight.double().clone()
    ema_update_(ema, student, 0.9)
    assert ema.lm_head.weight is ema.model.embed_tokens.weight
    assert torch.allclose(ema.lm_head.weight.double(), 0.9 * before + 0.1 * student.lm_head.weight.double(), atol=1e-6)


def _source(args, student, **kw) -> EMATeacher:
    return EMATeacher(SourceContext(args, detect_head(student), student), **kw)


@pytest.mark.parametrize("fused", [False, True])
def test_terms_equal_a_live_teacher_on_the_same_weights(tmp_path, tokenizer, fused):
    args = distill_config(tmp_path, teacher_ema_decay=0.9)
    student = make_llama(2, 32)
    source = _source(args, student, fused=fused)
    assert source.name == ("ema-fused" if fused else "ema") and not source.model.training
    assert all(not p.requires_grad for p in source.model.parameters())
    with torch.no_grad():  # move the student so that the EMA differs from it
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    source.update()
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([tokenizer(t) for t in TEXTS])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    view = SupervisedView.from_batch(batch, detect_head(student))
    live_cls = FusedLiveTeacher if fused else LiveTeacher
    live = live_cls(SourceContext(args, detect_head(student), student), copy.deepcopy(source.model))
    got = source.terms(student(**inputs, **source.student_forward_kwargs()), source.outputs(inputs, batch), view)
    ref = live.terms(student(**inputs, **live.student_forward_kwargs()), live.outputs(inputs, batch), view)
    assert set(got.sums) == {"kd", "ce"} and got.sums["kd"] > 0
    for key in got.sums:
        assert torch.equal(got.sums[key], ref.sums[key]), key
    assert got.weights == ref.weights


def ema_trainer(tmp_path, tok, model=None, eval_dataset=None, **fields) -> DistillationTrainer:
    """A trainer given no teacher and `teacher_ema_decay`: its source is the EMA of the student (default
    `make_llama(2, 32)`)."""
    run = {"teacher_ema_decay": 0.8, "learning_rate": 1e-2, "lr_scheduler_type": "linear", "max_steps": 4, **fields}
    trainer = DistillationTrainer(
        model=model if model is not None else make_llama(2, 32),
        args=distill_config(tmp_path, **run),
        train_dataset=tokenized_texts(tok, TEXTS),
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    trainer.ema = trainer.teacher_source
    assert isinstance(trainer.ema, EMATeacher) and trainer.ema.name == "ema-fused" and trainer.teacher is None
    return trainer


def test_ema_moves_after_every_optimizer_step_and_kd_is_logged(tmp_path, tokenizer):
    trainer = ema_trainer(tmp_path, tokenizer, max_steps=2, gradient_accumulation_steps=2,
                          per_device_train_batch_size=2)  # fmt: skip
    start = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}
    steps = []
    original = trainer.ema.update

    def counted_update():
        steps.append(trainer.state.global_step)
        original()

    trainer.ema.update = counted_update
    trainer.train()
    assert steps == [1, 2]  # once per optimizer step, not per micro-batch
    w = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(trainer.ema.model.state_dict()[w], start[w])
    assert not torch.equal(trainer.ema.model.state_dict()[w], trainer.model.state_dict()[w])
    assert any("kd_loss" in e for e in trainer.state.log_history)


def test_resume_restores_the_ema_exactly_and_it_is_not_exported(tmp_path, tokenizer):
    full = ema_trainer(tmp_path / "full", tokenizer, save_strategy="steps", save_steps=2)
    full.train()
    ckpt = tmp_path / "full" / "out" / "checkpoint-2"
    assert (ckpt / EMA_FILENAME).exists()
    resumed = ema_trainer(tmp_path / "resumed", tokenizer)
    resumed.train(resume_from_checkpoint=str(ckpt))
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 2] for t in (full, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    for a, b in ((full.model, resumed.model), (full.ema.model, resumed.ema.model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name

    full.save_model(str(tmp_path / "export"))
    assert not (tmp_path / "export" / EMA_FILENAME).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, full.model.state_dict()[name]), name


def test_a_teacher_and_an_ema_teacher_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="drop one of them"):
        DistillationTrainer(model=make_llama(2, 32), teacher_model=make_llama(2, 32, seed=1),
                            args=distill_config(tmp_path, teacher_ema_decay=0.9),
                            train_dataset=tokenized_texts(tokenizer, TEXTS), processing_class=tokenizer)  # fmt: skip


def test_resume_without_ema_file_and_bad_decay_say_so(tmp_path):
    args = distill_config(tmp_path, teacher_ema_decay=0.9)
    source = _source(args, make_llama(2, 32))
    with pytest.raises(FileNotFoundError, match="teacher_ema_decay"):
        source.load_checkpoint(tmp_path)
    source.save_checkpoint(tmp_path / "ok")
    other = _source(args, make_llama(2, 64))
    with pytest.raises(ValueError, match="does not hold an EMA of this student"):
        other.load_checkpoint(tmp_path / "ok")
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="teacher_ema_decay"):
            distill_config(tmp_path, teacher_ema_decay=bad)


def test_ema_copy_runs_its_own_weights_when_the_student_forward_is_wrapped():
    """A wrapper set on the student's instance closes over the student's bound forward; the EMA copy must not keep
    it, or the 'teacher' computes the student's outputs and KD is silently 0 (seen under DistillationSFTTrainer)."""
    import functools

    from hf_distill.teachers.ema import ema_copy

    student = make_llama(2, 32)
    original = student.forward

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)

    student.forward = wrapped  # as trainers / accelerate install wrappers on the instance
    ema = ema_copy(student)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.1)
        ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(ema(input_ids=ids).logits, student(input_ids=ids).logits)
        reference = copy.deepcopy(ema)
        assert torch.equal(ema(input_ids=ids).logits, type(reference).forward(reference, input_ids=ids).logits)


@pytest.mark.parametrize("save_strategy", ["steps", "epoch", "best"])
def test_ema_file_is_in_the_checkpoint_before_its_trainer_state(tmp_path, tokenizer, monkeypatch, save_strategy):
    """A checkpoint holding `trainer_state.json` (written last by the Trainer) is complete, EMA included: a kill
    between the two files can no longer leave a checkpoint that resumes without its EMA."""
    from transformers import TrainerState

    seen = {}
    original = TrainerState.save_to_json

    def save_to_json(self, json_path):
        folder = os.path.dirname(json_path)
        seen[os.path.basename(folder)] = os.path.exists(os.path.join(folder, EMA_FILENAME))
        return original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    best = {}  # save_strategy="best": a checkpoint is saved after an evaluation with a new best eval loss
    if save_strategy == "best":
        best = {"eval_strategy": "steps", "eval_steps": 1, "metric_for_best_model": "loss", "eval_dataset":
                tokenized_texts(tokenizer, TEXTS[:2]), "learning_rate": 1e-3}  # fmt: skip
    trainer = ema_trainer(tmp_path, tokenizer, max_steps=2, num_train_epochs=1, save_strategy=save_strategy,
                          save_steps=1, per_device_train_batch_size=2, **best)  # fmt: skip
    trainer.train()
    expected = {"checkpoint-1": True, "checkpoint-2": True} if save_strategy != "epoch" else {"checkpoint-2": True}
    assert seen == expected  # (with "best": both evaluations improved on the last one)
    resumed = ema_trainer(tmp_path / "resumed", tokenizer, max_steps=2, per_device_train_batch_size=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for name, value in trainer.ema.model.state_dict().items():
        assert torch.equal(value, resumed.ema.model.state_dict()[name]), name


def test_no_kd_weight_and_sharded_students_are_refused(tmp_path):
    with pytest.raises(ValueError, match="`kd_weight` > 0"):
        _source(distill_config(tmp_path, teacher_ema_decay=0.9, kd_weight=0.0), make_llama(2, 32))
    student, ema = make_llama(2, 32), make_llama(2, 32)
    with torch.no_grad():  # what a ZeRO-3 / FSDP rank holds outside forward: a shard of each weight
        student.model.layers[0].mlp.up_proj.weight.data = torch.empty(0)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight` is sharded.*DDP or ZeRO-1/2"):
        ema_update_(ema, student, 0.9)


def test_a_half_precision_student_gets_a_float32_ema_that_moves(tmp_path, tokenizer):
    """In bfloat16, `0.999 * ema + 0.001 * student` rounds back to `ema` for most weights: the EMA is float32."""
    student = make_llama(2, 32).to(torch.bfloat16)
    source = _source(distill_config(tmp_path, teacher_ema_decay=0.999), student)
    assert {p.dtype for p in source.model.parameters()} == {torch.float32}
    start = {k: v.double().clone() for k, v in source.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    source.update()
    moved = total = 0
    for name, value in source.model.state_dict().items():
        expected = 0.999 * start[name] + 0.001 * student.state_dict()[name].double()
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-7), name
        moved, total = moved + int((value.double() != start[name]).sum()), total + value.numel()
    assert moved / total > 0.99
    trainer = ema_trainer(tmp_path / "run", tokenizer, model=make_llama(2, 32).to(torch.bfloat16), max_steps=2)
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert next(trainer.ema.model.parameters()).dtype == torch.float32
