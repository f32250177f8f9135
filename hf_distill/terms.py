"""The supervised view of one micro-batch and the loss terms computed on it, with the one normaliser.

Every loss term is a scalar summed over supervised items (tokens, masked tokens or examples, see `heads.py`), with a
weight, so one micro-batch's loss is

    loss = sum_name weights[name] * sums[name] / n        (n: supervised items of the accumulation window)

and a teacher source, a feature term or a scheme only has to produce sums and weights. Batches with a `task` tensor
(distilling step-by-step) are normalised per task instead: each task's terms become a token mean of their own, and
`label_weight * L_label + rationale_weight * L_rationale` is taken (see `normalised_loss`).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .heads import IGNORE_INDEX, Head, aligned_labels, aligned_logits, kd_scale, supervised_mask


TASK_NAMES = ("label", "rationale")  # task id -> name, as RationaleCollator numbers them
TASK_COUNTS_KEY = "task_num_items"  # per-task supervised items of the accumulation window, shape (num tasks,)
__all__ = ["TASK_COUNTS_KEY", "TASK_NAMES", "LossTerms", "SupervisedView", "kd_scale", "normalised_loss"]


@dataclass
class SupervisedView:
    """What one micro-batch supervises, built once per batch.

    Attributes:
        labels (`torch.Tensor`): `(B, T)` (token heads) or `(B,)` (sequence heads), -100 where not supervised.
        head (`Head`): the student's head kind (`heads.detect_head`).
        shift_labels (`torch.Tensor`, *optional*): `(B, T)` already-shifted labels (padding-free batches).
        task (`torch.Tensor`, *optional*): `(B,)` task id of each row (distilling step-by-step), else None.
        window_task_counts (`torch.Tensor`, *optional*): `(len(TASK_NAMES),)` supervised items per task in the whole
            accumulation window on all processes (`add_window_task_counts`).
        batch (`dict`): the whole batch (a teacher source may read its own keys, e.g. cache entries).
    """

    labels: torch.Tensor
    head: Head
    shift_labels: torch.Tensor | None = None
    task: torch.Tensor | None = None
    window_task_counts: torch.Tensor | None = None
    batch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_batch(cls, batch: dict[str, Any], head: Head) -> "SupervisedView":
        """The view of a collated batch (`labels`, optional `shift_labels` / `task` / `TASK_COUNTS_KEY`)."""
        task = batch.get("task")
        if task is not None and (task.dim() != 1 or task.shape[0] != batch["labels"].shape[0]):
            raise ValueError(
                f"`task` must hold one id per row, shape ({batch['labels'].shape[0]},); got {tuple(task.shape)}."
            )
        if task is not None:
            unknown = sorted(set(task.tolist()) - set(range(len(TASK_NAMES))))
            if unknown:
                raise ValueError(f"`task` ids must be in {dict(enumerate(TASK_NAMES))}, got {unknown}.")
        return cls(batch["labels"], head, batch.get("shift_labels"), task, batch.get(TASK_COUNTS_KEY), batch)

    @property
    def mask(self) -> torch.Tensor:
        """`(B, T')` bool: supervised positions of the aligned logits (`T' = T - 1` for shifted causal heads)."""
        return supervised_mask(self.labels, self.head, self.shift_labels)

    @property
    def n_items(self) -> torch.Tensor:
        """Scalar int64 tensor: the number of supervised items of this view."""
        return self.mask.sum()

    def rows(self, logits: torch.Tensor) -> torch.Tensor:
        """`(B, T, V)` (or `(B, C)`) logits or hidden states -> `(N, V)` rows of the supervised positions."""
        return aligned_logits(logits, self.head, self.shift_labels)[self.mask]

    def targets(self) -> torch.Tensor:
        """`(N,)` labels of the supervised positions (int64; float for regression heads)."""
        y = aligned_labels(self.labels, self.head, self.shift_labels)[self.mask]
        return y if self.head.regression else y.long()

    def task_counts(self) -> torch.Tensor:
        """`(len(TASK_NAMES),)` int64: supervised items of each task in this micro-batch."""
        per_row = self.mask.reshape(self.mask.shape[0], -1).sum(-1)  # (B,)
        return torch.stack([per_row[self.task == i].sum() for i in range(len(TASK_NAMES))])

    def per_task(self) -> Iterator[tuple[str, "SupervisedView"]]:
        """`(task name, view with the other tasks' labels set to -100)` for each task."""
        for task_id, name in enumerate(TASK_NAMES):
            other_rows = (self.task != task_id).view(-1, *([1] * (self.labels.dim() - 1)))
            shift = self.shift_labels.masked_fill(other_rows, IGNORE_INDEX) if self.shift_labels is not None else None
            yield name, SupervisedView(self.labels.masked_fill(other_rows, IGNORE_INDEX), self.head, shift, None, None,
                                       self.batch)  # fmt: skip


@dataclass
class LossTerms:
    """Summed loss terms of one (view of a) micro-batch.

    Attributes:
        sums (`dict[str, torch.Tensor]`): scalar sums over the supervised items (`kd`, `ce`, `hint`, ...).
        weights (`dict[str, float]`): each term's factor in the loss.
        n_items (`torch.Tensor`): scalar, the supervised items the sums run over.
        metrics (`dict[str, tuple]`): `name -> (value summed over items, item count)`, logged as value / count over
            all processes (for example `top1_agreement`).
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    n_items: torch.Tensor | int = 0
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor | int]] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, weight: float) -> "LossTerms":
        """Add one summed term with its weight (returns self)."""
        self.sums[name], self.weights[name] = value, weight
        return self

    def metric(self, name: str, value: torch.Tensor, count: torch.Tensor | int) -> "LossTerms":
        """Add one metric, summed over `count` items (returns self)."""
        self.metrics[name] = (value, count)
        return self

    def update(self, other: "LossTerms", prefix: str = "") -> "LossTerms":
        """Merge `other`'s terms and metrics into self, names prefixed by `prefix` (returns self). Item counts are
        not added: `other` is expected to run over (a subset of) the same items."""
        self.sums.update({prefix + k: v for k, v in other.sums.items()})
        self.weights.update({prefix + k: v for k, v in other.weights.items()})
        self.metrics.update({prefix + k: v for k, v in other.metrics.items()})
        return self

    def total(self) -> torch.Tensor:
        """`sum_name weights[name] * sums[name]` (a scalar)."""
        return sum(self.weights[k] * v for k, v in self.sums.items())


