"""Cross-tokenizer distillation losses: teacher and student distributions over different vocabularies.

- `uld`: Universal Logit Distillation (Boizard et al. 2024). Per aligned position, both probability vectors are
  sorted in descending order, the shorter one is zero-padded to the longer vocabulary, and the L1 distance between the
  sorted vectors is taken (the Wasserstein-1 distance of the two distributions under a cost that ignores which token
  carries which mass).
- `gold`: the hybrid loss of TRL's GOLD trainer, as TRL 1.16 defines it (`uld_use_hybrid_loss` with its adaptive
  weights). The token strings both vocabularies share (`shared_token_ids`) carry the `kd_loss` divergence (forward KL,
  reverse KL or the generalized JSD with `beta`) between the two sides' probabilities of those tokens, taken as they
  are (not renormalised); the tokens left over on each side get ULD; the two parts are weighted `M / V_t` and
  `1 - M / V_t` (M shared tokens, V_t the teacher's vocabulary). Tested against TRL's own function.
- `alm`: Approximate Likelihood Matching (Minixhofer et al. 2025). On each chunk whose boundaries both tokenizations
  share (an aligned group), the likelihood of the chunk's actual text under each model (the product of its tokens'
  probabilities) is matched with a binarised divergence: the binary KL between Bernoulli(p_t) and Bernoulli(p_s),
  with `p = likelihood ** (1 / tau)`. It needs no vocabulary correspondence at all (`alm` takes `(G,)` chunk
  log-likelihoods, not probability rows).

`uld` and `gold` take probability rows (`(G, V_s)` student, `(G, V_t)` teacher), which may be unnormalised (merged over
aligned spans, see `hf_distill.alignment`), and return one value per row, `(G,)`.

Top-k truncation (`top_k`): the sorted vectors are kept to their `k` largest entries and the rest of each row's mass
is one tail bucket, compared as `|tail_s - tail_t|`. That is a lower bound of the exact ULD; the error is at most
`2 * min(tail_s, tail_t)` per row (both tails are sums of entries smaller than the k-th largest), so it vanishes when
either side puts (almost) all its mass in its top k. `top_k=None` is exact.

The teacher side at a vocabulary of 262144 is reduced chunk by chunk from hidden states (`teacher_row_stats`), so at
most `[chunk_size, V_t]` teacher probabilities exist at once.
"""

import torch
import torch.nn.functional as F


