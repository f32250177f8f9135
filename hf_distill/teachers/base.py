"""The one interface between the trainer and wherever the teacher's distribution comes from.

A source is a class registered under the kind of teacher a run asks for (`teachers.SOURCES`), and it builds itself:

    request = SourceRequest(args, teacher, teacher_processing_class, student)   # what the user asked for
    cls = select_source(request)                        # the one registered class whose `requested` holds
    train_dataset = cls.prepare_dataset(request, train_dataset)    # before Trainer.__init__ (e.g. cache row ids)
    source = cls.from_request(request, context)         # after it: loads, checks and places its models

and owns, besides the three per-batch methods, its preconditions and errors (`check`, `from_request`), the batch keys
it adds (`batch_keys`), its collator wrapper (`wrap_collator`), its callbacks and checkpoint files (`callbacks`,
`load_checkpoint`), how the student is saved (`save_model`) and what the student's model card says about the teacher
(`card_teacher`). Per micro-batch the trainer then does, and only does:

    kwargs = source.student_forward_kwargs()              # what the student's forward must return
    student_outputs = model(**model_inputs, **kwargs)
    teacher_outputs = source.outputs(model_inputs, batch)  # under no_grad where a model runs
    terms = source.terms(student_outputs, teacher_outputs, view)   # LossTerms on the SupervisedView

A source knows the student's outputs and the supervised view (`hf_distill.terms`), never the trainer. What it needs
from the run (the config, the student's head, the models, how to place a teacher) it is given in a `SourceContext`.
This class itself is the `none` source: no teacher, hard-label CE only.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..heads import Head
from ..model_card import CardTeacher, live_teachers
from ..terms import LossTerms, SupervisedView, logit_terms


@dataclass
class SourceRequest:
    """What the user asked for, known before `Trainer.__init__`.

    Attributes:
        args (`DistillationArguments`): the config.
        teacher (*optional*): `teacher_model=` of the trainer, else `args.teacher_model_name_or_path`: a model, a Hub
            id / path / shorthand, or a list of them (a list of one is one teacher).
        teacher_processing_class (*optional*): the teacher's tokenizer (or one per teacher), when given.
        student (`nn.Module`, *optional*): the model passed to the trainer (before the trainer wraps it).
        resources (`dict`): what `prepare_dataset` opened (e.g. the cache), handed on to `from_request`.
    """

    args: Any
    teacher: Any = None
    teacher_processing_class: Any = None
    student: nn.Module | None = None
    resources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.teacher, list | tuple) and len(self.teacher) == 1:
            self.teacher = self.teacher[0]

    @property
    def teachers(self) -> list[Any]:
        """The teachers given (models or names), as a list: empty, one, or several."""
        if self.teacher is None:
            return []
        return list(self.teacher) if isinstance(self.teacher, list | tuple) else [self.teacher]

    @property
    def needs_teacher(self) -> bool:
        """Whether the config has a term that only a teacher can give: KD (without a cache), hints/attention/
        relations, or sequence-level KD targets."""
        args = self.args
        return (args.kd_weight > 0 and args.teacher_cache is None) or args.uses_features or args.seq_kd


def _unplaced(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


@dataclass
class SourceContext:
    """What a teacher source may read about the run, fixed when the trainer is built.

    Attributes:
        args (`DistillationArguments`): the config (loss type, weights, temperature, ...).
        head (`Head`): the student's head (`heads.detect_head`).
        student (`nn.Module`): the unwrapped student (for example its lm_head, for the fused loss).
        tokenizer: the student's tokenizer, or None.
        vocab_size (`int`, *optional*): the real vocabulary shared by student and teacher (padded heads are sliced);
            set by the source that loads the teacher.
        feature_kwargs (`dict`): forward arguments the feature terms need from both models (hidden states,
            attentions, `features.hints.feature_forward_kwargs`), merged into the student's and the teacher's forward.
        place (`Callable`): places a loaded, frozen teacher for inference beside the student (the trainer's
            `models.prepare_teacher`: DDP / FSDP / ZeRO-3); default: eval mode, no grads, where it is.
        sharded (`bool`): FSDP / DeepSpeed shard the parameters (lm_heads outside forward: no fused loss).
    """

    args: Any
    head: Head
    student: nn.Module
    tokenizer: Any = None
    vocab_size: int | None = None
    feature_kwargs: dict[str, Any] | None = None
    place: Callable[[nn.Module], nn.Module] = _unplaced
    sharded: bool = False

    def with_vocab_size(self, vocab_size: int | None) -> "SourceContext":
        """A copy with the shared vocabulary size the source found."""
        return replace(self, vocab_size=vocab_size)


class TeacherSource:
    """Base class, and the `none` source: a run without a teacher (hard-label CE only). Subclasses override the
    per-batch methods and the building hooks they need.

    Attributes:
        kind (`str`): the registry key (`teachers.SOURCES`): what the config asks for.
        name (`str`): short name, logged and written in the model card (`"none"`, `"live"`, `"live-fused"`, ...).
        models (`list[nn.Module]`): the live teacher models this source runs (placement, checks, model card).
        batch_keys (`tuple[str, ...]`): entries its collator adds to a batch that are not model inputs.
    """

    kind: ClassVar[str] = "none"
    name = "none"
    starts_as_student = False  # its distribution equals the student's at step 0 (no zero-KD warning then)
    batch_keys: tuple[str, ...] = ()

    def __init__(self, context: SourceContext):
        self.context = context
        self.models: list[nn.Module] = []

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        """Whether the config / trainer arguments ask for this source (exactly one registered source may answer
        yes; none answering means `none`)."""
        return False

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        """How the user asked for this source, for the message when two sources are asked for at once."""
        return cls.kind

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        """Preconditions checked before `Trainer.__init__` (cheap: no model is loaded). The `none` source: a term
        that needs a teacher, with none given."""
        if cls is TeacherSource and request.needs_teacher:
            raise ValueError(
                "No teacher given: pass `teacher_model=` (a model or a Hub id/path) or set "
                "`teacher_model_name_or_path` in the config. To fine-tune without a teacher set `kd_weight=0`."
            )

    @classmethod
    def prepare_dataset(cls, request: SourceRequest, dataset: Any) -> Any:
        """The training dataset as this source needs it, before `Trainer.__init__` prepares it (unchanged here)."""
        return dataset

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> "TeacherSource":
        """The source for a run, built after `Trainer.__init__` (models loaded, checked and placed here)."""
        return cls(context)

    # ------------------------------------------------------------------------------------------- the run
    @property
    def model(self) -> nn.Module | None:
        """The first live teacher model, or None."""
        return self.models[0] if self.models else None

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary size student and teacher logits are compared over (None: all)."""
        return self.context.vocab_size

    def wrap_collator(self, collator: Any) -> Any:
        """The trainer's data collator, wrapped as this source needs its batches (unchanged here)."""
        return collator

    def rewritten(self, batch: dict[str, Any], new_batch: dict[str, Any]) -> dict[str, Any]:
        """The batch to train on after the on-policy / seq-KD rewriter made `new_batch` from `batch` (new
        completions, same prompts): completed with the source's own batch keys where it has some (the context
        source's teacher rows); `new_batch` itself here."""
        return new_batch

    def callbacks(self) -> list[Any]:
        """`TrainerCallback`s the source's training state needs (e.g. the EMA teacher's update); none here."""
        return []

    def load_checkpoint(self, folder: str) -> None:
        """Restore the source's training state from a checkpoint folder on resume (nothing to restore here)."""

    def save_model(self, model: nn.Module, output_dir: str, processing_class: Any, should_save: bool) -> bool:
        """Save the student in its own way (e.g. one folder per peer); False: the trainer saves it as usual."""
        return False

    def card_teacher(self) -> CardTeacher | None:
        """What the student's model card says about the teacher (`model_card.CardTeacher`: one description line, and
        the names the card's `base_model` lineage may come from), or None for the `none` source. The trainer's card
        reads only this; no URL or key goes in it.

        This default describes any source that does not override it: one whose teacher starts as the student as the
        student itself, one with live teacher models by their names and revisions or fingerprints
        (`model_card.live_teachers`: the `live` and `live-fused` sources), any other by its name.
        """
        if self.starts_as_student:
            return CardTeacher(
                f"the student itself (teacher source `{self.name}`): self-distillation, no separate teacher model"
            )
        if self.models:
            return live_teachers(self.context.args, self.models)
        if type(self) is TeacherSource:  # the `none` source
            return None
        return CardTeacher(f"teacher source `{self.name}` (it names no teacher model)")

    # ------------------------------------------------------------------------------------------- per batch
    def student_forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the student's forward (for example `output_hidden_states=True,
        logits_to_keep=1` for the fused loss). The feature terms' own kwargs are included."""
        return dict(self.context.feature_kwargs or {})

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        """The teacher's outputs for one micro-batch (`model_inputs`: what the student was called with; `batch`: the
        whole collated batch), or None. Runs under `torch.no_grad` where it runs a model."""
        return None

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        """The logit terms of one view: `ce` (weight `ce_weight`) and, with a teacher, `kd` (weight `kd_weight * T^2`),
        each summed over the view's supervised items. Metrics such as `top1_agreement` go in `LossTerms.metrics`."""
        return logit_terms(student_outputs.logits, None, view, self.context.args, self.context.vocab_size)


def teacher_forward(model: nn.Module, model_inputs: dict[str, Any], **kwargs: Any) -> Any:
    """`model(**model_inputs, **kwargs)` under `torch.no_grad` (a teacher never builds a graph)."""
    with torch.no_grad():
        return model(**model_inputs, **kwargs)


SELF_TEACHER = "self"  # `teacher_model_name_or_path: self`: the student as it starts (teachers/context.py)


def reads_context(args: Any) -> bool:
    """Whether the config gives the teacher text the student does not read (`teacher_system_prompt`,
    `teacher_context_column`)."""
    return getattr(args, "teacher_system_prompt", None) is not None or (
        getattr(args, "teacher_context_column", None) is not None
    )


def context_requested(request: "SourceRequest") -> bool:
    """Whether the request asks for the context source (`teachers.context.ContextTeacher`): the teacher is `"self"`,
    or a same-tokenizer teacher reads a system prompt or a context column. A teacher with another tokenizer
    (`cross_tokenizer_loss`) reads them in its own source."""
    is_self = isinstance(request.teacher, str) and request.teacher == SELF_TEACHER
    return (is_self or reads_context(request.args)) and request.args.cross_tokenizer_loss is None


def refuse_features(request: SourceRequest, what: str) -> None:
    """A ValueError when hints / attention / relation terms are on with a source that has no teacher hidden states
    (`what` names the source)."""
    if request.args.uses_features:
        raise ValueError(
            f"Hidden-state hints, attention and relation losses need a live teacher's hidden states, which {what} "
            "does not have: unset `hint_layers`, `attention_weight` and `relation_loss`, or use a live teacher."
        )
