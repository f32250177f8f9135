"""TAID's t as training state: the paper's update rule, logged, equal under gradient accumulation and on 2
processes, saved in checkpoints and restored exactly on resume."""

import itertools
import json
import math
import sys

import pytest
import torch
from conftest import make_llama, make_lm_trainer, one_sgd_step, run_processes, trained_weights
from transformers import TrainerCallback

from hf_distill.taid import TaidCallback


TEXTS = ["the cat sat on the mat and the dog sat too", "a dog", "the big red dog is slow", "one plus two"]
TAID = {"kd_loss": "taid", "taid_alpha": 0.5, "taid_t_start": 0.3, "kd_weight": 0.6, "ce_weight": 0.4}


def reference_schedule(losses, t_start, t_end, alpha, beta, max_steps):
    """The update of Shing et al. (2025) written out: t after each optimizer step, given that step's loss."""
    t, prev, momentum, out = t_start, None, 0.0, []
    for step, loss in enumerate(losses):
        if prev is not None:
            momentum = beta * momentum + (1 - beta) * (prev - loss) / (prev + 1e-15)
            linear = t_start + (t_end - t_start) * step / max_steps
            t = min(t_end, max(linear, t + alpha * (1 / (1 + math.exp(-momentum))) * (1 - t)))
        prev = loss
        out.append(t)
    return out


def test_update_follows_the_paper_rule():
    losses = [2.0, 1.5, 1.6, 1.0, 0.9, 0.95]
    cb = TaidCallback(t_start=0.4, t_end=0.9, alpha=0.3, beta=0.9)
    got = [cb.update(loss, step, 6) for step, loss in enumerate(losses)]
    assert got == pytest.approx(reference_schedule(losses, 0.4, 0.9, 0.3, 0.9, 6), abs=1e-15)
    assert got[0] == 0.4 and got[-1] <= 0.9 and all(a <= b for a, b in itertools.pairwise(got))  # monotone, capped
    linear = TaidCallback(t_start=0.4, t_end=1.0, alpha=0.3, beta=0.9, adaptive=False)
    assert [linear.update(loss, s, 6) for s, loss in enumerate(losses)][1:] == pytest.approx(
        [0.4 + 0.6 * s / 6 for s in range(1, 6)]
    )
    assert cb.update(float("nan"), 6, 6) == got[-1]  # a non-finite loss does not move t


def test_t_is_logged_and_reaches_the_loss(tmp_path, tokenizer):
    trainer = make_lm_trainer(tmp_path, tokenizer, TEXTS, max_steps=4, **TAID)
    assert trainer.loss_state().taid_t == 0.3  # before training: taid_t_start
    trainer.train()
    logged = [e["taid_t"] for e in trainer.state.log_history if "kd_loss" in e]
    kd = [e["kd_loss"] for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logged) == 4 and logged[0] == 0.3 and logged[-1] > logged[1] > 0.3
    assert logged == pytest.approx(reference_schedule(kd, 0.3, 1.0, 0.5, 0.99, 4), abs=1e-12)
    assert trainer.loss_state().taid_t == logged[-1]  # what the trainer hands to the loss


