r"""Divergences against a cached top-k teacher: the k stored tokens plus one tail bucket.

A teacher cache (`hf_distill.cache`) stores, per supervised position, the teacher's k most likely token ids `I`, their
log-probabilities at temperature 1, `l_i = log p_t(I_i)`, and the log of the remaining mass,
`rho = log(1 - sum_i p_t(I_i)) = logsumexp_{v not in I} log p_t(v)` (computed exactly when the cache is written). The
loss compares teacher and student on the k + 1 buckets `{I_1}, ..., {I_k}, tail = V \ I`:

Teacher at temperature T (only `l`, `rho` and the vocabulary size V are known; the tail's shape is not). The tail's
mass is taken to be spread evenly over its V - k tokens, each token's probability is raised to 1/T, and the k + 1
bucket weights are renormalised:

    a_i    = l_i / T                                           (i = 1..k)
    a_tail = rho / T + (1 - 1/T) * log(V - k)                  (= log((V - k) * ((e^rho / (V - k)) ^ (1/T))))
    log q  = log_softmax([a_1, ..., a_k, a_tail])

At T = 1 this is exactly the teacher's bucket distribution `[p_t(I_1), ..., p_t(I_k), e^rho]` (renormalised, which also
absorbs fp16/bf16 rounding of the stored values). The top-k part is exact at every T (renormalising `l / T` over the
top-k equals the teacher's tempered softmax restricted to them); only the tail's tempered mass is an approximation,
exact when the tail is uniform.

Student at temperature T, from its full logits `z` `(N, V)`:

    log s_v = log_softmax(z / T)_v
    log s_i = log s_{I_i},    log s_tail = logsumexp_{v not in I} log s_v

Divergence: any divergence of `hf_distill.losses.logits` applied to the two (k + 1)-bucket distributions, e.g.

    forward_kl = sum_b q_b (log q_b - log s_b)        reverse_kl = sum_b s_b (log s_b - log q_b)
    jsd        = beta KL(q || m) + (1 - beta) KL(s || m),  m = beta q + (1 - beta) s   (GKD convention)

and likewise skew_forward_kl, skew_reverse_kl, tvd, taid (the target interpolates the two bucket distributions),
ab_divergence and akl (its head/tail split runs over the buckets sorted by q, the tail bucket counted as one).
When k = V the tail is empty (rho = -inf, the bucket is dropped)
and every value and gradient equals the dense loss of `logit_divergence` on the full logits. When k < V the bucketed
forward KL is a lower bound of the dense forward KL against the same teacher (data-processing inequality).
"""

import math

import torch

from .logits import DIVERGENCE_DEFAULTS, LOGIT_LOSSES


# Divergences available in sparse (top-k + tail) form: all of them, as they act on the bucket distributions.
SPARSE_LOSSES = tuple(LOGIT_LOSSES)


