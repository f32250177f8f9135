"""The sparse (top-k + tail bucket) divergence of `losses.sparse` computed in token chunks from the student's final
hidden states and lm_head weight, never holding the student's full `[N, V]` logits: the teacher-cache and
served-teacher counterpart of `losses.fused`.

Per chunk of rows the student's logits are projected into one block, the chunk's sparse divergence and hard-label CE
are taken on it, and their gradient with respect to the block (autograd on the block alone) is folded into the
student's hidden-state, weight and bias gradients at once (`fused._Grads`), so memory stays a few `(chunk, V)` blocks
plus the gradient accumulators. Values and gradients equal `sparse_logit_divergence` and `cross_entropy` on the full
logits (tested).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused import IGNORE_INDEX, _Grads, _project_
from .logits import DIVERGENCE_DEFAULTS
from .sparse import SPARSE_LOSSES, sparse_logit_divergence


_BLOCK_ELEMENTS = 1 << 22  # fp32 logits per chunk (16 MiB): a few such blocks are alive at once


@dataclass(frozen=True)
class _SparseOptions:
    hyper: tuple[tuple[str, float | None], ...]  # loss_type, temperature, beta, ... (sparse_logit_divergence's)
    chunk_size: int
    width: int  # student logits compared with the entries (the real vocabulary of a padded head)
    logit_scale: float
    softcap: float | None
    loss_weights: tuple[float, float]  # (kd, ce): the caller back-propagates c * (kd_w * kd + ce_w * ce)
    need_grad: tuple[bool, bool, bool]  # hidden, weight, bias


class _FusedSparseDistillation(torch.autograd.Function):
    """Chunked sparse divergence + CE whose gradients are computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, tail, labels, opts: _SparseOptions, stats):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_grad = any(opts.need_grad)
        grads = _Grads(hidden, weight, bias, opts.need_grad, dtype) if need_grad else None
        kd_sum = torch.zeros((), dtype=dtype, device=hidden.device)
        ce_sum = torch.zeros((), dtype=dtype, device=hidden.device)
        block = torch.empty(min(opts.chunk_size, max(n, 1)), vocab, dtype=dtype, device=hidden.device)
        hyper = dict(opts.hyper)
        kd_w, ce_w = opts.loss_weights
        for start in range(0, n, opts.chunk_size):
            rows = slice(start, min(start + opts.chunk_size, n))
            z = block[: rows.stop - rows.start]
            dcap = _project_(z, hidden[rows], weight, bias, opts.logit_scale, opts.softcap, need_grad)
            with torch.enable_grad():
                leaf = z.detach().requires_grad_(need_grad)
                s = leaf[:, : opts.width] if opts.width != vocab else leaf
                kd = sparse_logit_divergence(s, ids[rows], logprobs[rows], tail[rows], **hyper).sum()
                ce = F.cross_entropy(leaf, labels[rows], ignore_index=IGNORE_INDEX, reduction="sum")
                if need_grad:
                    (g,) = torch.autograd.grad(kd_w * kd + ce_w * ce, leaf)
            kd_sum += kd.detach()
            ce_sum += ce.detach()
            if stats is not None:
                agree = (s.detach().argmax(-1) == ids[rows, 0]).sum()
                stats["top1_agreement"] = stats.get("top1_agreement", 0) + agree
            if need_grad:
                g.mul_(opts.logit_scale)
                grads.fold(g if dcap is None else g.mul_(dcap), rows, hidden[rows], weight)
            del dcap
        del block
        ctx.save_for_backward(*(grads.as_tuple() if grads is not None else (None, None, None)))
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.loss_weights = opts.loss_weights
        return kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        kd_w, ce_w = ctx.loss_weights
        g_kd = torch.zeros(()) if grad_kd is None else grad_kd.detach().cpu()
        g_ce = torch.zeros(()) if grad_ce is None else grad_ce.detach().cpu()
        if not torch.allclose(g_kd.double() * ce_w, g_ce.double() * kd_w, rtol=1e-5, atol=1e-12):
            raise RuntimeError(
                f"The chunked sparse loss was built with loss_weights={ctx.loss_weights} but back-propagated with "
                f"gradients ({float(g_kd)}, {float(g_ce)}) not in that ratio; use kd_w * kd + ce_w * ce."
            )
        scale = g_kd / kd_w if kd_w != 0 else g_ce / ce_w
        out = []
        for part, dtype in zip(ctx.saved_tensors, ctx.input_dtypes):
            out.append(None if part is None else (part * scale.to(part.device)).to(dtype))
        return (*out, None, None, None, None, None, None)


