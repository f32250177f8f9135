"""Every head distils what it predicts: per token (causal LM shifted; seq2seq, masked LM, token classification not),
per example (sequence classification) or per output (regression). Losses are re-computed by hand in float64."""

import pytest
import torch
from conftest import bert_config, distill_config, make_llama, make_t5, one_sgd_step, trained_weights
from datasets import Dataset
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BartConfig,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaForSequenceClassification,
    default_data_collator,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.heads import Head, detect_head
from hf_distill.terms import SupervisedView, logit_terms


KD_W, CE_W, T = 0.7, 0.3, 2.0


# ----------------------------------------------------------------------------------------------- tiny models
def bert(cls, layers: int = 2, seed: int = 0, **kwargs):
    """Tiny random BERT (vocab 64, hidden 32), dropout off so that losses are deterministic."""
    torch.manual_seed(seed)
    return cls(bert_config(layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs))


def bart(cls=BartForConditionalGeneration, layers: int = 1, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        **kwargs,
    )
    return cls(config)


def llama_cls(layers: int = 2, hidden: int = 32, seed: int = 0, num_labels: int = 3):
    return make_llama(layers, hidden, seed=seed, cls=LlamaForSequenceClassification, num_labels=num_labels)


def t5(layers: int = 2, seed: int = 0):
    model = make_t5(num_layers=layers, seed=seed)
    model.config.dropout_rate = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


# ----------------------------------------------------------------------------------------------- batches
def _ids(shape, seed, low=6, high=64):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


ATTENTION = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])


def encoder_batch(seed: int = 0, pad_id: int = 0) -> dict[str, torch.Tensor]:
    ids = _ids((4, 6), seed).masked_fill(ATTENTION == 0, pad_id)
    return {"input_ids": ids, "attention_mask": ATTENTION.clone()}


