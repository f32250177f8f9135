"""A live teacher model run next to the student on every batch: dense logits, or the fused chunked loss.

- `LiveTeacher`: the teacher's `[B, T, V]` logits, and any `kd_loss` divergence on any head (`heads.logit_terms`).
- `FusedLiveTeacher`: causal LMs with plain lm_heads only. Both models return final hidden states and the KD and CE
  sums are computed chunk by chunk from hidden states and lm_head weights (`losses.fused`), so the full
  `[N, V]` logits are never held. The student's forward keeps one position's logits (`logits_to_keep=1`), the teacher
  runs its base model alone (no lm_head) unless the feature terms need its full outputs.
"""

from typing import Any

from torch import nn

from ..heads import decoder_of, fused_head_loss, lm_head_of, logit_terms
from ..terms import LossTerms, SupervisedView, kd_scale
from .base import SourceContext, TeacherSource, teacher_forward


FUSED_FORWARD_KWARGS = {"output_hidden_states": True, "logits_to_keep": 1}


class LiveTeacher(TeacherSource):
    """One live teacher model; KD on materialised logits."""

    name = "live"

    def __init__(self, context: SourceContext, teacher: nn.Module):
        super().__init__(context)
        self.models = [teacher]

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        return teacher_forward(self.model, model_inputs, **(self.context.feature_kwargs or {}))

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        ctx = self.context
        out = logit_terms(student_outputs.logits, teacher_outputs.logits, view.labels, view.head, ctx.args,
                          ctx.vocab_size, view.shift_labels)  # fmt: skip
        terms = LossTerms(out.sums, out.weights, out.n_items)
        if out.agreement is not None:
            terms.metric("top1_agreement", *out.agreement)
        return terms


def fused_unsupported_reason(context: SourceContext, teacher: nn.Module, sharded: bool) -> str | None:
    """Why the fused loss cannot reproduce both models' logits here, or None when it can."""
    if context.head.kind != "causal_lm":
        return f"the student is a {context.head.kind} model"
    if sharded:
        return "FSDP/DeepSpeed shard the lm_head weights outside forward"
    if lm_head_of(context.student) is None or lm_head_of(teacher) is None:
        return "the student's or teacher's logits are not a plain lm_head of the last hidden state"
    return None


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
        kd, ce = fused_head_loss(view.rows(student_outputs.hidden_states[-1]), s_head, view.rows(t_last), t_head, args,
                                 self.context.vocab_size, y, stats, (weights["kd"], weights["ce"]))  # fmt: skip
        terms = LossTerms({"kd": kd, "ce": ce}, weights, y.new_tensor(y.numel()))
        if "top1_agreement" in stats:
            terms.metric("top1_agreement", stats["top1_agreement"], y.numel())
        return terms
