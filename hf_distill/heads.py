"""What is distilled for each kind of model head, worked out from the model itself.

| kind                      | logits    | labels | supervised positions                | hard loss | KD term        |
| ------------------------- | --------- | ------ | ----------------------------------- | --------- | -------------- |
| `causal_lm`               | (B, T, V) | (B, T) | logits at t predict label t+1       | CE        | `kd_loss`, T^2 |
| `seq2seq`                 | (B, T, V) | (B, T) | decoder tokens, label t at t        | CE        | `kd_loss`, T^2 |
| `masked_lm`               | (B, T, V) | (B, T) | masked tokens (labels != -100 only) | CE        | `kd_loss`, T^2 |
| `token_classification`    | (B, T, C) | (B, T) | labelled tokens, no shift           | CE        | `kd_loss`, T^2 |
| `sequence_classification` | (B, C)    | (B,)   | one row per example                 | CE        | `kd_loss`, T^2 |
| ... regression head       | (B, C)    | (B,)*  | each label value                    | MSE       | MSE to teacher |

(*) or (B, C) for several regression outputs.
A regression head has `num_labels == 1` (and no `problem_type`) or `problem_type="regression"`.
Positions whose label is -100 (prompts, padding, unmasked tokens, sub-word continuations, dropped examples) never
count, and each supervised position is one "item" of the loss normaliser: the same count transformers' `Trainer` uses
for `num_items_in_batch` (`labels != -100`, over `labels[:, 1:]` for causal LMs only), so gradient accumulation matches
one large batch for every head. Regression heads have no distribution to soften: their KD term is the squared error
between student and teacher outputs, weighted by `kd_weight` alone (`kd_loss` and `temperature` do not apply).
Multi-label classification (`problem_type="multi_label_classification"`, float labels `(B, C)`) is not supported: a
per-class sigmoid divergence is not implemented, and such models raise a ValueError.
"""

import functools
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto import modeling_auto

from .losses import IGNORE_INDEX, fused_logit_distillation_loss, logit_divergence
from .taid import current_taid_t


logger = logging.getLogger(__name__)


# kind -> (Auto class, transformers mapping of that head, class-name suffixes for models outside the mappings).
# Checked in this order: BART's ForConditionalGeneration is listed as a masked LM too, and encoder-decoder
# classifiers (BartForSequenceClassification) must not count as seq2seq.
_KINDS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "sequence_classification": (
        AutoModelForSequenceClassification,
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        ("ForSequenceClassification",),
    ),
    "token_classification": (
        AutoModelForTokenClassification,
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        ("ForTokenClassification",),
    ),
    "seq2seq": (AutoModelForSeq2SeqLM, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", ()),
    "masked_lm": (AutoModelForMaskedLM, "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",)),
    "causal_lm": (AutoModelForCausalLM, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel")),
}
HEAD_KINDS = tuple(_KINDS)
LABEL_KINDS = ("sequence_classification", "token_classification")


@dataclass(frozen=True)
class Head:
    """What a model predicts and how its logits line up with its labels.

    Args:
        kind (`str`): one of `HEAD_KINDS` (see the module docstring).
        regression (`bool`): a sequence-classification head trained with MSE (`num_labels == 1` or
            `problem_type="regression"`).
    """

    kind: str
    regression: bool = False

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"Unknown head kind {self.kind!r}; expected one of {list(HEAD_KINDS)}.")

    @property
    def shifts_labels(self) -> bool:
        """Logits at t predict label t+1 (causal LMs), as transformers' `ForCausalLMLoss`."""
        return self.kind == "causal_lm"

    @property
    def has_vocab(self) -> bool:
        """The last logit dimension is a token vocabulary (so padded embedding matrices are sliced to one size)."""
        return self.kind in ("causal_lm", "seq2seq", "masked_lm")

    @property
    def auto_class(self) -> type:
        """The transformers Auto class that loads a model with this head (used for a teacher given by name)."""
        return _KINDS[self.kind][0]

    def describe(self) -> str:
        return "regression" if self.regression else self.kind


