"""The one interface between the trainer and wherever the teacher's distribution comes from.

A `TeacherSource` is chosen once, when the trainer is built (`hf_distill.teachers.select_teacher_source`). Per
micro-batch the trainer then does, and only does:

    kwargs = source.student_forward_kwargs()              # what the student's forward must return
    student_outputs = model(**model_inputs, **kwargs)
    teacher_outputs = source.outputs(model_inputs, batch)  # under no_grad where a model runs
    terms = source.terms(student_outputs, teacher_outputs, view)   # LossTerms on the SupervisedView

A source knows the student's outputs and the supervised view (`hf_distill.terms`), never the trainer. What it needs
from the run (the config, the student's head, the models) it is given when it is built, in a `SourceContext`.

To add a source: one file in `teachers/` with a `TeacherSource` subclass, and one line in `SOURCES`
(`teachers/__init__.py`) that says when it is picked. See docs/architecture.md for a worked example.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..heads import Head
from ..terms import LossTerms, SupervisedView


@dataclass
class SourceContext:
    """What a teacher source may read about the run, fixed when the trainer is built.

    Attributes:
        args (`DistillationArguments`): the config (loss type, weights, temperature, ...).
        head (`Head`): the student's head (`heads.detect_head`).
        student (`nn.Module`): the unwrapped student (for example its lm_head, for the fused loss).
        tokenizer: the student's tokenizer, or None.
        vocab_size (`int`, *optional*): the real vocabulary shared by student and teacher (padded heads are sliced).
        feature_kwargs (`dict`): forward arguments the feature terms need from both models (hidden states,
            attentions), merged into the student's and the teacher's forward.
    """

    args: Any
    head: Head
    student: nn.Module
    tokenizer: Any = None
    vocab_size: int | None = None
    feature_kwargs: dict[str, Any] | None = None


class TeacherSource:
    """Base class: a run without a teacher. Subclasses override the three methods below.

    Attributes:
        name (`str`): short name, logged and written in the model card (`"none"`, `"live"`, `"cache"`, ...).
        models (`list[nn.Module]`): the live teacher models this source runs (placement, checks, model card), or
            empty.
    """

    name = "none"
    starts_as_student = False  # its distribution equals the student's at step 0 (no zero-KD warning then)

    def __init__(self, context: SourceContext):
        self.context = context
        self.models: list[nn.Module] = []

    @property
    def model(self) -> nn.Module | None:
        """The first live teacher model, or None."""
        return self.models[0] if self.models else None

    def student_forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the student's forward (for example `output_hidden_states=True,
        logits_to_keep=1` for the fused loss). The feature terms' own kwargs are included."""
        return dict(self.context.feature_kwargs or {})

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        """The teacher's outputs for one micro-batch (`model_inputs`: what the student was called with; `batch`: the
        whole collated batch), or None. Runs under `torch.no_grad` where it runs a model."""
        return None

    def callbacks(self) -> list[Any]:
        """`TrainerCallback`s the source's training state needs (e.g. the EMA teacher's update); none here."""
        return []

    def load_checkpoint(self, folder: str) -> None:
        """Restore the source's training state from a checkpoint folder on resume (nothing to restore here)."""

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        """The logit terms of one view: `ce` (weight `ce_weight`) and, with a teacher, `kd` (weight `kd_weight * T^2`),
        each summed over the view's supervised items. Metrics such as `top1_agreement` go in `LossTerms.metrics`."""
        from ..heads import logit_terms

        out = logit_terms(student_outputs.logits, None, view.labels, view.head, self.context.args,
                          self.context.vocab_size, view.shift_labels)  # fmt: skip
        return LossTerms(out.sums, out.weights, out.n_items)


def teacher_forward(model: nn.Module, model_inputs: dict[str, Any], **kwargs: Any) -> Any:
    """`model(**model_inputs, **kwargs)` under `torch.no_grad` (a teacher never builds a graph)."""
    with torch.no_grad():
        return model(**model_inputs, **kwargs)
