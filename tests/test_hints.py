"""Feature hints, attention transfer and relation terms inside the trainer (tiny Llamas, width 64 -> 32)."""

import pytest
import torch
from conftest import make_llama, make_lm_trainer
from safetensors.torch import load_file
from test_trainer import TEXTS
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_distill.losses.features import mse


def hint_trainer(tmp_path, tok, student=None, **kw):
    base = dict(
        hint_layers={1: 2, 2: 4},
        hint_loss="mse",
        hint_projector="linear",
        attention_weight=1.0,
        relation_loss="similarity_preserving",
        relation_weight=1.0,
    )
    base.update(kw)
    return make_lm_trainer(tmp_path, tok, TEXTS, student=student, **base)


def test_all_components_decrease_on_a_fixed_batch(tmp_path, tokenizer):
    # CE off: the random teacher's distribution and the dataset's labels would pull the student apart
    trainer = hint_trainer(
        tmp_path,
        tokenizer,
        max_steps=30,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        kd_weight=1.0,
        ce_weight=0.0,
        attention_weight=100.0,
    )  # random maps: tiny KL
    trainer.train()
    logs = [e for e in trainer.state.log_history if "hint_loss" in e]
    assert len(logs) == 30
    for name in ("hint_loss", "attention_loss", "relation_loss", "kd_loss"):
        first, last = logs[0][name], logs[-1][name]
        assert last < 0.9 * first, (name, first, last)
    projector = trainer._projectors().projectors["1"]
    assert projector.weight.shape == (64, 32)
    assert any(p is projector.weight for g in trainer.optimizer.param_groups for p in g["params"])


def test_hint_term_matches_hand_computation(tmp_path, tokenizer):
    trainer = hint_trainer(tmp_path, tokenizer, attention_weight=0.0, relation_loss=None)
    batch = next(iter(trainer.get_train_dataloader()))
    sums, weights, n_tokens, _ = trainer._loss_terms(trainer.model, batch)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    s_states = trainer.model(**kwargs).hidden_states
    with torch.no_grad():
        t_states = trainer.teacher(**kwargs).hidden_states
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100  # hidden position t predicts label t + 1
    proj = trainer._projectors()
    expected = (mse(proj(1, s_states[1]), t_states[2], mask) + mse(proj(2, s_states[2]), t_states[4], mask)) / 2
    assert torch.allclose(sums["hint"], expected, atol=1e-5)
    assert weights["hint"] == 1.0 and n_tokens == mask.sum()


