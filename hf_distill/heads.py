"""What is distilled for each kind of model head: which positions carry a distribution, and how labels line up.

`select_positions` turns full model outputs into aligned rows, one per supervised position:
student logits `(N, V)`, teacher logits `(N, V)` and hard labels `(N,)`.
"""

from dataclasses import dataclass

import torch
from torch import nn


IGNORE_INDEX = -100


@dataclass
class Head:
    """How a model's logits line up with its labels.

    kind: "causal_lm" (logits at t predict label t+1), "seq2seq" (decoder logits at t predict label t).
    """

    kind: str

    @property
    def shifts_labels(self) -> bool:
        return self.kind == "causal_lm"


def detect_head(model: nn.Module) -> Head:
    """Infer the head from the (possibly PEFT- or accelerate-wrapped) model's config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"Cannot tell what to distil for {type(model).__name__}: it has no `config`.")
    if getattr(config, "is_encoder_decoder", False):
        return Head("seq2seq")
    return Head("causal_lm")


def supervised_mask(labels: torch.Tensor, head: Head, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask `(B, T)` (or `(B, T-1)` for causal LMs) of positions whose label is not -100.

    Args:
        labels (`torch.Tensor`): shape `(B, T)`.
        shift_labels (`torch.Tensor`, *optional*): already-shifted labels `(B, T)` from padding-free collators.
    """
    if shift_labels is not None:
        return shift_labels != IGNORE_INDEX
    if head.shifts_labels:
        return labels[:, 1:] != IGNORE_INDEX
    return labels != IGNORE_INDEX


def aligned_labels(labels: torch.Tensor, head: Head, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with logit positions: `(B, T-1)` for causal LMs (`labels[:, 1:]`), else `(B, T)`."""
    if shift_labels is not None:
        return shift_labels
    return labels[:, 1:] if head.shifts_labels else labels


def aligned_logits(logits: torch.Tensor, head: Head, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits aligned with `aligned_labels`: `(B, T-1, V)` for causal LMs (last position dropped), else `(B, T, V)`."""
    if head.shifts_labels and shift_labels is None:
        return logits[:, :-1]
    return logits


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
        student_logits (`torch.Tensor`): `(B, T, V_s)`.
        teacher_logits (`torch.Tensor`): `(B, T, V_t)`.
        labels (`torch.Tensor`): `(B, T)`, -100 where nothing is supervised (prompt, padding).
        vocab_size (`int`, *optional*): slice both vocabularies to this many entries (padded embedding matrices).

    Returns:
        `(student (N, V), teacher (N, V), labels (N,))` with N the number of supervised positions.
    """
    mask = supervised_mask(labels, head, shift_labels)
    s = aligned_logits(student_logits, head, shift_labels)[mask]
    t = aligned_logits(teacher_logits, head, shift_labels)[mask]
    if vocab_size is not None:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    return s, t, aligned_labels(labels, head, shift_labels)[mask]


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
    """The base model (everything but the LM head) of a causal LM, returning `last_hidden_state`."""
    return unwrap(model).model
