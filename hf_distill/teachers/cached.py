"""An offline teacher: the top-k distributions of a teacher cache (`hf_distill.cache`), read from the batch that
`TeacherCacheCollator` built. No teacher model is in memory; KD is the sparse divergence of `losses.sparse` (the k
cached tokens plus one tail bucket).

Asked for by `teacher_cache`. Before the trainer prepares its datasets the cache is opened and the training set gets
the cache's id column (`TeacherCache.attach_row_ids`, which also refuses a set with rows the cache lacks); the
trainer's collator is wrapped in a `TeacherCacheCollator`."""

from dataclasses import dataclass
from typing import Any

import torch

from ..cache import CACHE_BATCH_KEYS, TeacherCache, TeacherCacheCollator
from ..heads import lm_head_of
from ..losses.fused_sparse import fused_sparse_distillation_loss
from ..losses.sparse import sparse_logit_divergence
from ..model_card import CardTeacher, cached_teacher
from ..terms import LossTerms, SupervisedView, divergence_kwargs, kd_scale
from ..validation import check_cache_config
from .base import SourceContext, SourceRequest, TeacherSource
from .live import FUSED_FORWARD_KWARGS


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


def open_cache(request: SourceRequest) -> TeacherCache:
    """The cache of `args.teacher_cache`, opened once per request (kept in `request.resources`)."""
    if "cache" not in request.resources:
        request.resources["cache"] = TeacherCache(request.args.teacher_cache)
    return request.resources["cache"]


def prepare_cached_dataset(request: SourceRequest, dataset: Any) -> Any:
    """The training dataset with the cache's id column (added as the row index when the cache was built that way),
    checked to be fully cached, before the trainer prepares it."""
    return open_cache(request).attach_row_ids(dataset)


class CacheTeacher(TeacherSource):
    """The teacher's top-k distributions from a `TeacherCache`, on causal-LM students."""

    kind = "cache"
    name = "cache"
    batch_keys = CACHE_BATCH_KEYS

    def __init__(self, context: SourceContext, cache: TeacherCache):
        super().__init__(context)
        if context.head.kind != "causal_lm":
            raise ValueError(f"Teacher caches hold causal-LM distributions; the student is a {context.head.kind}.")
        if cache.cross_tokenizer:
            raise ValueError(
                f"The teacher cache {cache.path} was built with the teacher's own tokenizer (a cross-tokenizer "
                "cache): set `cross_tokenizer_loss` (uld | gold | alm) to train from it."
            )
        if context.tokenizer is not None:
            cache.check_tokenizer(context.tokenizer)
        self.cache = cache

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        return request.args.teacher_cache is not None and request.args.cross_tokenizer_loss is None

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "`teacher_cache`"

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        check_cache_config(request.args)

    @classmethod
    def prepare_dataset(cls, request: SourceRequest, dataset: Any) -> Any:
        return prepare_cached_dataset(request, dataset)

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> "CacheTeacher":
        return cls(context, open_cache(request))

    def wrap_collator(self, collator: Any) -> TeacherCacheCollator:
        return TeacherCacheCollator(self.cache, collator)

    def card_teacher(self) -> CardTeacher:
        """The teacher the cache records (`cache_info.json`), read through the offline top-k cache."""
        return cached_teacher(self.cache.info)

    def student_forward_kwargs(self) -> dict[str, Any]:
        """The student's final hidden states instead of its `(B, T, V)` logits where the sparse loss runs chunk by
        chunk (`sparse_chunked`)."""
        kwargs = super().student_forward_kwargs()
        return {**kwargs, **FUSED_FORWARD_KWARGS} if sparse_chunked(self.context) else kwargs

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> CachedTeacherOutputs:
        return cached_teacher_outputs(batch)

    def terms(self, student_outputs: Any, teacher_outputs: CachedTeacherOutputs, view: SupervisedView) -> LossTerms:
        """Sparse KD (weight `kd_weight * T^2`) and CE over the view's supervised tokens (`sparse_terms`)."""
        return sparse_terms(student_outputs, teacher_outputs, view, self.context, self.cache.vocab_size, "the cache")


def sparse_chunked(context: SourceContext) -> bool:
    """Whether the sparse loss can run chunk by chunk from the student's final hidden states (`use_fused_kd_loss`,
    a causal LM whose logits are a plain lm_head of the last hidden state, parameters not sharded)."""
    return (
        bool(context.args.use_fused_kd_loss)
        and context.head.kind == "causal_lm"
        and not context.sharded
        and lm_head_of(context.student) is not None
    )


