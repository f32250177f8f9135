"""Run-time checks that warn instead of failing: a KD term that is zero from the first step, and mixed-precision
settings of the training config that disagree with the accelerate config the run was launched with."""

import logging
import math
import os
from typing import Any

import torch
import transformers.utils.logging  # noqa: F401  (adds `warning_once` to every logger: one message, logged once)
from torch import nn


logger = logging.getLogger(__name__)

ZERO_KD_CAUSES = (
    "Likely causes: (1) the teacher has the student's weights (the student is a full copy of the teacher, or both "
    "were loaded from the same checkpoint); (2) a LoRA student on top of the teacher's weights: LoRA's B matrices "
    "start at zero, so the KD term starts at 0 and only grows as the adapters train (expected for self-distillation "
    "from the base model); (3) a teacher PeftModel whose adapter is disabled, zero-initialised or never loaded, so "
    "it equals a student built from the same base; (4) teacher_model_name_or_path names the student's own checkpoint."
)


def kd_signal_problem(
    kd_sum: torch.Tensor,
    n_tokens: int,
    student: nn.Module,
    teacher: nn.Module,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> str | None:
    """Why a KD term carries no signal, or None when it does.

    Args:
        kd_sum (`torch.Tensor`): the KD divergence summed over the supervised positions (scalar).
        n_tokens (`int`): the number N of supervised positions.
        student (`nn.Module`), teacher (`nn.Module`): the two models; the same object is intended self-KD (no problem).
        student_logits (`torch.Tensor`, *optional*): supervised positions of the student, shape `(N, V)`.
        teacher_logits (`torch.Tensor`, *optional*): the teacher's at the same positions, shape `(N, V)` (the
            chunked loss has no logits: then only `kd_sum` is looked at).

    Returns:
        `str` or `None`: a message naming the likely causes.
    """
    if student is teacher:
        return None
    if n_tokens == 0:
        return (
            "The first training batch has no supervised tokens (every label is -100), so the KD and CE terms are 0. "
            "Check the collator (labels = -100 only on prompt and padding), `completion_only_loss` / "
            "`assistant_only_loss` with data that has completions / assistant turns, and that `max_length` does not "
            "truncate the completions away."
        )
    if student_logits is not None and teacher_logits is not None and torch.equal(student_logits, teacher_logits):
        return f"The student's logits equal the teacher's on the first step, so the KD term is 0. {ZERO_KD_CAUSES}"
    if kd_sum.item() == 0.0:
        return f"The KD term is exactly 0 on the first step (same distributions as the teacher). {ZERO_KD_CAUSES}"
    return None


def check_first_step_kd(
    trainer: Any,
    kd_sum: torch.Tensor,
    n_tokens: int,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> str | None:
    """Called by the trainer with each KD term; on the first training call only, logs `kd_signal_problem`'s
    warning (once per process) and returns it. Later calls, and evaluation, return None at once.

    Args:
        trainer (`DistillationMixin`): reads `model` (the student) and `teacher`; its public `kd_signal_checked` flag
            is set after the first training call.
        kd_sum, n_tokens, student_logits, teacher_logits: as in `kd_signal_problem`.
    """
    if getattr(trainer, "kd_signal_checked", False) or not trainer.model.training:
        return None
    trainer.kd_signal_checked = True
    problem = kd_signal_problem(kd_sum, n_tokens, trainer.model, trainer.teacher, student_logits, teacher_logits)
    if problem is not None:
        logger.warning_once(problem)
    return problem


def nonfinite_teacher_problem(teacher_outputs: Any, teacher: nn.Module | None = None) -> str | None:
    """Why the teacher's outputs for a batch cannot be distilled (NaN / inf values), or None when they are finite.

    Args:
        teacher_outputs: a model output (its `logits`, `last_hidden_state` and last `hidden_states` are checked: the
            logits `(B, T, V)` on the materialised path, the final hidden states `(B, T, H)` on the fused one), or a
            list of them (several teachers).
        teacher (`nn.Module`, *optional*): the teacher, to name its dtype in the message.

    Returns:
        `str` or `None`: what is non-finite and the likely cause.
    """
    outputs = teacher_outputs if isinstance(teacher_outputs, list | tuple) else [teacher_outputs]
    for index, output in enumerate(outputs):
        hidden = getattr(output, "hidden_states", None)
        named = {
            "logits": getattr(output, "logits", None),
            "last_hidden_state": getattr(output, "last_hidden_state", None),
            "hidden_states[-1]": hidden[-1] if hidden else None,
        }
        for name, tensor in named.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                continue
            bad = ~torch.isfinite(tensor)
            if bad.any():
                which = f"teacher {index}'s" if len(outputs) > 1 else "the teacher's"
                dtype = next(teacher.parameters()).dtype if teacher is not None else tensor.dtype
                hint = (
                    "float16 overflows above 65504: load the teacher in bfloat16 or float32 "
                    "(`teacher_model_init_kwargs: {dtype: bfloat16}`)"
                    if dtype == torch.float16
                    else "check the teacher's weights and inputs (a NaN in its checkpoint, an overflowing layer)"
                )
                return (
                    f"{int(bad.sum())} of {tensor.numel()} values of {which} `{name}` (shape {tuple(tensor.shape)}, "
                    f"dtype {tensor.dtype}; teacher weights in {dtype}) are NaN or inf. Likely cause: {hint}."
                )
    return None


def low_precision_weights_problem(model: nn.Module) -> str | None:
    """A message when the student's trainable weights are bfloat16/float16 themselves (e.g. loaded with
    `dtype=bfloat16`): with no float32 master copy, updates smaller than the weight's rounding step are lost (bf16
    keeps 8 bits of mantissa, so an update below ~1/256 of a weight vanishes), and the run quietly trains less. None
    when they are float32 (`bf16=True` mixed precision keeps them so, as in transformers).

    Args:
        model (`nn.Module`): the student (its parameters with `requires_grad`; a PEFT model's adapters).
    """
    low = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            low.setdefault(parameter.dtype, []).append(name)
    if not low:
        return None
    dtype, names = next(iter(low.items()))
    return (
        f"{sum(len(v) for v in low.values())} trainable student weights are {str(dtype).removeprefix('torch.')} "
        f"(e.g. `{names[0]}`), with no float32 master copy: updates smaller than a weight's rounding step are lost. "
        "Load the student in float32 (`dtype: float32`) and set `bf16: true`: mixed precision computes in bfloat16 "
        "and keeps float32 weights."
    )


def check_rows_left(split: str, before: int | None, after: int | None, args: Any) -> None:
    """Refuse a dataset left with no rows, and warn with the count when preparation dropped some: TRL drops rows
    whose supervised tokens were all cut by `max_length` (a prompt as long as `max_length` leaves no completion).

    Args:
        split (`str`): "train" or "eval". before / after (`int` or `None`): rows given and rows left after the
            trainer prepared the dataset (None: unsized, e.g. an iterable dataset, not checked).
        args: the training config (its `max_length`, when it has one, is named in the message).

    Raises:
        ValueError: no rows left, naming how many were given and why they went.
    """
    if before is None or after is None:
        return
    max_length = getattr(args, "max_length", None)
    if before == 0:
        raise ValueError(f"The {split} dataset has no rows. Point to a dataset with data (or check its split/filter).")
    if after == 0:
        raise ValueError(
            f"Nothing to train on in the {split} dataset: all {before} rows were dropped while preparing it, because "
            f"no supervised (completion / assistant) token is left within max_length={max_length}: the prompts fill "
            "it. Raise `max_length` or shorten the prompts."
        )
    if after < before and split == "train":
        logger.warning(
            "%d of %d %s rows were dropped while preparing the dataset: their supervised tokens were cut by "
            "max_length=%s. Raise `max_length` to keep them.",
            before - after,
            before,
            split,
            max_length,
        )


def nonfinite_loss_problem(sums: dict[str, torch.Tensor], weights: dict[str, float], model: nn.Module) -> str | None:
    """Why a micro-batch's loss is NaN / inf, naming the non-finite terms and the likely cause; None when finite.

    Args:
        sums (`dict[str, Tensor]`): each loss term's scalar sum over the supervised items (`LossTerms.sums`).
        weights (`dict[str, float]`): each term's weight (`LossTerms.weights`); a term of weight 0 still counts, since
            `0 * inf` is NaN.
        model (`nn.Module`): the student, checked for non-finite weights (a previous step already corrupted them).

    Returns:
        `str` or `None`.
    """
    values = {name: float(value.detach().float()) for name, value in sums.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if not bad:
        return None
    named = ", ".join(f"{name}={value} (weight {weights.get(name)})" for name, value in bad.items())
    corrupted = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if corrupted:
        cause = (
            f"{len(corrupted)} student parameters already hold NaN/inf (e.g. `{corrupted[0]}`): a previous step "
            "diverged; lower the learning rate or set `max_grad_norm`, and resume from the last finite checkpoint"
        )
    elif next(model.parameters()).dtype == torch.float16:
        cause = "the student's float16 logits overflow; train in bfloat16 or float32"
    else:
        cause = (
            "the student's outputs overflow for this batch, or a loss setting is extreme (temperature, divergence "
            "exponents); the finite terms were "
            + (", ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in bad) or "none")
        )
    return f"Non-finite loss terms: {named}. Likely cause: {cause}."


def mixed_precision_mismatch(args: Any, launcher_precision: str | None = None) -> str | None:
    """A message when the training config's `bf16`/`fp16` disagrees with the accelerate config's mixed precision.

    `accelerate launch` exports the config's `mixed_precision` as `ACCELERATE_MIXED_PRECISION`; transformers then lets
    `bf16=True` / `fp16=True` of the training config win without a word.

    Args:
        args (`TrainingArguments`): the training config.
        launcher_precision (`str`, *optional*): defaults to the `ACCELERATE_MIXED_PRECISION` environment variable;
            nothing to compare (None) outside `accelerate launch`.
    """
    launcher = launcher_precision if launcher_precision is not None else os.environ.get("ACCELERATE_MIXED_PRECISION")
    requested = "fp16" if getattr(args, "fp16", False) else "bf16" if getattr(args, "bf16", False) else None
    if launcher is None or requested is None or launcher.lower() == requested:
        return None
    return (
        f"Mixed precision disagrees: the accelerate config says mixed_precision={launcher.lower()!r} but the training "
        f"config sets {requested}=True, and the training config wins, so this run uses {requested}. Make them agree "
        f"(`mixed_precision: {requested}` in the accelerate config, or `{requested}: false` in the recipe)."
    )


def warn_mixed_precision_mismatch(args: Any) -> str | None:
    """Log `mixed_precision_mismatch(args)` once, from the main process only; returns the message."""
    problem = mixed_precision_mismatch(args)
    if problem is not None and getattr(args, "process_index", 0) == 0:
        logger.warning_once(problem)
    return problem


def warn_if_too_long(length: int, models: dict[str, nn.Module | None]) -> str | None:
    """Warn once (and return the message) when a batch of `length` positions is longer than a model's
    `max_position_embeddings` (`max_length` not set); `models` maps a role ("student", "teacher") to the unwrapped
    model, or None."""
    for name, model in models.items():
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", 0) if model is not None else 0
        if isinstance(limit, int) and 0 < limit < length:
            message = (
                f"A batch has sequences of {length} positions, more than the {name}'s max_position_embeddings "
                f"({limit}): positions beyond it are outside what the model was trained for. Set `max_length` "
                f"(<= {limit}) to truncate rows."
            )
            logger.warning_once(message)
            return message
    return None
