"""Attention-map transfer on attention probabilities (TinyBERT, Jiao et al. 2020; MiniLM, Wang et al. 2020).

Inputs are the post-softmax maps transformers returns with `output_attentions=True` (needs
`attn_implementation="eager"`; sdpa / flash kernels do not return them), shape `(B, heads, T, T)` with rows = queries
and columns = keys. `attentions[k - 1]` belongs to layer `k`, so a hint layer map `{i: j}` (hidden_states indices,
`i, j >= 1`) pairs `student.attentions[i - 1]` with `teacher.attentions[j - 1]`.

Masking: `mask` (B, T) bool selects the query rows that count and `key_mask` (B, T) the key columns (it defaults to
`mask`; pass the attention mask here when `mask` selects only supervised positions, so prompt tokens stay valid keys).
Rows outside `mask` are dropped and columns outside `key_mask` are zeroed, then each row is renormalised over its valid
keys on both sides. Padded entries therefore never reach the loss; when the model already masks padded keys (they hold
~0 mass) the renormalisation changes nothing.

Per valid query row, averaged over heads:

- `kl`  = KL(teacher_row || student_row) = sum_k a_t log(a_t / a_s)   (MiniLM's self-attention distribution transfer)
- `mse` = sum_k (a_s - a_t)^2                                           (TinyBERT's attention MSE, on probabilities)

Head mapping: equal head counts pair head by head; when the teacher has `g` times the student's heads, each student
head is compared with the mean of `g` consecutive teacher heads (the mean of distributions is a distribution); any
other pair of counts raises.
"""

import torch

from .features import _fp32


def _prepare(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, key_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks, head grouping, key masking and renormalisation, then selection of the valid query rows.

    Returns:
        `(s, t)`: fp32, shape `(N, heads_s, T)` where N is the number of valid (example, query) rows.
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"Attention maps must be (B, heads, T, T); got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}. Load both models with attn_implementation='eager' and output_attentions=True."
        )
    b, h_s, t_q, t_k = student.shape
    h_t = teacher.shape[1]
    if teacher.shape[0] != b or teacher.shape[2:] != student.shape[2:] or t_q != t_k:
        raise ValueError(
            f"Student attention {tuple(student.shape)} and teacher attention {tuple(teacher.shape)} must share batch "
            "and sequence sizes (B, *, T, T); feed both models the same inputs."
        )
    if h_t % h_s:
        raise ValueError(
            f"Cannot map teacher attention heads onto student heads: the teacher has {h_t} heads and the student "
            f"{h_s}; the teacher's count must be a multiple of the student's. Use a student config with compatible "
            "head counts, or turn attention transfer off (attention_weight: 0)."
        )
    s, t = _fp32(student), _fp32(teacher)
    if h_t != h_s:
        t = t.reshape(b, h_s, h_t // h_s, t_q, t_k).mean(2)
    mask = _check_mask(mask, b, t_q, s.device, "mask")
    key_mask = mask if key_mask is None else _check_mask(key_mask, b, t_q, s.device, "key_mask")
    if key_mask is not None:
        keys = key_mask[:, None, None, :]
        s = torch.where(keys, s, 0.0)
        t = torch.where(keys, t, 0.0)
        s = s / s.sum(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
        t = t / t.sum(-1, keepdim=True).clamp(min=torch.finfo(t.dtype).tiny)
    # (B, heads, T, T) -> (B, T, heads, T) -> valid query rows (N, heads, T)
    s, t = s.transpose(1, 2), t.transpose(1, 2)
    if mask is None:
        return s.reshape(-1, h_s, t_k), t.reshape(-1, h_s, t_k)
    return s[mask], t[mask]


def _check_mask(mask: torch.Tensor | None, b: int, t: int, device: torch.device, name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.to(device, torch.bool)
    if mask.shape != (b, t):
        raise ValueError(f"{name} shape {tuple(mask.shape)} must be (B, T) = {(b, t)}.")
    return mask


def kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher row || student row), averaged over heads, summed over valid query rows.

    Args:
        student (`torch.Tensor`): student attention probabilities, shape `(B, heads_s, T, T)`.
        teacher (`torch.Tensor`): teacher attention probabilities, shape `(B, heads_t, T, T)`, heads_t = g * heads_s.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`, the query rows that count; None counts every row.
        key_mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`, the valid keys; defaults to `mask` (None with
            `mask` None: every key).

    Returns:
        `torch.Tensor`: fp32 scalar; keys with zero teacher mass contribute 0 (`0 log 0 = 0`).
    """
    s, t = _prepare(student, teacher, mask, key_mask)
    positive = t > 0
    log_t = torch.where(positive, t, 1.0).log()  # double `where`: finite gradients where t == 0
    log_s = s.clamp(min=torch.finfo(s.dtype).tiny).log()
    per_key = torch.where(positive, t * (log_t - log_s), 0.0)
    return per_key.sum(-1).mean(-1).sum()


def mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared L2 distance between rows, averaged over heads, summed over valid query rows. Shapes as `kl`."""
    s, t = _prepare(student, teacher, mask, key_mask)
    return (s - t).pow(2).sum(-1).mean(-1).sum()


ATTENTION_LOSSES = {"kl": kl, "mse": mse}


def attention_count(mask: torch.Tensor | None, attention: torch.Tensor | None = None) -> torch.Tensor:
    """Number of query rows an attention loss sums over.

    Args:
        mask (`torch.Tensor` or `None`): bool, shape `(B, T)`.
        attention (`torch.Tensor`, *optional*): shape `(B, heads, T, T)`; needed when `mask` is None.

    Returns:
        `torch.Tensor`: int64 scalar.
    """
    if mask is not None:
        return mask.to(torch.bool).sum()
    if attention is None:
        raise ValueError("attention_count needs `mask` or `attention` (to count every row when mask is None).")
    return torch.tensor(attention.shape[0] * attention.shape[2], device=attention.device)


def attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    key_mask: torch.Tensor | None = None,
    loss_type: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention layer pair by name.

    Args:
        student (`torch.Tensor`): shape `(B, heads_s, T, T)`.
        teacher (`torch.Tensor`): shape `(B, heads_t, T, T)`.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`, the query rows that count.
        key_mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`, the valid keys (default: `mask`).
        loss_type (`str`): a key of `ATTENTION_LOSSES` (kl | mse).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(fp32 sum over valid query rows, int64 count of those rows)`.
    """
    if loss_type not in ATTENTION_LOSSES:
        raise ValueError(f"Unknown attention_loss {loss_type!r}; choose one of {sorted(ATTENTION_LOSSES)}.")
    return ATTENTION_LOSSES[loss_type](student, teacher, mask, key_mask), attention_count(mask, student)