def _run(tmp_path, tok, name, batch_size, accumulation, fused):
    fields = {**one_sgd_step(batch_size, accumulation), "max_steps": 3, **TAID}
    trainer = make_lm_trainer(tmp_path / name, tok, TEXTS, use_fused_kd_loss=fused, **fields)
    weights = trained_weights(trainer)
    cb = trainer._taid_callback()
    return weights, (cb.t, cb.momentum, cb.prev_loss)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_gradient_accumulation_equals_full_batch(tmp_path, tokenizer, fused):
    """2 x 2 accumulation == batch 4 for TAID: same weights after 3 SGD steps and the same t, momentum, loss."""
    start = make_llama(2, 32).state_dict()
    full, state_full = _run(tmp_path, tokenizer, "full", 4, 1, fused)
    acc, state_acc = _run(tmp_path, tokenizer, "ga", 2, 2, fused)
    assert state_full[0] > TAID["taid_t_start"]  # t moved
    assert state_acc == pytest.approx(state_full, rel=1e-4)  # fp32 weights differ in the last bits after a step
    assert max((full[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in full:
        assert torch.allclose(full[key], acc[key], atol=1e-5), key


@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_restores_t_exactly(tmp_path, tokenizer, restore_callbacks):
    fields = dict(max_steps=4, save_strategy="steps", save_steps=2, **TAID)
    fields["restore_callback_states_from_checkpoint"] = restore_callbacks
    straight = make_lm_trainer(tmp_path / "a", tokenizer, TEXTS, **fields)
    straight.train()
    logged = {e["step"]: e["taid_t"] for e in straight.state.log_history if "kd_loss" in e}
    saved = json.loads((tmp_path / "a/out/checkpoint-2/trainer_state.json").read_text())
    attributes = saved["stateful_callbacks"]["TaidCallback"]["attributes"]
    assert attributes["t"] == logged[2]  # the checkpoint holds t exactly (JSON floats round-trip)

    resumed = make_lm_trainer(tmp_path / "b", tokenizer, TEXTS, **fields)
    seen = {}

    class Probe(TrainerCallback):  # state before the first step after resuming
        def on_step_begin(self, args, state, control, **kwargs):
            cb = resumed._taid_callback()
            if not seen:
                seen.update(t=cb.t, momentum=cb.momentum, prev_loss=cb.prev_loss, arg=resumed.loss_state().taid_t)

    resumed.add_callback(Probe())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a/out/checkpoint-2"))
    assert seen == {**attributes, "arg": attributes["t"]}  # bit-exact, before any step runs
    again = {e["step"]: e["taid_t"] for e in resumed.state.log_history if "kd_loss" in e and e["step"] > 2}
    assert sorted(again) == [3, 4]  # (steps 1 and 2 are the restored history)
    assert again[4] == pytest.approx(logged[4], abs=1e-12) and again[4] > again[3] >= logged[2]


@pytest.mark.distributed
def test_two_processes_move_t_like_one(tmp_path):
    """torchrun 2 x batch 2 == 1 x batch 4 for TAID: the same t after every step (the loss is gathered)."""
    from test_distributed import SCRIPTS, TORCHRUN

    script = str(SCRIPTS / "kd_equivalence.py")
    run_processes([sys.executable, script, str(tmp_path / "one"), "--batch_size", "4", "--kd_loss", "taid"])
    run_processes(TORCHRUN + [script, str(tmp_path / "two"), "--batch_size", "2", "--kd_loss", "taid"])
    one = json.loads((tmp_path / "one/result.json").read_text())["log_history"]
    two = json.loads((tmp_path / "two/result.json").read_text())["log_history"]
    assert [e["step"] for e in one] == [e["step"] for e in two] == [1, 2, 3, 4]
    assert [e["taid_t"] for e in two] == pytest.approx([e["taid_t"] for e in one], abs=1e-7)
    assert one[-1]["taid_t"] > one[0]["taid_t"]
    assert [e["kd_loss"] for e in two] == pytest.approx([e["kd_loss"] for e in one], abs=1e-5)


def test_sft_trainer_moves_and_logs_t(tmp_path, tokenizer):
    """DistillationSFTTrainer (prompt / completion rows, as the quickstart) runs TAID the same way."""
    from conftest import distill_sft_config
    from datasets import Dataset

    from hf_distill import DistillationSFTTrainer

    ds = Dataset.from_dict({"prompt": ["the cat sat on", "one plus two equals"], "completion": [" the mat", " three"]})
    trainer = DistillationSFTTrainer(
        model=make_llama(2, 32),
        teacher_model=make_llama(4, 64, seed=1),
        args=distill_sft_config(tmp_path, max_length=32, max_steps=3, kd_loss="taid", taid_adaptive=False),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [e["taid_t"] for e in trainer.state.log_history if "kd_loss" in e]
    assert logged == pytest.approx([0.4, 0.4 + 0.6 / 3, 0.4 + 1.2 / 3])  # linear schedule, updated from step 2 on
