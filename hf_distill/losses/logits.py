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
- `taid`            = KL(p_tgt || p_s), p_tgt = softmax((1 - t) * sg(log p_s) + t * log p_t), sg = stop-gradient;
                      t = `taid_t` in [0, 1] is training state (`hf_distill.taid`); t = 1 is exactly forward KL
                      (TAID, Shing et al. ICLR 2025)
- `ab_divergence`   = -1 / (a b) * sum_v (p_t^a p_s^b - a / (a + b) p_t^(a + b) - b / (a + b) p_s^(a + b)),
                      a = `ab_alpha`, b = `ab_beta` (ABKD, Wang et al. ICML 2025; Cichocki et al. 2011), with its
                      continuous limits: b = 0 is 1 / a^2 * sum (p_t^a log(p_t^a / p_s^a) - p_t^a + p_s^a) (a = 1:
                      forward KL), a = 0 is 1 / b^2 * sum (p_s^b log(p_s^b / p_t^b) - p_s^b + p_t^b) (b = 1: reverse
                      KL), a = b = 0 is 0.5 * sum (log p_t - log p_s)^2
- `akl`             = w_head * KL(p_t || p_s) + w_tail * KL(p_s || p_t) per position (AKL, Wu et al. COLING 2025):
                      sort the vocabulary by p_t, the head is the tokens before the teacher's cumulative mass exceeds
                      mu = `akl_mu` (always at least the top token), g_head / g_tail = sum |p_t - p_s| over head /
                      tail, w_head = g_head / (g_head + g_tail), w_tail = 1 - w_head; the weights carry no gradient
"""

import math

import torch
import torch.nn.functional as F


# Every divergence hyper-parameter's default, written once: the functions here, the sparse and fused forms, and the
# config's fields (`DistillationArguments`) read them from this table.
DIVERGENCE_DEFAULTS: dict[str, float | None] = {
    "temperature": 1.0,
    "beta": 0.5,  # jsd: 0 = forward KL, 1 = reverse KL
    "skew_alpha": 0.1,  # skew KL (DistiLLM)
    "taid_t": None,  # TAID's t is training state (hf_distill.taid); a direct call passes it
    "ab_alpha": 0.8,  # ABKD
    "ab_beta": 0.3,
    "akl_mu": 0.5,  # AKL's head threshold
}
_D = DIVERGENCE_DEFAULTS


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
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = _D["temperature"], **_: float
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
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = _D["temperature"], **_: float
) -> torch.Tensor:
    """KL(student || teacher) per position. Shapes as `forward_kl`."""
    return _kl(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits, temperature))


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = _D["temperature"],
    beta: float = _D["beta"],
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
    temperature: float = _D["temperature"],
    skew_alpha: float = _D["skew_alpha"],
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
    temperature: float = _D["temperature"],
    skew_alpha: float = _D["skew_alpha"],
    **_: float,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(p_s || a * p_s + (1 - a) * p_t). Shapes as `forward_kl`."""
    # the skew forward KL with the two models' roles swapped
    return skew_forward_kl(teacher_logits, student_logits, temperature=temperature, skew_alpha=skew_alpha)


