"""taid, ab_divergence and akl through the trainer: the fused loss, materialised logits and a k = V teacher cache give
the same loss and gradients (`divergence_kwargs` carries each divergence's fields, and TAID's current t, to all
three)."""

import copy

import pytest
import torch
from conftest import make_llama
from test_cache import build, prompt_completion_rows, teacher_model, trainer_args
from transformers import DataCollatorForSeq2Seq

from hf_distill import DistillationTrainer
from hf_distill.terms import divergence_kwargs


FIELDS = {
    "taid": {"taid_t_start": 0.2},
    "ab_divergence": {"ab_alpha": 0.6, "ab_beta": 0.5},
    "akl": {"akl_mu": 0.4},
}


@pytest.mark.parametrize("kd_loss", sorted(FIELDS))
def test_fused_materialised_and_cache_agree(tmp_path, tokenizer, kd_loss):
    rows = prompt_completion_rows(tokenizer)
    build(tmp_path, tokenizer, rows, k=64, dtype="float32")  # k = V = 64: the cache holds the full distribution
    student, collator = make_llama(2, 32), DataCollatorForSeq2Seq(tokenizer, padding=True)
    fields = {"kd_loss": kd_loss, "temperature": 2.0, **FIELDS[kd_loss]}
    trainers = {
        name: DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=None if name == "cache" else teacher_model(),
            args=trainer_args(tmp_path / name, **fields, **extra),
            train_dataset=rows,
            data_collator=collator,
            processing_class=tokenizer,
        )
        for name, extra in {
            "fused": {},
            "materialised": {"use_fused_kd_loss": False},
            "cache": {"teacher_cache": str(tmp_path / "cache")},
        }.items()
    }
    assert trainers["fused"].teacher_source.name == "live-fused"
    assert trainers["materialised"].teacher_source.name == "live"
    features = [{**rows[i], "row_id": i} for i in (0, 2, 3)]
    losses, grads = {}, {}
    for name, trainer in trainers.items():
        if kd_loss == "taid":  # as after some steps: the trainer's current t, not taid_t_start, reaches the loss
            trainer._taid_callback().t = 0.55
            assert divergence_kwargs(trainer.args, trainer.loss_state())["taid_t"] == 0.55
        batch = trainer.data_collator(features) if name == "cache" else collator([dict(rows[i]) for i in (0, 2, 3)])
        losses[name] = trainer.compute_loss(trainer.model, batch)
        losses[name].backward()
        grads[name] = [p.grad for p in trainer.model.parameters()]
    for name in ("materialised", "cache"):
        torch.testing.assert_close(losses[name], losses["fused"], atol=1e-5, rtol=1e-5)
        for g, e in zip(grads[name], grads["fused"]):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    if kd_loss == "taid":  # t = 0.55 is not t = 0.2: the loss really reads the current t
        trainer = trainers["fused"]
        trainer._taid_callback().t = 0.2
        other = trainer.compute_loss(trainer.model, collator([dict(rows[i]) for i in (0, 2, 3)]))
        assert abs(other.item() - losses["fused"].item()) > 1e-4
