"""A cross-tokenizer teacher from a cache built with the teacher's own tokenizer (`cross_tokenizer_loss` +
`teacher_cache`).

`cache_teacher(..., tokenizer=<student's>, teacher_tokenizer=<teacher's>)` decodes each row's student ids into its
text (`alignment.token_char_spans`, as the live source does), lets the teacher read its own tokenization of that text
(`cross_tokenizer.teacher_tokenize`: its BOS first, character offsets kept) and stores, for every teacher position
j >= 1, the top-k token ids and log-probabilities of the distribution predicting token j, the log tail mass and the
log-prob of the actual token j (`score_cross_rows`), plus the teacher's ids and offsets (layout in `cache.format`).
`cache_info.json` records the student's tokenizer (`tokenizer`) and the teacher's (`teacher_tokenizer`), and the
cache keeps a copy of the teacher's tokenizer in `teacher_tokenizer/`. Conversational rows (a `messages` or
conversational `prompt` + `completion` column) are read rendered with the teacher's chat template when it has one,
as the live source reads a batch with `messages`; `teacher_chat_template` records that template's sha256, and
training then needs the conversations in the batch again (checked both ways).

At train time `TeacherCacheCollator` adds the teacher side of each row to the batch (`cross_cache_batch`) and
`CachedCrossTokenizerTeacher` aligns and merges exactly as `CrossTokenizerTeacher`, with the teacher's row statistics
taken from the cache instead of a forward pass. With `k >= V_t` (every entry cached) the loss equals the live
teacher's (tested); with a smaller `k` the mass beyond the cached entries is one tail bucket: in ULD it joins the
sorted tail (and both sides' sorted vectors are cut to `min(cross_tokenizer_top_k, k)` entries, so it stays the
lower bound of `losses.cross_tokenizer`), in gold's shared part it is missing (those shared tokens count as 0), and a
KD temperature != 1 renormalises the cached entries with the tempered tail bucket (as `losses.sparse`).
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from ..alignment import Span, chat_template_id, conversation_templated
from ..cache import (
    CACHE_BATCH_KEYS,
    CROSS_CACHE_BATCH_KEYS,
    TEACHER_TOKENIZER_DIR,
    TeacherCache,
    TeacherCacheCollator,
    tokenizer_identity,
)
from ..data.collators import CHAT_KWARGS_KEY, CONVERSATION_KEY, ConversationCollator
from ..losses.cross_tokenizer import sorted_head
from ..model_card import CardTeacher, cached_teacher
from ..models import teacher_tokenizer_of
from ..validation import check_cache_config
from .base import SourceContext, SourceRequest
from .cached import open_cache, prepare_cached_dataset
from .cross_tokenizer import CrossTokenizerOutputs, CrossTokenizerTeacher


logger = logging.getLogger(__name__)


@dataclass
class CachedCrossTokenizerOutputs(CrossTokenizerOutputs):
    """`CrossTokenizerOutputs` read from a cross-tokenizer cache: `last_hidden_state` holds the cached top-k
    log-probs `(B, T_t, k)` (the trainer's finiteness check reads it); the other cached tensors are indexed by teacher
    label position: `topk_ids (B, T_t, k)`, `tail_logmass`, `target_logprobs` and `mask (B, T_t)`."""

    topk_ids: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    target_logprobs: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class CachedCrossTokenizerTeacher(CrossTokenizerTeacher):
    """`CrossTokenizerTeacher` with the teacher's distributions read from a cross-tokenizer `TeacherCache`.

    Args:
        context (`SourceContext`): the run (`cross_tokenizer_loss` set; the student's tokenizer required).
        cache (`TeacherCache`): a cache built with `cache_teacher(..., teacher_tokenizer=...)`.
        teacher_tokenizer (*optional*): the teacher's tokenizer; checked against the one the cache recorded. None:
            the cache's own copy (`teacher_tokenizer/`).
    """

    kind = "cross-tokenizer-cache"
    name = "cross-tokenizer-cache"
    batch_keys = (*CACHE_BATCH_KEYS, *CROSS_CACHE_BATCH_KEYS, CONVERSATION_KEY, CHAT_KWARGS_KEY)

    def __init__(self, context: SourceContext, cache: TeacherCache, teacher_tokenizer: Any = None):
        if context.args.cross_tokenizer_loss is None:
            raise ValueError(
                f"The teacher cache {cache.path} was built with the teacher's own tokenizer (a cross-tokenizer "
                "cache): set `cross_tokenizer_loss` (uld | gold | alm) to train from it."
            )
        if not cache.cross_tokenizer:
            raise ValueError(
                f"`cross_tokenizer_loss` is set but the teacher cache {cache.path} holds the teacher's distributions "
                "on the student's tokens (an ordinary cache). Rebuild it with the teacher's tokenizer (`hf-distill "
                "cache-teacher --tokenizer <student's> --teacher_tokenizer <teacher's>`), or unset "
                "`cross_tokenizer_loss`."
            )
        if context.tokenizer is not None:
            cache.check_tokenizer(context.tokenizer)
        recorded = cache.info["teacher_tokenizer"]
        if teacher_tokenizer is None:
            teacher_tokenizer = AutoTokenizer.from_pretrained(cache.path / TEACHER_TOKENIZER_DIR)
        ours = tokenizer_identity(teacher_tokenizer)
        if ours["vocab_sha256"] != recorded["vocab_sha256"]:
            raise ValueError(
                f"The teacher cache {cache.path} was built with another teacher tokenizer "
                f"({recorded['name_or_path']!r}, {recorded['vocab_size']} tokens) than the one given "
                f"({ours['name_or_path']!r}, {ours['vocab_size']} tokens): its teacher token ids and offsets would "
                "not match. Rebuild the cache with this teacher tokenizer (`hf-distill cache-teacher "
                "--teacher_tokenizer ...`), or unset `teacher_tokenizer_name_or_path` to use the cache's own copy."
            )
        template = cache.info.get("teacher_chat_template")
        if template is not None and chat_template_id(teacher_tokenizer) != template:
            raise ValueError(
                f"The teacher cache {cache.path} was built from conversations rendered with another chat template "
                "than the given teacher tokenizer's: the cached offsets would not match its text. Unset "
                "`teacher_tokenizer_name_or_path` to use the cache's own copy, or rebuild the cache with this one."
            )
        if cache.vocab_size != len(teacher_tokenizer):
            raise ValueError(
                f"The teacher cache {cache.path} holds distributions over {cache.vocab_size} teacher ids but the "
                f"teacher's tokenizer has {len(teacher_tokenizer)} tokens (a cross-tokenizer cache holds "
                "distributions over the teacher tokenizer's tokens; older versions kept the extra rows of a padded "
                "embedding). "
                "Rebuild it with `hf-distill cache-teacher` and the teacher's own tokenizer."
            )
        super().__init__(context, None, teacher_tokenizer)
        self.cache = cache
        if self.top_k is None or self.top_k > cache.k:  # both sides truncated alike: ULD's lower bound holds
            logger.info("Cross-tokenizer cache of k=%d: ULD compares the top %d sorted entries.", cache.k, cache.k)
            self.top_k = cache.k

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        return request.args.teacher_cache is not None and request.args.cross_tokenizer_loss is not None

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "`teacher_cache` (with `cross_tokenizer_loss`)"

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        check_cache_config(request.args)

    @classmethod
    def prepare_dataset(cls, request: SourceRequest, dataset: Any) -> Any:
        return prepare_cached_dataset(request, dataset)

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> "CachedCrossTokenizerTeacher":
        """The source on the opened cache; the teacher's tokenizer is the one given (`teacher_processing_class`,
        `teacher_tokenizer_name_or_path`), checked against the cache's record, else the cache's own copy."""
        args = context.args
        tokenizer = None
        if request.teacher_processing_class is not None or args.teacher_tokenizer_name_or_path is not None:
            tokenizer = teacher_tokenizer_of(None, request.teacher_processing_class,
                                             args.teacher_tokenizer_name_or_path)  # fmt: skip
        return cls(context, open_cache(request), tokenizer)

    def card_teacher(self) -> CardTeacher:
        """The teacher the cache records, its own tokenizer and the cross-tokenizer loss."""
        teacher = cached_teacher(self.cache.info)
        return CardTeacher(f"{teacher.description}, {self.tokenizer_line()}", teacher.base_models)

    def wrap_collator(self, collator: Any) -> ConversationCollator:
        """The cache's entries into each batch (`TeacherCacheCollator`), and the rows' conversations."""
        return ConversationCollator(TeacherCacheCollator(self.cache, collator))

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> CachedCrossTokenizerOutputs:
        missing = [key for key in (*CROSS_CACHE_BATCH_KEYS, "teacher_topk_ids") if key not in batch]
        if missing:
            raise ValueError(
                f"The batch lacks {missing}: with a cross-tokenizer `teacher_cache` the data collator must be a "
                "`TeacherCacheCollator` (the trainer wraps its collator in one; do not replace it afterwards)."
            )
        rendered = self.cache.info.get("teacher_chat_template") is not None
        templated = conversation_templated(batch.get("messages"), self.teacher_tokenizer)
        if templated and not rendered:
            raise ValueError(
                f"The batch carries the rows' conversations (`messages`) and the teacher's tokenizer has a chat "
                f"template, so the live teacher would read them rendered with its own template, but the teacher cache "
                f"{self.cache.path} was built on the decoded student text (from rows without conversations). Rebuild "
                "the cache from the conversational rows (a `messages` or conversational `prompt` + `completion` "
                "column beside `input_ids`), or train on rows without the conversation columns, as the cache was "
                "built."
            )
        if rendered and not templated:
            raise ValueError(
                f"The teacher cache {self.cache.path} holds the teacher on each row's conversation rendered with its "
                "chat template, but the batch carries no `messages`: the student's tokens cannot be placed in that "
                "text. Train on the conversational dataset the cache was built from (its `messages` or "
                "conversational `prompt` + `completion` columns), e.g. with DistillationSFTTrainer."
            )
        texts, student_spans, _ = self.teacher_texts(model_inputs, batch)
        offsets = batch["teacher_offsets"].tolist()
        t_spans: list[list[Span | None]] = [[None if a < 0 else (a, b) for a, b in row] for row in offsets]
        return CachedCrossTokenizerOutputs(
            batch["teacher_topk_logprobs"], batch["teacher_input_ids"], texts, student_spans, t_spans,
            topk_ids=batch["teacher_topk_ids"], tail_logmass=batch["teacher_tail_logmass"],
            target_logprobs=batch["teacher_target_logprobs"], mask=batch["teacher_cache_mask"],
        )  # fmt: skip

    def teacher_vocab_size(self, teacher_outputs: Any) -> int:
        """V_t as the cache recorded it (the teacher tokenizer's tokens)."""
        return self.cache.vocab_size

    def teacher_stats(
        self, teacher_outputs: CachedCrossTokenizerOutputs, rows: torch.Tensor, n_groups: int
    ) -> dict[str, torch.Tensor]:
        """`CrossTokenizerTeacher.teacher_stats` from the cached entries of the label positions `rows + 1`."""
        k = teacher_outputs.topk_ids.shape[-1]
        device = teacher_outputs.last_hidden_state.device
        at = rows.to(device) + 1
        if not bool(teacher_outputs.mask.reshape(-1)[at].all()):
            raise ValueError("A teacher position of an aligned group has no cached entry; rebuild the teacher cache.")
        ids = teacher_outputs.topk_ids.reshape(-1, k)[at].long()  # (R, k), most likely first
        logprobs = teacher_outputs.last_hidden_state.reshape(-1, k)[at].float()
        tail = teacher_outputs.tail_logmass.reshape(-1)[at].float()
        target = teacher_outputs.target_logprobs.reshape(-1)[at].float()
        temperature = self.context.args.temperature
        if temperature != 1.0:  # renormalise the cached entries with the tempered tail bucket (as losses.sparse)
            norm = torch.cat([logprobs, tail[:, None]], -1).div(temperature).logsumexp(-1)
            logprobs = logprobs / temperature - norm[:, None]
            tail, target = tail / temperature - norm, target / temperature - norm
        probs, ids, tail_mass = logprobs[:n_groups].exp(), ids[:n_groups], tail[:n_groups].exp()
        out = {"target_logprobs": target, "argmax": ids[:, 0]}
        if self.loss == "gold":
            shared_t = self.shared_ids(device)[1]
            size = max(int(shared_t.max()), int(ids.max())) + 1
            column = torch.full((size,), -1, dtype=torch.long, device=device)
            column[shared_t] = torch.arange(shared_t.numel(), device=device)
            where = column[ids]  # (G, k): the shared column of each cached entry, -1 for unshared
            shared = probs.new_zeros(n_groups, shared_t.numel())
            shared.scatter_add_(1, where.clamp(min=0), torch.where(where >= 0, probs, torch.zeros_like(probs)))
            out["shared"] = shared
            probs = torch.where(where >= 0, torch.zeros_like(probs), probs)
        top, rest = sorted_head(probs, self.top_k)
        out["top"], out["tail"] = top, rest + tail_mass
        return out
