"""The supervised view of one micro-batch and the loss terms computed on it, with the one normaliser.

Every loss term is a scalar summed over supervised items (tokens, masked tokens or examples, see `heads.py`), with a
weight, so one micro-batch's loss is

    loss = sum_name weights[name] * sums[name] / n        (n: supervised items of the accumulation window)

and a teacher source, a feature term or a scheme only has to produce sums and weights. Batches with a `task` tensor
(distilling step-by-step) are normalised per task instead: each task's terms become a token mean of their own, and
`label_weight * L_label + rationale_weight * L_rationale` is taken (see `normalised_loss`).

`SupervisedView` is the one vocabulary for supervised positions, for every head (`heads.py` table): which positions
count (`mask`), their rows of any `(B, T, ...)` tensor (`rows`), their targets (`targets`), student/teacher logit
pairs (`pair`). Every teacher source and feature term reads it; nothing derives the positions a second time.
The logit terms every source builds on (`logit_terms`, `fused_head_loss`, `hard_loss`) and the two factors written
once (`kd_scale`, `divergence_kwargs`) live here too. `LossState` is the training state the loss reads (TAID's t),
handed by the trainer with each batch's view.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .heads import Head, LMHead
from .losses import IGNORE_INDEX, fused_logit_distillation_loss, logit_divergence


TASK_NAMES = ("label", "rationale")  # task id -> name, as RationaleCollator numbers them
TASK_COUNTS_KEY = "task_num_items"  # per-task supervised items of the accumulation window, shape (num tasks,)
__all__ = [
    "TASK_COUNTS_KEY",
    "TASK_NAMES",
    "LossState",
    "LossTerms",
    "SupervisedView",
    "divergence_kwargs",
    "fused_head_loss",
    "hard_loss",
    "kd_scale",
    "logit_terms",
    "normalised_loss",
]


@dataclass(frozen=True)
class LossState:
    """Training state the loss reads, handed by the trainer with each batch's view (never a config attribute).

    Attributes:
        taid_t (`float`, *optional*): TAID's current interpolation t (`hf_distill.taid.TaidCallback`); None before
            the callback runs (then `taid_t_start`).
    """

    taid_t: float | None = None


def divergence_kwargs(args: Any, state: LossState | None = None) -> dict[str, Any]:
    """The keyword arguments of the logit divergences (dense, sparse, fused) for `args.kd_loss`: `loss_type`,
    `temperature`, `beta`, `skew_alpha`, and the fields of the chosen divergence only (`taid_t` from `state`, else
    `taid_t_start`; `ab_alpha` / `ab_beta`; `akl_mu`).

    Args:
        args: a `DistillationArguments` (or any object with those fields).
        state (`LossState`, *optional*): the trainer's loss state for this batch.
    """
    kwargs = {"loss_type": args.kd_loss, "temperature": args.temperature, "beta": args.beta,
              "skew_alpha": args.skew_alpha}  # fmt: skip
    if args.kd_loss == "taid":
        kwargs["taid_t"] = state.taid_t if state is not None and state.taid_t is not None else args.taid_t_start
    elif args.kd_loss == "ab_divergence":
        kwargs.update(ab_alpha=args.ab_alpha, ab_beta=args.ab_beta)
    elif args.kd_loss == "akl":
        kwargs["akl_mu"] = args.akl_mu
    return kwargs


def kd_scale(args: Any, head: Head | None = None) -> float:
    """The weight of a summed KD divergence: `kd_weight * T^2` (Hinton et al. 2015: gradients of tempered softmaxes
    shrink by 1 / T^2), or `kd_weight` for regression heads, whose KD term is a squared error. The one place this
    factor is written."""
    if head is not None and head.regression:
        return args.kd_weight
    return args.kd_weight * args.temperature**2


def _check_labels(labels: torch.Tensor, head: Head) -> None:
    if head.kind == "sequence_classification" and not head.regression and labels.ndim != 1:
        raise ValueError(
            f"Sequence-classification labels must be class ids of shape (B,), got shape {tuple(labels.shape)}; "
            "multi-label targets (B, C) are not supported."
        )
    if head.kind == "token_classification" and labels.ndim != 2:
        raise ValueError(f"Token-classification labels must have shape (B, T), got {tuple(labels.shape)}.")


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
        state (`LossState`): the trainer's loss state for this batch (TAID's t).
        teacher_labels (`torch.Tensor`, *optional*): `(B, T_t)` labels of the teacher's own rows when the teacher reads
            other tokens than the student (context distillation: another prompt, the same completion); its supervised
            positions are the student's, row by row in the same order (`with_teacher_labels`). None: the teacher's
            positions are the student's.
    """

    labels: torch.Tensor
    head: Head
    shift_labels: torch.Tensor | None = None
    task: torch.Tensor | None = None
    window_task_counts: torch.Tensor | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    state: LossState = field(default_factory=LossState)
    teacher_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_labels(self.labels, self.head)

    def with_teacher_labels(self, teacher_labels: torch.Tensor) -> "SupervisedView":
        """A copy whose teacher side reads the teacher's own rows: `teacher_rows` takes the positions where
        `teacher_labels` `(B, T_t)` supervises. Checked here: causal token heads, no padding-free batch, and each
        row supervising the same tokens in the same order on both sides.

        Raises:
            `ValueError`: the two sides do not supervise the same tokens.
        """
        if not self.head.shifts_labels or self.shift_labels is not None:
            raise ValueError("The teacher's own rows (context distillation) need a causal LM and padded batches.")
        student = self.aligned_labels()
        teacher = teacher_labels[:, 1:].to(student.device)
        s_mask, t_mask = student != IGNORE_INDEX, teacher != IGNORE_INDEX
        if teacher.shape[0] != student.shape[0] or not torch.equal(s_mask.sum(-1), t_mask.sum(-1)):
            raise ValueError(
                f"The teacher's rows supervise {t_mask.sum(-1).tolist()} tokens per row, the student's "
                f"{s_mask.sum(-1).tolist()}: they must supervise the same completion tokens."
            )
        if not torch.equal(student[s_mask], teacher[t_mask]):
            raise ValueError("The teacher's rows supervise other tokens than the student's (same count, other ids).")
        return replace(self, teacher_labels=teacher_labels)

    @property
    def teacher_mask(self) -> torch.Tensor:
        """`(B, T_t')` bool: the supervised positions of the teacher's aligned outputs (`mask` when the teacher reads
        the student's tokens)."""
        if self.teacher_labels is None:
            return self.mask
        return self.teacher_labels[:, 1:] != IGNORE_INDEX

    def teacher_rows(self, outputs: torch.Tensor) -> torch.Tensor:
        """`(B, T_t, V)` teacher logits or hidden states -> `(N, V)` rows of its supervised positions, in the order
        of `rows` (the same as `rows` when the teacher reads the student's tokens)."""
        if self.teacher_labels is None:
            return self.rows(outputs)
        return outputs[:, :-1][self.teacher_mask.to(outputs.device)]

    @classmethod
    def from_batch(cls, batch: dict[str, Any], head: Head, state: LossState | None = None) -> "SupervisedView":
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
        return cls(batch["labels"], head, batch.get("shift_labels"), task, batch.get(TASK_COUNTS_KEY), batch,
                   state or LossState())  # fmt: skip

    def aligned_labels(self) -> torch.Tensor:
        """Labels aligned with logit positions: `(B, T-1)` for causal LMs (`labels[:, 1:]`, or `shift_labels` of
        padding-free batches), else the labels unchanged."""
        if self.shift_labels is not None:
            return self.shift_labels
        return self.labels[:, 1:] if self.head.shifts_labels else self.labels

    def aligned(self, logits: torch.Tensor) -> torch.Tensor:
        """`(B, T, ...)` logits or hidden states aligned with `aligned_labels`: `(B, T-1, ...)` for causal LMs (last
        position dropped); `(B,)` for a single-output regression head (`(B, 1)` squeezed); else unchanged."""
        if self.head.shifts_labels and self.shift_labels is None:
            return logits[:, :-1]
        if self.head.regression and logits.shape[-1] == 1:
            return logits.squeeze(-1)
        return logits

    @property
    def mask(self) -> torch.Tensor:
        """`(B, T')` bool: supervised positions of the aligned logits (`T' = T - 1` for shifted causal heads; the
        shape of the labels for sequence heads)."""
        return self.aligned_labels() != IGNORE_INDEX

    def hidden_mask(self) -> torch.Tensor:
        """`(B, T)` bool over the model's own positions: those whose output is supervised (for a causal LM the
        hidden state at t predicts label t + 1, so the last position never is). Sequence heads: the labels' mask."""
        mask = self.mask
        if self.head.shifts_labels and self.shift_labels is None:
            mask = F.pad(mask, (0, 1), value=False)
        return mask

    @property
    def n_items(self) -> torch.Tensor:
        """Scalar int64 tensor: the number of supervised items of this view."""
        return self.mask.sum()

    def rows(self, logits: torch.Tensor) -> torch.Tensor:
        """`(B, T, V)` (or `(B, C)`) logits or hidden states -> `(N, V)` rows of the supervised positions."""
        return self.aligned(logits)[self.mask]

    def targets(self) -> torch.Tensor:
        """`(N,)` labels of the supervised positions (int64; float for regression heads)."""
        y = self.aligned_labels()[self.mask]
        return y if self.head.regression else y.long()

    def pair(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The supervised rows of a student and a teacher output, and their targets.

        Args:
            student_logits (`torch.Tensor`): `(B, T, V_s)` for token heads, `(B, C)` for sequence classification.
            teacher_logits (`torch.Tensor`): same layout as the student's (`V_t` may be padded beyond `V_s`).
            vocab_size (`int`, *optional*): slice both vocabularies to this many entries (padded embedding matrices).

        Returns:
            `(student (N, V), teacher (N, V), targets (N,))`; for regression heads `(N,)` outputs and targets.
        """
        s, t = self.rows(student_logits), self.teacher_rows(teacher_logits)
        if vocab_size is not None and self.head.has_vocab:
            s, t = s[..., :vocab_size], t[..., :vocab_size]
        return s, t, self.targets()

    def task_counts(self) -> torch.Tensor:
        """`(len(TASK_NAMES),)` int64: supervised items of each task in this micro-batch."""
        per_row = self.mask.reshape(self.mask.shape[0], -1).sum(-1)  # (B,)
        return torch.stack([per_row[self.task == i].sum() for i in range(len(TASK_NAMES))])

    def per_task(self) -> Iterator[tuple[str, "SupervisedView"]]:
        """`(task name, view with the other tasks' labels set to -100)` for each task."""
        for task_id, name in enumerate(TASK_NAMES):
            other_rows = (self.task != task_id).view(-1, *([1] * (self.labels.dim() - 1)))
            shift = self.shift_labels.masked_fill(other_rows, IGNORE_INDEX) if self.shift_labels is not None else None
            teacher = self.teacher_labels
            teacher = None if teacher is None else teacher.masked_fill(other_rows, IGNORE_INDEX)
            yield name, SupervisedView(self.labels.masked_fill(other_rows, IGNORE_INDEX), self.head, shift, None, None,
                                       self.batch, self.state, teacher)  # fmt: skip


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


def hard_loss(student: torch.Tensor, labels: torch.Tensor, head: Head) -> torch.Tensor:
    """Summed hard-label loss of selected rows: CE for `(N, V)` logits and `(N,)` class ids, squared error for
    regression `(N,)` outputs and targets. fp32."""
    if head.regression:
        return (student.float() - labels.float()).pow(2).sum()
    return F.cross_entropy(student.float(), labels, reduction="sum")


def logit_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    view: SupervisedView,
    args: Any,
    vocab_size: int | None = None,
) -> LossTerms:
    """KD and hard-label terms for any head: `loss = (ce_weight * sums["ce"] + kd_weight * T^2 * sums["kd"]) / N`.

    Args:
        student_logits (`torch.Tensor`): the student's `logits` (layouts in `SupervisedView.pair`).
        teacher_logits (`torch.Tensor`, *optional*): the teacher's, or None for a CE-only run.
        view (`SupervisedView`): the batch's supervised positions (and the loss state).
        args: the config (`kd_loss`, `temperature`, ..., `kd_weight`, `ce_weight`).
        vocab_size (`int`, *optional*): shared real vocabulary size of padded LM heads.

    Returns:
        `LossTerms`: `ce` and, with a teacher, `kd`, summed over the view's N items; `top1_agreement` (teacher vs
        student argmax) as a metric for classification and LM heads.
    """
    reference = teacher_logits if teacher_logits is not None else student_logits
    s, t, y = view.pair(student_logits, reference, vocab_size)
    n_items = torch.as_tensor(y.numel(), device=s.device)
    terms = LossTerms(n_items=n_items).add("ce", hard_loss(s, y, view.head), args.ce_weight)
    if teacher_logits is None:
        return terms
    if view.head.regression:
        return terms.add("kd", (s.float() - t.float()).pow(2).sum(), kd_scale(args, view.head))
    terms.add("kd", logit_divergence(s, t, **divergence_kwargs(args, view.state)).sum(), kd_scale(args, view.head))
    return terms.metric("top1_agreement", (s.argmax(-1) == t.argmax(-1)).sum(), n_items)


def fused_head_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    args: Any,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    stats: dict[str, Any] | None = None,
    loss_weights: tuple[float, float] | None = None,
    state: LossState | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`losses.fused_logit_distillation_loss` between two lm_heads, summed over rows, with `args`' divergence; the
    teacher side is detached (it never gets gradients).

    Args:
        student_hidden (`torch.Tensor`): `(N, H_s)` final hidden states of the student's supervised rows.
        student_head (`LMHead`), teacher_head (`LMHead`): the two lm_heads (`heads.lm_head_of`).
        teacher_hidden (`torch.Tensor`): `(N, H_t)`.
        args: the config (`kd_loss`, `temperature`, ..., `kd_chunk_size`).
        vocab_size (`int`, *optional*): compare only the first `vocab_size` logits (padded heads).
        labels (`torch.Tensor`, *optional*): `(N,)` targets; the CE sum is returned too when given.
        stats (`dict`, *optional*): filled with `top1_agreement`.
        loss_weights (`tuple`, *optional*): `(kd weight, ce weight)` the gradients are computed for.
        state (`LossState`, *optional*): the loss state (TAID's t).

    Returns:
        `(kd, ce)`: fp32 scalars summed over the N rows; `ce` is None without `labels`.
    """
    result = fused_logit_distillation_loss(
        student_hidden,
        student_head.weight,
        teacher_hidden.detach(),
        teacher_head.weight.detach(),
        **divergence_kwargs(args, state),
        chunk_size=args.kd_chunk_size,
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias.detach() if teacher_head.bias is not None else None,
        student_logit_scale=student_head.logit_scale,
        teacher_logit_scale=teacher_head.logit_scale,
        student_softcap=student_head.softcap,
        teacher_softcap=teacher_head.softcap,
        vocab_size=vocab_size,
        labels=labels,
        reduction="sum",
        stats=stats if stats is not None else {},
        **({"loss_weights": loss_weights} if loss_weights is not None else {}),
    )
    return result if labels is not None else (result, None)


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
