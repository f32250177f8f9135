"""hf-distill: knowledge distillation for the Hugging Face Trainer ecosystem."""

from .collators import RationaleCollator
from .config import DistillationArguments, DistillationConfig, DistillationSFTConfig
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