def fused_sparse_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = DIVERGENCE_DEFAULTS["temperature"],
    loss_weights: tuple[float, float] = (1.0, 1.0),
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    stats: dict | None = None,
    **hyper: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse teacher divergence and hard-label CE, summed over N rows, chunk by chunk from hidden states.

    Same values and gradients as `sparse_logit_divergence(logits[:, :vocab_size], ids, logprobs, tail).sum()` and
    `cross_entropy(logits, labels, reduction="sum")` with `logits = softcap(((hidden @ weight.T + bias) *
    logit_scale))`, without the `(N, V)` logits.

    Args:
        student_hidden (`torch.Tensor`): `(N, H)` final hidden states of the supervised rows.
        student_weight (`torch.Tensor`): `(V, H)` the student's lm_head weight.
        topk_ids (`torch.Tensor`): `(N, k)` the teacher's top-k ids (most likely first); topk_logprobs `(N, k)` their
            log-probs at temperature 1; tail_logmass `(N,)` the log of the mass outside them.
        labels (`torch.Tensor`): `(N,)` hard-label targets (-100 ignored).
        loss_type (`str`): a name of `SPARSE_LOSSES`; temperature and `**hyper` (beta, skew_alpha, taid_t, ...) as
            `sparse_logit_divergence`.
        loss_weights (`tuple[float, float]`): `(kd_w, ce_w)`: the caller back-propagates `c * (kd_w * kd + ce_w *
            ce)` (any scalar c), so both gradients share one buffer; backward raises otherwise.
        chunk_size (`int`, *optional*): rows per chunk (default: 16 MiB fp32 blocks).
        student_bias (`torch.Tensor`, *optional*): `(V,)`; logit_scale, softcap as the model's head.
        vocab_size (`int`, *optional*): the vocabulary the entries cover (the first columns of a padded head).
        stats (`dict`, *optional*): filled with `top1_agreement` (rows whose student argmax is the teacher's top id).

    Returns:
        `(kd, ce)`: fp32 scalars summed over the N rows.
    """
    if loss_type not in SPARSE_LOSSES:
        raise ValueError(f"kd_loss={loss_type!r} has no sparse form; choose one of {list(SPARSE_LOSSES)}.")
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    width = vocab if vocab_size is None else vocab_size
    rows = chunk_size or max(1, _BLOCK_ELEMENTS // vocab)
    need_grad = (student_hidden.requires_grad, student_weight.requires_grad,
                 student_bias is not None and student_bias.requires_grad)  # fmt: skip
    options = _SparseOptions(
        hyper=(("loss_type", loss_type), ("temperature", temperature), *sorted(hyper.items())),
        chunk_size=rows,
        width=width,
        logit_scale=logit_scale,
        softcap=softcap,
        loss_weights=tuple(float(w) for w in loss_weights),
        need_grad=need_grad,
    )
    if n == 0:
        zero = student_hidden.sum() * 0.0 + student_weight.sum() * 0.0
        return zero, zero.clone()
    return _FusedSparseDistillation.apply(student_hidden, student_weight, student_bias, topk_ids, topk_logprobs,
                                          tail_logmass, labels, options, stats)  # fmt: skip
