"""Self-distillation with a mean teacher: the teacher is an exponential moving average of the student (Tarvainen and
Valpola 2017; as a distillation teacher e.g. in DINO and BYOL).

With no teacher given and `teacher_ema_decay` set, the teacher is a frozen deep copy of the student taken when the
trainer is built, moved after every optimizer step by

    ema = decay * ema + (1 - decay) * student          (every parameter and saved float buffer)

The update reads only the student's weights, which are identical on every process (DDP), so the EMA is too. It is a
live model with the student's lm_head, so the dense and fused KD paths of `teachers.live` apply unchanged.

`EMACallback` does the update (`on_step_end`) and writes `checkpoint-N/ema_teacher.safetensors` before the
Trainer writes that checkpoint's `trainer_state.json` (so a checkpoint the Trainer finished holds the EMA); a
resumed run restores it bit-exactly with `EMATeacher.load_checkpoint(folder)`. The EMA is never exported: `save_model`
writes the student only.
"""

import copy
import logging
import os
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..checkpoints import CheckpointFileCallback, load_checkpoint_tensors, save_checkpoint_tensors
from ..heads import unwrap
from ..model_card import CardTeacher
from ..terms import LossTerms, SupervisedView
from .base import SourceContext, SourceRequest, TeacherSource, context_requested, refuse_features
from .live import FusedLiveTeacher, LiveTeacher, use_fused_loss


logger = logging.getLogger(__name__)

EMA_FILENAME = "ema_teacher.safetensors"


@torch.no_grad()
def ema_update_(ema: nn.Module, student: nn.Module, decay: float) -> None:
    """`ema = decay * ema + (1 - decay) * student`, in place, for every parameter and saved floating-point buffer.

    Args:
        ema (`nn.Module`): the moving average, same architecture (parameter and buffer names) as `student`.
        student (`nn.Module`): the trained model (DDP / PEFT wrappers are looked through).
        decay (`float`): in (0, 1).

    Each tensor is updated as `ema.mul_(decay).add_(student, alpha=1 - decay)` in the EMA's own dtype. Integer
    buffers and buffers outside the state dict (e.g. rotary `inv_freq`, rebuilt from the config on load) are copied,
    so a resumed EMA holds exactly what the uninterrupted one does.
    """
    student, ema = unwrap(student), unwrap(ema)
    source = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    saved = set(ema.state_dict())
    targets = {**dict(ema.named_parameters()), **dict(ema.named_buffers())}
    missing = sorted(set(targets) - set(source))
    if missing:
        raise ValueError(f"The EMA teacher has tensors the student lacks: {missing[:5]}; it must be a copy of it.")
    seen: set[int] = set()
    for name, target in targets.items():
        if id(target) in seen:  # tied weights: one tensor, updated once
            continue
        seen.add(id(target))
        value = source[name].detach()
        if value.shape != target.shape or type(value).__name__ == "DTensor":
            raise ValueError(
                f"The EMA teacher needs the student's full weights on every process, but `{name}` is sharded here "
                f"({type(value).__name__} of shape {tuple(value.shape)}, the EMA's is {tuple(target.shape)}), as "
                "FSDP and DeepSpeed ZeRO-3 shard them. Train with `teacher_ema_decay` under DDP or ZeRO-1/2."
            )
        value = value.to(device=target.device, dtype=target.dtype)
        if target.is_floating_point() and name in saved:
            target.mul_(decay).add_(value, alpha=1.0 - decay)
        else:
            target.copy_(value)


HALF = (torch.float16, torch.bfloat16)


def ema_copy(student: nn.Module) -> nn.Module:
    """A frozen deep copy of the (unwrapped) student in eval mode: the EMA teacher's starting point.

    Instance-level `forward` overrides are dropped from the copy, so it runs its class's forward on its own weights: a
    wrapper installed on the student's instance (e.g. by a trainer or accelerate) closes over the student's bound
    `forward`, which `deepcopy` keeps, so the copy would silently compute the student's outputs.

    A student with float16 / bfloat16 weights gets a float32 EMA: in half precision `decay * ema + (1 - decay) *
    student` rounds back to `ema` for most weights once `1 - decay` is small (bfloat16 keeps 8 bits: with decay
    0.999 a weight moves only when the student differs from it by more than about 40%), so the average would not
    move. It costs twice the student's memory for the copy."""
    model = copy.deepcopy(unwrap(student))
    for module in model.modules():
        module.__dict__.pop("forward", None)
    if any(p.dtype in HALF for p in model.parameters()):
        logger.info("EMA teacher: float32 copy of a half-precision student (half-precision averages would not move).")
        model = model.float()
    return model.eval().requires_grad_(False)