def _float(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """fp32 math (float64 kept for gradcheck references)."""
    return x.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


def teacher_bucket_log_probs(
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    vocab_size: int,
    *,
    temperature: float = DIVERGENCE_DEFAULTS["temperature"],
) -> torch.Tensor:
    """Teacher log-probabilities of the k top tokens and the tail bucket at `temperature` (module docstring).

    Args:
        topk_logprobs (`torch.Tensor`): shape `(N, k)`, teacher log-probabilities at temperature 1 (any float dtype).
        tail_logmass (`torch.Tensor`): shape `(N,)`, log of the teacher mass outside the top k (-inf when none).
        vocab_size (`int`): V, the size of the vocabulary the teacher's distribution covers.
        temperature (`float`): KD temperature T > 0.

    Returns:
        `torch.Tensor`: fp32, shape `(N, k + 1)` (last column = tail), or `(N, k)` when k == V.
    """
    k = topk_logprobs.shape[-1]
    if k > vocab_size:
        raise ValueError(f"The cache holds k={k} tokens per position but the vocabulary has only {vocab_size}.")
    top = _float(topk_logprobs, topk_logprobs) / temperature
    if k == vocab_size:
        return torch.log_softmax(top, dim=-1)
    tail = _float(tail_logmass, topk_logprobs)
    tail = tail / temperature + (1.0 - 1.0 / temperature) * math.log(vocab_size - k)
    return torch.log_softmax(torch.cat([top, tail.unsqueeze(-1)], dim=-1), dim=-1)


def student_bucket_log_probs(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, *, temperature: float = DIVERGENCE_DEFAULTS["temperature"]
) -> torch.Tensor:
    """Student log-probabilities of the teacher's top-k tokens and of the tail bucket (all other tokens).

    Args:
        student_logits (`torch.Tensor`): shape `(N, V)`.
        topk_ids (`torch.Tensor`): shape `(N, k)`, integer token ids, distinct within a row.
        temperature (`float`): KD temperature T > 0.

    Returns:
        `torch.Tensor`: fp32 (float64 for float64 logits), shape `(N, k + 1)`, or `(N, k)` when k == V.
    """
    vocab_size, k = student_logits.shape[-1], topk_ids.shape[-1]
    if k > vocab_size:
        raise ValueError(f"topk_ids has k={k} columns but the student has only {vocab_size} logits.")
    log_s = torch.log_softmax(_float(student_logits, student_logits) / temperature, dim=-1)  # (N, V)
    ids = topk_ids.long()
    top = log_s.gather(-1, ids)  # (N, k)
    if k == vocab_size:
        return top
    tail = log_s.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (N,): at least one token is left per row
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


def sparse_logit_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = DIVERGENCE_DEFAULTS["temperature"],
    beta: float = DIVERGENCE_DEFAULTS["beta"],
    skew_alpha: float = DIVERGENCE_DEFAULTS["skew_alpha"],
    **hyper: float,
) -> torch.Tensor:
    """Per-position divergence between the student and a cached top-k teacher (formula in the module docstring).

    No T^2 factor (the trainer applies it), as `logit_divergence`.

    Args:
        student_logits (`torch.Tensor`): shape `(N, V)`; V must be the vocabulary the cache was built over.
        topk_ids (`torch.Tensor`): shape `(N, k)`, the teacher's top-k token ids.
        topk_logprobs (`torch.Tensor`): shape `(N, k)`, their teacher log-probabilities at temperature 1.
        tail_logmass (`torch.Tensor`): shape `(N,)`, log of the teacher mass outside the top k.
        loss_type (`str`): a name in `SPARSE_LOSSES` (forward_kl, reverse_kl, jsd, skew_forward_kl, ...).
        temperature (`float`): KD temperature.
        beta (`float`): jsd interpolation, 0 = forward KL, 1 = reverse KL.
        skew_alpha (`float`): skew KL mixing weight.
        **hyper: `taid_t`, `ab_alpha`, `ab_beta`, `akl_mu` for taid, ab_divergence and akl (as `logit_divergence`).

    Returns:
        `torch.Tensor`: fp32, shape `(N,)`.
    """
    if loss_type not in SPARSE_LOSSES:
        raise ValueError(
            f"kd_loss={loss_type!r} has no sparse (top-k + tail) form for a cached teacher; choose one of "
            f"{list(SPARSE_LOSSES)}, or train with the live teacher."
        )
    n = student_logits.shape[0]
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != n or tail_logmass.shape != (n,):
        raise ValueError(
            f"Shapes do not line up: student_logits {tuple(student_logits.shape)}, topk_ids {tuple(topk_ids.shape)}, "
            f"topk_logprobs {tuple(topk_logprobs.shape)}, tail_logmass {tuple(tail_logmass.shape)}; expected (N, V), "
            "(N, k), (N, k), (N,)."
        )
    log_s = student_bucket_log_probs(student_logits, topk_ids, temperature=temperature)
    log_q = teacher_bucket_log_probs(topk_logprobs, tail_logmass, student_logits.shape[-1], temperature=temperature)
    log_q = log_q.to(log_s.dtype)
    # The bucket distributions are normalised, so the dense divergences at T = 1 act on them unchanged.
    return LOGIT_LOSSES[loss_type](log_s, log_q, temperature=1.0, beta=beta, skew_alpha=skew_alpha, **hyper)


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = DIVERGENCE_DEFAULTS["temperature"],
    beta: float = DIVERGENCE_DEFAULTS["beta"],
    skew_alpha: float = DIVERGENCE_DEFAULTS["skew_alpha"],
    **hyper: float,
) -> torch.Tensor:
    """Mean of `sparse_logit_divergence` over the N positions (0 when N == 0). Shapes as there; returns a scalar."""
    per_position = sparse_logit_divergence(
        student_logits,
        topk_ids,
        topk_logprobs,
        tail_logmass,
        loss_type=loss_type,
        temperature=temperature,
        beta=beta,
        skew_alpha=skew_alpha,
        **hyper,
    )
    return per_position.sum() / max(per_position.numel(), 1)
