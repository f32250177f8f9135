"""Logit distillation from hidden states and lm_head weights, without materialising `[N, V]` logits.

`fused_logit_distillation_loss` returns the same value and the same gradients as
`logit_distillation_loss(lm_head_s(h_s), lm_head_t(h_t), ...)` for every divergence in `LOGIT_LOSSES`. The selected
token rows are processed in chunks of `chunk_size` rows: per chunk both models' logits are projected, the per-row
divergence and its gradient with respect to the student's logits are computed analytically, and that gradient is folded
into the gradients of the student's hidden states, lm_head weight and bias right away. Only one chunk's `[rows, V]`
blocks are alive at a time; the backward pass then only scales the stored gradients.

Speed: the `[rows, V]` blocks are allocated once per call and reused by every chunk, every element-wise step writes
into one of them (in-place log-softmax, `out=` products), and at temperature 1 the hard-label CE shares the student's
log-softmax and softmax with the divergence. On CPU this makes the loss cost about its four matmuls (benchmarks/).

Gradients of the divergences with respect to the student's tempered logits `s = z / T` (`p = softmax`), row by row:

- forward_kl:       p_s - p_t
- reverse_kl:       p_s * (log p_s - log p_t - KL(p_s || p_t))
- jsd (0 < b < 1):  (1 - b) * p_s * (log p_s - log m - KL(p_s || m)),   m = b * p_t + (1 - b) * p_s
- skew_forward_kl:  p_s * sum(w) - w,   w = (1 - a) * p_s * p_t / m,     m = a * p_t + (1 - a) * p_s
- skew_reverse_kl:  p_s * (log p_s - log m - L - a * (p_s / m - sum(p_s^2 / m))),   m = a * p_s + (1 - a) * p_t
- tvd:              p_s * (g - sum(p_s * g)),   g = 0.5 * sign(p_s - p_t)
- taid:             p_s - p_tgt,   p_tgt = softmax((1 - t) * log p_s + t * log p_t)   (the target carries no gradient)
- ab_divergence, akl: autograd through the dense formula (`hf_distill.losses.logits`) on the chunk's block alone, so
                    value and gradient are the dense ones by construction; this costs a few more `(rows, V)` blocks
                    per chunk (still never the full `[N, V]` logits)

Liger's `LigerFusedLinearJSD` is deliberately not dispatched to, even when installed: it allocates a `(BT, V)` fp32
loss buffer (so the full-vocabulary block exists after all), has no bias, logit scale, softcap or position mask, and
normalises by its own label count.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .logits import DIVERGENCE_DEFAULTS, LOGIT_LOSSES


IGNORE_INDEX = -100
# Automatic chunking keeps one `[rows, V]` block under 2**24 elements (64 MiB in fp32). A call allocates three to five
# such blocks once (two for the logits, one or two scratch, one more for CE at temperature != 1) and every chunk reuses
# them. Larger blocks cost memory for little speed (benchmarks/kd_loss_memory.py).
_AUTO_BLOCK_ELEMENTS = 1 << 24


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """`x = log_softmax(x, -1)` in place for a `(c, V)` block: one fused kernel on CPU, no new block."""
    if x.device.type == "cpu":
        return torch._log_softmax(x, -1, False, out=x)
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _dot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Row-wise `(a * b).sum(-1)` of `(c, V)` blocks, shape `(c,)`; the product goes to `out` (may be `a` or `b`)."""
    return torch.mul(a, b, out=out).sum(-1)


# Each divergence takes the student's and the teacher's tempered log-probabilities `ls`, `lt` (`(c, V)` blocks, both
# overwritten) and `_SCRATCH[name]` scratch blocks of the same shape. It returns the per-row divergence `(c,)` and, if
# `need_grad`, its gradient with respect to the student's tempered logits and `p_s = exp(ls)`, in two distinct blocks
# (else None, None). No other `(c, V)` tensor is allocated.
def _forward_kl(ls, lt, scratch, need_grad, **_):
    p_t = torch.exp(lt, out=scratch[0])
    loss = _dot(lt.sub_(ls), p_t, out=lt)  # sum p_t * (log p_t - log p_s)
    if not need_grad:
        return loss, None, None
    p_s = ls.exp_()
    return loss, torch.sub(p_s, p_t, out=lt), p_s


