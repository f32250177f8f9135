"""Relation-based distillation: match how examples (or tokens, or layers) relate, not the features themselves.

Two input kinds (`RELATION_INPUTS` says which a loss takes):

- `"pooled"`: one vector per example, `(B, H_s)` vs `(B, H_t)` (widths may differ), built with `pool`. Needs `B >= 2`
  (`rkd_angle`: `B >= 3`) because the relations are between examples of the batch.
  `similarity_preserving` (Tung & Mori, ICCV 2019), `rkd_distance` and `rkd_angle` (Park et al., CVPR 2019).
- `"tokens"`: token features of one layer, `(B, T, H_s)` vs `(B, T, H_t)` (widths may differ), with a `(B, T)` mask.
  `gram`: token-token cosine Gram matrices (relation of tokens within each example).
- `"layer_pairs"`: token features of two layers per model. `fsp` (Yim et al., CVPR 2017): the flow between layers.
  Student and teacher FSP matrices are `H_s x H_s` vs `H_t x H_t`, so they need equal widths: pass projected student
  hidden states (`HintProjectors`) when the widths differ.

`relation_loss` applies one of them to the hidden states of the mapped layer pairs. Every value is fp32 (float64 stays
float64) and a mean, not a sum: the trainer weights it per batch.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .features import _fp32


POOLINGS = ("mean", "first", "last")
_BATCH_MESSAGE = "relation losses need batch size >= 2; increase per_device_train_batch_size"


def pool(hidden: torch.Tensor, mask: torch.Tensor | None = None, how: str = "mean") -> torch.Tensor:
    """One vector per example from token features.

    Args:
        hidden (`torch.Tensor`): shape `(B, T, H)`.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`, True on real tokens; None = all tokens.
        how (`str`): `"mean"` over the masked tokens, `"first"` / `"last"` masked token of each row (works for left
            and right padding; `"last"` is the usual choice for causal LMs, `"first"` for a [CLS] token).

    Returns:
        `torch.Tensor`: shape `(B, H)`, in the dtype of `hidden`.
    """
    if how not in POOLINGS:
        raise ValueError(f"Unknown relation_pooling {how!r}; choose one of {list(POOLINGS)}.")
    b, t, _ = hidden.shape
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
    mask = mask.to(hidden.device, torch.bool)
    if mask.shape != (b, t):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, T) = {(b, t)}.")
    if not mask.any(-1).all():
        raise ValueError("Every example needs at least one masked (True) token to pool.")
    if how == "mean":
        weights = mask.to(hidden.dtype)
        summed = torch.where(mask[..., None], hidden, 0.0).sum(1)
        return summed / weights.sum(1, keepdim=True)
    positions = torch.arange(t, device=hidden.device).expand(b, t)
    if how == "first":
        index = torch.where(mask, positions, t).min(1).values
    else:
        index = torch.where(mask, positions, -1).max(1).values
    return hidden[torch.arange(b, device=hidden.device), index]


def _check_pooled(student: torch.Tensor, teacher: torch.Tensor, min_batch: int = 2) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"Pooled relation losses take (B, H) features; got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}. Pool token features first (`pool`)."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"Student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ.")
    if student.shape[0] < 2:
        raise ValueError(f"{_BATCH_MESSAGE} (got batch size {student.shape[0]}).")
    if student.shape[0] < min_batch:
        raise ValueError(
            f"rkd_angle needs batch size >= {min_batch} (angles between three distinct examples); increase "
            f"per_device_train_batch_size (got batch size {student.shape[0]})."
        )


def _safe_norm(x: torch.Tensor, dim: int = -1, keepdim: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """L2 norm with a finite gradient at zero (sqrt of a clamped sum of squares)."""
    return x.pow(2).sum(dim, keepdim=keepdim).clamp(min=eps**2).sqrt()


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019). Recipe: `relation_loss: similarity_preserving`.

    `G = F F^T` (B x B), each row L2-normalised; loss = `||G_s - G_t||_F^2 / B^2`.

    Args:
        student (`torch.Tensor`): pooled student features, shape `(B, H_s)`, `B >= 2`.
        teacher (`torch.Tensor`): pooled teacher features, shape `(B, H_t)`.

    Returns:
        `torch.Tensor`: fp32 scalar.
    """
    _check_pooled(student, teacher)
    s, t = _fp32(student), _fp32(teacher)
    g_s, g_t = s @ s.T, t @ t.T
    g_s = g_s / _safe_norm(g_s, dim=1, keepdim=True)
    g_t = g_t / _safe_norm(g_t, dim=1, keepdim=True)
    return (g_s - g_t).pow(2).sum() / s.shape[0] ** 2


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the pairs `i < j` of rows of `x` (B, H): shape `(B (B - 1) / 2,)`."""
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return _safe_norm(x[i] - x[j])


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance term of Relational KD (Park et al., CVPR 2019). Recipe: `relation_loss: rkd_distance`.

    `psi(i, j) = ||f_i - f_j||_2 / mu`, `mu` = mean distance over the pairs `i != j` of the same model; loss = mean
    over the pairs `i != j` of `smooth_l1(psi_s - psi_t)` (Huber, delta 1).

    Args:
        student (`torch.Tensor`): pooled student features, shape `(B, H_s)`, `B >= 2`.
        teacher (`torch.Tensor`): pooled teacher features, shape `(B, H_t)`.

    Returns:
        `torch.Tensor`: fp32 scalar.
    """
    _check_pooled(student, teacher)
    d_s, d_t = _pairwise_distances(_fp32(student)), _pairwise_distances(_fp32(teacher))
    d_s = d_s / d_s.mean().clamp(min=1e-12)
    d_t = d_t / d_t.mean().clamp(min=1e-12)
    return F.smooth_l1_loss(d_s, d_t, beta=1.0)


def _angles(x: torch.Tensor) -> torch.Tensor:
    """`cos` of the angle at vertex `j` between `f_i` and `f_k`, for all ordered distinct `(i, j, k)`: `(M,)`."""
    b = x.shape[0]
    diff = x[None, :, :] - x[:, None, :]  # diff[j, i] = f_i - f_j, (B, B, H)
    unit = diff / _safe_norm(diff, keepdim=True)
    cos = torch.einsum("jih,jkh->jik", unit, unit)  # (B, B, B)
    eye = torch.eye(b, dtype=torch.bool, device=x.device)
    distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])  # j != i, j != k, i != k
    return cos[distinct]


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Angle term of Relational KD (Park et al., CVPR 2019). Recipe: `relation_loss: rkd_angle`.

    `psi(i, j, k) = cos angle(f_i, f_j, f_k) = <e_ji, e_jk>`, `e_ji = (f_i - f_j) / ||f_i - f_j||`; loss = mean over
    the ordered triplets of distinct examples of `smooth_l1(psi_s - psi_t)` (Huber, delta 1).

    Args:
        student (`torch.Tensor`): pooled student features, shape `(B, H_s)`, `B >= 3`.
        teacher (`torch.Tensor`): pooled teacher features, shape `(B, H_t)`.

    Returns:
        `torch.Tensor`: fp32 scalar.
    """
    _check_pooled(student, teacher, min_batch=3)
    return F.smooth_l1_loss(_angles(_fp32(student)), _angles(_fp32(teacher)), beta=1.0)


def _check_tokens(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Shape checks for token features; returns the `(B, T)` bool mask (all True when None)."""
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"Token relation losses take (B, T, H) features with equal B and T; got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}."
        )
    if mask is None:
        return torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
    mask = mask.to(student.device, torch.bool)
    if mask.shape != student.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, T) = {tuple(student.shape[:2])}.")
    return mask


def _token_gram(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine Gram matrix of the tokens of each example, padded tokens zeroed first: `(B, T, H)` -> `(B, T, T)`."""
    x = torch.where(mask[..., None], _fp32(x), 0.0)
    x = x / _safe_norm(x, keepdim=True)
    return x @ x.transpose(1, 2)


def gram(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token Gram-matrix matching (the Gram relation of the survey by Gou et al. 2021; MiniLMv2-style token relations).

    For each example, `G = X_n X_n^T` (T x T) where `X_n` holds its token features L2-normalised per token, so
    `G[i, j] = cos(x_i, x_j)`; loss = mean over examples of the mean over valid token pairs `(i, j)` (both masked) of
    `(G_s[i, j] - G_t[i, j])^2`. Widths may differ (G is T x T); batch size 1 is fine.

    Args:
        student (`torch.Tensor`): student token features of one layer, shape `(B, T, H_s)`.
        teacher (`torch.Tensor`): teacher token features of the paired layer, shape `(B, T, H_t)`.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`.

    Returns:
        `torch.Tensor`: fp32 scalar.
    """
    mask = _check_tokens(student, teacher, mask)
    pairs = mask[:, :, None] & mask[:, None, :]
    sq = torch.where(pairs, (_token_gram(student, mask) - _token_gram(teacher, mask)).pow(2), 0.0)
    per_example = sq.sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    return per_example.mean()


def _fsp_matrix(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`F1^T F2 / T` per example over its valid tokens: `(B, T, H1)`, `(B, T, H2)` -> `(B, H1, H2)`."""
    f1 = torch.where(mask[..., None], _fp32(first), 0.0)
    f2 = torch.where(mask[..., None], _fp32(second), 0.0)
    n = mask.sum(1).clamp(min=1).to(f1.dtype)
    return f1.transpose(1, 2) @ f2 / n[:, None, None]


