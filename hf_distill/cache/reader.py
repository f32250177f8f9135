"""Reading a teacher cache: `TeacherCache` (memory-mapped shards, row lookup by id, checks); layout in
`hf_distill.cache.format`."""

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from .compact import checksum, decode_row
from .format import (
    CORRUPT_SUFFIX,
    CROSS_CACHE_COLUMNS,
    FORMAT,
    INFO_FILE,
    SHARD_DIR,
    VERSIONS,
    CachedRow,
    tokenizer_identity,
    unreadable_shard,
)


logger = logging.getLogger(__name__)


class TeacherCache:
    """A teacher cache written by `cache_teacher` (read-only, memory-mapped).

    Args:
        path (`str`): the cache folder.

    Example:
        >>> cache = TeacherCache("runs/cache")
        >>> cache.k, cache.vocab_size, len(cache)
        (64, 49152, 3000)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        info_path = self.path / INFO_FILE
        if not info_path.exists():
            raise ValueError(
                f"{self.path} is not a teacher cache (no {INFO_FILE}); build one with `hf-distill cache-teacher` or "
                "`hf_distill.cache.cache_teacher`."
            )
        self.info = json.loads(info_path.read_text())
        if self.info.get("format") != FORMAT or self.info.get("version") not in VERSIONS:
            raise ValueError(
                f"{info_path} is not an hf-distill teacher cache of a version this library reads ({list(VERSIONS)}); "
                "rebuild it with `hf-distill cache-teacher`, or upgrade hf-distill."
            )
        shards = sorted((self.path / SHARD_DIR).glob("*.arrow"))
        if not shards:
            raise ValueError(f"The teacher cache {self.path} holds no shards yet; run `hf-distill cache-teacher`.")
        parts = []
        self._shards = shards
        for shard in shards:
            try:
                parts.append(Dataset.from_file(str(shard)))
            except (pa.ArrowException, OSError) as error:
                raise unreadable_shard(shard, error) from error
        self.dataset: Dataset = concatenate_datasets(parts)
        self._shard_ends = np.cumsum([len(part) for part in parts])
        self._arrow = self.dataset.with_format("arrow")
        self._index: dict[Any, int] = {}
        for i, rid in enumerate(self._arrow["row_id"].to_pylist()):
            self._index.setdefault(rid, i)
        self._check_complete()

    def _check_complete(self) -> None:
        """A cache marked complete must still hold the `num_rows` rows it was finished with (from the shards' row
        ids, already in memory: no full read)."""
        expected = self.info.get("num_rows")
        if self.info.get("status") != "complete" or expected is None or len(self._index) >= expected:
            return
        lost = expected - len(self._index)
        named = ""
        if self.info.get("ids_from_index"):
            gone = [i for i in range(expected) if i not in self._index]
            named = f" (ids {gone[:10]}{' ...' if len(gone) > 10 else ''})"
        raise ValueError(
            f"The teacher cache {self.path} lost {lost} of its {expected} rows{named}: a shard file under "
            f"{SHARD_DIR}/ was deleted or truncated. Re-run `hf-distill cache-teacher` with the same settings and "
            "output_dir: it rebuilds the missing rows and keeps the others."
        )

    k = property(lambda self: int(self.info["k"]))
    compact = property(lambda self: VERSIONS[self.info["version"]] == "compact")
    vocab_size = property(lambda self: int(self.info["vocab_size"]))
    id_column = property(lambda self: self.info["id_column"])
    supervision = property(lambda self: self.info["supervision"])
    max_length = property(lambda self: self.info["max_length"])
    cross_tokenizer = property(lambda self: self.info.get("teacher_tokenizer") is not None)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, row_id: Any) -> bool:
        return row_id in self._index

    def row_ids(self) -> list[Any]:
        """Every cached row id, in shard order."""
        return list(self._index)

    def table(self, row_ids: Sequence[Any]) -> pa.Table:
        """The stored Arrow rows of `row_ids` (every column of the format, undecoded), in that order."""
        return self._arrow[[self._index[rid] for rid in row_ids]]

    def missing(self, row_ids: Sequence[Any]) -> list[Any]:
        """The ids among `row_ids` that the cache lacks."""
        return [rid for rid in row_ids if rid not in self._index]

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise a ValueError unless `tokenizer` has the token -> id map the cache was built with."""
        ours, theirs = tokenizer_identity(tokenizer), self.info["tokenizer"]
        if ours["vocab_sha256"] != theirs["vocab_sha256"]:
            raise ValueError(
                f"The teacher cache {self.path} was built with another tokenizer ({theirs['name_or_path']!r}, "
                f"{theirs['vocab_size']} tokens) than the student's ({ours['name_or_path']!r}, {ours['vocab_size']} "
                "tokens); its token ids would not match. Rebuild the cache with the student's tokenizer."
            )

    def attach_row_ids(self, dataset: Dataset | None) -> Dataset | None:
        """`dataset` with the cache's id column (added as the row index when the cache was built that way), after
        checking that the cache holds every one of its ids (a ValueError names the first missing ones, their count
        and the fix), so that a run never stops at the first batch that reaches a missing row."""
        if dataset is None or getattr(dataset, "column_names", None) is None:  # e.g. an IterableDataset: unchecked
            return dataset
        if self.id_column not in dataset.column_names:
            if not self.info.get("ids_from_index"):
                raise ValueError(
                    f"The training dataset has no `{self.id_column}` column, which the teacher cache {self.path} uses "
                    "to find each row's teacher entries; keep that column in the dataset."
                )
            logger.info("Adding a `%s` column (row index) to match the teacher cache's rows.", self.id_column)
            dataset = dataset.add_column(self.id_column, list(range(len(dataset))))
        missing = self.missing(dataset[self.id_column])
        if missing:
            raise ValueError(
                f"The teacher cache {self.path} has no entries for {len(missing)} of the {len(dataset)} training rows "
                f"(ids {missing[:10]}{' ...' if len(missing) > 10 else ''}). Re-run `hf-distill cache-teacher` on "
                "this dataset with the same output_dir: rows already cached are kept, the missing ones are computed."
            )
        return dataset

    def lookup(self, row_ids: Sequence[Any]) -> list[CachedRow]:
        """The cached rows for `row_ids`; a ValueError names the ids the cache lacks."""
        missing = self.missing(row_ids)
        if missing:
            raise ValueError(
                f"The teacher cache {self.path} has no entries for {len(missing)} row(s) of this batch: ids "
                f"{missing[:10]}. Cache every training (and evaluation) row: re-run `hf-distill cache-teacher` on "
                "that dataset with the same output_dir (rows already cached are skipped)."
            )
        positions = [self._index[rid] for rid in row_ids]
        table = self.table(row_ids)
        if self.compact:
            return self._decode(table, row_ids, positions)
        k = self.k
        ids, id_off = _list_column(table, "topk_ids")
        values, _ = _list_column(table, "topk_logprobs")
        tails, tail_off = _list_column(table, "tail_logmass")
        cross = {name: _list_column(table, name) for name in CROSS_CACHE_COLUMNS} if self.cross_tokenizer else {}
        if self.info["dtype"] == "bfloat16":
            values = torch.from_numpy(values.astype(np.int16)).view(torch.bfloat16).float().numpy()
            tails = torch.from_numpy(tails.astype(np.int16)).view(torch.bfloat16).float().numpy()
            if cross:
                flat, offsets = cross["target_logprobs"]
                flat = torch.from_numpy(flat.astype(np.int16)).view(torch.bfloat16).float().numpy()
                cross["target_logprobs"] = (flat, offsets)
        digests = table.column("input_digest").to_pylist()
        rows = []
        for b, rid in enumerate(row_ids):
            a, z = id_off[b], id_off[b + 1]
            rows.append(
                CachedRow(
                    rid,
                    digests[b],
                    ids[a:z].astype(np.int32).reshape(-1, k),
                    values[a:z].astype(np.float32).reshape(-1, k),
                    tails[tail_off[b] : tail_off[b + 1]].astype(np.float32),
                    {name: flat[offsets[b] : offsets[b + 1]] for name, (flat, offsets) in cross.items()} or None,
                )
            )
            if cross:
                rows[-1].teacher["teacher_offsets"] = rows[-1].teacher["teacher_offsets"].reshape(-1, 2)
                rows[-1].teacher["target_logprobs"] = rows[-1].teacher["target_logprobs"].astype(np.float32)
        return rows

    def _decode(self, table: pa.Table, row_ids: Sequence[Any], positions: list[int]) -> list[CachedRow]:
        """Compact rows -> `CachedRow`s (vectorised per row; a bad checksum names the shard file)."""
        payloads = table.column("payload").to_pylist()
        crcs = table.column("crc32").to_pylist()
        counts = table.column("num_tokens").to_pylist()
        orders = table.column("id_golomb_order").to_pylist()
        digests = table.column("input_digest").to_pylist()
        rows = []
        for rid, where, payload, crc, n, order, digest in zip(
            row_ids, positions, payloads, crcs, counts, orders, digests, strict=True
        ):
            try:
                if checksum(payload) != crc:
                    raise ValueError("checksum mismatch")
                ids, logprobs, tail = decode_row(payload, n, self.k, order, self.info["value_bits"])
            except ValueError as error:
                shard = self._shards[int(np.searchsorted(self._shard_ends, where, side="right"))]
                raise ValueError(
                    f"Row {rid!r} of the teacher cache shard {shard} is corrupt ({error}). Re-run `hf-distill "
                    "cache-teacher` with the same settings and output_dir: it sets the shard aside as "
                    f"{shard.name}{CORRUPT_SUFFIX} and recomputes its rows."
                ) from error
            rows.append(CachedRow(rid, digest, ids, logprobs, tail))
        return rows

    def training_dataset(self) -> Dataset:
        """For `generate=True` caches: the rows with teacher-written completions (id column, input_ids, labels)."""
        if "input_ids" not in self.dataset.column_names:
            raise ValueError(f"{self.path} was not built with generate=True; train on the dataset it was built from.")
        data = self.dataset.select_columns(["row_id", "input_ids", "labels"])
        return data.rename_column("row_id", self.id_column) if self.id_column != "row_id" else data


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and row offsets (starting at 0) of a list column."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]