@functools.cache
def _mapped_class_names(mapping_name: str) -> frozenset[str]:
    names = set()
    for value in getattr(modeling_auto, mapping_name, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def detect_head(model: nn.Module) -> Head:
    """Infer what to distil from the (possibly PEFT-, DDP- or accelerate-wrapped) model's class and config.

    The class is looked up in transformers' Auto mappings (sequence classification, token classification, seq2seq
    LM, masked LM, causal LM, in that order), then by its name's suffix; other encoder-decoders count as seq2seq and
    anything else as a causal LM.

    Raises:
        ValueError: the model has no config, or is a multi-label classifier (not supported).
    """
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None:
        raise ValueError(f"Cannot tell what to distil for {type(model).__name__}: it has no `config`.")
    name = type(base).__name__
    kind = next((k for k, (_, mapping, _) in _KINDS.items() if name in _mapped_class_names(mapping)), None)
    if kind is None:
        kind = next((k for k, (_, _, suffixes) in _KINDS.items() if suffixes and name.endswith(suffixes)), None)
    if kind is None:
        kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal_lm"
    problem_type = getattr(config, "problem_type", None)
    if kind == "sequence_classification" and problem_type == "multi_label_classification":
        raise ValueError(
            f"{name} is a multi-label classifier (problem_type='multi_label_classification'); distilling per-class "
            "sigmoid outputs is not supported. Use single-label classification or regression heads."
        )
    regression = kind == "sequence_classification" and (
        problem_type == "regression" or (problem_type is None and getattr(config, "num_labels", 2) == 1)
    )
    return Head(kind, regression)


# ------------------------------------------------------------------------------------------------ positions
def supervised_mask(labels: torch.Tensor, head: Head, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of supervised positions (label != -100).

    Args:
        labels (`torch.Tensor`): `(B, T)` for token heads, `(B,)` (or `(B, C)` regression targets) for sequence heads.
        shift_labels (`torch.Tensor`, *optional*): already-shifted labels `(B, T)` from padding-free collators.

    Returns:
        `torch.Tensor`: `(B, T-1)` for causal LMs (`labels[:, 1:]`), else the shape of `labels`.
    """
    return aligned_labels(labels, head, shift_labels) != IGNORE_INDEX


def aligned_labels(labels: torch.Tensor, head: Head, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with logit positions: `(B, T-1)` for causal LMs (`labels[:, 1:]`), else `labels` unchanged."""
    if shift_labels is not None:
        return shift_labels
    return labels[:, 1:] if head.shifts_labels else labels


def aligned_logits(logits: torch.Tensor, head: Head, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits aligned with `aligned_labels`: `(B, T-1, V)` for causal LMs (last position dropped); `(B,)` for a
    single-output regression head (`(B, 1)` squeezed); else unchanged."""
    if head.shifts_labels and shift_labels is None:
        return logits[:, :-1]
    if head.regression and logits.shape[-1] == 1:
        return logits.squeeze(-1)
    return logits


def _check_labels(labels: torch.Tensor, head: Head) -> None:
    if head.kind == "sequence_classification" and not head.regression and labels.ndim != 1:
        raise ValueError(
            f"Sequence-classification labels must be class ids of shape (B,), got shape {tuple(labels.shape)}; "
            "multi-label targets (B, C) are not supported."
        )
    if head.kind == "token_classification" and labels.ndim != 2:
        raise ValueError(f"Token-classification labels must have shape (B, T), got {tuple(labels.shape)}.")


def select_positions(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    head: Head,
    vocab_size: int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of supervised positions.

    Args:
        student_logits (`torch.Tensor`): `(B, T, V_s)` for token heads, `(B, C)` for sequence classification.
        teacher_logits (`torch.Tensor`): same layout as the student's (`V_t` may be padded beyond `V_s`).
        labels (`torch.Tensor`): `(B, T)` or `(B,)`, -100 where nothing is supervised (prompt, padding, ...).
        vocab_size (`int`, *optional*): slice both vocabularies to this many entries (padded embedding matrices).

    Returns:
        `(student (N, V), teacher (N, V), labels (N,))` with N the number of supervised positions; for regression
        heads `(student (N,), teacher (N,), targets (N,))`, one row per label value.
    """
    _check_labels(labels, head)
    mask = supervised_mask(labels, head, shift_labels)
    s = aligned_logits(student_logits, head, shift_labels)[mask]
    t = aligned_logits(teacher_logits, head, shift_labels)[mask]
    if vocab_size is not None and head.has_vocab:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    y = aligned_labels(labels, head, shift_labels)[mask]
    return s, t, y if head.regression else y.long()


# ------------------------------------------------------------------------------------------------ loss terms
class LogitTerms(NamedTuple):
    """Summed logit loss terms of one micro-batch.

    `sums[name]` is a scalar summed over the `n_items` supervised positions and `weights[name]` its factor in the
    loss; `agreement` is `(number of positions where the top-1 classes agree, n_items)`, or None without a teacher
    or for regression heads.
    """

    sums: dict[str, torch.Tensor]
    weights: dict[str, float]
    n_items: torch.Tensor
    agreement: tuple[torch.Tensor, torch.Tensor] | None


def hard_loss(student: torch.Tensor, labels: torch.Tensor, head: Head) -> torch.Tensor:
    """Summed hard-label loss of selected rows: CE for `(N, V)` logits and `(N,)` class ids, squared error for
    regression `(N,)` outputs and targets. fp32."""
    if head.regression:
        return (student.float() - labels.float()).pow(2).sum()
    return F.cross_entropy(student.float(), labels, reduction="sum")


def divergence_kwargs(args: Any) -> dict[str, Any]:
    """`loss_type` / `temperature` / `beta` / `skew_alpha` / `taid_t` / `ab_alpha` / `ab_beta` / `akl_mu` from a
    `DistillationConfig`-like `args`, as the logit divergence functions (dense, sparse, fused) take them. TAID's `t` is
    training state, not a field: the trainer's `TaidCallback` keeps it current (`hf_distill.taid.current_taid_t`)."""
    return {
        "loss_type": args.kd_loss,
        "temperature": args.temperature,
        "beta": args.beta,
        "skew_alpha": args.skew_alpha,
        "taid_t": current_taid_t(args),
        "ab_alpha": getattr(args, "ab_alpha", 0.8),
        "ab_beta": getattr(args, "ab_beta", 0.3),
        "akl_mu": getattr(args, "akl_mu", 0.5),
    }


def kd_scale(args: Any, head: Head | None = None) -> float:
    """The weight of a summed KD divergence: `kd_weight * T^2` (Hinton et al. 2015: gradients of tempered softmaxes
    shrink by 1 / T^2), or `kd_weight` for regression heads, whose KD term is a squared error. The one place this
    factor is written."""
    if head is not None and head.regression:
        return args.kd_weight
    return args.kd_weight * args.temperature**2


def logit_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    head: Head,
    args: Any,
    vocab_size: int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> LogitTerms:
    """KD and hard-label terms for any head: `loss = (ce_weight * sums["ce"] + kd_weight * T^2 * sums["kd"]) / N`.

    Args:
        student_logits (`torch.Tensor`): the student's `logits` (see `select_positions` for the layouts).
        teacher_logits (`torch.Tensor`, *optional*): the teacher's, or None for a CE-only run.
        labels (`torch.Tensor`): `(B, T)` or `(B,)`, -100 where not supervised.
        args: an object with `kd_loss`, `temperature`, `beta`, `skew_alpha`, `kd_weight`, `ce_weight`
            (a `DistillationArguments`).
        vocab_size (`int`, *optional*): shared real vocabulary size of padded LM heads.
    """
    reference = teacher_logits if teacher_logits is not None else student_logits
    s, t, y = select_positions(student_logits, reference, labels, head, vocab_size, shift_labels)
    sums = {"ce": hard_loss(s, y, head)}
    weights = {"ce": args.ce_weight}
    n_items = torch.as_tensor(y.numel(), device=s.device)
    agreement = None
    if teacher_logits is not None:
        weights["kd"] = kd_scale(args, head)
        if head.regression:
            sums["kd"] = (s.float() - t.float()).pow(2).sum()
        else:
            sums["kd"] = logit_divergence(s, t, **divergence_kwargs(args)).sum()
            agreement = ((s.argmax(-1) == t.argmax(-1)).sum(), n_items)
    return LogitTerms(sums, weights, n_items, agreement)


# ------------------------------------------------------------------------------------------------ teacher checks
def named_labels(config: Any) -> dict[int, str] | None:
    """`id2label` with int keys, or None when it holds transformers' placeholder names `LABEL_i`."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return None if id2label == {i: f"LABEL_{i}" for i in range(len(id2label))} else id2label


def check_label_spaces(student_config: Any, teacher_config: Any) -> None:
    """Raise a ValueError when the two classifiers' label spaces differ (count, or names where both name them)."""
    s_n, t_n = student_config.num_labels, teacher_config.num_labels
    s_names, t_names = named_labels(student_config), named_labels(teacher_config)
    if s_n != t_n or (s_names is not None and t_names is not None and s_names != t_names):
        raise ValueError(
            f"Teacher and student label spaces differ: student num_labels={s_n}, id2label={s_names or 'unnamed'}; "
            f"teacher num_labels={t_n}, id2label={t_names or 'unnamed'}. Class i of one model must be class i of "
            "the other: fine-tune the teacher on the student's labels (or give both the same `id2label`)."
        )


# Causal LMs whose logits are exactly `lm_head(final hidden state)` up to the scale/softcap handled below.
FUSED_MODEL_TYPES = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
    "smollm3",
    "cohere",
    "cohere2",
    "granite",
    "starcoder2",
    "stablelm",
    "glm",
    "helium",
}


@dataclass
class LMHead:
    """What turns a final hidden state `(N, H)` into logits `(N, V)`: `softcap(((h @ W.T + b) * scale))`."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None


def fused_head_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    args: Any,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    stats: dict[str, Any] | None = None,
    loss_weights: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`losses.fused_logit_distillation_loss` between two lm_heads, summed over rows, with `args`' divergence; the
    teacher side is detached (it never gets gradients).

    Args:
        student_hidden (`torch.Tensor`): `(N, H_s)` final hidden states of the student's supervised rows.
        student_head (`LMHead`), teacher_head (`LMHead`): the two lm_heads (`lm_head_of`).
        teacher_hidden (`torch.Tensor`): `(N, H_t)`.
        args: the config (`kd_loss`, `temperature`, ..., `kd_chunk_size`).
        vocab_size (`int`, *optional*): compare only the first `vocab_size` logits (padded heads).
        labels (`torch.Tensor`, *optional*): `(N,)` targets; the CE sum is returned too when given.
        stats (`dict`, *optional*): filled with `top1_agreement`.
        loss_weights (`tuple`, *optional*): `(kd weight, ce weight)` the gradients are computed for.

    Returns:
        `(kd, ce)`: fp32 scalars summed over the N rows; `ce` is None without `labels`.
    """
    result = fused_logit_distillation_loss(
        student_hidden,
        student_head.weight,
        teacher_hidden.detach(),
        teacher_head.weight.detach(),
        **divergence_kwargs(args),
        chunk_size=getattr(args, "kd_chunk_size", None),
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias.detach() if teacher_head.bias is not None else None,
        student_logit_scale=student_head.logit_scale,
        teacher_logit_scale=teacher_head.logit_scale,
        student_softcap=student_head.softcap,
        teacher_softcap=teacher_head.softcap,
        vocab_size=vocab_size,
        labels=labels,
        reduction="sum",
        stats=stats if stats is not None else {},
        **({"loss_weights": loss_weights} if loss_weights is not None else {}),
    )
    return result if labels is not None else (result, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP / compile wrappers (LoRA layers stay injected)."""
    while True:
        if hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def lm_head_of(model: nn.Module) -> LMHead | None:
    """The model's LM head when its logits can be reproduced from the final hidden state, else None."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or not hasattr(model, "model"):
        return None  # e.g. a LoRA-wrapped lm_head, or no separate decoder
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    return LMHead(head.weight, head.bias, scale, getattr(config, "final_logit_softcapping", None))


def decoder_of(model: nn.Module) -> nn.Module:
    """The base model (everything but the LM head) of a causal LM, returning `last_hidden_state`
    (`PreTrainedModel.get_decoder()`; `.model` for modules without it)."""
    model = unwrap(model)
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model
