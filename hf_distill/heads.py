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
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto import modeling_auto


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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(N, H)` final hidden states -> `(N, V)` logits, as the model computes them."""
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias) * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / FSDP / DeepSpeed / `torch.compile` wrappers (accelerate's
    `extract_model_from_parallel`) and PEFT's `PeftModel` (its LoRA layers stay injected)."""
    while True:
        model = extract_model_from_parallel(model, keep_torch_compile=False)
        if not hasattr(model, "get_base_model"):  # PeftModel, and PeerStudents (peer 0 stands for all)
            return model
        model = model.get_base_model()


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
