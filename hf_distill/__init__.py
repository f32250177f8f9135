"""hf-distill: knowledge distillation for the Hugging Face Trainer ecosystem.

The public names are imported on first use (a module-level `__getattr__`, as `transformers` and `peft` do), so that
`import hf_distill` and `hf-distill --help` do not load torch, the trainers or datasets.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__


# public name -> the module (relative to this package) that defines it
_LAZY_IMPORTS = {
    "DistillationArguments": "config",
    "DistillationConfig": "config",
    "DistillationSFTConfig": "config",
    "RationaleCollator": "data.collators",
    "DistillationMixin": "trainer",
    "DistillationSFTTrainer": "trainer",
    "DistillationTrainer": "trainer",
}

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

if TYPE_CHECKING:  # static analysers and IDEs see the names; at run time `__getattr__` imports them
    from .config import DistillationArguments, DistillationConfig, DistillationSFTConfig
    from .data.collators import RationaleCollator
    from .trainer import DistillationMixin, DistillationSFTTrainer, DistillationTrainer


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for (`hf_distill.DistillationTrainer`,
    `from hf_distill import DistillationTrainer`), then keep it in the package namespace."""
    if name not in _LAZY_IMPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