def test_projectors_resume_bit_equal_and_are_not_exported(tmp_path, tokenizer):
    trainer = hint_trainer(tmp_path, tokenizer, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    saved = {k: v.clone() for k, v in trainer._projectors().state_dict().items()}
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "hint_projectors.safetensors").exists()
    assert not any("projector" in k for k in load_file(ckpt / "model.safetensors"))

    resumed = hint_trainer(tmp_path, tokenizer, max_steps=2, save_strategy="no")
    assert not all(torch.equal(saved[k], v) for k, v in resumed._projectors().state_dict().items())
    resumed.train(resume_from_checkpoint=str(ckpt))
    for key, value in resumed._projectors().state_dict().items():
        assert torch.equal(saved[key], value), key

    trainer.save_model(str(tmp_path / "export"))
    assert not (tmp_path / "export" / "hint_projectors.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert set(reloaded.state_dict()) == set(make_llama(2, 32).state_dict())


def test_projectors_are_in_the_checkpoint_before_its_trainer_state(tmp_path, tokenizer, monkeypatch):
    """As for the EMA teacher (jobs.CheckpointFileCallback): a checkpoint holding `trainer_state.json`, which the
    Trainer writes last, already holds the projectors, so a kill between the two cannot leave a checkpoint that looks
    complete but cannot resume a hint run."""
    import os

    from transformers import TrainerState

    seen, original = {}, TrainerState.save_to_json

    def save_to_json(self, json_path):
        folder = os.path.dirname(json_path)
        seen[os.path.basename(folder)] = os.path.exists(os.path.join(folder, "hint_projectors.safetensors"))
        return original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    hint_trainer(tmp_path, tokenizer, max_steps=2, save_strategy="steps", save_steps=1).train()
    assert seen == {"checkpoint-1": True, "checkpoint-2": True}


def test_identity_projector_needs_equal_widths(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="widths"):
        hint_trainer(tmp_path, tokenizer, hint_projector="identity")
    hint_trainer(tmp_path, tokenizer, hint_projector="identity", student=make_llama(2, 64))  # equal widths: fine


def test_bad_layer_index_lists_valid_ranges(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"student layers are 0\.\.2 and teacher layers 0\.\.4"):
        hint_trainer(tmp_path, tokenizer, hint_layers={1: 9})


def test_attention_needs_dividing_head_counts(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"teacher's head count \(4\) to be a multiple of the student's \(3\)"):
        hint_trainer(tmp_path, tokenizer, student=make_llama(2, 48, heads=3))


def test_relation_loss_needs_batch_of_two(tmp_path, tokenizer):
    trainer = hint_trainer(tmp_path, tokenizer, per_device_train_batch_size=1, attention_weight=0.0)
    with pytest.raises(ValueError, match="batch size >= 2"):
        trainer.train()


def test_hint_layers_json_string_and_uniform(tmp_path, tokenizer):
    trainer = hint_trainer(tmp_path, tokenizer, hint_layers='{"1": 2, "2": 4}')
    assert trainer._hints.layer_map == {1: 2, 2: 4}
    trainer = hint_trainer(tmp_path, tokenizer, hint_layers="uniform")
    assert trainer._hints.layer_map == {1: 2, 2: 4}
    with pytest.raises(ValueError, match="`hint_layers` must be 'uniform'"):
        hint_trainer(tmp_path, tokenizer, hint_layers="every")


def test_eager_attention_only_when_needed(tmp_path, tokenizer):
    trainer = hint_trainer(tmp_path, tokenizer, attention_weight=0.0)
    assert trainer.model.config._attn_implementation != "eager"  # sdpa kept without attention losses
    trainer = hint_trainer(tmp_path, tokenizer, attention_weight=1.0)
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.teacher.config._attn_implementation == "eager"


class _GradProbe(TrainerCallback):
    """Records, per optimizer step, the projector gradients' norm before the step and whether any is left after it."""

    def __init__(self, trainer):
        self.trainer, self.pre, self.left_after, self.total_pre = trainer, [], [], []

    def _grads(self, module):
        return [p.grad for p in module.parameters() if p.grad is not None]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # after clipping, before optimizer.step()
        proj = self._grads(self.trainer._projectors())
        student = self._grads(self.trainer.model)
        self.pre.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in proj])).item())
        self.total_pre.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in proj + student])).item())

    def on_step_end(self, args, state, control, **kwargs):  # after the Trainer's zero_grad
        self.left_after.append(any(g.abs().sum() > 0 for g in self._grads(self.trainer._projectors())))


def test_projector_gradients_reset_every_step_and_are_clipped_with_the_student(tmp_path, tokenizer):
    trainer = hint_trainer(tmp_path, tokenizer, max_steps=4, max_grad_norm=0.05, learning_rate=1e-3)
    probe = _GradProbe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.left_after == [False] * 4  # zeroed with the student's after every optimizer step
    assert all(0 < n for n in probe.pre)
    assert max(probe.total_pre) <= 0.05 * (1 + 1e-4)  # one clipping norm over student + projectors


def test_resume_with_hints_attention_and_relations_is_exact(tmp_path, tokenizer):
    run = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3, lr_scheduler_type="linear")
    full = hint_trainer(tmp_path / "full", tokenizer, **run)
    full.train()
    resumed = hint_trainer(tmp_path / "resumed", tokenizer, **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 2] for t in (full, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    for a, b in ((full.model, resumed.model), (full._projectors(), resumed._projectors())):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
