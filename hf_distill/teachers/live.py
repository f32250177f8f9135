"""A live teacher model run next to the student on every batch: dense logits, or the fused chunked loss.

- `LiveTeacher`: the teacher's `[B, T, V]` logits, and any `kd_loss` divergence on any head (`terms.logit_terms`).
- `FusedLiveTeacher`: causal LMs with plain lm_heads only. Both models return final hidden states and the KD and CE
  sums are computed chunk by chunk from hidden states and lm_head weights (`losses.fused`), so the full
  `[N, V]` logits are never held. The student's forward keeps one position's logits (`logits_to_keep=1`), the teacher
  runs its base model alone (no lm_head) unless the feature terms need its full outputs.

Asked for by one teacher (`teacher_model=` or `teacher_model_name_or_path`) with the student's tokenizer. The teacher
is loaded (Hub id, path, GGUF, shorthand), checked against the student (`models.load_teacher`: tokenizer, head kind,
label space, padded vocabulary) and placed beside it (`SourceContext.place`); the fused loss is used where it
reproduces both models' logits (`fused_unsupported_reason`), else the dense one, with an info log saying why.
"""

import logging
from typing import Any

from torch import nn

from ..heads import decoder_of, lm_head_of
from ..models import load_teacher
from ..terms import LossTerms, SupervisedView, fused_head_loss, kd_scale, logit_terms
from .base import SourceContext, SourceRequest, TeacherSource, context_requested, teacher_forward


logger = logging.getLogger(__name__)

FUSED_FORWARD_KWARGS = {"output_hidden_states": True, "logits_to_keep": 1}


def load_live_teachers(
    context: SourceContext, teachers: list[Any], processing_classes: list[Any]
) -> tuple[list[nn.Module], int | None]:
    """Load, check and place every teacher; returns them and the vocabulary size to compare logits over (the first
    teacher's that is not None: padded embedding matrices)."""
    args = context.args
    loaded, sizes = [], []
    for teacher, processing_class in zip(teachers, processing_classes, strict=True):
        model, size = load_teacher(teacher, context.head.auto_class, context.student, context.tokenizer,
                                   processing_class, args.cross_tokenizer_loss, args.teacher_tokenizer_name_or_path,
                                   **dict(args.teacher_model_init_kwargs or {}))  # fmt: skip
        loaded.append(context.place(model))
        sizes.append(size)
    return loaded, next((size for size in sizes if size is not None), None)


class LiveTeacher(TeacherSource):
    """One live teacher model; KD on materialised logits."""

    kind = "live"
    name = "live"

    def __init__(self, context: SourceContext, teacher: nn.Module):
        super().__init__(context)
        self.models = [teacher]

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        single = len(request.teachers) == 1 and request.args.cross_tokenizer_loss is None
        return single and not context_requested(request)  # with a context: `context.ContextTeacher` runs it

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "`teacher_model`"

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> TeacherSource:
        """The dense or fused live source; the `none` source when no term needs the teacher (`kd_weight=0` and no
        feature term: it is then not loaded)."""
        if not request.needs_teacher:
            logger.info("kd_weight is 0 and no hint/relation term is on: the teacher is not loaded or run.")
            return TeacherSource(context)
        (teacher,), vocab_size = load_live_teachers(context, [request.teacher], [request.teacher_processing_class])
        context = context.with_vocab_size(vocab_size)
        return (FusedLiveTeacher if use_fused_loss(context, teacher) else LiveTeacher)(context, teacher)

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        return teacher_forward(self.model, model_inputs, **(self.context.feature_kwargs or {}))

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        ctx = self.context
        return logit_terms(student_outputs.logits, teacher_outputs.logits, view, ctx.args, ctx.vocab_size)


def fused_unsupported_reason(context: SourceContext, teacher: nn.Module, sharded: bool | None = None) -> str | None:
    """Why the fused loss cannot reproduce both models' logits here, or None when it can (`sharded` defaults to
    `context.sharded`)."""
    if context.head.kind != "causal_lm":
        return f"the student is a {context.head.kind} model"
    if context.sharded if sharded is None else sharded:
        return "FSDP/DeepSpeed shard the lm_head weights outside forward"
    if lm_head_of(context.student) is None or lm_head_of(teacher) is None:
        return "the student's or teacher's logits are not a plain lm_head of the last hidden state"
    return None


def use_fused_loss(context: SourceContext, teacher: nn.Module, who: str = "") -> bool:
    """`use_fused_kd_loss` where `fused_unsupported_reason` finds nothing against it; logs why not, once."""
    if not context.args.use_fused_kd_loss:
        return False
    reason = fused_unsupported_reason(context, teacher)
    if reason:
        logger.info("%sUsing materialised logits for the KD loss: %s (set use_fused_kd_loss=False to silence).",
                    who, reason)  # fmt: skip
    return reason is None


class FusedLiveTeacher(LiveTeacher):
    """One live causal-LM teacher; KD and CE by the chunked hidden-state loss (`losses.fused`)."""

    name = "live-fused"

    def student_forward_kwargs(self) -> dict[str, Any]:
        return {**super().student_forward_kwargs(), **FUSED_FORWARD_KWARGS}

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        if not self.context.feature_kwargs:  # the base model alone: no lm_head, no logits
            return teacher_forward(decoder_of(self.model), model_inputs)
        return teacher_forward(self.model, model_inputs, **{**self.context.feature_kwargs, **FUSED_FORWARD_KWARGS})

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        args = self.context.args
        t_last = getattr(teacher_outputs, "last_hidden_state", None)
        t_last = teacher_outputs.hidden_states[-1] if t_last is None else t_last
        y = view.targets()
        s_head, t_head = lm_head_of(self.context.student), lm_head_of(self.model)
        stats: dict[str, Any] = {}
        weights = {"kd": kd_scale(args), "ce": args.ce_weight}
        s_rows, t_rows = view.rows(student_outputs.hidden_states[-1]), view.teacher_rows(t_last)
        kd, ce = fused_head_loss(s_rows, s_head, t_rows, t_head, args, self.context.vocab_size, y, stats,
                                 (weights["kd"], weights["ce"]), view.state)  # fmt: skip
        terms = LossTerms({"kd": kd, "ce": ce}, weights, y.new_tensor(y.numel()))
        if "top1_agreement" in stats:
            terms.metric("top1_agreement", stats["top1_agreement"], y.numel())
        return terms