def terms_per_task(compute: Callable[[SupervisedView], LossTerms], view: SupervisedView) -> LossTerms:
    """`compute` once per task view. Terms are prefixed by the task name (`label_ce`, `rationale_kd`, ...); metrics
    keep their names and add up over the tasks (values and counts); the item count is the batch's."""
    out = LossTerms(n_items=view.n_items)
    for name, task_view in view.per_task():
        task_terms = compute(task_view)
        out.sums.update({f"{name}_{k}": v for k, v in task_terms.sums.items()})
        out.weights.update({f"{name}_{k}": v for k, v in task_terms.weights.items()})
        for key, (value, count) in task_terms.metrics.items():
            old_value, old_count = out.metrics.get(key, (0, 0))
            out.metrics[key] = (old_value + value, old_count + count)
    return out


def add_window_task_counts(batches: list[dict[str, Any]], head: Head, args: Any, accelerator: Any) -> None:
    """Store the per-task item counts of an accumulation window (all processes) in each of its batches under
    `TASK_COUNTS_KEY` (the per-task analogue of transformers' `num_items_in_batch`)."""
    if not batches or not all(isinstance(b, dict) and "task" in b and "labels" in b for b in batches):
        return
    counts = sum(SupervisedView.from_batch(b, head).task_counts() for b in batches)
    if args.average_tokens_across_devices and args.world_size > 1:
        counts = accelerator.gather(counts.to(accelerator.device)).view(-1, len(TASK_NAMES)).sum(0)
    for batch in batches:
        batch[TASK_COUNTS_KEY] = counts


