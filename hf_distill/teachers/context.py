"""Context distillation: a teacher that reads what the student never sees (Askell et al. 2021; Snell et al. 2022).

Asked for by `teacher_model_name_or_path: self`, or by `teacher_system_prompt` / `teacher_context_column` with any
same-tokenizer teacher (a teacher model, `self`, or the EMA of `teacher_ema_decay`; a teacher with another tokenizer
reads them in `cross_tokenizer.py`). The teacher is:

- `self`: the student as it starts, frozen: a deep copy (`ema.ema_copy`), or for a PEFT student whose trainable
  parameters are all adapter parameters the student itself run with its adapters disabled (no copy: that is exactly
  the base model); a PEFT student whose base weights train too gets a frozen copy, also run with adapters disabled;
- `self` + `teacher_ema_decay` (or `teacher_ema_decay` alone with a context): the moving average (`ema.EMATeacher`);
- any other single teacher: loaded and checked as a live teacher (`live.load_live_teachers`).

With a system prompt or a context column (`data.context.TeacherContext`) the source wraps the trainer's collator
(`data.context.ContextCollator`), which adds the teacher's own rows (`teacher_input_ids`, `teacher_attention_mask`,
`teacher_labels`, `teacher_prompt_ids`: this source's `batch_keys`); the teacher runs on those rows, and the terms pair
the teacher's supervised rows with the student's in order (`SupervisedView.with_teacher_labels`) on the dense and the
fused path alike. After on-policy samples replace a batch's completions (`lmbda`), `rewritten` builds the teacher's
rows again from the same teacher prompts and the new completions. Without either, the teacher reads the student's
tokens (with `self`: KD is exactly 0 on the first step).
"""

import contextlib
import copy
import logging
from typing import Any

from torch import nn

from ..data.context import TEACHER_KEYS, ContextCollator, TeacherContext, rebuild_teacher_rows
from ..heads import unwrap
from ..losses import IGNORE_INDEX
from ..model_card import CardTeacher
from ..terms import LossTerms, SupervisedView
from .base import (
    SELF_TEACHER,
    SourceContext,
    SourceRequest,
    TeacherSource,
    context_requested,
    reads_context,
    refuse_features,
)
from .ema import EMATeacher, ema_copy
from .live import FusedLiveTeacher, LiveTeacher, load_live_teachers, use_fused_loss


logger = logging.getLogger(__name__)


def is_self(request: SourceRequest) -> bool:
    """Whether the teacher asked for is the student itself (`teacher_model_name_or_path: self`)."""
    return isinstance(request.teacher, str) and request.teacher == SELF_TEACHER


