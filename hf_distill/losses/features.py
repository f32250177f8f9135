"""Hidden-state hint losses (FitNets, Romero et al. 2015; DistilBERT / TinyBERT / BERT-PKD hidden-state losses).

A hint pairs the hidden states of one student layer with those of one teacher layer. The student states are first
projected to the teacher width (`features.projectors.HintProjectors`), optionally both sides are layer-normalised
(`hint_normalize`), then one of `HINT_LOSSES` compares them per position:

- `mse`       = mean_H (s - t)^2
- `l1`        = mean_H |s - t|
- `smooth_l1` = mean_H smooth_l1(s - t; beta=1)   (Huber with delta 1)
- `cosine`    = 1 - cos(s, t)

Each function returns the SUM over the positions where `mask` is True (fp32); `hint_count` gives the number of those
positions, so the trainer normalises hints like its other token-summed terms. Positions outside the mask are dropped
before any arithmetic: their values (padding, NaN, anything) never reach the loss or its gradient.

Layer indices follow `output_hidden_states=True` in transformers: `hidden_states[0]` is the embedding output and
`hidden_states[k]` the output of decoder layer `k` (1-based), so a model with L layers has indices `0..L`. In
transformers 5 the last entry (`k = L`) already has the model's final norm applied (it is what `lm_head` reads).
"""

import json
from collections.abc import Mapping

import torch
import torch.nn.functional as F