def _reverse_kl(ls, lt, scratch, need_grad, **_):
    gap = torch.sub(ls, lt, out=lt)  # log p_s - log p_t
    p_s = ls.exp_()
    loss = _dot(p_s, gap, out=scratch[0])
    if not need_grad:
        return loss, None, None
    return loss, gap.sub_(loss.unsqueeze(1)).mul_(p_s), p_s


def _jsd(ls, lt, scratch, need_grad, beta, **_):
    if beta == 0:
        return _forward_kl(ls, lt, scratch, need_grad)
    if beta == 1:
        return _reverse_kl(ls, lt, scratch, need_grad)
    log_m, beta_pt = torch.add(ls, math.log1p(-beta), out=scratch[0]), torch.add(lt, math.log(beta), out=scratch[1])
    torch.logaddexp(log_m, beta_pt, out=log_m)  # log(b * p_t + (1 - b) * p_s)
    kl_t = _dot(lt.sub_(log_m), beta_pt.exp_(), out=lt)  # b * KL(p_t || m)
    p_s = torch.exp(ls, out=scratch[1])
    gap = ls.sub_(log_m)  # log p_s - log m
    kl_s = _dot(p_s, gap, out=scratch[0])  # KL(p_s || m)
    loss = kl_t + (1 - beta) * kl_s
    if not need_grad:
        return loss, None, None
    return loss, gap.sub_(kl_s.unsqueeze(1)).mul_(p_s).mul_(1 - beta), p_s


def _skew_forward_kl(ls, lt, scratch, need_grad, skew_alpha, **_):
    if skew_alpha == 0:
        return _forward_kl(ls, lt, scratch, need_grad)
    log_m = torch.add(lt, math.log(skew_alpha), out=scratch[0])
    torch.logaddexp(log_m, torch.add(ls, math.log1p(-skew_alpha), out=scratch[1]), out=log_m)  # log(a p_t + (1-a) p_s)
    p_t = torch.exp(lt, out=scratch[1])
    gap = lt.sub_(log_m)  # log p_t - log m
    loss = _dot(p_t, gap, out=scratch[0])
    if not need_grad:
        return loss, None, None
    w = gap.add_(ls).add_(math.log1p(-skew_alpha)).exp_()  # (1 - a) * p_s * p_t / m
    p_s = ls.exp_()
    return loss, torch.mul(p_s, w.sum(-1, keepdim=True), out=scratch[0]).sub_(w), p_s


def _skew_reverse_kl(ls, lt, scratch, need_grad, skew_alpha, **_):
    if skew_alpha == 0:
        return _reverse_kl(ls, lt, scratch, need_grad)
    log_m = torch.add(ls, math.log(skew_alpha), out=scratch[0])
    torch.logaddexp(log_m, lt.add_(math.log1p(-skew_alpha)), out=log_m)  # log(a * p_s + (1 - a) * p_t)
    gap = torch.sub(ls, log_m, out=lt)  # log p_s - log m
    p_s = ls.exp_()
    loss = _dot(p_s, gap, out=scratch[1])
    if not need_grad:
        return loss, None, None
    ratio = torch.exp(gap, out=scratch[0])  # p_s / m
    ratio.sub_(_dot(p_s, ratio, out=scratch[1]).unsqueeze(1)).mul_(-skew_alpha)
    return loss, ratio.add_(gap).sub_(loss.unsqueeze(1)).mul_(p_s), p_s


