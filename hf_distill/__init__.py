"""hf-distill: knowledge distillation for the Hugging Face Trainer ecosystem."""

__version__ = "0.1.0"