def make_batch(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of 4 rows of length 6 with right padding and -100 labels, laid out for `kind`."""
    gen = torch.Generator().manual_seed(seed + 100)
    pad_id = 1 if kind == "bart" else 0
    batch = encoder_batch(seed, pad_id)
    if kind in ("sequence_classification", "llama_sequence_classification"):
        batch["labels"] = torch.tensor([0, 2, -100, 1])
    elif kind == "regression":
        batch["labels"] = torch.tensor([0.5, -1.0, 2.0, 0.25])
    elif kind == "token_classification":
        labels = torch.randint(0, 5, (4, 6), generator=gen)
        labels[:, 0] = -100  # e.g. [CLS]
        labels[1, 2] = -100  # e.g. a sub-word continuation
        batch["labels"] = labels.masked_fill(ATTENTION == 0, -100)
    elif kind == "masked_lm":
        masked = (torch.rand(4, 6, generator=gen) < 0.4) & (ATTENTION == 1)
        masked[0, 1] = True
        batch["labels"] = batch["input_ids"].masked_fill(~masked, -100)
        batch["input_ids"] = batch["input_ids"].masked_fill(masked, 5)  # 5 plays [MASK]
    elif kind in ("t5", "bart"):
        labels = _ids((4, 5), seed + 1)
        labels[1, 3:] = -100
        labels[2, 1:] = -100
        batch["labels"] = labels
    elif kind == "causal_lm":
        batch["labels"] = batch["input_ids"].masked_fill(ATTENTION == 0, -100)
    return batch


# kind -> (student factory, teacher factory, head kind, Auto class)
CASES = {
    "sequence_classification": (
        lambda: bert(BertForSequenceClassification, num_labels=3),
        lambda: bert(BertForSequenceClassification, layers=4, seed=1, num_labels=3),
        "sequence_classification",
        AutoModelForSequenceClassification,
    ),
    "llama_sequence_classification": (
        lambda: llama_cls(),
        lambda: llama_cls(layers=4, hidden=64, seed=1),
        "sequence_classification",
        AutoModelForSequenceClassification,
    ),
    "token_classification": (
        lambda: bert(BertForTokenClassification, num_labels=5),
        lambda: bert(BertForTokenClassification, layers=4, seed=1, num_labels=5),
        "token_classification",
        AutoModelForTokenClassification,
    ),
    "masked_lm": (
        lambda: bert(BertForMaskedLM),
        lambda: bert(BertForMaskedLM, layers=4, seed=1),
        "masked_lm",
        AutoModelForMaskedLM,
    ),
    "t5": (lambda: t5(), lambda: t5(layers=3, seed=1), "seq2seq", AutoModelForSeq2SeqLM),
    "bart": (lambda: bart(), lambda: bart(layers=2, seed=1), "seq2seq", AutoModelForSeq2SeqLM),
    "causal_lm": (lambda: make_llama(2, 32), lambda: make_llama(4, 64, seed=1), "causal_lm", None),
}


def config(tmp_path, **kwargs) -> DistillationConfig:
    return distill_config(
        tmp_path, **{"max_steps": 1, "kd_weight": KD_W, "ce_weight": CE_W, "temperature": T, **kwargs}
    )


# ----------------------------------------------------------------------------------------------- references
def ref_forward_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per row, float64."""
    log_p_t = torch.log_softmax(t.double() / temperature, -1)
    log_p_s = torch.log_softmax(s.double() / temperature, -1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def ref_ce(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(s.double(), -1).gather(-1, y[:, None]).squeeze(-1)


def shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    out = torch.full_like(labels, pad)
    out[:, 0] = start
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, pad)


def reference_rows(kind: str, student, teacher, batch):
    """(student rows, teacher rows, labels) chosen without hf_distill: each head's rule written out."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    if kind in ("t5", "bart"):
        cfg = student.config
        inputs["decoder_input_ids"] = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
    s_logits = student(**inputs).logits
    if kind == "causal_lm":
        s_logits, t_logits, labels = s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return s_logits[keep], t_logits[keep], labels[keep]


# ----------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("case", sorted(CASES))
def test_detects_head_and_teacher_auto_class(case, tmp_path):
    make_student, make_teacher, kind, auto = CASES[case]
    assert detect_head(make_student()).kind == kind
    trainer = DistillationTrainer(model=make_student(), teacher_model=make_teacher(), args=config(tmp_path))
    assert trainer._head.kind == kind
    if auto is not None:
        assert trainer._head.auto_class is auto


def test_detect_head_other_classes():
    assert detect_head(bart(BartForSequenceClassification, num_labels=3)) == Head("sequence_classification")
    assert detect_head(bert(BertForSequenceClassification, num_labels=1)) == Head("sequence_classification", True)
    reg = bert(BertForSequenceClassification, num_labels=2, problem_type="regression")
    assert detect_head(reg).regression
    assert detect_head(make_llama()) == Head("causal_lm")
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(bert(BertForTokenClassification, num_labels=5), LoraConfig(target_modules=["query"]))
    assert detect_head(wrapped).kind == "token_classification"


# ----------------------------------------------------------------------------------------------- loss by hand
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_equals_weighted_sum_by_hand(case, tmp_path):
    """loss = (ce_weight * CE + kd_weight * T^2 * KL) / N over the head's supervised positions."""
    make_student, make_teacher, _, _ = CASES[case]
    student, teacher = make_student().eval(), make_teacher().eval()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path))
    batch = make_batch(case)
    loss = trainer.compute_loss(trainer.model, batch)
    s, t, y = reference_rows(case, student, teacher, batch)
    expected = (CE_W * ref_ce(s, y).sum() + KD_W * T**2 * ref_forward_kl(s, t, T).sum()) / y.numel()
    assert y.numel() > 0
    assert torch.allclose(loss.double(), expected, atol=1e-6, rtol=1e-5)
    # transformers counts the same items for `num_items_in_batch` (gradient accumulation)
    assert int(trainer._get_num_items_in_batch([batch], torch.device("cpu"))) == y.numel()


