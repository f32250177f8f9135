"""A served teacher: the teacher runs in an inference server (vLLM) and returns its top-k log-probs over HTTP, so it
never enters the training process's memory.

Asked for by `teacher_api_base` (one URL, or several: replicas of one model, or one teacher each when the data has a
`teacher_id` column) with `teacher_api_model` and `teacher_api_top_k` (k, default 20). Each micro-batch's rows are
sent as token-id prompts with `prompt_logprobs: k` (`generation.served.ServedLogprobs`); every position is scored,
since the teacher needs the prompt as context, but only the supervised ones count. The reply becomes the cache's
entries (top-k ids, log-probs at temperature 1, the tail mass outside them) and KD is the sparse divergence of the
cache path (`cached.sparse_terms`: the k tokens plus one tail bucket, the temperature applied by renormalising), so
every `kd_loss` the cache supports works here.

Speed: the collator sends each batch's request when the batch is collated (the dataloader collates one batch ahead,
and a whole accumulation window before its first step), so the teacher answers while the previous micro-batch trains
(`teacher_api_prefetch`). A batch whose rows changed since (on-policy samples) is requested again when it trains.
Faults: the client retries 429 / 5xx / connection errors / timeouts with backoff (a restarting server is waited for),
refuses any other 4xx at once, validates every reply, and fails naming the server; nothing trains on a partial reply.
Each process asks for its own rows.
"""

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import TrainerCallback
from transformers.data.data_collator import DataCollatorMixin

from ..generation.served import Pending, ServedLogprobs
from ..model_card import CardTeacher, name_line
from ..terms import LossTerms, SupervisedView
from ..validation import check_served_config
from .base import SourceContext, SourceRequest, TeacherSource
from .cached import CachedTeacherOutputs, sparse_chunked, sparse_terms
from .live import FUSED_FORWARD_KWARGS


logger = logging.getLogger(__name__)

PENDING_KEY = "served_teacher_request"  # the batch's requests in flight (not a tensor, never a model input)
TEACHER_ID_KEY = "teacher_id"  # a dataset column: which server (teacher) scores the row