def fsp(
    student_first: torch.Tensor,
    student_second: torch.Tensor,
    teacher_first: torch.Tensor,
    teacher_second: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow of Solution Procedure (Yim et al., CVPR 2017). Recipe: `relation_loss: fsp` (>= 2 hint layers).

    The FSP matrix of two layers' token features is `G = F1^T F2 / T` (H1 x H2, T = valid tokens of the example),
    the sequence analogue of Yim's spatial average; loss = mean over examples of the mean over entries of
    `(G_s - G_t)^2`. Student and teacher matrices must have the same shape: project student features to the teacher
    width first when the widths differ.

    Args:
        student_first (`torch.Tensor`): student features of the lower layer, shape `(B, T, H1)`.
        student_second (`torch.Tensor`): student features of the upper layer, shape `(B, T, H2)`.
        teacher_first (`torch.Tensor`): teacher features of the paired lower layer, shape `(B, T, H1)`.
        teacher_second (`torch.Tensor`): teacher features of the paired upper layer, shape `(B, T, H2)`.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`.

    Returns:
        `torch.Tensor`: fp32 scalar.
    """
    mask = _check_tokens(student_first, teacher_first, mask)
    _check_tokens(student_second, teacher_second, mask)
    if student_first.shape[-1] != teacher_first.shape[-1] or student_second.shape[-1] != teacher_second.shape[-1]:
        raise ValueError(
            f"fsp compares FSP matrices of equal shape, but the student widths ({student_first.shape[-1]}, "
            f"{student_second.shape[-1]}) differ from the teacher widths ({teacher_first.shape[-1]}, "
            f"{teacher_second.shape[-1]}); pass projected student hidden states (hint_projector: linear)."
        )
    g_s = _fsp_matrix(student_first, student_second, mask)
    g_t = _fsp_matrix(teacher_first, teacher_second, mask)
    return (g_s - g_t).pow(2).mean((1, 2)).mean()


RELATION_LOSSES = {
    "similarity_preserving": similarity_preserving,
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "gram": gram,
    "fsp": fsp,
}
RELATION_INPUTS = {
    "similarity_preserving": "pooled",
    "rkd_distance": "pooled",
    "rkd_angle": "pooled",
    "gram": "tokens",
    "fsp": "layer_pairs",
}


def relation_loss(
    student_layers: Sequence[torch.Tensor],
    teacher_layers: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    *,
    loss_type: str = "similarity_preserving",
    pooling: str = "mean",
) -> torch.Tensor:
    """A relation loss by name over the mapped layer pairs, averaged over the pairs.

    Args:
        student_layers (`Sequence[torch.Tensor]`): student hidden states of the mapped layers in layer-map order, each
            `(B, T, H_s)` (projected to the teacher width for `fsp` when the widths differ).
        teacher_layers (`Sequence[torch.Tensor]`): the paired teacher hidden states, each `(B, T, H_t)`.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`, True on real tokens.
        loss_type (`str`): a key of `RELATION_LOSSES`.
        pooling (`str`): mean | first | last, for the pooled losses.

    Returns:
        `torch.Tensor`: fp32 scalar. Pooled and token losses: mean over the `P` layer pairs. `fsp`: mean over the
        `P - 1` consecutive pairs `(layers[p], layers[p + 1])` of each model, so it needs `P >= 2`.
    """
    if loss_type not in RELATION_LOSSES:
        raise ValueError(f"Unknown relation_loss {loss_type!r}; choose one of {sorted(RELATION_LOSSES)}.")
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError(
            f"relation_loss needs the same non-zero number of student and teacher layers, got {len(student_layers)} "
            f"and {len(teacher_layers)}."
        )
    fn, kind = RELATION_LOSSES[loss_type], RELATION_INPUTS[loss_type]
    if kind == "layer_pairs":
        if len(student_layers) < 2:
            raise ValueError("relation_loss 'fsp' needs at least two mapped layer pairs; list >= 2 hint_layers.")
        terms = [
            fn(student_layers[p], student_layers[p + 1], teacher_layers[p], teacher_layers[p + 1], mask)
            for p in range(len(student_layers) - 1)
        ]
    elif kind == "tokens":
        terms = [fn(s, t, mask) for s, t in zip(student_layers, teacher_layers)]
    else:
        terms = [fn(pool(s, mask, pooling), pool(t, mask, pooling)) for s, t in zip(student_layers, teacher_layers)]
    return torch.stack(terms).mean()
