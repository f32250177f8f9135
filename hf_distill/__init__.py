"""hf-distill: knowledge distillation for the Hugging Face Trainer ecosystem."""

from .config import DistillationArguments, DistillationConfig, DistillationSFTConfig
from .data.collators import RationaleCollator
from .trainer import DistillationMixin, DistillationSFTTrainer, DistillationTrainer


__version__ = "0.1.0"

__all__ = [
    "DistillationArguments",
    "DistillationConfig",
    "DistillationMixin",
    "DistillationSFTConfig",
    "DistillationSFTTrainer",
    "DistillationTrainer",
    "RationaleCollator",
]
