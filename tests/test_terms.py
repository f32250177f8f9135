"""The supervised view, LossTerms, the one normaliser, and picking the teacher source."""

import types

import pytest
import torch
from conftest import distill_config, make_llama

from hf_distill.heads import Head
from hf_distill.teachers import SOURCES, SourceContext, SourceRequest, TeacherSource, build_source
from hf_distill.teachers.ensemble import EnsembleTeacher
from hf_distill.teachers.live import FusedLiveTeacher, LiveTeacher
from hf_distill.terms import (
    TASK_COUNTS_KEY,
    LossTerms,
    SupervisedView,
    add_window_task_counts,
    kd_scale,
    normalised_loss,
    terms_per_task,
)


CAUSAL = Head("causal_lm")
LABELS = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8], [-100, 9, -100, -100]])
TASK = torch.tensor([0, 1, 0])


def args(**kw):
    base = dict(kd_weight=0.5, temperature=2.0, ce_weight=0.3, label_weight=0.5, rationale_weight=0.5,
                average_tokens_across_devices=True, world_size=1)  # fmt: skip
    return types.SimpleNamespace(**{**base, **kw})


def test_view_rows_targets_and_tasks():
    view = SupervisedView.from_batch({"labels": LABELS, "task": TASK}, CAUSAL)
    # causal: logits at t predict label t + 1, so positions (0,0),(0,1),(1,1),(1,2),(2,0) are supervised
    expected_mask = torch.tensor([[True, True, False], [False, True, True], [True, False, False]])
    assert torch.equal(view.mask, expected_mask) and int(view.n_items) == 5
    logits = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    assert torch.equal(view.rows(logits), logits[:, :-1][expected_mask])
    assert view.targets().tolist() == [5, 6, 7, 8, 9]
    assert view.task_counts().tolist() == [3, 2]
    names = []
    for name, sub in view.per_task():
        names.append(name)
        keep = (TASK == (0 if name == "label" else 1))[:, None]
        assert torch.equal(sub.labels, LABELS.masked_fill(~keep, -100)) and sub.task is None
    assert names == ["label", "rationale"]


def test_view_rejects_bad_task_ids():
    with pytest.raises(ValueError, match="one id per row"):
        SupervisedView.from_batch({"labels": LABELS, "task": torch.tensor([0, 1])}, CAUSAL)
    with pytest.raises(ValueError, match="must be in"):
        SupervisedView.from_batch({"labels": LABELS, "task": torch.tensor([0, 1, 2])}, CAUSAL)


def test_kd_scale_is_the_one_factor():
    assert kd_scale(args()) == 0.5 * 2.0**2
    assert kd_scale(args(), Head("sequence_classification", regression=True)) == 0.5


def test_loss_terms_and_global_normaliser():
    terms = LossTerms(n_items=torch.tensor(4)).add("kd", torch.tensor(2.0), 2.0).add("ce", torch.tensor(3.0), 0.3)
    terms.metric("top1_agreement", torch.tensor(3), 4)
    assert float(terms.total()) == pytest.approx(2.0 * 2.0 + 0.3 * 3.0)
    view = SupervisedView.from_batch({"labels": LABELS}, CAUSAL)
    loss, metrics = normalised_loss(terms, view, args())
    assert float(loss) == pytest.approx(4.9 / 4)
    loss, _ = normalised_loss(terms, view, args(), num_items_in_batch=10, num_processes=2)
    assert float(loss) == pytest.approx(4.9 / 10 * 2)  # DDP averages gradients over the 2 processes
    loss, _ = normalised_loss(terms, view, args(average_tokens_across_devices=False), 10, 2)
    assert float(loss) == pytest.approx(4.9 / 10)
    assert set(metrics) == {"kd_loss", "ce_loss", "total_loss", "top1_agreement"}
    assert float(metrics["kd_loss"][0]) == 2.0 and int(metrics["kd_loss"][1]) == 4


