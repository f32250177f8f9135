"""Multi-task loss of distilling step-by-step (Hsieh et al., 2023) for batches with a `task` tensor.

`RationaleCollator` marks every sequence with a task id (0 = label view, 1 = rationale view). The trainer then computes
its logit terms (CE, and KD when a teacher is set) once per task and combines them as

    loss = label_weight * L_label + rationale_weight * L_rationale
    L_task = (ce_weight * sum CE + kd_weight * T^2 * sum KD) / n_task

where the sums run over the task's supervised tokens (labels != -100) and `n_task` counts those tokens. Normalisation
is per task, not global: each task is a token mean of its own, as in the paper's weighted sum of the two task losses
(a global count would let the longer rationales outweigh the short labels). Under gradient accumulation `n_task`
counts the task's tokens in the whole accumulation window on all processes (`add_window_task_counts`, the per-task
analogue of transformers' `num_items_in_batch`), so 2 x 2 accumulation gives the gradients of one batch of 4. Other
loss terms (e.g. hidden-state hints) keep the global normalisation by `num_items_in_batch`.
"""

from collections.abc import Callable
from typing import Any

import torch

from .heads import IGNORE_INDEX, Head, supervised_mask


TASK_NAMES = ("label", "rationale")  # task id -> name, as RationaleCollator numbers them
TASK_COUNTS_KEY = "task_num_items"  # per-task supervised tokens of the accumulation window, shape (num tasks,)


def task_token_counts(
    labels: torch.Tensor, task: torch.Tensor, head: Head, shift_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Supervised tokens per task.

    Args:
        labels (`torch.Tensor`): `(B, T)`, -100 where nothing is supervised.
        task (`torch.Tensor`): `(B,)` task id of each row.
        shift_labels (`torch.Tensor`, *optional*): already-shifted labels `(B, T)`.

    Returns:
        `torch.Tensor` of shape `(len(TASK_NAMES),)`, int64.
    """
    per_row = supervised_mask(labels, head, shift_labels).sum(-1)  # (B,)
    return torch.stack([per_row[task == i].sum() for i in range(len(TASK_NAMES))])


def add_window_task_counts(batches: list[dict[str, Any]], head: Head, args: Any, accelerator: Any) -> None:
    """Store the per-task token counts of an accumulation window (all processes) in each of its batches."""
    if not batches or not all(isinstance(b, dict) and "task" in b and "labels" in b for b in batches):
        return
    counts = sum(task_token_counts(b["labels"], b["task"], head, b.get("shift_labels")) for b in batches)
    if args.average_tokens_across_devices and args.world_size > 1:
        counts = accelerator.gather(counts.to(accelerator.device)).view(-1, len(TASK_NAMES)).sum(0)
    for batch in batches:
        batch[TASK_COUNTS_KEY] = counts


def split_by_task(
    logit_terms: Callable[[Any, Any, dict[str, Any]], tuple[dict, dict, torch.Tensor]],
    outputs: Any,
    teacher_outputs: Any,
    inputs: dict[str, Any],
) -> tuple[dict, dict, torch.Tensor]:
    """Run `logit_terms` once per task with the other tasks' labels masked out.

    Returns:
        `(sums, weights, n_tokens)` with keys prefixed by the task name (`label_ce`, `rationale_kd`, ...).
    """
    task = inputs["task"]
    if task.dim() != 1 or task.shape[0] != inputs["labels"].shape[0]:
        raise ValueError(
            f"`task` must hold one id per row, shape ({inputs['labels'].shape[0]},); got {tuple(task.shape)}."
        )
    unknown = sorted(set(task.tolist()) - set(range(len(TASK_NAMES))))
    if unknown:
        raise ValueError(f"`task` ids must be in {dict(enumerate(TASK_NAMES))}, got {unknown}.")
    sums, weights, n_tokens = {}, {}, 0
    for task_id, name in enumerate(TASK_NAMES):
        other_rows = (task != task_id)[:, None]
        masked = {k: v for k, v in inputs.items() if k not in ("task", TASK_COUNTS_KEY)}
        for key in ("labels", "shift_labels"):
            if masked.get(key) is not None:
                masked[key] = masked[key].masked_fill(other_rows, IGNORE_INDEX)
        task_sums, task_weights, task_n = logit_terms(outputs, teacher_outputs, masked)
        sums.update({f"{name}_{k}": v for k, v in task_sums.items()})
        weights.update({f"{name}_{k}": v for k, v in task_weights.items()})
        n_tokens = n_tokens + task_n
    return sums, weights, n_tokens


def multitask_loss(
    trainer: Any,
    sums: dict[str, torch.Tensor],
    weights: dict[str, float],
    n_tokens: torch.Tensor,
    inputs: dict[str, Any],
    num_items_in_batch: Any = None,
) -> torch.Tensor:
    """`label_weight * L_label + rationale_weight * L_rationale` (+ other terms / num_items_in_batch) for one
    micro-batch, scaled for gradient accumulation; records `label_loss`, `rationale_loss` and per-term metrics.

    Args:
        sums (`dict`): summed terms from `split_by_task` (`label_ce`, `rationale_kd`, ...) plus any other terms.
        weights (`dict`): each term's factor inside its task loss (`ce_weight`, `kd_weight * T^2`).
        n_tokens (`torch.Tensor`): supervised tokens of the micro-batch (all tasks).
    """
    args = trainer.args
    task_weight = {"label": args.label_weight, "rationale": args.rationale_weight}
    local = task_token_counts(inputs["labels"], inputs["task"], trainer._head, inputs.get("shift_labels"))
    window = inputs.get(TASK_COUNTS_KEY)
    use_window = num_items_in_batch is not None and window is not None
    denominators = (window if use_window else local).to(n_tokens.device).clamp(min=1)
    loss = n_tokens.new_zeros((), dtype=torch.float32)
    reported = n_tokens.new_zeros((), dtype=torch.float32)  # the same loss normalised by this micro-batch alone
    per_term = {}
    for task_id, name in enumerate(TASK_NAMES):
        keys = [k for k in sums if k.startswith(f"{name}_")]
        task_sum = sum((weights[k] * sums[k] for k in keys), loss.new_zeros(()))
        loss = loss + task_weight[name] * task_sum / denominators[task_id]
        reported = reported + task_weight[name] * task_sum.detach() / local[task_id].clamp(min=1)
        trainer._record_sum(f"{name}_loss", task_sum.detach(), local[task_id])
        for key in keys:
            trainer._record_sum(f"{key}_loss", sums[key].detach(), local[task_id])
            term = key[len(name) + 1 :]
            per_term[term] = per_term.get(term, 0) + sums[key].detach()
    for term, value in per_term.items():  # ce_loss / kd_loss over both tasks, as for single-task batches
        trainer._record_sum(f"{term}_loss", value, n_tokens)
    others = [k for k in sums if not k.startswith(tuple(f"{name}_" for name in TASK_NAMES))]
    if others:
        other_sum = sum(weights[k] * sums[k] for k in others)
        total = num_items_in_batch if num_items_in_batch is not None else n_tokens
        loss = loss + other_sum / torch.as_tensor(total, device=other_sum.device).clamp(min=1)
        reported = reported + other_sum.detach() / n_tokens.clamp(min=1)
        for key in others:
            trainer._record_sum(f"{key}_loss", sums[key].detach(), n_tokens)
    trainer._record_sum("total_loss", reported, 1)
    if use_window and args.average_tokens_across_devices:
        loss = loss * trainer.accelerator.num_processes  # DDP averages gradients over processes
    return loss
