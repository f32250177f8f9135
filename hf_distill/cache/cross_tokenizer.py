"""Cross-tokenizer teacher caches: rows scored on the teacher's own tokenization (`cross_tokenizer_loss`).

`cache_teacher(..., tokenizer=<student's>, teacher_tokenizer=<teacher's>)` decodes each row's student ids into its
text (`alignment.token_char_spans`), lets the teacher read its own tokenization of that text (`alignment.
teacher_tokenize`: its BOS first, character offsets kept) or, for conversational rows, the conversation rendered with
its chat template, and stores for every teacher position j >= 1 the top-k ids and log-probs of the distribution
predicting token j, the log tail mass and the log-prob of the actual token j (`score_cross_rows`), plus the teacher's
ids and offsets (layout in `cache.format`). At train time `TeacherCacheCollator` adds that side of each row to the
batch (`cross_cache_batch`), which `teachers.cross_tokenizer_cache.CachedCrossTokenizerTeacher` aligns and merges as
the live cross-tokenizer source does.
"""

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from ..alignment import teacher_tokenize, token_char_spans
from ..heads import decoder_of, lm_head_of
from .format import CachedRow
from .reader import TeacherCache


logger = logging.getLogger(__name__)


@torch.no_grad()
def score_cross_rows(
    teacher: nn.Module,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    rows: list[list[int]],
    k: int,
    vocab_size: int,
    chunk_size: int = 64,
    conversations: list[list[dict[str, Any]]] | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], list[dict[str, Any]]]:
    """The teacher's top-k distributions on its own tokenization of each row's text: the decoded student ids, or,
    with `conversations`, each row's conversation rendered with the teacher's chat template (as the live
    `CrossTokenizerTeacher` reads a batch that carries `messages`).

    Args:
        teacher (`nn.Module`): a causal LM in eval mode.
        student_tokenizer: decodes `rows` (the dataset's tokenizer). teacher_tokenizer: the teacher's fast tokenizer.
        rows (`list[list[int]]`): B rows of student ids (unpadded).
        k (`int`): entries kept per position.
        vocab_size (`int`): V_t, the teacher tokenizer's tokens; logits beyond it (rows of an embedding padded beyond
            the tokenizer) are dropped before the softmax, as the live source does.
        chunk_size (`int`): teacher rows per `[chunk, V_t]` log-softmax.
        conversations (`list`, *optional*): B conversations (`[{"role", "content"}, ...]`), rows in order.

    Returns:
        `(scored, extra)`: per row `(ids (n, k) int32, logprobs (n, k) fp32, log tail (n,) fp32)` for the teacher
        positions j = 1 .. n (n = teacher length - 1), and `{"teacher_input_ids" (n + 1,), "teacher_offsets"
        (2 (n + 1),) (-1 for special tokens), "target_logprobs" (n,) fp32}`.
    """
    if conversations is None:
        texts = [token_char_spans(student_tokenizer, row)[0] for row in rows]
    else:
        texts = [teacher_tokenizer.apply_chat_template(m, tokenize=False) for m in conversations]
    t_ids, t_spans = teacher_tokenize(teacher_tokenizer, texts, add_special_tokens=conversations is None)
    device = next(teacher.parameters()).device
    mask = torch.zeros_like(t_ids)
    for b, spans in enumerate(t_spans):
        mask[b, : len(spans)] = 1
    t_ids, mask = t_ids.to(device), mask.to(device)
    head = lm_head_of(teacher)
    if head is not None:
        states = decoder_of(teacher)(input_ids=t_ids, attention_mask=mask).last_hidden_state
    else:
        states = teacher(input_ids=t_ids, attention_mask=mask).logits
    scored, extra = [], []
    for b, spans in enumerate(t_spans):
        n = len(spans) - 1
        ids, values, tails, targets = [], [], [], []
        for start in range(0, n, chunk_size):
            h = states[b, start : min(n, start + chunk_size)].float()
            logits = h if head is None else h @ head.weight.float().T
            if head is not None and head.bias is not None:
                logits = logits + head.bias.float()
            if head is not None:
                logits = logits * head.logit_scale
                if head.softcap:
                    logits = torch.tanh(logits / head.softcap) * head.softcap
            logp = logits[:, :vocab_size].log_softmax(-1)  # (chunk, V_t)
            top, top_ids = logp.topk(k, dim=-1)
            if k < vocab_size:
                tail = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
            else:
                tail = torch.full_like(top[:, 0], float("-inf"))
            targets.append(logp.gather(-1, t_ids[b, start + 1 : start + 1 + len(h), None]).squeeze(-1))
            ids.append(top_ids.int())
            values.append(top)
            tails.append(tail)
        cat = lambda xs, width: torch.cat(xs).cpu() if xs else torch.zeros(0, *width)  # noqa: E731
        scored.append((cat(ids, (k,)).int(), cat(values, (k,)), cat(tails, ())))
        offsets = [x for span in spans for x in (span if span is not None else (-1, -1))]
        extra.append({
            "teacher_input_ids": t_ids[b, : n + 1].tolist(),
            "teacher_offsets": offsets,
            "target_logprobs": cat(targets, ()),
        })  # fmt: skip
    return scored, extra


def cross_cache_batch(cache: TeacherCache, cached: list[CachedRow]) -> dict[str, torch.Tensor]:
    """The teacher side of a batch from its cached rows, indexed by teacher label position (right-padded).

    Returns:
        `dict`: `teacher_input_ids (B, T_t)`, `teacher_offsets (B, T_t, 2)` (-1: special or padding),
        `teacher_topk_ids / teacher_topk_logprobs (B, T_t, k)`, `teacher_tail_logmass`, `teacher_target_logprobs`
        and `teacher_cache_mask (B, T_t)`; entry `[b, j]` is the teacher's distribution of its token j.
    """
    width, k = max(1, max(len(row.teacher["teacher_input_ids"]) for row in cached)), cache.k
    rows = len(cached)
    out = {
        "teacher_input_ids": torch.zeros(rows, width, dtype=torch.long),
        "teacher_offsets": torch.full((rows, width, 2), -1, dtype=torch.long),
        "teacher_topk_ids": torch.zeros(rows, width, k, dtype=torch.int32),
        "teacher_topk_logprobs": torch.zeros(rows, width, k),
        "teacher_tail_logmass": torch.zeros(rows, width),
        "teacher_target_logprobs": torch.zeros(rows, width),
        "teacher_cache_mask": torch.zeros(rows, width, dtype=torch.bool),
    }
    for b, row in enumerate(cached):
        n = len(row.teacher["teacher_input_ids"])
        out["teacher_input_ids"][b, :n] = torch.from_numpy(row.teacher["teacher_input_ids"].astype(np.int64))
        out["teacher_offsets"][b, :n] = torch.from_numpy(row.teacher["teacher_offsets"].astype(np.int64))
        out["teacher_topk_ids"][b, 1:n] = torch.from_numpy(np.ascontiguousarray(row.ids, dtype=np.int32))
        out["teacher_topk_logprobs"][b, 1:n] = torch.from_numpy(np.ascontiguousarray(row.logprobs))
        out["teacher_tail_logmass"][b, 1:n] = torch.from_numpy(np.ascontiguousarray(row.tail))
        out["teacher_target_logprobs"][b, 1:n] = torch.from_numpy(row.teacher["target_logprobs"])
        out["teacher_cache_mask"][b, 1:n] = True
    return out