@pytest.mark.parametrize("case", ["sequence_classification", "token_classification", "masked_lm", "regression"])
def test_ce_only_equals_transformers_loss(case, tmp_path):
    """Without a teacher the loss is the model's own loss (mean CE over labels != -100, or MSE)."""
    if case == "regression":
        model = bert(BertForSequenceClassification, num_labels=1).eval()
    else:
        model = CASES[case][0]().eval()
    trainer = DistillationTrainer(model=model, args=config(tmp_path, kd_weight=0.0, ce_weight=1.0))
    batch = make_batch(case)
    own = model(**batch).loss
    assert torch.allclose(trainer.compute_loss(trainer.model, batch), own, atol=1e-6)


@pytest.mark.parametrize("num_labels", [1, 2])
def test_regression_head_uses_mse(num_labels, tmp_path):
    """KD term = squared error to the teacher's outputs, weighted by kd_weight (no T^2: nothing is softened)."""
    kwargs = {"num_labels": num_labels, "problem_type": "regression"}
    student = bert(BertForSequenceClassification, **kwargs).eval()
    teacher = bert(BertForSequenceClassification, layers=4, seed=1, **kwargs).eval()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path))
    batch = make_batch("regression")
    if num_labels == 2:
        batch["labels"] = torch.stack([batch["labels"], -batch["labels"]], 1)  # (B, 2)
    loss = trainer.compute_loss(trainer.model, batch)
    s = student(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    with torch.no_grad():
        t = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    y = batch["labels"].double().reshape(s.shape)
    expected = (CE_W * (s - y).pow(2).sum() + KD_W * (s - t).pow(2).sum()) / y.numel()
    assert torch.allclose(loss.double(), expected, atol=1e-6)
    assert int(trainer._get_num_items_in_batch([batch], torch.device("cpu"))) == y.numel()


# ----------------------------------------------------------------------------------------------- ignored positions
@pytest.mark.parametrize(
    "head, shape, label_shape",
    [
        (Head("causal_lm"), (3, 5, 11), (3, 5)),
        (Head("seq2seq"), (3, 5, 11), (3, 5)),
        (Head("masked_lm"), (3, 5, 11), (3, 5)),
        (Head("token_classification"), (3, 5, 4), (3, 5)),
        (Head("sequence_classification"), (6, 4), (6,)),
    ],
    ids=lambda v: v.kind if isinstance(v, Head) else None,
)
def test_ignored_positions_do_not_count(head, shape, label_shape):
    """Changing logits wherever nothing is supervised leaves every term unchanged; a supervised one changes it."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    labels = torch.randint(0, shape[-1], label_shape, generator=gen)
    labels[torch.rand(label_shape, generator=gen) < 0.4] = -100
    labels.view(-1)[1] = 3
    args = config_like()
    base = logit_terms(s, t, SupervisedView(labels, head), args)
    # logit positions that predict a label: causal LMs at t predict label t+1, the last position predicts nothing
    used = torch.zeros(label_shape, dtype=torch.bool)
    if head.kind == "causal_lm":
        used[:, :-1] = labels[:, 1:] != -100
    else:
        used = labels != -100
    noise = 5 * torch.randn(shape, generator=gen)
    ignored = (~used).unsqueeze(-1)
    other = logit_terms(s + noise * ignored, t - noise * ignored, SupervisedView(labels, head), args)
    for name in base.sums:
        assert torch.equal(base.sums[name], other.sums[name]), name
    assert base.n_items == used.sum()
    changed = logit_terms(s + noise * used.unsqueeze(-1), t, SupervisedView(labels, head), args)
    assert not torch.allclose(changed.sums["kd"], base.sums["kd"])


def config_like():
    from types import SimpleNamespace

    return SimpleNamespace(
        kd_loss="forward_kl", temperature=T, beta=0.5, skew_alpha=0.1, kd_weight=KD_W, ce_weight=CE_W
    )


@pytest.mark.parametrize("case", ["sequence_classification", "token_classification", "masked_lm", "t5"])
def test_padding_tokens_do_not_change_the_loss(case, tmp_path):
    make_student, make_teacher, _, _ = CASES[case]
    trainer = DistillationTrainer(
        model=make_student().eval(), teacher_model=make_teacher().eval(), args=config(tmp_path)
    )
    batch = make_batch(case)
    noisy = dict(batch, input_ids=torch.where(ATTENTION == 0, _ids((4, 6), seed=7), batch["input_ids"]))
    assert not torch.equal(noisy["input_ids"], batch["input_ids"])
    a, b = trainer.compute_loss(trainer.model, batch), trainer.compute_loss(trainer.model, noisy)
    assert torch.allclose(a, b, atol=1e-6)


def test_multi_label_targets_rejected(tmp_path):
    with pytest.raises(ValueError, match="multi-label"):
        SupervisedView(torch.ones(4, 3), Head("sequence_classification")).pair(torch.randn(4, 3), torch.randn(4, 3))
    model = bert(BertForSequenceClassification, num_labels=3, problem_type="multi_label_classification")
    with pytest.raises(ValueError, match="multi-label classifier"):
        DistillationTrainer(model=model, args=config(tmp_path, kd_weight=0.0, ce_weight=1.0))


# ----------------------------------------------------------------------------------------------- teacher checks
def test_num_labels_mismatch_names_both(tmp_path):
    student = bert(BertForSequenceClassification, num_labels=3)
    teacher = bert(BertForSequenceClassification, layers=4, num_labels=2)
    with pytest.raises(ValueError, match=r"student num_labels=3.*teacher num_labels=2"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path))


def test_id2label_mismatch_names_both(tmp_path):
    names = ["entailment", "neutral", "contradiction"]
    student = bert(BertForSequenceClassification, id2label=dict(enumerate(names)))
    teacher = bert(BertForSequenceClassification, layers=4, id2label=dict(enumerate(reversed(names))))
    with pytest.raises(ValueError, match=r"label spaces differ.*0: 'entailment'.*0: 'contradiction'"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path))
    # placeholder names (LABEL_i) on one side are not a mismatch
    plain = bert(BertForSequenceClassification, layers=4, num_labels=3)
    DistillationTrainer(model=student, teacher_model=plain, args=config(tmp_path))


@pytest.mark.parametrize(
    "student, teacher",
    [
        (lambda: llama_cls(), lambda: make_llama(4, 64, seed=1)),
        (lambda: bert(BertForSequenceClassification, num_labels=3), lambda: bert(BertForMaskedLM, layers=4)),
        (
            lambda: bert(BertForTokenClassification, num_labels=3),
            lambda: bert(BertForSequenceClassification, num_labels=3),
        ),
    ],
    ids=["causal-teacher-for-classifier", "mlm-teacher-for-classifier", "seq-teacher-for-token-classifier"],
)
def test_different_head_type_rejected(student, teacher, tmp_path):
    with pytest.raises(
        ValueError, match=r"The teacher \(\w+, a \w+ head\) and the student .* predict different things"
    ):
        DistillationTrainer(model=student(), teacher_model=teacher(), args=config(tmp_path))


def test_regression_teacher_for_classifier_rejected(tmp_path):
    student = bert(BertForSequenceClassification, num_labels=2)
    teacher = bert(BertForSequenceClassification, layers=4, num_labels=2, problem_type="regression")
    with pytest.raises(ValueError, match=r"a regression head\) and the student .*sequence_classification"):
        DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path))


def test_teacher_by_path_uses_the_students_auto_class(tmp_path):
    bert(BertForTokenClassification, layers=4, seed=1, num_labels=5).save_pretrained(tmp_path / "teacher")
    bert(BertForTokenClassification, layers=4, seed=1, num_labels=4).save_pretrained(tmp_path / "teacher4")
    student = bert(BertForTokenClassification, num_labels=5)
    trainer = DistillationTrainer(model=student, teacher_model=str(tmp_path / "teacher"), args=config(tmp_path))
    assert type(trainer.teacher) is BertForTokenClassification
    with pytest.raises(ValueError, match=r"student num_labels=5.*teacher num_labels=4"):
        DistillationTrainer(model=student, teacher_model=str(tmp_path / "teacher4"), args=config(tmp_path))


# ----------------------------------------------------------------------------------------------- training
def dataset(case: str, n_batches: int = 2) -> Dataset:
    rows = [make_batch(case, seed=i) for i in range(n_batches)]
    return Dataset.from_dict({k: torch.cat([r[k] for r in rows]).tolist() for k in rows[0]})


@pytest.mark.parametrize("case", ["sequence_classification", "token_classification", "masked_lm", "t5"])
def test_trains_and_reloads_with_the_right_auto_class(case, tmp_path):
    make_student, make_teacher, _, auto = CASES[case]
    trainer = DistillationTrainer(
        model=make_student(),
        teacher_model=make_teacher(),
        args=config(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=dataset(case),
        data_collator=default_data_collator,
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert logs and {"kd_loss", "ce_loss", "top1_agreement"} <= set(logs[0])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.save_model(str(tmp_path / "final"))
    reloaded = auto.from_pretrained(tmp_path / "final").eval()
    assert type(reloaded) is type(trainer.model)
    batch = make_batch(case)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if case == "t5":
        inputs["decoder_input_ids"] = shift_right(batch["labels"], 0, 0)
    trainer.model.eval()
    assert torch.allclose(reloaded(**inputs).logits, trainer.model(**inputs).logits, atol=1e-5)


def test_eval_compute_metrics_and_agreement_for_classification(tmp_path):
    def accuracy(prediction):  # the user's own metric sees the student's logits (B, C) and the labels (B,)
        keep = prediction.label_ids != -100
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids)[keep].mean())}

    student = bert(BertForSequenceClassification, num_labels=3).eval()
    teacher = bert(BertForSequenceClassification, layers=4, seed=1, num_labels=3).eval()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, per_device_eval_batch_size=4),
        data_collator=default_data_collator,
        compute_metrics=accuracy,
    )
    data = dataset("sequence_classification", n_batches=2)
    metrics = trainer.evaluate(data)
    rows = [make_batch("sequence_classification", seed=i) for i in range(2)]
    inputs = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    labels = inputs.pop("labels")
    with torch.no_grad():
        s, t = student(**inputs).logits.argmax(-1), teacher(**inputs).logits.argmax(-1)
    keep = labels != -100
    assert metrics["eval_accuracy"] == pytest.approx((s[keep] == labels[keep]).double().mean().item())
    assert metrics["eval_top1_agreement"] == pytest.approx((s[keep] == t[keep]).double().mean().item())


def _ga_weights(tmp_path, name: str, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    trainer = DistillationTrainer(
        model=bert(BertForSequenceClassification, num_labels=3),
        teacher_model=bert(BertForSequenceClassification, layers=4, seed=1, num_labels=3),
        args=config(tmp_path / name, **one_sgd_step(batch_size, accumulation)),
        train_dataset=dataset("sequence_classification", n_batches=1),  # 4 rows, one labelled -100
        data_collator=default_data_collator,
    )
    return trained_weights(trainer)


def test_gradient_accumulation_equals_full_batch_for_sequence_classification(tmp_path):
    """2 micro-batches of 2 (3 labelled examples, split unevenly) give the SGD update of one batch of 4."""
    start = bert(BertForSequenceClassification, num_labels=3).state_dict()
    full = _ga_weights(tmp_path, "full", 4, 1)
    accumulated = _ga_weights(tmp_path, "ga", 2, 2)
    assert max((full[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in full:
        assert torch.allclose(full[key], accumulated[key], atol=1e-5), key