__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "GOLD_BETAS",
    "alm",
    "gold",
    "gold_from_parts",
    "gold_matched",
    "sorted_head",
    "teacher_row_stats",
    "uld",
    "uld_from_sorted",
]


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for the references and gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def sorted_head(probs: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` largest entries of each row in descending order, and the row's remaining mass.

    Args:
        probs (`torch.Tensor`): `(G, V)` non-negative rows (need not sum to 1).
        top_k (`int`, *optional*): entries kept; None or `>= V` keeps all (then the tail is 0).

    Returns:
        `(top, tail)`: `(G, min(top_k, V))` sorted descending, and `(G,)` = `probs.sum(-1) - top.sum(-1)` (>= 0).
    """
    if top_k is None or top_k >= probs.shape[-1]:
        top = probs.sort(dim=-1, descending=True).values
        return top, probs.new_zeros(probs.shape[:-1])
    top = probs.topk(top_k, dim=-1).values
    return top, (probs.sum(-1) - top.sum(-1)).clamp(min=0)


def uld_from_sorted(
    student_top: torch.Tensor, student_tail: torch.Tensor, teacher_top: torch.Tensor, teacher_tail: torch.Tensor
) -> torch.Tensor:
    """ULD between two sorted (possibly truncated) rows: L1 over the zero-padded sorted heads plus `|tail_s - tail_t|`.

    Args:
        student_top (`torch.Tensor`): `(G, K_s)` sorted descending. student_tail (`torch.Tensor`): `(G,)`.
        teacher_top (`torch.Tensor`): `(G, K_t)` sorted descending. teacher_tail (`torch.Tensor`): `(G,)`.

    Returns:
        `torch.Tensor`: `(G,)`.
    """
    width = max(student_top.shape[-1], teacher_top.shape[-1])
    s = F.pad(student_top, (0, width - student_top.shape[-1]))
    t = F.pad(teacher_top, (0, width - teacher_top.shape[-1]))
    return (s - t).abs().sum(-1) + (student_tail - teacher_tail).abs()


def uld(student_probs: torch.Tensor, teacher_probs: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): L1 between the descending-sorted probability vectors.

    Args:
        student_probs (`torch.Tensor`): `(G, V_s)` student probabilities of the aligned positions.
        teacher_probs (`torch.Tensor`): `(G, V_t)` teacher probabilities (no gradient needed).
        top_k (`int`, *optional*): truncate both sorted vectors to `top_k` entries plus a tail bucket (module
            docstring: error <= `2 * min(tail_s, tail_t)`); None is exact.

    Returns:
        `torch.Tensor`: `(G,)` per-row distance, in `[0, 2]` for normalised rows.
    """
    if student_probs.shape[0] != teacher_probs.shape[0]:
        raise ValueError(f"uld needs one teacher row per student row, got {student_probs.shape[0]} and "
                         f"{teacher_probs.shape[0]}.")  # fmt: skip
    return uld_from_sorted(*sorted_head(_fp32(student_probs), top_k), *sorted_head(_fp32(teacher_probs), top_k))


GOLD_BETAS = {"forward_kl": 0.0, "reverse_kl": 1.0}  # kd_loss -> beta of the generalized JSD (jsd: its own beta)
GOLD_PROB_FLOOR = 1e-8  # TRL's GOLD takes logs of probabilities clamped to this floor


def gold_matched(student_shared: torch.Tensor, teacher_shared: torch.Tensor, beta: float) -> torch.Tensor:
    """The matched part of TRL's GOLD: the generalized JSD (GKD convention, `beta` 0 = forward KL, 1 = reverse KL) on
    the shared tokens' probabilities as they are, not renormalised; logs of probabilities floored at 1e-8.

    Element-wise as TRL 1.16's `GOLDTrainer.generalized_jsd_loss(..., logits_are_probs=True)`: with `ls, lt` the
    floored logs and `m = log((1 - beta) e^ls + beta e^lt)`, `beta * e^lt (lt - m) + (1 - beta) * e^ls (ls - m)`
    (`beta = 0`: `e^lt (lt - ls)`; `beta = 1`: `e^ls (ls - lt)`), summed over the M tokens.

    Args:
        student_shared (`torch.Tensor`): `(G, M)` student probabilities of the M shared tokens (column m of both
            tensors is the same token string).
        teacher_shared (`torch.Tensor`): `(G, M)` teacher probabilities of the same tokens.
        beta (`float`): in [0, 1].

    Returns:
        `torch.Tensor`: `(G,)`.
    """
    log_s = _fp32(student_shared).clamp(min=GOLD_PROB_FLOOR).log()
    log_t = _fp32(teacher_shared).to(log_s.dtype).clamp(min=GOLD_PROB_FLOOR).log()
    if beta == 0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    beta_t = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-beta_t), log_t + torch.log(beta_t)]), dim=0)
    return (beta * log_t.exp() * (log_t - log_m) + (1 - beta) * log_s.exp() * (log_s - log_m)).sum(-1)


def gold_from_parts(
    student_shared: torch.Tensor,
    teacher_shared: torch.Tensor,
    student_rest: tuple[torch.Tensor, torch.Tensor],
    teacher_rest: tuple[torch.Tensor, torch.Tensor],
    matched_weight: float,
    beta: float,
) -> torch.Tensor:
    """TRL's GOLD hybrid from its parts: `w * gold_matched + (1 - w) * ULD(unshared entries)`.

    Args:
        student_shared, teacher_shared (`torch.Tensor`): `(G, M)` probabilities of the shared tokens.
        student_rest, teacher_rest (`tuple`): `(top (G, K), tail (G,))` of each side's unshared entries sorted in
            descending order (`sorted_head`).
        matched_weight (`float`): `w`, TRL's adaptive weight: shared tokens / the teacher's vocabulary size.
        beta (`float`): the matched part's generalized-JSD interpolation (`GOLD_BETAS`).

    Returns:
        `torch.Tensor`: `(G,)`.
    """
    matched = gold_matched(student_shared, teacher_shared, beta)
    return matched_weight * matched + (1.0 - matched_weight) * uld_from_sorted(*student_rest, *teacher_rest)


def gold(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_shared_ids: torch.Tensor,
    teacher_shared_ids: torch.Tensor,
    top_k: int | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """GOLD's hybrid loss as TRL 1.16 defines it (`uld_use_hybrid_loss`, adaptive weights): the generalized JSD on the
    shared tokens' unnormalised probabilities (`gold_matched`), ULD on the tokens each side does not share, weighted
    `M / V_t` and `1 - M / V_t` (M shared tokens, V_t the teacher's vocabulary).

    Args:
        student_probs (`torch.Tensor`): `(G, V_s)`. teacher_probs (`torch.Tensor`): `(G, V_t)`.
        student_shared_ids (`torch.Tensor`): `(M,)` int64 student ids of the shared token strings.
        teacher_shared_ids (`torch.Tensor`): `(M,)` int64 teacher ids of the same strings, in the same order.
        top_k (`int`, *optional*): truncation of the ULD part (see `uld`); None is exact, as TRL.
        beta (`float`): 0 = forward KL (`kd_loss: forward_kl`), 1 = reverse KL, else JSD (`GOLD_BETAS`).

    Returns:
        `torch.Tensor`: `(G,)`.
    """
    if student_shared_ids.shape != teacher_shared_ids.shape:
        raise ValueError("student_shared_ids and teacher_shared_ids must pair the same token strings (same length).")
    s, t = _fp32(student_probs), _fp32(teacher_probs)
    s_rest = torch.ones(s.shape[-1], dtype=torch.bool, device=s.device).index_fill(0, student_shared_ids, False)
    t_rest = torch.ones(t.shape[-1], dtype=torch.bool, device=t.device).index_fill(0, teacher_shared_ids, False)
    weight = student_shared_ids.numel() / t.shape[-1]
    return gold_from_parts(s[:, student_shared_ids], t[:, teacher_shared_ids], sorted_head(s[:, s_rest], top_k),
                           sorted_head(t[:, t_rest], top_k), weight, beta)  # fmt: skip


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for `x < 0`, stable on both sides of `log(1/2)`."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def alm(
    student_loglik: torch.Tensor, teacher_loglik: torch.Tensor, tau: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """Approximate Likelihood Matching (Minixhofer et al. 2025): binary KL between the chunk likelihoods.

    For each chunk, `p_t = exp(teacher_loglik / tau)` and `p_s = exp(student_loglik / tau)` are read as the
    probabilities of two Bernoulli variables ("this chunk's text comes next"), and the loss is
    `p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s))` (0 when the likelihoods agree; its gradient is that of
    the binary cross-entropy the paper's code minimises). Log-likelihoods are clamped to `<= -eps` so `1 - p > 0`.

    Args:
        student_loglik (`torch.Tensor`): `(G,)` the student's log-likelihood of each chunk (sum of its tokens'
            log-probabilities).
        teacher_loglik (`torch.Tensor`): `(G,)` the teacher's (no gradient needed).
        tau (`float`): binarisation temperature (> 0).
        eps (`float`): margin below log-likelihood 0.

    Returns:
        `torch.Tensor`: `(G,)` per-chunk divergence, >= 0.
    """
    if student_loglik.shape != teacher_loglik.shape:
        raise ValueError(f"alm needs one teacher chunk per student chunk, got {tuple(student_loglik.shape)} and "
                         f"{tuple(teacher_loglik.shape)}.")  # fmt: skip
    if tau <= 0:
        raise ValueError(f"`tau` must be > 0, got {tau}.")
    s = (_fp32(student_loglik) / tau).clamp(max=-eps)
    t = (_fp32(teacher_loglik).to(s.dtype) / tau).clamp(max=-eps)
    log1m_s, log1m_t = _log1mexp(s), _log1mexp(t)
    return t.exp() * (t - s) + (-torch.expm1(t)) * (log1m_t - log1m_s)


CROSS_TOKENIZER_LOSSES = {"uld": uld, "gold": gold, "alm": alm}


@torch.no_grad()
def teacher_row_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    target_ids: torch.Tensor,
    base_rows: torch.Tensor,
    *,
    top_k: int | None = None,
    shared_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 64,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """What the cross-tokenizer losses need of the teacher's rows, reduced chunk by chunk from hidden states.

    Logits are `softcap((hidden @ weight.T + bias) * logit_scale) / temperature`; never more than `[chunk_size, V]`
    of them exist at once. With `vocab_size` below the head's rows (an embedding padded beyond the tokenizer), only
    the first `vocab_size` logits are computed: the padded rows are no token and hold no probability.

    Args:
        hidden (`torch.Tensor`): `(R, H)` teacher final hidden states of the rows needed.
        weight (`torch.Tensor`, *optional*): `(V_rows, H)` the teacher's lm_head weight; None when `hidden` already
            holds the logits `(R, V_rows)`.
        target_ids (`torch.Tensor`): `(R,)` the token each row predicts (its log-prob is returned).
        base_rows (`torch.Tensor`): `(G,)` indices into the R rows whose full distribution is needed.
        top_k (`int`, *optional*): sorted entries kept for ULD (None: all V).
        shared_ids (`torch.Tensor`, *optional*): `(M,)` teacher ids of the shared tokens (gold): then the shared
            probabilities and the sorted head of the other entries are returned.
        temperature, bias, logit_scale, softcap: as the teacher's head and the KD temperature.
        chunk_size (`int`): rows per chunk.
        vocab_size (`int`, *optional*): V, the tokenizer's tokens (`<=` the head's rows `V_rows`); None: all rows.

    Returns:
        `dict`: `target_logprobs (R,)`; for the G base rows `argmax (G,)` (the top token id), `top (G, K)` and
        `tail (G,)` of the (unshared) entries, and with `shared_ids` also `shared (G, M)`.
    """
    device = hidden.device
    rows = hidden.shape[-1] if weight is None else weight.shape[0]
    vocab = rows if vocab_size is None else vocab_size
    if not 1 <= vocab <= rows:
        raise ValueError(f"`vocab_size` {vocab} must be between 1 and the teacher head's {rows} rows.")
    if vocab < rows:  # the padded rows are left out: V columns only
        hidden = hidden if weight is not None else hidden[:, :vocab]
        weight = weight[:vocab] if weight is not None else None
        bias = bias[:vocab] if bias is not None else None
    is_base = torch.zeros(hidden.shape[0], dtype=torch.long, device=device)
    is_base[base_rows] = torch.arange(1, base_rows.numel() + 1, device=device)
    rest = None
    if shared_ids is not None:
        rest = torch.ones(vocab, dtype=torch.bool, device=device).index_fill(0, shared_ids, False)
    target_logprobs, tops, tails, shared, order, argmax = [], [], [], [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size].float()
        logits = h if weight is None else h @ weight.float().T
        if bias is not None:
            logits = logits + bias.float()
        logits = logits * logit_scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logprobs = (logits / temperature).log_softmax(-1)  # (chunk, V)
        target_logprobs.append(logprobs.gather(-1, target_ids[start : start + chunk_size, None]).squeeze(-1))
        base = is_base[start : start + chunk_size]
        if (base > 0).any():
            probs = logprobs[base > 0].exp()
            order.append(base[base > 0] - 1)
            argmax.append(probs.argmax(-1))
            if shared_ids is not None:
                shared.append(probs[:, shared_ids])
                probs = probs[:, rest]
            top, tail = sorted_head(probs, top_k)
            tops.append(top)
            tails.append(tail)
    out = {"target_logprobs": torch.cat(target_logprobs)}
    k = min(top_k or vocab, int(rest.sum()) if rest is not None else vocab)
    if not order:
        out["top"], out["tail"] = hidden.new_zeros(0, k), hidden.new_zeros(0)
        out["argmax"] = torch.zeros(0, dtype=torch.long, device=device)
        if shared_ids is not None:
            out["shared"] = hidden.new_zeros(0, shared_ids.numel())
        return out
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.numel(), device=device)
    out["top"], out["tail"] = torch.cat(tops)[inverse], torch.cat(tails)[inverse]
    out["argmax"] = torch.cat(argmax)[inverse]
    if shared_ids is not None:
        out["shared"] = torch.cat(shared)[inverse]
    return out
