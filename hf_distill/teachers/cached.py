"""An offline teacher: the top-k distributions of a teacher cache (`hf_distill.cache`), read from the batch that
`TeacherCacheCollator` built. No teacher model is in memory; KD is the sparse divergence of `losses.sparse` (the k
cached tokens plus one tail bucket)."""

from dataclasses import dataclass
from typing import Any

import torch

from ..cache import CACHE_BATCH_KEYS, TeacherCache
from ..heads import divergence_kwargs, kd_scale
from ..losses.sparse import SPARSE_LOSSES, sparse_logit_divergence
from ..terms import LossTerms, SupervisedView
from .base import SourceContext, TeacherSource


@dataclass
class CachedTeacherOutputs:
    """Teacher entries of a batch, indexed by label position: ids / logprobs `(B, T, k)`, tail and mask `(B, T)`."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    mask: torch.Tensor


def cached_teacher_outputs(inputs: dict[str, Any]) -> CachedTeacherOutputs:
    """The teacher entries the `TeacherCacheCollator` put into a batch (`CACHE_BATCH_KEYS`)."""
    missing = [key for key in CACHE_BATCH_KEYS if key not in inputs]
    if missing:
        raise ValueError(
            f"The batch lacks {missing}: with `teacher_cache` the data collator must be a `TeacherCacheCollator` "
            "(the trainer wraps its collator in one; do not replace `trainer.data_collator` afterwards)."
        )
    return CachedTeacherOutputs(*(inputs[key] for key in CACHE_BATCH_KEYS))


def check_cache_config(args: Any) -> None:
    """Settings that cannot work without a live teacher."""
    if args.kd_loss not in SPARSE_LOSSES:
        raise ValueError(
            f"kd_loss={args.kd_loss!r} has no sparse form for a teacher cache; use one of {SPARSE_LOSSES}."
        )
    if args.lmbda > 0 or args.seq_kd:
        raise ValueError(
            "A teacher cache holds the teacher's distributions on the dataset's tokens only, so it cannot score "
            "on-policy samples (`lmbda` > 0) or generate targets (`seq_kd`); use a live teacher, or build the cache "
            "with `hf-distill cache-teacher --generate` for offline sequence-level KD."
        )
    if args.uses_features:
        raise ValueError("Hints, attention and relation losses need the teacher's hidden states: not in a cache.")


class CacheTeacher(TeacherSource):
    """The teacher's top-k distributions from a `TeacherCache`, on causal-LM students."""

    name = "cache"

    def __init__(self, context: SourceContext, cache: TeacherCache):
        super().__init__(context)
        if context.head.kind != "causal_lm":
            raise ValueError(f"Teacher caches hold causal-LM distributions; the student is a {context.head.kind}.")
        if context.tokenizer is not None:
            cache.check_tokenizer(context.tokenizer)
        self.cache = cache

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> CachedTeacherOutputs:
        return cached_teacher_outputs(batch)

    def terms(self, student_outputs: Any, teacher_outputs: CachedTeacherOutputs, view: SupervisedView) -> LossTerms:
        """Sparse KD (weight `kd_weight * T^2`) and CE over the view's supervised tokens."""
        args, head = self.context.args, view.head
        if view.shift_labels is not None:
            raise ValueError("Teacher caches do not support padding-free batches (`shift_labels`); pad the batches.")
        mask = view.mask
        s = view.rows(student_outputs.logits)  # (N, V_s)
        y = view.targets()
        label_index = slice(1, None) if head.shifts_labels else slice(None)
        ids = teacher_outputs.topk_ids[:, label_index][mask].long()
        logprobs = teacher_outputs.topk_logprobs[:, label_index][mask]
        tail = teacher_outputs.tail_logmass[:, label_index][mask]
        vocab = self.cache.vocab_size
        s_kd = s
        if s.shape[-1] != vocab:
            tokenizer = self.context.tokenizer
            real = len(tokenizer) if tokenizer is not None else None
            if s.shape[-1] < vocab or real is None or real > vocab:
                raise ValueError(
                    f"The student has {s.shape[-1]} logits but the teacher cache covers a vocabulary of {vocab}; "
                    "build the cache from a teacher with the student's vocabulary."
                )
            s_kd = s[:, :vocab]  # the student's extra rows are embedding padding
        terms = LossTerms(n_items=y.new_tensor(y.numel()))
        terms.add("kd", sparse_logit_divergence(s_kd, ids, logprobs, tail, **divergence_kwargs(args)).sum(),
                  kd_scale(args, head))  # fmt: skip
        terms.add("ce", torch.nn.functional.cross_entropy(s.float(), y, reduction="sum"), args.ce_weight)
        return terms.metric("top1_agreement", (s_kd.argmax(-1) == ids[:, 0]).sum(), y.numel())
