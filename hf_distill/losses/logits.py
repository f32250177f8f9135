"""Divergences between teacher and student next-token distributions, on materialised logits.

Every function here is pure: logits in, one value per position out, computed in fp32. Shapes use
`(..., V)` for logits (any leading dims, e.g. `(B, T, V)` or `(N, V)`) and `(...)` for the result.

Conventions (all follow the literature and TRL's GKD trainer):

- `p_t = softmax(teacher / T)`, `p_s = softmax(student / T)`.
- `forward_kl`      = KL(p_t || p_s)                      (Hinton et al. 2015)
- `reverse_kl`      = KL(p_s || p_t)                      (MiniLLM / GKD)
- `jsd`             = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s;
                      beta = 0 is exactly forward KL and beta = 1 exactly reverse KL (GKD, Agarwal et al. 2024)
- `skew_forward_kl` = KL(p_t || a * p_t + (1 - a) * p_s)  (DistiLLM, Ko et al. 2024; a = `skew_alpha`)
- `skew_reverse_kl` = KL(p_s || a * p_s + (1 - a) * p_t)
- `tvd`             = 0.5 * sum_v |p_t - p_s|
"""

import math

import torch
import torch.nn.functional as F


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 (or float64 when given float64, for gradcheck) log-softmax at `temperature`."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.log_softmax(logits / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probabilities; `0 * log 0` counts as 0 (and only that: a NaN in either
    input stays NaN, it is never summed away)."""
    p = log_p.exp()
    zero = p == 0
    return torch.where(zero, 0.0, p * (log_p.masked_fill(zero, 0.0) - log_q)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stable in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, **_: float
) -> torch.Tensor:
    """KL(teacher || student) per position.

    Args:
        student_logits (`torch.Tensor`): shape `(..., V)`.
        teacher_logits (`torch.Tensor`): shape `(..., V)`, no gradient needed.
        temperature (`float`): softmax temperature applied to both.

    Returns:
        `torch.Tensor`: fp32, shape `(...)`.
    """
    return _kl(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature))


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, **_: float
) -> torch.Tensor:
    """KL(student || teacher) per position. Shapes as `forward_kl`."""
    return _kl(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits, temperature))


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    **_: float,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per position (GKD; TRL's beta convention).

    `beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)` with `m = beta * p_t + (1 - beta) * p_s`; `beta = 0` returns
    forward KL and `beta = 1` reverse KL exactly. Shapes as `forward_kl`.
    """
    log_s = _log_softmax(student_logits, temperature)
    log_t = _log_softmax(teacher_logits, temperature)
    if beta == 0:
        return _kl(log_t, log_s)
    if beta == 1:
        return _kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    **_: float,
) -> torch.Tensor:
    """Skew KL of DistiLLM: KL(p_t || a * p_t + (1 - a) * p_s), a = `skew_alpha`. Shapes as `forward_kl`."""
    log_s = _log_softmax(student_logits, temperature)
    log_t = _log_softmax(teacher_logits, temperature)
    if skew_alpha == 0:
        return _kl(log_t, log_s)
    return _kl(log_t, _log_mix(log_t, log_s, skew_alpha))


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    **_: float,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(p_s || a * p_s + (1 - a) * p_t). Shapes as `forward_kl`."""
    # the skew forward KL with the two models' roles swapped
    return skew_forward_kl(teacher_logits, student_logits, temperature=temperature, skew_alpha=skew_alpha)


def tvd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0, **_: float
) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p_t - p_s| per position. Shapes as `forward_kl`."""
    p_s = _log_softmax(student_logits, temperature).exp()
    p_t = _log_softmax(teacher_logits, temperature).exp()
    return 0.5 * (p_t - p_s).abs().sum(-1)


LOGIT_LOSSES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence chosen by name (see the module docstring).

    Args:
        student_logits (`torch.Tensor`): shape `(..., V)`.
        teacher_logits (`torch.Tensor`): shape `(..., V)`; same V as the student (align vocabularies first).
        loss_type (`str`): a key of `LOGIT_LOSSES`.

    Returns:
        `torch.Tensor`: fp32, shape `(...)`.
    """
    if loss_type not in LOGIT_LOSSES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {sorted(LOGIT_LOSSES)}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape; align the vocabularies (same tokenizer) and the positions first."
        )
    return LOGIT_LOSSES[loss_type](
        student_logits, teacher_logits, temperature=temperature, beta=beta, skew_alpha=skew_alpha
    )


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean divergence over the positions where `mask` is True (no T^2 factor; the trainer applies it).

    Args:
        student_logits (`torch.Tensor`): shape `(..., V)`, e.g. `(B, T, V)`.
        teacher_logits (`torch.Tensor`): shape `(..., V)`.
        loss_type (`str`): forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tvd.
        temperature (`float`): softmax temperature for both models.
        beta (`float`): jsd interpolation, 0 = forward KL, 1 = reverse KL.
        skew_alpha (`float`): skew KL mixing weight.
        mask (`torch.Tensor`, *optional*): bool, shape `(...)`; None counts every position.

    Returns:
        `torch.Tensor`: fp32 scalar; 0 when the mask selects nothing.
    """
    per_position = logit_divergence(
        student_logits, teacher_logits, loss_type=loss_type, temperature=temperature, beta=beta, skew_alpha=skew_alpha
    )
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.device, torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(per_position.shape)}."
        )
    return torch.where(mask, per_position, 0.0).sum() / mask.sum().clamp(min=1)