def normalised_loss(
    terms: LossTerms,
    view: SupervisedView,
    args: Any,
    num_items_in_batch: Any = None,
    num_processes: int = 1,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, Any]]]:
    """The micro-batch's loss, scaled for gradient accumulation and DDP, and the metrics to log.

    Global: `terms.total() / num_items_in_batch` (the window's supervised items on all processes; this micro-batch's
    own `n_items` when None), times `num_processes` when `average_tokens_across_devices` (DDP averages gradients).
    Per task (`view.task` set): `label_weight * L_label + rationale_weight * L_rationale` with `L_task` the task's
    terms (`label_*`, `rationale_*`) over the task's items in the window, plus the other terms over
    `num_items_in_batch`.

    Returns:
        `(loss, metrics)`: `loss` a scalar tensor; `metrics[name] = (summed value, count)`: `<term>_loss` for every
        term, `total_loss`, and for per-task batches `label_loss` / `rationale_loss`.
    """
    n = torch.as_tensor(terms.n_items)
    metrics: dict[str, tuple[torch.Tensor, Any]] = dict(terms.metrics)
    if view.task is None:
        total = terms.total()
        for name, value in terms.sums.items():
            metrics[f"{name}_loss"] = (value.detach(), n)
        metrics["total_loss"] = (total.detach(), n)
        denominator = n if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
        if num_items_in_batch is not None and args.average_tokens_across_devices:
            loss = loss * num_processes
        return loss, metrics
    task_weight = {"label": args.label_weight, "rationale": args.rationale_weight}
    local = view.task_counts()
    window = view.window_task_counts
    use_window = num_items_in_batch is not None and window is not None
    denominators = (window if use_window else local).to(n.device).clamp(min=1)
    loss = torch.zeros((), dtype=torch.float32, device=n.device)
    reported = torch.zeros((), dtype=torch.float32, device=n.device)  # the loss over this micro-batch alone
    per_term: dict[str, torch.Tensor] = {}
    prefixes = tuple(f"{name}_" for name in TASK_NAMES)
    for task_id, name in enumerate(TASK_NAMES):
        keys = [k for k in terms.sums if k.startswith(f"{name}_")]
        task_sum = sum((terms.weights[k] * terms.sums[k] for k in keys), loss.new_zeros(()))
        loss = loss + task_weight[name] * task_sum / denominators[task_id]
        reported = reported + task_weight[name] * task_sum.detach() / local[task_id].clamp(min=1)
        metrics[f"{name}_loss"] = (task_sum.detach(), local[task_id])
        for key in keys:
            metrics[f"{key}_loss"] = (terms.sums[key].detach(), local[task_id])
            term = key[len(name) + 1 :]
            per_term[term] = per_term.get(term, 0) + terms.sums[key].detach()
    for term, value in per_term.items():  # ce_loss / kd_loss over both tasks, as for single-task batches
        metrics[f"{term}_loss"] = (value, n)
    others = [k for k in terms.sums if not k.startswith(prefixes)]
    if others:
        other_sum = sum(terms.weights[k] * terms.sums[k] for k in others)
        total = num_items_in_batch if num_items_in_batch is not None else n
        loss = loss + other_sum / torch.as_tensor(total, device=other_sum.device).clamp(min=1)
        reported = reported + other_sum.detach() / n.clamp(min=1)
        for key in others:
            metrics[f"{key}_loss"] = (terms.sums[key].detach(), n)
    metrics["total_loss"] = (reported, 1)
    if use_window and args.average_tokens_across_devices:
        loss = loss * num_processes
    return loss, metrics