def tvd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = _D["temperature"], **_: float
) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p_t - p_s| per position. Shapes as `forward_kl`."""
    p_s = _log_softmax(student_logits, temperature).exp()
    p_t = _log_softmax(teacher_logits, temperature).exp()
    return 0.5 * (p_t - p_s).abs().sum(-1)


def taid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = _D["temperature"],
    taid_t: float | None = None,
    **_: float,
) -> torch.Tensor:
    """TAID (Shing et al., ICLR 2025): KL(p_tgt || p_s) to a target between the detached student and the teacher.

    `p_tgt = softmax((1 - t) * sg(log p_s) + t * log p_t)` (the stop-gradient `sg` is the paper's: the target moves
    with the student but is not optimised); `t = 1` is exactly `forward_kl`. Shapes as `forward_kl`.

    Args:
        taid_t (`float`): the interpolation t in [0, 1], training state that the trainer moves from `taid_t_start`
            to `taid_t_end` (`hf_distill.taid.TaidCallback`).
    """
    if taid_t is None or not 0.0 <= taid_t <= 1.0:
        raise ValueError(
            f"loss_type='taid' needs taid_t, the interpolation t in [0, 1], got {taid_t!r}; the trainer passes its "
            "current value (hf_distill.taid), a direct call must pass taid_t=..."
        )
    log_s = _log_softmax(student_logits, temperature)
    log_t = _log_softmax(teacher_logits, temperature)
    if taid_t != 1.0:
        log_t = torch.log_softmax((1.0 - taid_t) * log_s.detach() + taid_t * log_t, dim=-1)
    return _kl(log_t, log_s)


def ab_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = _D["temperature"],
    ab_alpha: float = _D["ab_alpha"],
    ab_beta: float = _D["ab_beta"],
    **_: float,
) -> torch.Tensor:
    """Alpha-beta divergence D_AB(p_t || p_s) of ABKD (Wang et al., ICML 2025) per position.

    Formula and its limits in the module docstring: `(ab_alpha, ab_beta) = (1, 0)` is forward KL, `(0, 1)` reverse KL,
    `(0.5, 0.5)` four times the squared Hellinger distance. Shapes as `forward_kl`.

    Args:
        ab_alpha (`float`): a >= 0, weight on the teacher's mass (larger: more mode-covering, like forward KL).
        ab_beta (`float`): b >= 0, weight on the student's mass (larger: more mode-seeking, like reverse KL).
    """
    a, b = float(ab_alpha), float(ab_beta)
    if a < 0 or b < 0:
        raise ValueError(f"ab_divergence needs ab_alpha >= 0 and ab_beta >= 0, got ({a}, {b}).")
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    if a == 0 and b == 0:
        return 0.5 * (log_p - log_q).square().sum(-1)
    if b == 0:  # 1/a^2 sum(p^a log(p^a / q^a) - p^a + q^a)
        p_a = (a * log_p).exp()
        return (p_a * (log_p - log_q)).nansum(-1) / a - (p_a - (a * log_q).exp()).sum(-1) / a**2
    if a == 0:  # 1/b^2 sum(q^b log(q^b / p^b) - q^b + p^b)
        q_b = (b * log_q).exp()
        return (q_b * (log_q - log_p)).nansum(-1) / b - (q_b - (b * log_p).exp()).sum(-1) / b**2
    c = a + b
    cross = (a * log_p + b * log_q).exp()
    own = (a / c) * (c * log_p).exp() + (b / c) * (c * log_q).exp()
    return (own - cross).sum(-1) / (a * b)


def akl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = _D["temperature"],
    akl_mu: float = _D["akl_mu"],
    **_: float,
) -> torch.Tensor:
    """Adaptive KL (AKL, Wu et al., COLING 2025): forward and reverse KL mixed per position by the head/tail gap.

    Weights in the module docstring; they are computed without gradient, as in the paper's code. Shapes as
    `forward_kl`.

    Args:
        akl_mu (`float`): head threshold in (0, 1]: the head holds the teacher's top tokens up to cumulative mass mu.
    """
    log_s = _log_softmax(student_logits, temperature)
    log_t = _log_softmax(teacher_logits, temperature)
    if akl_mu >= 1.0:  # every token is head: forward KL exactly
        return _kl(log_t, log_s)
    with torch.no_grad():
        w_head = akl_head_weight(log_s, log_t, akl_mu)
    return w_head * _kl(log_t, log_s) + (1.0 - w_head) * _kl(log_s, log_t)


def akl_head_weight(log_s: torch.Tensor, log_t: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL's forward-KL weight `g_head / (g_head + g_tail)` from log-probabilities `(..., V)`; shape `(...)`.

    0.5 where the two distributions are equal (both KL terms are then 0).
    """
    p_t, idx = log_t.exp().sort(dim=-1, descending=True)
    gap = (p_t - log_s.exp().gather(-1, idx)).abs()
    # mu >= 1 puts every token in the head (forward KL exactly): `cumsum > 1` would still hold for the smallest
    # tokens whenever the fp32 cumulative sum rounds above 1.
    tail = p_t.cumsum(-1) > mu if mu < 1.0 else torch.zeros_like(p_t, dtype=torch.bool)
    tail[..., 0] = False  # the teacher's top token is always head
    g_head = torch.where(tail, 0.0, gap).sum(-1)
    total = gap.sum(-1)
    weight = torch.where(total > 0, g_head / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)
    return weight if mu < 1.0 else torch.ones_like(weight)  # all head: forward KL (also where p_s == p_t)


LOGIT_LOSSES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "taid": taid,
    "ab_divergence": ab_divergence,
    "akl": akl,
}


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = _D["temperature"],
    beta: float = _D["beta"],
    skew_alpha: float = _D["skew_alpha"],
    taid_t: float | None = None,
    ab_alpha: float = _D["ab_alpha"],
    ab_beta: float = _D["ab_beta"],
    akl_mu: float = _D["akl_mu"],
) -> torch.Tensor:
    """Per-position divergence chosen by name (see the module docstring).

    Args:
        student_logits (`torch.Tensor`): shape `(..., V)`.
        teacher_logits (`torch.Tensor`): shape `(..., V)`; same V as the student (align vocabularies first).
        loss_type (`str`): a key of `LOGIT_LOSSES`.
        beta, skew_alpha, taid_t, ab_alpha, ab_beta, akl_mu: the hyper-parameters of jsd, skew KL, taid,
            ab_divergence and akl (each divergence reads only its own).

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
        student_logits,
        teacher_logits,
        temperature=temperature,
        beta=beta,
        skew_alpha=skew_alpha,
        taid_t=taid_t,
        ab_alpha=ab_alpha,
        ab_beta=ab_beta,
        akl_mu=akl_mu,
    )


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = _D["temperature"],
    beta: float = _D["beta"],
    skew_alpha: float = _D["skew_alpha"],
    mask: torch.Tensor | None = None,
    **hyper: float,
) -> torch.Tensor:
    """Mean divergence over the positions where `mask` is True (no T^2 factor; the trainer applies it).

    Args:
        student_logits (`torch.Tensor`): shape `(..., V)`, e.g. `(B, T, V)`.
        teacher_logits (`torch.Tensor`): shape `(..., V)`.
        loss_type (`str`): forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tvd | taid |
            ab_divergence | akl.
        temperature (`float`): softmax temperature for both models.
        beta (`float`): jsd interpolation, 0 = forward KL, 1 = reverse KL.
        skew_alpha (`float`): skew KL mixing weight.
        mask (`torch.Tensor`, *optional*): bool, shape `(...)`; None counts every position.
        **hyper: `taid_t`, `ab_alpha`, `ab_beta`, `akl_mu` as `logit_divergence`.

    Returns:
        `torch.Tensor`: fp32 scalar; 0 when the mask selects nothing.
    """
    per_position = logit_divergence(
        student_logits,
        teacher_logits,
        loss_type=loss_type,
        temperature=temperature,
        beta=beta,
        skew_alpha=skew_alpha,
        **hyper,
    )
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.device, torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(per_position.shape)}."
        )
    return torch.where(mask, per_position, 0.0).sum() / mask.sum().clamp(min=1)
