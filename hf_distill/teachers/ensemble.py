"""Several teachers with one tokenizer (multi-teacher KD, Gou et al. 2021 survey; e.g. You et al. 2017).

Recipe lines: `teacher_models_name_or_path: [a, b]` (or `teacher_model=[model_a, model_b]`), `teacher_weights: [0.7,
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

from ..heads import divergence_kwargs, hard_loss, select_positions
from ..losses import logit_divergence


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


def setup_teachers(trainer: Any, teachers: Sequence[Any], processing_classes: Any = None) -> None:
    """Load, check and place every teacher with the trainer's `_setup_teacher`; sets `trainer.teachers` (all) and
    `trainer.teacher` (the first, for code that expects one teacher)."""
    teachers = list(teachers)
    if not teachers:
        raise ValueError("`teacher_model` is an empty list; give at least one teacher.")
    if not isinstance(processing_classes, list | tuple):
        processing_classes = [processing_classes] * len(teachers)
    if len(processing_classes) != len(teachers):
        raise ValueError(f"{len(teachers)} teachers but {len(processing_classes)} teacher processing classes.")
    weights = trainer.args.teacher_weights
    if weights is not None and len(weights) != len(teachers):
        raise ValueError(
            f"`teacher_weights` has {len(weights)} entries for {len(teachers)} teachers; give one weight per teacher."
        )
    if len(teachers) > 1 and trainer.args.uses_features:
        raise ValueError(
            "Hidden-state hints, attention and relation losses need one teacher; with several teachers set "
            "hint_layers=None, attention_weight=0 and relation_loss=None."
        )
    prepared, sizes = [], []
    for teacher, processing_class in zip(teachers, processing_classes):
        trainer._setup_teacher(teacher, processing_class)
        prepared.append(trainer.teacher)
        sizes.append(trainer._vocab_size)
    trainer.teachers, trainer.teacher = prepared, prepared[0]
    trainer._vocab_size = next((s for s in sizes if s is not None), None)
    if len(prepared) > 1:
        trainer._fused = False
        logger.info("%d teachers (%s): KD uses materialised logits.", len(prepared), trainer.args.multi_teacher_mode)


def teacher_weights(args: Any, n: int) -> list[float]:
    """The configured weights, or equal weights 1/n."""
    return list(args.teacher_weights) if args.teacher_weights is not None else [1.0 / n] * n


def multi_teacher_logit_terms(
    trainer: Any, outputs: Any, teacher_outputs: Sequence[Any], inputs: dict[str, Any]
) -> tuple[dict, dict, torch.Tensor]:
    """KD and CE sums over supervised tokens against several teachers (module docstring). Same contract as
    `DistillationMixin._logit_terms`."""
    args = trainer.args
    if trainer._head.regression:
        raise ValueError("Several teachers need a classification or LM head (their distributions are mixed).")
    labels, shift_labels = inputs["labels"], inputs.get("shift_labels")
    rows = [
        select_positions(outputs.logits, t.logits, labels, trainer._head, trainer._vocab_size, shift_labels)
        for t in teacher_outputs
    ]
    s, y = rows[0][0], rows[0][2]
    t_logits = [r[1] for r in rows]
    weights = teacher_weights(args, len(t_logits))
    hyper = divergence_kwargs(args)
    per_teacher = [logit_divergence(s, t, **hyper).sum() for t in t_logits]
    for i, value in enumerate(per_teacher):
        trainer._record_sum(f"kd_teacher{i}_loss", value.detach(), y.numel())
    if args.multi_teacher_mode == "sum":
        kd = sum(w * v for w, v in zip(weights, per_teacher))
        target = t_logits[max(range(len(weights)), key=lambda i: weights[i])]
    else:  # T * log p_mix are logits whose tempered softmax is p_mix
        target = args.temperature * mixture_log_probs(t_logits, weights, temperature=args.temperature)
        kd = logit_divergence(s, target, **hyper).sum()
    trainer._record_sum("top1_agreement", (s.argmax(-1) == target.argmax(-1)).sum(), y.numel())
    sums = {"kd": kd, "ce": hard_loss(s, y, trainer._head)}
    weights_out = {"kd": args.kd_weight * args.temperature**2, "ce": args.ce_weight}
    return sums, weights_out, y.new_tensor(y.numel())