def _tvd(ls, lt, scratch, need_grad, **_):
    p_s = ls.exp_()
    diff = torch.sub(p_s, lt.exp_(), out=lt)  # p_s - p_t
    loss = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
    if not need_grad:
        return loss, None, None
    g = diff.sign_().mul_(0.5)
    return loss, g.sub_(_dot(p_s, g, out=scratch[0]).unsqueeze(1)).mul_(p_s), p_s


def _taid(ls, lt, scratch, need_grad, taid_t=None, **_):
    if taid_t is None or not 0.0 <= taid_t <= 1.0:
        raise ValueError(f"loss_type='taid' needs taid_t in [0, 1], got {taid_t!r}.")
    if taid_t != 1.0:  # target log-probs: log_softmax((1 - t) * ls + t * lt), written into lt
        _log_softmax_(lt.mul_(taid_t).add_(ls, alpha=1.0 - taid_t))
    return _forward_kl(ls, lt, scratch, need_grad)


def _by_autograd(name: str) -> Callable:
    """A fused divergence from the dense one: value and gradient by autograd on one `(c, V)` chunk."""
    dense = LOGIT_LOSSES[name]

    def divergence(ls, lt, scratch, need_grad, **hyper):
        if not need_grad:
            with torch.no_grad():
                return dense(ls, lt, temperature=1.0, **hyper), None, None
        # log_softmax of log-probabilities is the identity, and the gradient with respect to them equals the gradient
        # with respect to the tempered logits (both depend on the input only through its softmax).
        leaf = ls.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = dense(leaf, lt, temperature=1.0, **hyper)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad, torch.exp(ls, out=scratch[0])

    return divergence


# Divergences whose chunk gradient comes from autograd (new blocks per chunk) rather than a closed form.
BY_AUTOGRAD = ("ab_divergence", "akl")
_DIVERGENCES: dict[str, Callable] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
    "taid": _taid,
    "ab_divergence": _by_autograd("ab_divergence"),
    "akl": _by_autograd("akl"),
}
_SCRATCH = {
    "forward_kl": 1,
    "reverse_kl": 1,
    "jsd": 2,
    "skew_forward_kl": 2,
    "skew_reverse_kl": 2,
    "tvd": 1,
    "taid": 1,
    "ab_divergence": 1,
    "akl": 1,
}
assert set(_DIVERGENCES) == set(LOGIT_LOSSES) == set(_SCRATCH), "every loss in LOGIT_LOSSES needs a fused gradient"


@dataclass(frozen=True)
class _Options:
    loss_type: str
    temperature: float
    beta: float
    skew_alpha: float
    chunk_size: int
    reduction: str
    student_logit_scale: float
    teacher_logit_scale: float
    student_softcap: float | None
    teacher_softcap: float | None
    need_grad: tuple[bool, bool, bool]  # student hidden, weight, bias
    loss_weights: tuple[float, float] | None = None  # (kd, ce): one gradient buffer for kd_w * kd + ce_w * ce
    extra_hyper: tuple[tuple[str, float | None], ...] = ()  # taid_t, ab_alpha, ab_beta, akl_mu


