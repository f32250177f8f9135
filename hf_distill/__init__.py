"""hf-distill: knowledge distillation for the Hugging Face Trainer ecosystem."""

from .config import DistillationArguments, DistillationConfig, DistillationSFTConfig
from .data.collators import RationaleCollator
from .trainer import DistillationMixin, DistillationSFTTrainer, DistillationTrainer
from .version import __version__


__all__ = [
    "DistillationArguments",
    "DistillationConfig",
    "DistillationMixin",
    "DistillationSFTConfig",
    "DistillationSFTTrainer",
    "DistillationTrainer",
    "RationaleCollator",
    "__version__",
]