class EMATeacher(TeacherSource):
    """The moving average of the student as the teacher; dense (`LiveTeacher`) or fused (`FusedLiveTeacher`) KD.

    Args:
        context (`SourceContext`): the run (config with `teacher_ema_decay`, head, student).
        fused (`bool`, *optional*): the chunked hidden-state loss; default: `args.use_fused_kd_loss` where
            `live.fused_unsupported_reason` finds nothing against it.
        sharded (`bool`): FSDP / DeepSpeed (no fused loss, see `live.fused_unsupported_reason`).

    Attributes:
        decay (`float`): `args.teacher_ema_decay`.
        models (`list[nn.Module]`): `[the EMA model]`.
    """

    kind = "ema"
    name = "ema"
    starts_as_student = True  # KD is exactly 0 on the first step by construction (no "dead KD" warning)

    def __init__(self, context: SourceContext, fused: bool | None = None, sharded: bool | None = None):
        super().__init__(context)
        self.decay = context.args.teacher_ema_decay
        if self.decay is None or not 0.0 < self.decay < 1.0:
            raise ValueError(f"EMATeacher needs `teacher_ema_decay` in (0, 1), got {self.decay}.")
        if not context.args.kd_weight:
            raise ValueError(
                "`teacher_ema_decay` is set but `kd_weight` is 0, so the EMA teacher would teach nothing; set "
                "`kd_weight` > 0 (e.g. 0.5), or remove `teacher_ema_decay` to train on the labels alone."
            )
        model = ema_copy(context.student)
        if fused is None:
            if sharded is not None:
                context = replace(context, sharded=sharded)
            fused = use_fused_loss(context, model, "EMA teacher: ")
        self.inner = (FusedLiveTeacher if fused else LiveTeacher)(context, model)
        self.fused = fused
        self.name = "ema-fused" if fused else "ema"
        self.models = [model]

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        """Asked for by `teacher_ema_decay` (no other teacher; with a system prompt / context column or `self`, the
        context source runs the EMA: `context.ContextTeacher`)."""
        return request.args.teacher_ema_decay is not None and not context_requested(request)

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "`teacher_ema_decay` (the teacher is an EMA of the student)"

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        refuse_features(request, "an EMA teacher (a copy of the student, run for its logits only)")
        if request.args.seq_kd:
            raise ValueError(
                "`seq_kd` replaces completions by a teacher's generations, and `teacher_ema_decay` gives no teacher "
                "to generate them: give a teacher, or use `lmbda` for on-policy samples of the student."
            )

    # ------------------------------------------------------------------------------------------- the source
    def student_forward_kwargs(self) -> dict[str, Any]:
        return self.inner.student_forward_kwargs()

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        return self.inner.outputs(model_inputs, batch)

    def terms(self, student_outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        return self.inner.terms(student_outputs, teacher_outputs, view)

    def card_teacher(self) -> CardTeacher:
        """The moving average of the student itself: no teacher model, so no `base_model` from it."""
        return CardTeacher(
            f"an exponential moving average of the student itself (`teacher_ema_decay: {self.decay}`, a mean "
            "teacher): self-distillation, no separate teacher model"
        )

    # ------------------------------------------------------------------------------------------- training state
    def update(self) -> None:
        """One EMA step from the student's current weights (after an optimizer step)."""
        ema_update_(self.model, self.context.student, self.decay)

    def callbacks(self) -> list[TrainerCallback]:
        """The callbacks the trainer adds: the EMA update after each optimizer step and its checkpoint file."""
        return [EMACallback(self)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA's tensors (CPU, contiguous, tied weights as separate copies)."""
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, folder: str | os.PathLike) -> str:
        """Write `folder/ema_teacher.safetensors` (bit-exact) and return its path."""
        return save_checkpoint_tensors(folder, EMA_FILENAME, self.state_dict(), {"decay": repr(self.decay)})

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore the EMA from `folder/ema_teacher.safetensors` (raises when absent or of another model)."""
        state, metadata = load_checkpoint_tensors(
            folder,
            EMA_FILENAME,
            self.model.state_dict(),
            what="an EMA of this student",
            missing="the checkpoint was saved without an EMA teacher, so a run with `teacher_ema_decay` cannot resume "
            "from it (its teacher would restart from the current student).",
            fix="resume with the student the checkpoint was saved with.",
        )
        saved_decay = metadata.get("decay")
        if saved_decay is not None and saved_decay != repr(self.decay):
            logger.warning("%s was written with teacher_ema_decay=%s; resuming with %s.", EMA_FILENAME, saved_decay,
                           self.decay)  # fmt: skip
        self.model.load_state_dict(state)


class EMACallback(CheckpointFileCallback):
    """Moves the EMA teacher after every optimizer step and writes it into each checkpoint folder, before the
    checkpoint's `trainer_state.json` (`checkpoints.CheckpointFileCallback`).

    Args:
        source (`EMATeacher`): the source whose model is updated.
    """

    def __init__(self, source: EMATeacher):
        self.source = source

    def write(self, folder: str) -> None:
        self.source.save_checkpoint(folder)

    def on_step_end(self, args, state, control, **kwargs):
        self.source.update()  # before this step's save, so its checkpoint holds this step's EMA