def sparse_terms(
    student_outputs: Any,
    teacher_outputs: CachedTeacherOutputs,
    view: SupervisedView,
    context: SourceContext,
    vocab_size: int,
    what: str = "the teacher's top-k entries",
) -> LossTerms:
    """KD from top-k teacher entries (the sparse divergence of `losses.sparse`: the k tokens plus one tail bucket) and
    the student's CE, summed over the view's supervised tokens; shared by the cache and the served teacher.

    When the student returned its final hidden states and `sparse_chunked(context)` holds, the loss is taken chunk by
    chunk from the hidden states and the lm_head (`losses.fused_sparse`), so no `(N, V)` logits exist beyond one
    chunk; the values and gradients are those of the full logits.

    Args:
        student_outputs: the student's outputs: `logits` `(B, T, V_s)`, or `hidden_states` (the chunked path).
        teacher_outputs (`CachedTeacherOutputs`): `(B, T, k)` ids / log-probs and `(B, T)` tail, indexed by label
            position (entry `[b, j]` is the distribution of token j given tokens < j).
        view (`SupervisedView`): the supervised positions (causal LM).
        context (`SourceContext`): the run (config, the student's tokenizer).
        vocab_size (`int`): the vocabulary the entries cover; a student with more logits (embedding padding beyond
            its tokenizer) is sliced to it.
        what (`str`): the entries' origin, for the error messages.

    Returns:
        `LossTerms`: `kd` (weight `kd_weight * T^2`), `ce` (weight `ce_weight`), metric `top1_agreement`.
    """
    args, head = context.args, view.head
    if view.shift_labels is not None:
        raise ValueError(f"KD from {what} does not support padding-free batches (`shift_labels`); pad the batches.")
    mask = view.mask
    y = view.targets()
    label_index = slice(1, None) if head.shifts_labels else slice(None)
    ids = teacher_outputs.topk_ids[:, label_index][mask].long()
    logprobs = teacher_outputs.topk_logprobs[:, label_index][mask]
    tail = teacher_outputs.tail_logmass[:, label_index][mask]
    hyper = divergence_kwargs(args, view.state)
    weights = {"kd": kd_scale(args, head), "ce": args.ce_weight}
    chunked = getattr(student_outputs, "logits", None) is None or student_outputs.logits.shape[1] == 1
    if chunked and sparse_chunked(context) and student_outputs.hidden_states is not None:
        lm_head = lm_head_of(context.student)
        width = _check_width(lm_head.weight.shape[0], vocab_size, context, what)
        stats: dict[str, Any] = {}
        kd, ce = fused_sparse_distillation_loss(
            view.rows(student_outputs.hidden_states[-1]), lm_head.weight, ids, logprobs, tail, y,
            loss_weights=(weights["kd"], weights["ce"]), chunk_size=args.kd_chunk_size, student_bias=lm_head.bias,
            logit_scale=lm_head.logit_scale, softcap=lm_head.softcap, vocab_size=width, stats=stats, **hyper,
        )  # fmt: skip
        agree = stats.get("top1_agreement", 0)
    else:
        s = view.rows(student_outputs.logits)  # (N, V_s)
        width = _check_width(s.shape[-1], vocab_size, context, what)
        s_kd = s[:, :width] if s.shape[-1] != width else s
        kd = sparse_logit_divergence(s_kd, ids, logprobs, tail, **hyper).sum()
        ce = torch.nn.functional.cross_entropy(s.float(), y, reduction="sum")
        agree = (s_kd.argmax(-1) == ids[:, 0]).sum()
    terms = LossTerms(n_items=y.new_tensor(y.numel()))
    terms.add("kd", kd, weights["kd"])
    terms.add("ce", ce, weights["ce"])
    return terms.metric("top1_agreement", agree, y.numel())


def _check_width(student_width: int, vocab_size: int, context: SourceContext, what: str) -> int:
    """The number of student logits the entries are compared over (the student's extra rows are embedding
    padding), or a ValueError when the vocabularies cannot match."""
    if student_width == vocab_size:
        return vocab_size
    real = len(context.tokenizer) if context.tokenizer is not None else None
    if student_width < vocab_size or real is None or real > vocab_size:
        raise ValueError(
            f"The student has {student_width} logits but {what} cover a vocabulary of {vocab_size}; "
            "distil from a teacher with the student's vocabulary."
        )
    return vocab_size
