"""Several teachers with one tokenizer (multi-teacher KD, Gou et al. 2021 survey; e.g. You et al. 2017).

Recipe lines: `teacher_model_name_or_path: [a, b]` (or `teacher_model=[model_a, model_b]`), `teacher_weights: [0.7,
0.3]` (default: equal), `multi_teacher_mode: mixture | sum`.

- `mixture`: the target is the weighted mixture in probability space, `p_mix = sum_i w_i softmax(t_i / T)` with the
  weights normalised to sum to 1, and the usual `kd_loss` divergence is taken against `p_mix`.
- `sum`: `sum_i w_i * divergence(student, teacher_i)` with the weights as given (not normalised).

Teacher i's loss (its divergence summed over supervised tokens) is logged as `kd_teacher{i}_loss` in both modes.
All teachers must share the student's tokenizer; the fused (chunked) loss is used for one teacher only.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..losses import logit_divergence
from ..model_card import CardTeacher, live_teachers
from ..terms import LossTerms, SupervisedView, divergence_kwargs, hard_loss, kd_scale
from .base import SourceContext, SourceRequest, TeacherSource, teacher_forward
from .live import load_live_teachers


logger = logging.getLogger(__name__)

MULTI_TEACHER_MODES = ("mixture", "sum")


def mixture_log_probs(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float], *, temperature: float = 1.0):
    """`log sum_i w_i softmax(t_i / T)` with `w` normalised to sum to 1, computed stably in log space (fp32).

    Args:
        teacher_logits (`Sequence[torch.Tensor]`): one `(..., V)` tensor per teacher.
        weights (`Sequence[float]`): one non-negative weight per teacher, sum > 0.
        temperature (`float`): softmax temperature T.

    Returns:
        `torch.Tensor`: fp32 (float64 for float64 input), shape `(..., V)`.
    """
    if len(teacher_logits) != len(weights):
        raise ValueError(f"{len(teacher_logits)} teachers but {len(weights)} teacher_weights.")
    total = float(sum(weights))
    if any(w < 0 for w in weights) or total <= 0:
        raise ValueError(f"`teacher_weights` must be >= 0 with a positive sum, got {list(weights)}.")
    parts = []
    for logits, weight in zip(teacher_logits, weights):
        logits = logits if logits.dtype == torch.float64 else logits.float()
        log_w = torch.log(torch.tensor(weight / total, dtype=logits.dtype, device=logits.device))
        parts.append(F.log_softmax(logits / temperature, dim=-1) + log_w)
    return torch.logsumexp(torch.stack(parts), dim=0)


def check_teacher_list(args: Any, n_teachers: int) -> None:
    """Settings that a list of `n_teachers` teachers must satisfy (raised before any teacher is loaded)."""
    if n_teachers == 0:
        raise ValueError("`teacher_model` is an empty list; give at least one teacher.")
    weights = args.teacher_weights
    if weights is not None and len(weights) != n_teachers:
        raise ValueError(
            f"`teacher_weights` has {len(weights)} entries for {n_teachers} teachers; give one weight per teacher."
        )
    if n_teachers > 1 and args.uses_features:
        raise ValueError(
            "Hidden-state hints, attention and relation losses need one teacher; with several teachers set "
            "hint_layers=None, attention_weight=0 and relation_loss=None."
        )


def teacher_weights(args: Any, n: int) -> list[float]:
    """The configured weights, or equal weights 1/n."""
    return list(args.teacher_weights) if args.teacher_weights is not None else [1.0 / n] * n


class EnsembleTeacher(TeacherSource):
    """Several live teachers sharing the student's tokenizer; KD on materialised logits (module docstring)."""

    kind = "ensemble"
    name = "ensemble"

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        return len(request.teachers) > 1

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "several teachers (`teacher_model=[...]`)"

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        check_teacher_list(request.args, len(request.teachers))
        if request.args.cross_tokenizer_loss is not None:
            raise ValueError(
                "`cross_tokenizer_loss` runs one teacher: give one teacher (several cross-tokenizer teachers are not "
                "supported yet), or a `teacher_cache` built with its tokenizer."
            )

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> TeacherSource:
        """Every teacher loaded, checked and placed (one processing class per teacher, or one for all); the `none`
        source when no term needs a teacher."""
        if not request.needs_teacher:
            logger.info("kd_weight is 0 and no hint/relation term is on: the teachers are not loaded or run.")
            return TeacherSource(context)
        teachers, classes = request.teachers, request.teacher_processing_class
        classes = list(classes) if isinstance(classes, list | tuple) else [classes] * len(teachers)
        if len(classes) != len(teachers):
            raise ValueError(f"{len(teachers)} teachers but {len(classes)} teacher processing classes.")
        models, vocab_size = load_live_teachers(context, teachers, classes)
        return cls(context.with_vocab_size(vocab_size), models)

    def __init__(self, context: SourceContext, teachers: Sequence[Any]):
        super().__init__(context)
        if context.head.regression:
            raise ValueError("Several teachers need a classification or LM head (their distributions are mixed).")
        self.models = list(teachers)
        logger.info(
            "%d teachers (%s): KD uses materialised logits.", len(self.models), context.args.multi_teacher_mode
        )

    def card_teacher(self) -> CardTeacher:
        """Every teacher by name and revision or fingerprint, with the mode and weights that combine them."""
        args = self.context.args
        teachers = live_teachers(args, self.models)
        weights = ", ".join(f"{w:g}" for w in teacher_weights(args, len(self.models)))
        return CardTeacher(
            f"{len(self.models)} teachers, `multi_teacher_mode: {args.multi_teacher_mode}`, weights {weights}: "
            f"{teachers.description}",
            teachers.base_models,
        )

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> list[Any]:
        return [teacher_forward(t, model_inputs, **(self.context.feature_kwargs or {})) for t in self.models]

    def terms(self, student_outputs: Any, teacher_outputs: Sequence[Any], view: SupervisedView) -> LossTerms:
        """KD and CE sums over the view's supervised items; `kd_teacher{i}` metrics per teacher."""
        args, head = self.context.args, view.head
        rows = [view.pair(student_outputs.logits, t.logits, self.context.vocab_size) for t in teacher_outputs]
        s, y = rows[0][0], rows[0][2]
        t_logits = [r[1] for r in rows]
        weights = teacher_weights(args, len(t_logits))
        hyper = divergence_kwargs(args, view.state)
        per_teacher = [logit_divergence(s, t, **hyper).sum() for t in t_logits]
        terms = LossTerms(n_items=y.new_tensor(y.numel()))
        for i, value in enumerate(per_teacher):
            terms.metric(f"kd_teacher{i}_loss", value.detach(), y.numel())
        if args.multi_teacher_mode == "sum":
            kd = sum(w * v for w, v in zip(weights, per_teacher))
            target = t_logits[max(range(len(weights)), key=lambda i: weights[i])]
        else:  # T * log p_mix are logits whose tempered softmax is p_mix
            target = args.temperature * mixture_log_probs(t_logits, weights, temperature=args.temperature)
            kd = logit_divergence(s, target, **hyper).sum()
        terms.metric("top1_agreement", (s.argmax(-1) == target.argmax(-1)).sum(), y.numel())
        terms.add("kd", kd, kd_scale(args, head))
        return terms.add("ce", hard_loss(s, y, head), args.ce_weight)
