"""Held-out agreement between a student and its teacher: per-token KL(teacher || student), top-1 agreement and the
student's perplexity, over supervised tokens (labels != -100)."""

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .heads import detect_head
from .losses import logit_divergence
from .terms import SupervisedView


@torch.no_grad()
def teacher_student_metrics(
    student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, Any]], vocab_size: int | None = None
) -> dict[str, float]:
    """Token-weighted metrics over `batches` (each with `input_ids`, `attention_mask`, `labels` of shape `(B, T)`).

    Returns:
        `{"kl": mean KL(teacher || student) per supervised token, "top1_agreement": fraction of tokens where the
        argmaxes agree, "perplexity": exp(mean student CE on the labels), "teacher_perplexity": the same for the
        teacher, "tokens": number of supervised tokens}`.
    """
    student_was_training, teacher_was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    head = detect_head(student)
    kl = agree = ce = teacher_ce = 0.0
    tokens = 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        labels = batch["labels"].to(device)
        s_logits = student(**inputs).logits
        t_logits = teacher(**inputs).logits
        s, t, y = SupervisedView(labels, head).pair(s_logits, t_logits, vocab_size)
        kl += logit_divergence(s, t, loss_type="forward_kl").sum().item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        ce += F.cross_entropy(s.float(), y, reduction="sum").item()
        teacher_ce += F.cross_entropy(t.float(), y, reduction="sum").item()
        tokens += y.numel()
    student.train(student_was_training)
    teacher.train(teacher_was_training)
    if tokens == 0:
        raise ValueError("No supervised tokens (labels != -100) in the evaluation batches.")
    return {
        "kl": kl / tokens,
        "top1_agreement": agree / tokens,
        "perplexity": math.exp(ce / tokens),
        "teacher_perplexity": math.exp(teacher_ce / tokens),
        "tokens": tokens,
    }