def row_prompts(batch: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's tokens without padding, and their positions in the padded row.

    Returns:
        `(prompts, positions)`: B lists of token ids and B lists of column indices into `input_ids` `(B, T)`.
    """
    input_ids = batch["input_ids"].tolist()
    mask = batch.get("attention_mask")
    keep = mask.bool().tolist() if mask is not None else [[True] * len(row) for row in input_ids]
    positions = [[j for j, k in enumerate(row) if k] for row in keep]
    return [[ids[j] for j in cols] for ids, cols in zip(input_ids, positions)], positions


def host_kind(url: str) -> str:
    """Where a server runs, in words that name no host: `on this machine` (loopback), `on a private network`, or
    `remote`."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return "on this machine"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name: where it resolves is not recorded
        return "remote"
    return "on this machine" if address.is_loopback else "on a private network" if address.is_private else "remote"


@dataclass
class ServedTeacherCollator(DataCollatorMixin):
    """Wraps a collator: collates the batch, then sends its teacher requests (`ServedTeacher.submit`) and puts them in
    the batch under `PENDING_KEY`; a `teacher_id` column becomes the batch's `teacher_id` tensor `(B,)`.

    Args:
        collator (`Callable`): the wrapped collator.
        source (`ServedTeacher`): the source whose servers are asked.
    """

    collator: Any
    source: Any
    return_tensors: str = "pt"

    @property
    def dataset_columns(self) -> tuple[str, ...]:
        """The raw columns the wrapped collator reads, passed through."""
        return tuple(getattr(self.collator, "dataset_columns", ()) or ())

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """Raw columns the trainer keeps through `remove_unused_columns`: `teacher_id` (routed teachers)."""
        own = (TEACHER_ID_KEY,) if self.source.pool.routed else ()
        return tuple(dict.fromkeys((*own, *getattr(self.collator, "kept_columns", ()))))

    def torch_call(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        teacher_ids = None
        if self.source.pool.routed:
            missing = [i for i, f in enumerate(features) if TEACHER_ID_KEY not in f]
            if missing:
                raise ValueError(
                    f"Rows {missing[:10]} have no `{TEACHER_ID_KEY}` column, which says which of the "
                    f"{len(self.source.pool.clients)} served teachers scores them (several `teacher_api_base` URLs "
                    "and a `teacher_id` column in the training data)."
                )
            teacher_ids = [int(f[TEACHER_ID_KEY]) for f in features]
            features = [{k: v for k, v in f.items() if k != TEACHER_ID_KEY} for f in features]
        batch = dict(self.collator(features))
        if teacher_ids is not None:
            batch[TEACHER_ID_KEY] = torch.tensor(teacher_ids)
        if self.source.prefetch:
            batch[PENDING_KEY] = self.source.submit(batch)
        return batch


class ServedTeacher(TeacherSource):
    """The teacher's top-k distributions from inference servers, on causal-LM students with the teacher's tokenizer.

    Args:
        context (`SourceContext`): the run (the student's tokenizer is required).
        pool (`ServedLogprobs`): the servers, checked against the student's tokenizer.
        prefetch (`bool`): send each batch's requests when it is collated (else when it trains).
    """

    kind = "served"
    name = "served"
    batch_keys = (PENDING_KEY, TEACHER_ID_KEY)

    def __init__(self, context: SourceContext, pool: ServedLogprobs, prefetch: bool = True):
        super().__init__(context)
        if context.head.kind != "causal_lm":
            raise ValueError(f"A served teacher scores causal-LM tokens; the student is a {context.head.kind} model.")
        if context.tokenizer is None:
            raise ValueError("A served teacher needs the student's tokenizer (`processing_class=`) to check servers.")
        self.pool, self.prefetch = pool, prefetch
        self.refetched = 0  # batches requested when they train although prefetching is on (rows rewritten since)

    @classmethod
    def requested(cls, request: SourceRequest) -> bool:
        return bool(request.args.teacher_api_base)

    @classmethod
    def describe(cls, request: SourceRequest) -> str:
        return "`teacher_api_base` (a served teacher)"

    @classmethod
    def check(cls, request: SourceRequest) -> None:
        check_served_config(request.args)

    @classmethod
    def from_request(cls, request: SourceRequest, context: SourceContext) -> "ServedTeacher":
        """The servers' clients, each checked to serve the named model with the student's tokenizer."""
        args = context.args
        pool = ServedLogprobs(
            args.teacher_api_base,
            args.teacher_api_model,
            k=args.teacher_api_top_k,
            vocab_size=len(context.tokenizer) if context.tokenizer is not None else None,
            routed=request.resources.get("routed", False),
            timeout=args.teacher_api_timeout,
            max_retries=args.teacher_api_max_retries,
            max_concurrency=args.max_concurrency,
            api_key_env=args.teacher_api_key_env,
        )
        if context.tokenizer is not None:
            pool.check_tokenizer(context.tokenizer)
        logger.info("Served teacher: %s, top-%d log-probs per position.", ", ".join(pool.urls), pool.k)
        return cls(context, pool, prefetch=args.teacher_api_prefetch)

    @classmethod
    def prepare_dataset(cls, request: SourceRequest, dataset: Any) -> Any:
        """A `teacher_id` column with several servers routes each row to its own teacher (checked to be in range)."""
        columns = getattr(dataset, "column_names", None) or []
        urls = request.args.teacher_api_base
        if TEACHER_ID_KEY in columns and len(urls) > 1:
            bad = sorted({int(t) for t in dataset[TEACHER_ID_KEY] if not 0 <= int(t) < len(urls)})
            if bad:
                raise ValueError(f"`teacher_id` values {bad[:10]} name no server: `teacher_api_base` has {len(urls)}.")
            request.resources["routed"] = True
            logger.info("Served teachers: each row goes to the server its `teacher_id` names (%d servers).", len(urls))
        return dataset

    def wrap_collator(self, collator: Any) -> ServedTeacherCollator:
        return ServedTeacherCollator(collator, self)

    def card_teacher(self) -> CardTeacher:
        """The served model name(s) and where the servers run (never their URLs or the key), and k."""
        clients, args = self.pool.clients, self.context.args
        names = list(dict.fromkeys(args.teacher_api_model or [client.model_name() for client in clients]))
        n = len(clients)
        how = "one server" if n == 1 else f"{n} servers, each row to the one its `teacher_id` names" if (
            self.pool.routed) else f"{n} replicas"  # fmt: skip
        hosts = ", ".join(dict.fromkeys(host_kind(url) for url in self.pool.urls))
        return CardTeacher(
            f"{', '.join(name_line(name) for name in names)}, served over an OpenAI-compatible HTTP API ({how}, "
            f"{hosts}), top-{self.pool.k} log-probs per position (`prompt_logprobs`)",
            names,
        )

    def callbacks(self) -> list[TrainerCallback]:
        return [ServedTeacherCallback(self)]

    def student_forward_kwargs(self) -> dict[str, Any]:
        """The student's final hidden states instead of its `(B, T, V)` logits where the sparse loss runs chunk by
        chunk (`cached.sparse_chunked`)."""
        kwargs = super().student_forward_kwargs()
        return {**kwargs, **FUSED_FORWARD_KWARGS} if sparse_chunked(self.context) else kwargs

    # ------------------------------------------------------------------------------------------- per batch
    def submit(self, batch: dict[str, Any]) -> Pending:
        """Send the requests of a collated batch (its rows without padding; `teacher_id` routes them)."""
        prompts, _ = row_prompts(batch)
        ids = batch.get(TEACHER_ID_KEY)
        return self.pool.submit(prompts, ids.tolist() if ids is not None else None)

    def outputs(self, model_inputs: dict[str, Any], batch: dict[str, Any]) -> CachedTeacherOutputs:
        """The batch's replies (sent by the collator, or now) as label-position entries `(B, T, k)` / `(B, T)`."""
        if batch.get("position_ids") is not None or batch.get("shift_labels") is not None:
            raise ValueError(
                "A served teacher scores each row as one sequence: packed / padding-free batches (`position_ids`, "
                "`shift_labels`) are not supported; pad the batches (`padding_free: false`, `packing: false`)."
            )
        prompts, positions = row_prompts(batch)
        pending = batch.get(PENDING_KEY)
        if pending is None or pending.prompts != prompts:  # not prefetched, or rows rewritten since (on-policy)
            self.refetched += self.prefetch  # a request sent when the batch trains although prefetching is on
            pending = self.submit(batch)
        replies = pending.result().rows
        input_ids = batch["input_ids"]
        rows, width, k = input_ids.shape[0], input_ids.shape[1], self.pool.k
        out = CachedTeacherOutputs(
            torch.zeros(rows, width, k, dtype=torch.long),
            torch.zeros(rows, width, k),
            torch.zeros(rows, width),
            torch.zeros(rows, width, dtype=torch.bool),
        )
        for b, (reply, cols) in enumerate(zip(replies, positions)):
            if len(cols) < 2:
                continue
            ids, logprobs, tail = self.pool.topk_rows(reply)
            at = torch.as_tensor(cols[1:])
            out.topk_ids[b, at], out.topk_logprobs[b, at], out.tail_logmass[b, at] = ids.long(), logprobs, tail
            out.mask[b, at] = True
        device = input_ids.device
        return CachedTeacherOutputs(*(t.to(device) for t in (out.topk_ids, out.topk_logprobs, out.tail_logmass,
                                                                  out.mask)))  # fmt: skip

    def terms(self, student_outputs: Any, teacher_outputs: CachedTeacherOutputs, view: SupervisedView) -> LossTerms:
        """Sparse KD and CE over the view's supervised tokens (`cached.sparse_terms`)."""
        vocab = len(self.context.tokenizer)
        return sparse_terms(student_outputs, teacher_outputs, view, self.context, vocab, "the served replies")


class ServedTeacherCallback(TrainerCallback):
    """Logs what the servers were asked at the end of training, and stops the request pool."""

    def __init__(self, source: ServedTeacher):
        self.source = source

    def on_train_end(self, args, state, control, **kwargs):
        stats = self.source.pool.stats
        logger.info("Served teacher: %d requests, %d prompts, %d positions scored; %d batches requested again.",
                    stats["requests"], stats["prompts"], stats["positions"], self.source.refetched)  # fmt: skip