def test_per_task_normaliser_against_hand_computation():
    view = SupervisedView.from_batch({"labels": LABELS, "task": TASK}, CAUSAL)

    def compute(v):  # ce = number of supervised items of the task view, kd = twice that
        n = v.n_items.float()
        return LossTerms(n_items=v.n_items).add("ce", n, 0.3).add("kd", 2 * n, 2.0).metric("top1_agreement", n, n)

    terms = terms_per_task(compute, view)
    assert set(terms.sums) == {"label_ce", "label_kd", "rationale_ce", "rationale_kd"}
    assert [float(x) for x in terms.metrics["top1_agreement"]] == [5.0, 5.0]  # both tasks add up
    terms.add("hint", torch.tensor(1.5), 1.0)
    loss, metrics = normalised_loss(terms, view, args())
    label = (0.3 * 3 + 2.0 * 6) / 3
    rationale = (0.3 * 2 + 2.0 * 4) / 2
    assert float(loss) == pytest.approx(0.5 * label + 0.5 * rationale + 1.5 / 5)
    assert float(metrics["label_loss"][0]) == pytest.approx(0.3 * 3 + 2.0 * 6)
    # with the accumulation window's per-task counts, each task is a mean over the window's tokens of that task
    batch = {"labels": LABELS, "task": TASK, TASK_COUNTS_KEY: torch.tensor([6, 4])}
    loss, _ = normalised_loss(terms, SupervisedView.from_batch(batch, CAUSAL), args(), num_items_in_batch=10)
    expected = 0.5 * (0.3 * 3 + 2.0 * 6) / 6 + 0.5 * (0.3 * 2 + 2.0 * 4) / 4 + 1.5 / 10
    assert float(loss) == pytest.approx(expected)


def test_window_task_counts_add_up_over_the_window():
    batches = [{"labels": LABELS, "task": TASK}, {"labels": LABELS, "task": torch.tensor([1, 1, 1])}]
    add_window_task_counts(batches, CAUSAL, args(), accelerator=None)
    assert all(b[TASK_COUNTS_KEY].tolist() == [3, 7] for b in batches)


def test_select_source_by_what_the_config_asks_for(tmp_path):
    student, teacher = make_llama(2, 32), make_llama(2, 32, seed=1)

    def built(teacher_model=None, **fields):
        config = distill_config(tmp_path, **fields)
        return build_source(
            SourceRequest(config, teacher_model, student=student), SourceContext(config, CAUSAL, student)
        )

    assert type(built(kd_weight=0.0, ce_weight=1.0)) is TeacherSource
    assert type(built(teacher, use_fused_kd_loss=False)) is LiveTeacher
    assert type(built(teacher)) is FusedLiveTeacher
    assert type(built([teacher, make_llama(2, 32, seed=2)])) is EnsembleTeacher
    assert type(built(teacher, kd_weight=0.0, ce_weight=1.0)) is TeacherSource  # no term needs it: not loaded
    assert "none" not in SOURCES  # the none source is the fallback, not a registry entry
    with pytest.raises(ValueError, match="Pass either `teacher_model` or `teacher_ema_decay`.*drop one of them"):
        built(teacher, teacher_ema_decay=0.9)


def test_no_teacher_source_gives_ce_only():
    student = make_llama(2, 32)
    ids = torch.randint(0, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100
    a = args(kd_loss="forward_kl", kd_weight=0.0, ce_weight=1.0, beta=0.5, skew_alpha=0.1)
    source = TeacherSource(SourceContext(a, CAUSAL, student))
    out = student(input_ids=ids)
    terms = source.terms(out, source.outputs({"input_ids": ids}, {}), SupervisedView.from_batch({"labels": labels},
                                                                                                CAUSAL))  # fmt: skip
    reference = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).double(),
                                                  labels[:, 1:].reshape(-1), reduction="sum")  # fmt: skip
    assert set(terms.sums) == {"ce"} and int(terms.n_items) == 6
    assert float(terms.sums["ce"].detach()) == pytest.approx(float(reference.detach()), rel=1e-5)


def test_sharded_runs_never_pick_the_fused_loss_for_self_taught_sources(tmp_path):
    student = make_llama(2, 32)
    a = distill_config(tmp_path, teacher_ema_decay=0.9)
    request = SourceRequest(a, student=student)
    assert build_source(request, SourceContext(a, CAUSAL, student)).name == "ema-fused"
    assert build_source(request, SourceContext(a, CAUSAL, student, sharded=True)).name == "ema"  # FSDP/ZeRO