def _project_(out, hidden, weight, bias, scale, softcap, keep_softcap_grad):
    """Logits of one chunk written into the `(c, V)` block `out`: (h @ W.T + b) * scale, then
    softcap * tanh(. / softcap). Returns `1 - tanh^2` (the softcap's derivative, a new block) when
    `keep_softcap_grad` and a softcap is set, else None."""
    if hidden.dtype == out.dtype and weight.dtype == out.dtype:
        torch.mm(hidden, weight.T, out=out)
    else:  # e.g. bf16 inputs: fp32 math from the bf16 product, as a bf16 model's upcast logits
        out.copy_(hidden @ weight.T)
    if bias is not None:
        out.add_(bias)
    if scale != 1.0:
        out.mul_(scale)
    if softcap is None:
        return None
    out.div_(softcap).tanh_()
    dcap = torch.square(out).neg_().add_(1.0) if keep_softcap_grad else None
    out.mul_(softcap)
    return dcap


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into a wider accumulator without rounding the product to the inputs' dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Grads:
    """Gradient accumulators for the student's hidden states `(N, H)`, lm_head weight `(V, H)` and bias `(V,)`."""

    def __init__(self, hidden, weight, bias, need_grad, dtype):
        need_h, need_w, need_b = need_grad
        self.hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None

    def fold(self, grad_logits, rows, hidden, weight):
        """Adds one chunk: `grad_logits` `(c, V)` is dLoss/d(h @ W.T + b) for the token rows `rows`."""
        g = grad_logits.to(weight.dtype)
        if self.hidden is not None:
            if g.dtype == self.hidden.dtype:
                torch.mm(g, weight, out=self.hidden[rows])
            else:
                self.hidden[rows] = g @ weight
        if self.weight is not None:
            _addmm_(self.weight, g.T, hidden)
        if self.bias is not None:
            self.bias += grad_logits.sum(0)

    def as_tuple(self):
        return self.hidden, self.weight, self.bias


def _dummy_grads():
    return None, None, None