def is_peft(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model (has adapters that can be disabled)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def base_is_frozen(model: nn.Module) -> bool:
    """For a PEFT model: whether every trainable parameter is an adapter's (`.<adapter name>.` in its name), so that
    running it with its adapters disabled gives exactly the base model, now and after any training step."""
    adapters = tuple(f".{name}." for name in model.peft_config)
    return all(not p.requires_grad or any(a in n for a in adapters) for n, p in model.named_parameters())


def self_teacher(context: SourceContext) -> tuple[nn.Module, bool]:
    """The student as it starts, frozen, and whether it runs with its PEFT adapters disabled.

    Returns:
        `(model, adapters_off)`: the PEFT student itself (`adapters_off=True`, no copy) when `base_is_frozen`; a frozen
        deep copy of a PEFT student otherwise (`adapters_off=True`); else a frozen copy placed beside the student.
    """
    student = context.student
    if context.sharded:
        raise ValueError(
            "`teacher_model_name_or_path: self` copies the student's full weights, which FSDP / DeepSpeed ZeRO-3 "
            "shard: save the student first and name that folder as the teacher, or train under DDP."
        )
    if is_peft(student):
        if base_is_frozen(student):
            return student, True
        model = copy.deepcopy(student)
        for module in model.modules():
            module.__dict__.pop("forward", None)  # a wrapper on the student's instance would run the student
        return model.eval().requires_grad_(False), True
    return context.place(ema_copy(student)), False


class ContextTeacher(TeacherSource):
    """The teacher reads its own prompt (system prompt, per-row context) and the student's completion (module
    docstring).

    Args:
        context (`SourceContext`): the run.
        inner (`TeacherSource`): the source that runs the teacher model and computes the terms (`LiveTeacher`,
            `FusedLiveTeacher` or `EMATeacher`).
        reader (`TeacherContext`, *optional*): what only the teacher reads; None: it reads the student's tokens.
        adapters_off (`bool`): run the teacher with its PEFT adapters disabled (a `self` teacher of a PEFT student).
        self_taught (`bool`): the teacher is the student at step 0 (`self`, EMA).
    """

    kind = "context"
    name = "context"
    batch_keys = TEACHER_KEYS

    def __init__(
        self,
        context: SourceContext,
        inner: TeacherSource,
        reader: TeacherContext | None = None,
        adapters_off: bool = False,
        self_taught: bool = False,
    ):
        super().__init__(context)
        self.inner, self.reader, self.adapters_off = inner, reader, adapters_off
        self.models = list(inner.models)
        self.starts_as_student = self_taught  # KD 0 on the first step is then expected (no "dead KD" warning)
        base = ("self" + inner.name.removeprefix("live")) if self_taught and inner.kind != "ema" else inner.name
        self.name = base + ("+context" if reader is not None else "")

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        """`teacher_model_name_or_path: self`, or a system prompt / context column with a same-tokenizer teacher."""
        return context_requested(request)

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        what = "`teacher_model_name_or_path: self`" if is_self(request) else "a teacher"
        return f"{what} with `teacher_system_prompt` / `teacher_context_column` (context distillation)"

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        """Refused: several teachers, a teacher besides `teacher_ema_decay`, no teacher at all, `seq_kd` (its
        generations would not read the context), hidden-state terms (the two sides' positions differ)."""
        args = request.args
        refuse_features(request, "context distillation (teacher and student positions differ)")
        if len(request.teachers) > 1:
            raise ValueError(
                "`teacher_system_prompt` / `teacher_context_column` / `self` take one teacher; several teachers are "
                "not supported with a context."
            )
        if args.teacher_ema_decay is not None and request.teachers and not is_self(request):
            raise ValueError(
                "`teacher_ema_decay` makes the teacher a moving average of the student, and a teacher is given too "
                f"({request.teacher!r}); drop one (`self` with `teacher_ema_decay` is the moving self-teacher)."
            )
        if not request.teachers and args.teacher_ema_decay is None:
            raise ValueError(
                "`teacher_system_prompt` / `teacher_context_column` need a teacher to read them: set "
                "`teacher_model_name_or_path: self` (the student as it starts), a teacher, or `teacher_ema_decay`."
            )
        if args.seq_kd:
            raise ValueError(
                "`seq_kd` with context distillation is not supported: its generations would not read the context. "
                "Generate the context teacher's answers first and train on them, or use `lmbda` (on-policy)."
            )

    @classmethod
    def prepare_dataset(cls, request: SourceRequest, dataset: Any) -> Any:
        """Checks that the training dataset has the context column (when it lists its columns)."""
        column = request.args.teacher_context_column
        columns = getattr(dataset, "column_names", None)
        if column is not None and isinstance(columns, list) and column not in columns:
            raise ValueError(
                f"`teacher_context_column` is {column!r}, but the training dataset has columns {columns}: add the "
                "column (demonstrations, a document, the answer, a rationale per row) or unset the field."
            )
        return dataset

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> TeacherSource:
        """Loads (or copies) the teacher, picks dense or fused KD, and reads the system prompt file."""
        args = context.args
        if not request.needs_teacher:
            logger.info("kd_weight is 0: the teacher is not built or run.")
            return TeacherSource(context)
        adapters_off, self_taught = False, is_self(request) or args.teacher_ema_decay is not None
        if args.teacher_ema_decay is not None:
            inner: TeacherSource = EMATeacher(context)
        else:
            if is_self(request):
                teacher, adapters_off = self_teacher(context)
            else:
                (teacher,), vocab_size = load_live_teachers(context, [request.teacher],
                                                            [request.teacher_processing_class])  # fmt: skip
                context = context.with_vocab_size(vocab_size)
            fused = use_fused_loss(context, teacher, "Context teacher: ")
            inner = (FusedLiveTeacher if fused else LiveTeacher)(context, teacher)
        reader = None
        if reads_context(args):
            if context.tokenizer is None:
                raise ValueError("Context distillation needs the student's tokenizer: pass `processing_class`.")
            config = getattr(unwrap(inner.models[0]), "config", None)
            limit = getattr(args, "max_length", None) or getattr(config, "max_position_embeddings", None)
            reader = TeacherContext.from_args(args, context.tokenizer, limit)
        return cls(context, inner, reader, adapters_off, self_taught)

    def wrap_collator(self, collator: Any) -> Any:
        """`ContextCollator` (the teacher's own rows) when the teacher reads a context, else `collator`."""
        if self.reader is None:
            return collator
        return ContextCollator(collator, self.reader, self.pad_token_id)

    @property
    def pad_token_id(self) -> int:
        """Padding of the teacher's rows (the tokenizer's pad, else EOS, else 0)."""
        tok = self.context.tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None:
                return candidate
        return 0

    def rewritten(self, batch: dict[str, Any], new_batch: dict[str, Any]) -> dict[str, Any]:
        """After on-policy samples replaced the completions of `batch` (`new_batch`: the same prompts), the teacher's
        rows built again: its prompts from `batch`, the new completions."""
        if self.reader is None or new_batch is batch:
            return new_batch
        rows = rebuild_teacher_rows(new_batch, batch["teacher_prompt_ids"], self.pad_token_id, self.reader.max_length)
        return {**new_batch, **rows}

    def card_teacher(self) -> CardTeacher:
        """The inner teacher's card line (the student itself for `self`, the EMA, or the teacher model), plus what
        only the teacher read: the system prompt (its length, not its text) and / or the context column."""
        if self.starts_as_student and self.inner.kind != "ema":
            inner = CardTeacher("the student itself as it starts, frozen (`teacher_model_name_or_path: self`)")
        else:
            inner = self.inner.card_teacher() or CardTeacher(f"teacher source `{self.inner.name}`")
        read = []
        if self.reader is not None and self.reader.system_prompt:
            read.append(f"a system prompt of {len(self.reader.system_prompt)} characters")
        if self.reader is not None and self.reader.column:
            read.append(f"the context column `{self.reader.column}`")
        extra = f"; context distillation: only the teacher reads {' and '.join(read)}" if read else ""
        return CardTeacher(inner.description + extra, inner.base_models, inner.student_subfolder)

    def callbacks(self) -> list[Any]:
        return self.inner.callbacks()

    def load_checkpoint(self, folder: str) -> None:
        self.inner.load_checkpoint(folder)

    # ------------------------------------------------------------------------------------------- per batch
    def student_forward_kwargs(self) -> dict[str, Any]:
        return self.inner.student_forward_kwargs()

    def teacher_inputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """What the teacher's forward reads: its own rows (`teacher_input_ids` `(B, T_t)`, `teacher_attention_mask`)
        with a context, else the student's `model_inputs`."""
        if self.reader is None:
            return model_inputs
        return {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"],
                "use_cache": False}  # fmt: skip

    @contextlib.contextmanager
    def _mode(self):
        """The PEFT adapters disabled and eval mode for a `self` teacher that is the PEFT student."""
        if not self.adapters_off:
            yield
            return
        model = self.inner.models[0]
        training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield
        finally:
            model.train(training)

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        with self._mode():
            return self.inner.outputs(self.teacher_inputs(model_inputs, batch), batch)

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        if self.reader is not None:  # rows the view leaves out (another task's, step-by-step) left out on both sides
            left_out = (view.aligned_labels() == IGNORE_INDEX).all(-1, keepdim=True)
            teacher_labels = view.batch["teacher_labels"].masked_fill(left_out.to(view.labels.device), IGNORE_INDEX)
            view = view.with_teacher_labels(teacher_labels)
        return self.inner.terms(student_outputs, teacher_outputs, view)
