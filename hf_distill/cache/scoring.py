"""Who scores the rows of a teacher cache (`cache_teacher`): a local causal LM on the dataset's tokens
(`score_rows`), a local LM with its own tokenizer (`cache.cross_tokenizer.score_cross_rows`), a served teacher
(`generation.served.ServedLogprobs`), or another tool's stored top-k log-probs (`cache.imports.ImportedTopK`: Axolotl,
DistillKit); each returns the cache's row entries (top-k ids, log-probs, log tail mass)."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from trl.trainer.utils import pad

from ..alignment import row_conversation
from ..generation.onpolicy import generate_completions
from ..generation.served import ServedLogprobs
from ..losses import IGNORE_INDEX
from ..models.checks import check_saved_tokenizer, tokenizer_vocab_size
from ..models.loading import load_model, output_vocab_size
from .compact import encode_row
from .cross_tokenizer import score_cross_rows
from .format import input_digest, supervised_positions, teacher_identity
from .imports import ImportedTopK


@torch.no_grad()
def score_rows(
    teacher: nn.Module, rows: list[list[int]], positions: list[np.ndarray], k: int, pad_token_id: int, vocab_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The teacher's top-k ids, log-probs and log tail mass at the given label positions of each row.

    Args:
        teacher (`nn.Module`): a causal LM in eval mode.
        rows (`list[list[int]]`): B token-id rows (right-padded here).
        positions (`list[np.ndarray]`): per row, label positions j >= 1 (distribution of logits at j - 1).
        k (`int`): tokens kept per position.
        pad_token_id (`int`): padding id.
        vocab_size (`int`): V; logits beyond it (padded embeddings) are dropped before the softmax.

    Returns:
        `list` of B triples on CPU: ids `(n_b, k)` int32, log-probs `(n_b, k)` fp32, log tail mass `(n_b,)` fp32.
    """
    device = next(teacher.parameters()).device
    input_ids = pad([torch.as_tensor(row, dtype=torch.long) for row in rows], pad_token_id, "right")  # (B, T)
    attention_mask = pad([torch.ones(len(row), dtype=torch.long) for row in rows], 0, "right")  # (B, T)
    if int(input_ids.max()) >= vocab_size:
        raise ValueError(
            f"Token id {int(input_ids.max())} is outside the teacher's vocabulary ({vocab_size}); the dataset was "
            "tokenised with another tokenizer."
        )
    logits = teacher(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    ).logits  # (B, T, V')
    b_idx = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)])
    t_idx = torch.cat([torch.as_tensor(p, dtype=torch.long) - 1 for p in positions])
    logp = torch.log_softmax(logits[b_idx.to(device), t_idx.to(device), :vocab_size].float(), dim=-1)  # (N, V)
    values, ids = logp.topk(k, dim=-1)
    if k < vocab_size:
        tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    else:
        tail = torch.full(values.shape[:1], float("-inf"), device=values.device)
    counts = [len(p) for p in positions]
    return list(zip(ids.int().cpu().split(counts), values.cpu().split(counts), tail.cpu().split(counts), strict=True))


def cache_record(
    row_id: Any,
    seq: list[int],
    positions: np.ndarray,
    ids: torch.Tensor,
    values: torch.Tensor,
    tail: torch.Tensor,
    more: dict,
    compact: bool,
    vocab_size: int,
    value_bits: int,
) -> dict[str, Any]:
    """One row of a shard: its id, input digest, number of cached positions and entries (compact or not)."""
    if compact:
        payload, order = encode_row(ids.numpy(), values.numpy(), tail.numpy(), vocab_size, value_bits)
        entries = {"payload": payload, "id_golomb_order": order}
    else:
        entries = {"topk_ids": ids.reshape(-1).numpy(), "topk_logprobs": values.reshape(-1), "tail_logmass": tail}
    return {"row_id": row_id, "input_digest": input_digest(seq), "num_tokens": len(positions), **entries, **more}