class _FusedLogitDistillation(torch.autograd.Function):
    """Chunked divergence (and optional hard-label CE) whose gradients are computed during the forward pass."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts: _Options, stats=None):
        ctx.set_materialize_grads(False)
        n, vocab = s_hidden.shape[0], s_weight.shape[0]
        dtype = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        need_grad = any(opts.need_grad)
        divergence = _DIVERGENCES[opts.loss_type]
        hyper = {"beta": opts.beta, "skew_alpha": opts.skew_alpha, **dict(opts.extra_hyper)}
        temperature = opts.temperature
        own_ce_block = labels is not None and temperature != 1.0  # else CE shares the student's log-softmax

        kd_denom = max(n, 1) if opts.reduction == "mean" else 1
        kd_grads = _Grads(s_hidden, s_weight, s_bias, opts.need_grad, dtype) if need_grad else None
        kd_sum = torch.zeros((), dtype=dtype, device=s_hidden.device)
        ce_grads = ce_sum = None
        combined = False
        if labels is not None:
            valid = labels != IGNORE_INDEX
            ce_denom = max(int(valid.sum()), 1) if opts.reduction == "mean" else 1
            combined = opts.loss_weights is not None
            ce_grads = (
                _Grads(s_hidden, s_weight, s_bias, opts.need_grad, dtype) if need_grad and not combined else None
            )
            ce_sum = torch.zeros((), dtype=dtype, device=s_hidden.device)
            ce_scale = opts.student_logit_scale / ce_denom * (opts.loss_weights[1] if combined else 1.0)
        rows_per_chunk = min(opts.chunk_size, max(n, 1))
        num_blocks = 2 + _SCRATCH[opts.loss_type] + own_ce_block
        blocks = [torch.empty(rows_per_chunk, vocab, dtype=dtype, device=s_hidden.device) for _ in range(num_blocks)]
        # d(loss)/d(h @ W.T + b) = scale * dcap * d(loss)/d(logits); tempered logits add 1 / T for the divergence
        kd_scale = opts.student_logit_scale / (temperature * kd_denom)
        if combined:
            kd_scale *= opts.loss_weights[0]

        for start in range(0, n, opts.chunk_size):
            rows = slice(start, min(start + opts.chunk_size, n))
            c = rows.stop - rows.start
            ls, lt, *scratch = (b[:c] for b in blocks)
            ce_block = scratch.pop() if own_ce_block else None
            h_s = s_hidden[rows]
            dcap = _project_(ls, h_s, s_weight, s_bias, opts.student_logit_scale, opts.student_softcap, need_grad)
            with torch.no_grad():
                _project_(lt, t_hidden[rows], t_weight, t_bias, opts.teacher_logit_scale, opts.teacher_softcap, False)
            if stats is not None:  # argmax is unchanged by temperature and log-softmax; ties count as agreement
                t_top = lt.max(-1).indices.unsqueeze(1)
                agree = (ls.gather(1, t_top).squeeze(1) >= ls.amax(-1)).sum()
                stats["top1_agreement"] = stats.get("top1_agreement", 0) + agree

            if labels is not None:
                target = labels[rows].clamp(min=0).unsqueeze(1)
                row_valid = valid[rows]
                if own_ce_block:
                    ce_logp = _log_softmax_(ce_block.copy_(ls))
                else:
                    ce_logp = _log_softmax_(ls)  # temperature 1: also the divergence's student log-probs
                ce_sum -= torch.where(row_valid, ce_logp.gather(1, target).squeeze(1), 0.0).sum()
            if labels is None or own_ce_block:
                _log_softmax_(ls.div_(temperature) if temperature != 1.0 else ls)
            _log_softmax_(lt.div_(temperature) if temperature != 1.0 else lt)

            loss_rows, g, p_s = divergence(ls, lt, scratch, need_grad, **hyper)
            kd_sum += loss_rows.sum()
            if g is None:
                continue
            g.mul_(kd_scale)
            if labels is not None:  # CE gradient: softmax(z) - onehot(target) on rows with a label
                p_ce = ce_logp.exp_() if own_ce_block else p_s
                ce_row = row_valid.to(dtype).mul_(ce_scale).unsqueeze(1)
                if combined:
                    g.addcmul_(p_ce, ce_row).scatter_add_(1, target, ce_row.neg())
                else:
                    g_ce = p_ce.mul_(ce_row).scatter_add_(1, target, ce_row.neg())
                    ce_grads.fold(g_ce if dcap is None else g_ce.mul_(dcap), rows, h_s, s_weight)
            kd_grads.fold(g if dcap is None else g.mul_(dcap), rows, h_s, s_weight)
            del dcap
        del blocks

        # Saved (not kept on ctx) so that autograd frees them right after backward unless the graph is retained.
        ctx.save_for_backward(
            *(kd_grads.as_tuple() if kd_grads is not None else _dummy_grads()),
            *(ce_grads.as_tuple() if ce_grads is not None else _dummy_grads()),
        )
        ctx.input_dtypes = (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        ctx.loss_weights = opts.loss_weights if labels is not None else None
        kd = kd_sum / kd_denom
        ce = (ce_sum / ce_denom) if labels is not None else torch.zeros_like(kd)
        return kd, ce

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        saved = ctx.saved_tensors
        if ctx.loss_weights is not None:  # the buffer holds d(kd_w * kd + ce_w * ce); upstream must be proportional
            kd_w, ce_w = ctx.loss_weights
            g_kd = torch.zeros(()) if grad_kd is None else grad_kd.detach().cpu()
            g_ce = torch.zeros(()) if grad_ce is None else grad_ce.detach().cpu()
            scale = g_kd / kd_w if kd_w != 0 else g_ce / ce_w
            if not torch.allclose(g_kd.double() * ce_w, g_ce.double() * kd_w, rtol=1e-5, atol=1e-12):
                raise RuntimeError(
                    f"fused loss built with loss_weights={ctx.loss_weights} was back-propagated with gradients "
                    f"({float(g_kd)}, {float(g_ce)}) not in that ratio; use kd_w * kd + ce_w * ce (times any scalar)."
                )
            grad_kd, grad_ce = scale.to(saved[0].device if saved[0] is not None else "cpu"), None
        out = []
        for kd_part, ce_part, dtype in zip(saved[:3], saved[3:], ctx.input_dtypes):
            total = None
            if kd_part is not None and grad_kd is not None:
                total = kd_part * grad_kd  # out of place: a retained graph can run backward again
            if ce_part is not None and grad_ce is not None:
                total = ce_part * grad_ce if total is None else total.addcmul_(ce_part, grad_ce)
            out.append(None if total is None else total.to(dtype))
        return (*out, None, None, None, None, None, None)


def _leading(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape[:-1])


def _auto_chunk_size(n: int, vocab: int) -> int:
    """Rows per chunk: at most `_AUTO_BLOCK_ELEMENTS // vocab`, split evenly over the `n` rows."""
    max_rows = max(1, _AUTO_BLOCK_ELEMENTS // vocab)
    num_chunks = max(1, -(-n // max_rows))
    return max(1, -(-n // num_chunks))


def fused_logit_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = DIVERGENCE_DEFAULTS["temperature"],
    beta: float = DIVERGENCE_DEFAULTS["beta"],
    skew_alpha: float = DIVERGENCE_DEFAULTS["skew_alpha"],
    taid_t: float | None = None,
    ab_alpha: float = DIVERGENCE_DEFAULTS["ab_alpha"],
    ab_beta: float = DIVERGENCE_DEFAULTS["ab_beta"],
    akl_mu: float = DIVERGENCE_DEFAULTS["akl_mu"],
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    stats: dict | None = None,
    loss_weights: tuple[float, float] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Teacher-logit divergence (and optionally hard-label CE) computed in token chunks from hidden states.

    Same value and gradients as `logit_distillation_loss(student_logits, teacher_logits, ...)` with
    `logits = softcap * tanh(((hidden @ weight.T + bias) * logit_scale) / softcap)` (the transformers order), without
    ever holding either model's full `[N, V]` logits: at most `chunk_size` selected token rows are projected at a time,
    and each chunk's gradient is folded into the student's gradients before the next chunk. The teacher gets no
    gradient. Math is fp32 (fp64 for fp64 inputs).

    Args:
        student_hidden (`torch.Tensor`): final hidden states, shape `(N, H_s)` or `(B, T, H_s)`.
        student_weight (`torch.Tensor`): student lm_head weight, shape `(V_s, H_s)`.
        teacher_hidden (`torch.Tensor`): shape `(N, H_t)` or `(B, T, H_t)`, same leading shape as the student's.
        teacher_weight (`torch.Tensor`): teacher lm_head weight, shape `(V_t, H_t)`.
        loss_type (`str`): a key of `LOGIT_LOSSES`: forward_kl | reverse_kl | jsd | skew_forward_kl |
            skew_reverse_kl | tvd | taid | ab_divergence | akl.
        temperature (`float`): softmax temperature of the divergence (no T^2 factor; the trainer applies it).
        beta (`float`): jsd interpolation (TRL's GKD convention), 0 = forward KL, 1 = reverse KL.
        skew_alpha (`float`): skew KL mixing weight.
        taid_t, ab_alpha, ab_beta, akl_mu (`float`): hyper-parameters of taid, ab_divergence and akl (as
            `logit_divergence`).
        mask (`torch.Tensor`, *optional*): bool, shape `(N,)` or `(B, T)`; only these positions are computed.
        chunk_size (`int`, *optional*): token rows per chunk; None picks at most `2**24 // V` rows
            (64 MiB fp32 blocks), split evenly.
        student_bias (`torch.Tensor`, *optional*): shape `(V_s,)`; teacher_bias likewise `(V_t,)`.
        student_logit_scale (`float`): multiplies the student's logits (e.g. Cohere's `logit_scale`);
            teacher_logit_scale likewise.
        student_softcap (`float`, *optional*): final-logit softcapping (e.g. Gemma 2); teacher_softcap likewise.
        vocab_size (`int`, *optional*): keep only the first `vocab_size` rows of both heads (the shared real
            vocabulary when an embedding matrix is padded). Required when `V_s != V_t`.
        labels (`torch.Tensor`, *optional*): int, shape `(N,)` or `(B, T)`, -100 ignored. When given, also returns the
            hard-label cross-entropy of the student's logits (temperature 1) over the selected positions.
        reduction (`str`): "mean" over the selected positions (CE: over those with a label) or "sum".
        loss_weights (`tuple[float, float]`, *optional*): `(kd_w, ce_w)` with `labels`: the caller promises to
            back-propagate `c * (kd_w * kd + ce_w * ce)` (any scalar c), so both gradients share one buffer and one
            pair of matmuls per chunk (about a third less work). Backward raises if the upstream gradients are not in
            that ratio.
        stats (`dict`, *optional*): when given, `stats["top1_agreement"]` is set to the number of selected positions
            where the teacher's argmax token is also a top token of the student (a by-product of the chunks; no extra
            matmul).

    Returns:
        `torch.Tensor` or `tuple[torch.Tensor, torch.Tensor]`: the divergence, a scalar (0 when nothing is selected),
        or `(divergence, ce)` when `labels` is given.
    """
    if loss_type not in LOGIT_LOSSES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {sorted(LOGIT_LOSSES)}.")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive number of token rows (or None for automatic), got {chunk_size}."
        )
    for name, hidden, weight in (
        ("student", student_hidden, student_weight),
        ("teacher", teacher_hidden, teacher_weight),
    ):
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{name}_hidden {tuple(hidden.shape)} does not match {name}_weight {tuple(weight.shape)}: pass the "
                "final hidden states (..., H) and the lm_head weight (V, H)."
            )
    if _leading(student_hidden) != _leading(teacher_hidden):
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must "
            "cover the same positions (same leading shape)."
        )
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"Student lm_head has {v_s} rows and teacher lm_head {v_t}. If both use the same tokenizer and the "
                "extra rows are embedding padding, pass vocab_size=len(tokenizer); different tokenizers are not "
                "supported."
            )
        vocab_size = v_s
    elif not 0 < vocab_size <= min(v_s, v_t):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min(v_s, v_t)}] (student {v_s}, teacher {v_t}).")
    student_weight, teacher_weight = student_weight[:vocab_size], teacher_weight[:vocab_size]
    student_bias = None if student_bias is None else student_bias[:vocab_size]
    teacher_bias = None if teacher_bias is None else teacher_bias[:vocab_size]

    lead = _leading(student_hidden)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if labels is not None:
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal the hidden states' leading shape {lead}.")
        labels = labels.reshape(-1).to(s_hidden.device, torch.long)
    if mask is not None:
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape {lead}.")
        index = mask.reshape(-1).to(s_hidden.device, torch.bool).nonzero().squeeze(1)
        s_hidden, t_hidden = s_hidden.index_select(0, index), t_hidden.index_select(0, index)
        labels = None if labels is None else labels.index_select(0, index)

    grad_on = torch.is_grad_enabled()
    opts = _Options(
        loss_type=loss_type,
        temperature=float(temperature),
        beta=float(beta),
        skew_alpha=float(skew_alpha),
        chunk_size=chunk_size or _auto_chunk_size(s_hidden.shape[0], vocab_size),
        reduction=reduction,
        student_logit_scale=float(student_logit_scale),
        teacher_logit_scale=float(teacher_logit_scale),
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
        need_grad=tuple(
            grad_on and t is not None and t.requires_grad for t in (s_hidden, student_weight, student_bias)
        ),
        loss_weights=None if loss_weights is None or labels is None else tuple(float(w) for w in loss_weights),
        extra_hyper=(
            ("taid_t", None if taid_t is None else float(taid_t)),
            ("ab_alpha", float(ab_alpha)),
            ("ab_beta", float(ab_beta)),
            ("akl_mu", float(akl_mu)),
        ),
    )
    kd, ce = _FusedLogitDistillation.apply(
        s_hidden,
        student_weight,
        student_bias,
        t_hidden,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        labels,
        opts,
        stats,
    )
    return (kd, ce) if labels is not None else kd