HINT_NORMALIZATIONS = ("none", "layernorm")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy for the math (float64 stays float64, for gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _masked_pair(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the masked positions of both sides: `(B, T, H)` -> `(N, H)`, after shape checks."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"Student hidden states {tuple(student.shape)} and teacher hidden states {tuple(teacher.shape)} differ in "
            "shape; project the student to the teacher width first (hint_projector: linear) and use the same inputs."
        )
    if mask is None:
        return _fp32(student).reshape(-1, student.shape[-1]), _fp32(teacher).reshape(-1, teacher.shape[-1])
    mask = mask.to(student.device, torch.bool)
    if mask.shape != student.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the hidden states' leading shape {tuple(student.shape[:-1])}."
        )
    return _fp32(student[mask]), _fp32(teacher[mask])


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over H, summed over the masked positions.

    Args:
        student (`torch.Tensor`): projected student hidden states, shape `(B, T, H)` (H = teacher width).
        teacher (`torch.Tensor`): teacher hidden states, shape `(B, T, H)`.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`; None counts every position.

    Returns:
        `torch.Tensor`: fp32 scalar, `sum_{mask} mean_H (s - t)^2`.
    """
    s, t = _masked_pair(student, teacher, mask)
    return (s - t).pow(2).mean(-1).sum()


def l1(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over H, summed over the masked positions. Shapes as `mse`."""
    s, t = _masked_pair(student, teacher, mask)
    return (s - t).abs().mean(-1).sum()


def smooth_l1(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth L1 (Huber, delta = beta = 1) averaged over H, summed over the masked positions. Shapes as `mse`."""
    s, t = _masked_pair(student, teacher, mask)
    return F.smooth_l1_loss(s, t, reduction="none", beta=1.0).mean(-1).sum()


def cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`1 - cos(s, t)` per position, summed over the masked positions. Shapes as `mse`; zero vectors count as
    orthogonal (cosine 0, eps 1e-8 as `F.cosine_similarity`)."""
    s, t = _masked_pair(student, teacher, mask)
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum()


HINT_LOSSES = {"mse": mse, "l1": l1, "smooth_l1": smooth_l1, "cosine": cosine}


def hint_normalize(hidden: torch.Tensor, how: str = "none") -> torch.Tensor:
    """Optional normalisation applied to both sides before a hint loss.

    Args:
        hidden (`torch.Tensor`): shape `(..., H)`.
        how (`str`): `"none"` (returned unchanged) or `"layernorm"` (parameter-free `F.layer_norm` over H, eps 1e-5,
            computed in fp32), which removes the scale differences between teacher and student layers.

    Returns:
        `torch.Tensor`: shape `(..., H)`.
    """
    if how == "none":
        return hidden
    if how == "layernorm":
        x = _fp32(hidden)
        return F.layer_norm(x, x.shape[-1:])
    raise ValueError(f"Unknown hint_normalize {how!r}; choose one of {list(HINT_NORMALIZATIONS)}.")


def hint_count(mask: torch.Tensor | None, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Number of positions a hint loss sums over.

    Args:
        mask (`torch.Tensor` or `None`): bool, shape `(B, T)`.
        hidden (`torch.Tensor`, *optional*): shape `(B, T, H)`; needed when `mask` is None (every position counts).

    Returns:
        `torch.Tensor`: int64 scalar.
    """
    if mask is not None:
        return mask.to(torch.bool).sum()
    if hidden is None:
        raise ValueError("hint_count needs `mask` or `hidden` (to count every position when mask is None).")
    return torch.tensor(hidden[..., 0].numel(), device=hidden.device)


def hint_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss_type: str = "mse",
    normalize: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hint pair: normalise both sides, compare them, return the masked sum and its count.

    Args:
        student (`torch.Tensor`): projected student hidden states, shape `(B, T, H)`.
        teacher (`torch.Tensor`): teacher hidden states, shape `(B, T, H)`.
        mask (`torch.Tensor`, *optional*): bool, shape `(B, T)`.
        loss_type (`str`): a key of `HINT_LOSSES` (mse | l1 | smooth_l1 | cosine).
        normalize (`str`): none | layernorm (see `hint_normalize`).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(fp32 sum over masked positions, int64 count of those positions)`.
    """
    if loss_type not in HINT_LOSSES:
        raise ValueError(f"Unknown hint_loss {loss_type!r}; choose one of {sorted(HINT_LOSSES)}.")
    value = HINT_LOSSES[loss_type](hint_normalize(student, normalize), hint_normalize(teacher, normalize), mask)
    return value, hint_count(mask, student)


# ----------------------------------------------------------------------------------------------- layer maps
def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> dict[int, int]:
    """Evenly spaced layer map, student layer `i` -> teacher layer `ceil(i * L_t / L_s)`, for `i = 1..L_s`.

    Indices are `hidden_states` indices (0 = embeddings, k = output of layer k), so the last student layer maps to the
    last teacher layer and, when `L_t` is a multiple of `L_s`, student layer `i` reads teacher layer `i * L_t / L_s`
    (DistilBERT / TinyBERT's `g(m) = m * N / M`). The embeddings (index 0) are not mapped; add `0: 0` to an explicit
    map to include them.

    Args:
        num_student_layers (`int`): L_s >= 1.
        num_teacher_layers (`int`): L_t >= 1.

    Returns:
        `dict[int, int]`: `{student index: teacher index}` with L_s entries, ascending.

    Example:
        >>> uniform_layer_map(4, 30)
        {1: 8, 2: 15, 3: 23, 4: 30}
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"Layer counts must be >= 1, got student {num_student_layers} and teacher {num_teacher_layers}."
        )
    return {i: -(-i * num_teacher_layers // num_student_layers) for i in range(1, num_student_layers + 1)}


def _as_index(value: object, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{what} {value!r} is not a layer index (an integer).")


def parse_layer_map(
    value: str | Mapping[int | str, int | str], num_student_layers: int, num_teacher_layers: int
) -> dict[int, int]:
    """Resolve the `hint_layers` config value into `{student hidden_states index: teacher hidden_states index}`.

    Args:
        value (`str` or `Mapping`): `"uniform"` (see `uniform_layer_map`), a dict such as `{2: 6, 4: 12}` (keys and
            values may be strings, as YAML/JSON produce them), or the JSON string of such a dict (`'{"2": 6}'`).
        num_student_layers (`int`): the student's `num_hidden_layers`; valid student indices are `0..L_s`.
        num_teacher_layers (`int`): the teacher's `num_hidden_layers`; valid teacher indices are `0..L_t`.

    Returns:
        `dict[int, int]`: sorted by student index. Several student layers may read the same teacher layer.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "uniform":
            return uniform_layer_map(num_student_layers, num_teacher_layers)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"hint_layers {value!r} is neither 'uniform' nor a JSON object like '{{\"2\": 6, \"4\": 12}}' ({err})."
            ) from None
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"hint_layers must be 'uniform' or a non-empty dict {{student layer: teacher layer}}, got {value!r}."
        )
    layer_map = {}
    for key, target in value.items():
        s, t = _as_index(key, "Student layer"), _as_index(target, "Teacher layer")
        if not (0 <= s <= num_student_layers and 0 <= t <= num_teacher_layers):
            raise ValueError(
                f"hint_layers entry {key!r}: {target!r} is out of range: student layers are 0..{num_student_layers} "
                f"and teacher layers 0..{num_teacher_layers} (hidden_states indices: 0 = embeddings, k = output of "
                "layer k)."
            )
        if s in layer_map:
            raise ValueError(f"hint_layers maps student layer {s} twice.")
        layer_map[s] = t
    return dict(sorted(layer_map.items()))
