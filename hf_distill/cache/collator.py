"""`TeacherCacheCollator`: puts a teacher cache's entries into each training batch, at their label positions."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.data.data_collator import DataCollatorMixin

from ..losses import IGNORE_INDEX
from .format import input_digest, supervised_positions
from .reader import TeacherCache


# ----------------------------------------------------------------------------------------------- teacher cache
def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@dataclass
class TeacherCacheCollator(DataCollatorMixin):
    """Wraps a collator and adds the cached teacher entries of each row, looked up by the cache's id column.

    Each row is cut to the cache's `max_length` (as when the cache was built), checked against the cache (same
    input_ids digest and number of supervised positions), collated by `collator`, and its entries are placed at their
    label positions in the padded batch (left or right padding). A row id the cache lacks, or a supervised token of
    the batch without an entry, raises a ValueError naming the rows. A cross-tokenizer cache (built with the teacher's
    own tokenizer) adds the teacher's side of each row instead, on the teacher's positions
    (`cache.cross_tokenizer.cross_cache_batch`).

    Adds `teacher_topk_ids` `(B, T, k)` int32, `teacher_topk_logprobs` `(B, T, k)` fp32 (temperature 1),
    `teacher_tail_logmass` `(B, T)` fp32 and `teacher_cache_mask` `(B, T)` bool, indexed by label position (entry
    `[b, j]` is the teacher's distribution of token j given tokens < j).

    Example (not a doctest: it needs a cache on disk; see tests/test_cache.py):

        collator = TeacherCacheCollator(TeacherCache("runs/cache"), DataCollatorForSeq2Seq(tok, padding=True))
        batch = collator([{"row_id": 0, "input_ids": [2, 7, 9], "labels": [-100, 7, 9]}])
        batch["teacher_cache_mask"]  # tensor([[False, True, True]]): entries for the two supervised tokens

    Args:
        cache (`TeacherCache`): the cache (its `id_column`, `k`, `supervision` and `max_length` are used).
        collator (`Callable`): the collator producing `input_ids` (and `labels`) from rows without the id column.
    """

    cache: TeacherCache
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    return_tensors: str = "pt"

    @property
    def dataset_columns(self) -> tuple[str, ...]:
        """The raw columns the wrapped collator reads (e.g. `RationaleCollator`'s), passed through."""
        return tuple(getattr(self.collator, "dataset_columns", ()) or ())

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """Raw columns the trainer keeps through `remove_unused_columns`: the cache's id column (never a model
        input: it is consumed here) and the wrapped collator's own."""
        return tuple(dict.fromkeys((self.cache.id_column, *getattr(self.collator, "kept_columns", ()))))

    def _strip(self, feature: dict[str, Any]) -> dict[str, Any]:
        """The row without its id, per-token columns cut to the cache's max_length."""
        id_column, max_length = self.cache.id_column, self.cache.max_length
        n = len(feature["input_ids"])
        out = {}
        for key, value in feature.items():
            if key == id_column:
                continue
            if max_length is not None and hasattr(value, "__len__") and not isinstance(value, str) and len(value) == n:
                value = value[:max_length]
            out[key] = value
        return out

    @staticmethod
    def _offset(padded: torch.Tensor, seq: list[int], row_id: Any) -> int:
        width, n = padded.shape[0], len(seq)
        target = torch.as_tensor(seq, dtype=padded.dtype)
        if n <= width and torch.equal(padded[:n].cpu(), target):
            return 0
        if n <= width and torch.equal(padded[width - n :].cpu(), target):
            return width - n
        raise ValueError(
            f"Row {row_id!r}: the collator changed its input_ids (truncated, packed or reordered them), so the "
            "teacher cache's positions no longer line up. Use a collator that only pads."
        )

    def torch_call(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        id_column = self.cache.id_column
        lacking = [i for i, f in enumerate(features) if id_column not in f]
        if lacking:
            raise ValueError(
                f"Rows {lacking} of the batch have no `{id_column}` column, which the teacher cache uses to find "
                "their entries. Keep it in the dataset (the trainer keeps it out of the model inputs)."
            )
        row_ids = [_scalar(f[id_column]) for f in features]
        stripped = [self._strip(f) for f in features]
        cached = self.cache.lookup(row_ids)
        batch = dict(self.collator(stripped))
        input_ids = batch["input_ids"]
        rows, width, k = input_ids.shape[0], input_ids.shape[1], self.cache.k
        topk_ids = torch.zeros(rows, width, k, dtype=torch.int32)
        topk_logprobs = torch.zeros(rows, width, k, dtype=torch.float32)
        tail = torch.zeros(rows, width, dtype=torch.float32)
        mask = torch.zeros(rows, width, dtype=torch.bool)
        for b, (feature, entry) in enumerate(zip(stripped, cached)):
            seq = [int(x) for x in _as_list(feature["input_ids"])]
            if input_digest(seq) != entry.input_digest:
                raise ValueError(
                    f"Row {entry.row_id!r}: its input_ids differ from those the teacher cache was built on (another "
                    "tokenisation or dataset). Rebuild the cache from the training dataset."
                )
            if self.cache.cross_tokenizer:  # entries on the teacher's own tokens (`teachers.cross_tokenizer_cache`)
                continue
            positions = supervised_positions({k_: _as_list(v) for k_, v in feature.items()}, self.cache.supervision)
            if len(positions) != entry.ids.shape[0]:
                raise ValueError(
                    f"Row {entry.row_id!r} has {len(positions)} supervised tokens but the cache holds "
                    f"{entry.ids.shape[0]}; its `{self.cache.supervision}` column changed since the cache was built."
                )
            cols = torch.as_tensor(positions + self._offset(input_ids[b], seq, entry.row_id), dtype=torch.long)
            topk_ids[b, cols] = torch.from_numpy(np.ascontiguousarray(entry.ids, dtype=np.int32))
            topk_logprobs[b, cols] = torch.from_numpy(np.ascontiguousarray(entry.logprobs))
            tail[b, cols] = torch.from_numpy(np.ascontiguousarray(entry.tail))
            mask[b, cols] = True
        if self.cache.cross_tokenizer:
            from .cross_tokenizer import cross_cache_batch

            device = input_ids.device
            batch.update({key: value.to(device) for key, value in cross_cache_batch(self.cache, cached).items()})
            return batch
        if "labels" in batch:
            supervised = batch["labels"].cpu() != IGNORE_INDEX
            supervised[:, 0] = False  # never predicted by a causal LM
            uncovered = (supervised & ~mask).any(-1)
            if uncovered.any():
                bad = [row_ids[b] for b in uncovered.nonzero().flatten().tolist()]
                raise ValueError(
                    f"Rows {bad[:10]} have supervised tokens without a cached teacher entry: the collator's labels "
                    f"supervise tokens that the cache (supervision rule `{self.cache.supervision}`) did not. Give the "
                    "dataset a `labels` column and rebuild the cache, or use a collator that keeps those labels."
                )
        device = input_ids.device
        batch.update(
            teacher_topk_ids=topk_ids.to(device),
            teacher_topk_logprobs=topk_logprobs.to(device),
            teacher_tail_logmass=tail.to(device),
            teacher_cache_mask=mask.to(device),
        )
        return batch