@dataclass
class Scorer:
    """Who scores the rows of `cache_teacher`: a local model (same or cross tokenizer) or a served teacher.

    Attributes:
        teacher: the causal LM, or the `ServedLogprobs`.
        vocab_size (`int`): V of the stored distributions (a cross-tokenizer cache: the teacher tokenizer's tokens,
            rows of a padded embedding beyond them left out).
        identity (`dict`): the teacher's identity in cache_info.json.
    """

    teacher: Any
    vocab_size: int
    identity: dict[str, Any]
    k: int
    tokenizer: Any
    teacher_tokenizer: Any = None
    chat_template: str | None = None

    @property
    def served(self) -> bool:
        return isinstance(self.teacher, ServedLogprobs)

    @classmethod
    def build(cls, teacher: Any, tokenizer: Any, teacher_tokenizer: Any, k: int, init_kwargs: dict | None,
              state: Any, generate: bool, chat_template: str | None) -> "Scorer":  # fmt: skip
        if isinstance(teacher, ServedLogprobs):
            if generate or teacher_tokenizer is not None:
                raise ValueError(
                    "A served teacher caches the distributions of the dataset's own tokens: `generate` (write its "
                    "generations with the API teacher first: `cache-teacher --generate --teacher_api_base ...`) and "
                    "`teacher_tokenizer` (a cross-tokenizer cache) need a teacher loaded in process."
                )
            if teacher.k != k:
                raise ValueError(f"The served teacher asks for top-{teacher.k} log-probs but the cache stores k={k}.")
            teacher.check_tokenizer(tokenizer)
            vocab_size = teacher.vocab_size or len(tokenizer)
            return cls(teacher, vocab_size, teacher.identity(), k, tokenizer)
        if isinstance(teacher, ImportedTopK):
            if generate or teacher_tokenizer is not None:
                raise ValueError(
                    "Imported top-k log-probs are cached on the dataset's own tokens: `generate` and "
                    "`teacher_tokenizer` (a cross-tokenizer cache) need a teacher loaded in process."
                )
            if teacher.k != k:
                raise ValueError(f"The import keeps top-{teacher.k} entries but the cache stores k={k}.")
            return cls(teacher, teacher.vocab_size, teacher.identity(), k, tokenizer)
        name = teacher if isinstance(teacher, str) else None
        if isinstance(teacher, str):
            teacher = load_model(teacher, **(init_kwargs or {}))
        if getattr(teacher.config, "is_encoder_decoder", False):
            raise ValueError("Teacher caches support causal LM teachers; use the live teacher for encoder-decoders.")
        teacher = teacher.to(state.device).eval()
        vocab_size = output_vocab_size(teacher)
        if teacher_tokenizer is not None:  # cross-tokenizer: the teacher's tokens only (padded rows are no token)
            check_saved_tokenizer(teacher, teacher_tokenizer)
            vocab_size = tokenizer_vocab_size(teacher, teacher_tokenizer, "teacher")
        if not 1 <= k <= vocab_size:
            which = "its output embedding's rows" if teacher_tokenizer is None else "the teacher tokenizer's tokens"
            raise ValueError(
                f"k={k} must be between 1 and the teacher's vocabulary size ({vocab_size}), {which}; --k "
                f"{vocab_size} caches every entry."
            )
        return cls(teacher, vocab_size, teacher_identity(teacher, name), k, tokenizer, teacher_tokenizer,
                   chat_template)  # fmt: skip

    def regenerate(self, row_ids: list, seqs: list[list[int]], positions: list[np.ndarray], kwargs: dict):
        """`generate=True`: each row's completion (from its first supervised token) replaced by the teacher's
        generation; returns the new rows, their supervised positions and the `input_ids` / `labels` to store."""
        prompts = []
        for rid, seq, pos in zip(row_ids, seqs, positions):
            if len(pos) == 0:
                raise ValueError(f"Row {rid!r} has no supervised completion to regenerate.")
            prompts.append(seq[: int(pos[0])])
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        completions = generate_completions(self.teacher, prompts, pad_token_id=pad_id,
                                           eos_token_id=self.tokenizer.eos_token_id, **kwargs)  # fmt: skip
        seqs = [p + c for p, c in zip(prompts, completions)]
        labels = [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)]
        positions = [supervised_positions({"input_ids": s, "labels": y}, "labels") for s, y in zip(seqs, labels)]
        return seqs, positions, [{"input_ids": s, "labels": y} for s, y in zip(seqs, labels)]

    def score(self, rows: list[dict], row_ids: list, seqs: list[list[int]], positions: list[np.ndarray],
              extra: list[dict]):  # fmt: skip
        """`(scored, positions, extra)`: per row `(ids (n, k) int32, log-probs (n, k) fp32, log tail (n,) fp32)` at
        its supervised positions (a cross-tokenizer cache: every teacher position, its own `extra` columns)."""
        if isinstance(self.teacher, ImportedTopK):
            return self.teacher.topk_rows(rows, row_ids, positions), positions, extra
        if self.served:
            replies = self.teacher.score(seqs).rows
            return [self.teacher.topk_rows(r, p) for r, p in zip(replies, positions)], positions, extra
        if self.teacher_tokenizer is None:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            return score_rows(self.teacher, seqs, positions, self.k, pad_id, self.vocab_size), positions, extra
        conversations = None
        if self.chat_template is not None:  # each row's conversation, rendered with the teacher's template
            conversations = [row_conversation(r) for r in rows]
            if any(c is None for c in conversations):
                bad = [rid for rid, c in zip(row_ids, conversations) if c is None]
                raise ValueError(f"Rows {bad[:10]} are not conversations, the first row is: one format only.")
        scored, extra = score_cross_rows(self.teacher, self.tokenizer, self.teacher_tokenizer, seqs, self.k,
                                         self.vocab_size, conversations=conversations)  # fmt: skip
        return scored, [np.arange(1, len(more["teacher_input_ids"])) for more in extra], extra
