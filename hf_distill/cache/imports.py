"""Teacher log-prob datasets written by other tools, read into our teacher cache (`cache-teacher --import`).

Two formats, read from their public code (our own readers; conventions below are theirs):

- **Axolotl** (`axolotl-ai-cloud/axolotl`, `src/axolotl/integrations/kd`): the prepared (tokenised) KD dataset, rows
  `input_ids`, `labels` and per input token j a row of `target_token_ids[j]`, `target_logprobs[j]`, `target_mask[j]`
  (k entries each). Row j is the teacher's distribution of `input_ids[j + 1]` ("Target alignment" in its KD README;
  `target_mask[j]` is 0 where `labels[j + 1] == -100`; the last row is padding). Its chat-template strategy stores
  the top k renormalised to sum to 1, rescaled from the dataset's generation `temperature` T1 to `kd_temperature` T2
  (`p ** (T1 / T2) / Z`); the mass outside the top k is not kept.
- **DistillKit** (`arcee-ai/DistillKit`, `distillkit/compression`): Parquet rows `input_ids`, `compressed_logprobs`,
  `bytepacked_indices`, row i being the distribution of `input_ids[i + 1]` (`len(input_ids) - 1` rows); vLLM's raw
  log-probs at temperature 1, not renormalised (the mass outside the top k is 1 - their sum). Codec:
  `hf_distill.cache.distillkit`.

Our cache stores, at each supervised label position j (`labels[j] != -100`, or every j >= 1 without labels), the
top-k ids and log-probs at temperature 1, most likely first, and the log of the mass outside them; so imported row
j - 1 becomes cache position j. Values given at a temperature T (`temperature=`, Axolotl's `kd_temperature` when it
is not 1) are brought back to T = 1 within the top k (`p_1 ∝ p_T ** T`, their total mass kept). The tail is
`log(1 - sum p)` (floored at 1e-7 of the mass when k < V, as for served teachers): a renormalised Axolotl top k thus
gets a tail of 1e-7.

Checked for every row, each with an error naming the row: the entry rows' count against `input_ids` (T rows for
Axolotl, T - 1 for DistillKit), k entries at every position, token ids (and `input_ids`) inside the student
tokenizer's vocabulary, no id twice at a position, finite values, log-probs whose probabilities do not sum to more
than e^0.1, and (Axolotl) `target_mask` set at every supervised position.
"""

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Value
from datasets import Sequence as DatasetSequence
from transformers import PreTrainedTokenizerBase

from ..generation.served import tail_logmass
from ..losses import IGNORE_INDEX
from .distillkit import COLUMNS as DISTILLKIT_COLUMNS
from .distillkit import LEGACY_COLUMNS, DistillKitCodec, find_codec
from .format import supervision_rule


IMPORT_FORMATS = ("axolotl", "distillkit")


AXOLOTL_COLUMNS = ("target_token_ids", "target_logprobs", "target_mask")


SUM_TOLERANCE = 0.1  # nats the top-k probabilities may sum above 1 (quantization) before a position is refused


TRAINING_COLUMNS = ("input_ids", "labels", "attention_mask", "completion_mask", "assistant_masks")


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(-1, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(-1, keepdims=True)))[..., 0]


def _stack(parts: list, dtype: Any, what: str, row_id: Any) -> np.ndarray:
    """`(n, k)` array from n lists of k entries; a ValueError names the row when the lengths differ."""
    lengths = {len(p) for p in parts}
    if len(lengths) > 1:
        raise ValueError(f"Row {row_id!r}: `{what}` has positions of different lengths {sorted(lengths)}.")
    return np.asarray(parts, dtype=dtype).reshape(len(parts), lengths.pop() if lengths else 0)


def read_axolotl_row(row: dict[str, Any], positions: np.ndarray, row_id: Any) -> tuple[np.ndarray, np.ndarray]:
    """The entries of an Axolotl KD row at our label positions.

    Args:
        row (`dict`): `input_ids` (T) and `target_token_ids`, `target_logprobs` (T lists of K), optional `target_mask`.
        positions (`np.ndarray`): `(n,)` label positions j >= 1; Axolotl's row j - 1 holds their distribution.
        row_id: the row's id, for errors.

    Returns:
        `tuple`: ids `(n, K)` int64 and log-probs `(n, K)` float64, as stored.
    """
    n_tokens = len(row["input_ids"])
    for column in AXOLOTL_COLUMNS:
        if column in row and len(row[column]) != n_tokens:
            raise ValueError(
                f"Row {row_id!r}: `{column}` has {len(row[column])} positions but `input_ids` has {n_tokens}; "
                "Axolotl writes one per input token (row j: the distribution of input_ids[j + 1])."
            )
    rows = (positions - 1).tolist()
    ids = _stack([row["target_token_ids"][i] for i in rows], np.int64, "target_token_ids", row_id)
    values = _stack([row["target_logprobs"][i] for i in rows], np.float64, "target_logprobs", row_id)
    if ids.shape != values.shape:
        raise ValueError(f"Row {row_id!r}: `target_token_ids` and `target_logprobs` differ in k.")
    if "target_mask" in row:
        mask = _stack([row["target_mask"][i] for i in rows], np.int64, "target_mask", row_id)
        unset = np.nonzero((mask != 1).any(-1))[0]
        if len(unset):
            j = int(positions[unset[0]])
            raise ValueError(
                f"Row {row_id!r}: token {j} is supervised (labels) but `target_mask[{j - 1}]` is not all 1, so the "
                "file has no teacher distribution for it. Axolotl's row j describes input_ids[j + 1] and is masked "
                "where labels[j + 1] == -100: a mask that disagrees comes from another alignment or other labels."
            )
    return ids, values


def read_distillkit_row(
    row: dict[str, Any], positions: np.ndarray, row_id: Any, codec: DistillKitCodec
) -> tuple[np.ndarray, np.ndarray]:
    """The entries of a DistillKit row at our label positions, decoded.

    Args:
        row (`dict`): `input_ids` (T), `compressed_logprobs` and `bytepacked_indices` (T - 1 lists of bytes).
        positions (`np.ndarray`): `(n,)` label positions j >= 1; DistillKit's row j - 1 holds their distribution.
        row_id: the row's id, for errors.
        codec (`DistillKitCodec`): the dataset's compression config.

    Returns:
        `tuple`: ids `(n, k)` int64 and log-probs `(n, k)` float64.
    """
    n_tokens = len(row["input_ids"])
    for column in DISTILLKIT_COLUMNS:
        if len(row[column]) != n_tokens - 1:
            raise ValueError(
                f"Row {row_id!r}: `{column}` has {len(row[column])} positions but `input_ids` has {n_tokens} tokens; "
                f"DistillKit writes one per token after the first ({n_tokens - 1})."
            )
    rows = (positions - 1).tolist()
    packed = {c: _stack([row[c][i] for i in rows], np.uint8, c, row_id) for c in DISTILLKIT_COLUMNS}
    for column, width in (("compressed_logprobs", codec.logprob_bytes), ("bytepacked_indices", codec.index_bytes)):
        if len(rows) and packed[column].shape[1] != width:
            raise ValueError(
                f"Row {row_id!r}: `{column}` holds {packed[column].shape[1]} bytes per position but the compression "
                f"config needs {width}: the config is not the one these rows were written with."
            )
    if not rows:
        return np.zeros((0, codec.k), dtype=np.int64), np.zeros((0, codec.k))
    return codec.decode_ids(packed["bytepacked_indices"]), codec.decode_logprobs(packed["compressed_logprobs"])


def to_cache_entries(
    ids: np.ndarray, values: np.ndarray, k: int, vocab_size: int, row_id: Any, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked imported entries -> the cache's: top `k` at temperature 1, most likely first, and the log tail mass.

    Args:
        ids (`np.ndarray`): `(n, K)` token ids, `K >= k`.
        values (`np.ndarray`): `(n, K)` log-probs at `temperature`.
        k (`int`): entries kept per position.
        vocab_size (`int`): V, the width of the logits (ids must be below it).
        row_id: the row's id, for errors.
        temperature (`float`): the temperature the values are at (brought back to 1 within the top K).

    Returns:
        `tuple`: ids `(n, k)` int32, log-probs `(n, k)` fp32, log tail mass `(n,)` fp32.
    """
    if len(ids) == 0:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), torch.zeros(0)
    if ids.shape[1] < k:
        raise ValueError(f"Row {row_id!r} has {ids.shape[1]} entries per position, fewer than k={k}.")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise ValueError(
            f"Row {row_id!r}: token id {bad} is outside the student's vocabulary ({vocab_size} tokens): the logits "
            "were computed with another tokenizer (or give the model's padded size with --vocab_size)."
        )
    ordered = np.sort(ids, axis=-1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError(f"Row {row_id!r}: a position lists the same token id twice.")
    if not np.isfinite(values).all():
        raise ValueError(
            f"Row {row_id!r}: non-finite log-probs (-inf, nan) at a supervised position: fewer than k entries were "
            "stored there."
        )
    mass = _logsumexp(values)  # (n,) log of the top-K probability mass
    if (mass > SUM_TOLERANCE).any():
        raise ValueError(
            f"Row {row_id!r}: the top-k probabilities sum to {float(np.exp(mass.max())):.3g} > 1: the values are not "
            "log-probabilities (logits?)."
        )
    if temperature != 1.0:  # p_1 ∝ p_T ** T within the top K, the top K's mass kept
        scaled = temperature * values
        values = scaled - _logsumexp(scaled)[:, None] + np.minimum(mass, 0.0)[:, None]
    order = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    ids, values = np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)
    tail = tail_logmass(torch.from_numpy(values), vocab_size)
    return torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(values.astype(np.float32)), tail


@dataclass
class ImportedTopK:
    """Another tool's top-k log-probs as the teacher of `cache_teacher` (the `Scorer` reads its rows).

    Attributes:
        format (`str`): "axolotl" or "distillkit".
        source (`str`): the dataset as named (its identity in cache_info.json).
        k (`int`): entries per position kept in the cache (at most the file's).
        file_k (`int`): entries per position in the file.
        vocab_size (`int`): V, the width of the logits the entries index.
        temperature (`float`): the temperature of the stored values.
        codec (`DistillKitCodec`, *optional*): DistillKit's compression config.
    """

    format: str
    source: str
    k: int
    file_k: int
    vocab_size: int
    temperature: float = 1.0
    codec: DistillKitCodec | None = None

    def identity(self) -> dict[str, Any]:
        """The teacher's entry in cache_info.json: the imported dataset and how it was read."""
        return {
            "name_or_path": self.source,
            "model_type": None,
            "imported_from": self.format,
            "import_temperature": self.temperature,
            "file_k": self.file_k,
            "distillkit_config": asdict(self.codec) if self.codec is not None else None,
        }

    def topk_rows(
        self, rows: list[dict[str, Any]], row_ids: list[Any], positions: list[np.ndarray]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per row, the cache's entries at its supervised label positions.

        Args:
            rows (`list[dict]`): B dataset rows (the format's columns and `input_ids`).
            row_ids (`list`): their ids.
            positions (`list[np.ndarray]`): per row, label positions j >= 1.

        Returns:
            `list` of B triples: ids `(n_b, k)` int32, log-probs `(n_b, k)` fp32, log tail mass `(n_b,)` fp32.
        """
        out = []
        for row, row_id, pos in zip(rows, row_ids, positions, strict=True):
            input_ids = np.asarray(row["input_ids"], dtype=np.int64)
            if len(input_ids) and (input_ids.max() >= self.vocab_size or input_ids.min() < 0):
                raise ValueError(
                    f"Row {row_id!r}: input id {int(input_ids.max())} is outside the student's vocabulary "
                    f"({self.vocab_size} tokens): the dataset was tokenised with another tokenizer."
                )
            if self.format == "axolotl":
                ids, values = read_axolotl_row(row, pos, row_id)
            else:
                ids, values = read_distillkit_row(row, pos, row_id, self.codec)
            out.append(to_cache_entries(ids, values, self.k, self.vocab_size, row_id, self.temperature))
        return out


def _file_k(dataset: Dataset, column: str) -> int:
    """Entries per position in the first row that has a position."""
    for row in dataset.select_columns([column]):
        if len(row[column]):
            return len(row[column][0])
    raise ValueError(f"The dataset's `{column}` column holds no position in any row.")


def prepare_import(
    format: str,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    k: int | None = None,
    temperature: float = 1.0,
    distillkit_config: str | os.PathLike | None = None,
    vocab_size: int | None = None,
) -> ImportedTopK:
    """Check another tool's dataset against the student tokenizer and return the source `cache_teacher` reads.

    Args:
        format (`str`): "axolotl" (prepared KD rows) or "distillkit" (compressed Parquet rows).
        dataset (`Dataset`): the rows, with `input_ids` of length T each.
        tokenizer (`PreTrainedTokenizerBase`): the student's tokenizer (the cache records it; ids must fit in it).
        source (`str`): the dataset's name or path (recorded; a DistillKit config is looked for beside it).
        k (`int`, *optional*): entries kept per position (default: all of the file's).
        temperature (`float`): the temperature the stored values are at (Axolotl's `kd_temperature`; 1 for
            DistillKit).
        distillkit_config (`str`, *optional*): DistillKit's `compression_config.yaml` (default: beside the data).
        vocab_size (`int`, *optional*): V, the width of the teacher's (and student's) logits when the model's
            embedding is padded beyond the tokenizer (its config's `vocab_size`); default `len(tokenizer)`. Token
            ids must be below it.

    Returns:
        `ImportedTopK`: pass it as the teacher of `cache_teacher(source, dataset, tokenizer, ..., k=source.k)`.
    """
    if format not in IMPORT_FORMATS:
        raise ValueError(f"--import must be one of {list(IMPORT_FORMATS)}, got {format!r}.")
    if temperature <= 0:
        raise ValueError(f"The import temperature must be > 0, got {temperature}.")
    columns = dataset.column_names
    needed = ("input_ids", *(AXOLOTL_COLUMNS[:2] if format == "axolotl" else DISTILLKIT_COLUMNS))
    if format == "distillkit" and set(LEGACY_COLUMNS) <= set(columns):
        raise ValueError(
            "This is DistillKit's legacy compressed format (packed_indices / exact_values / coeffs: centred logits, "
            "not log-probs), which `--import distillkit` does not read."
        )
    if not set(needed) <= set(columns):
        raw = format == "axolotl" and "input_ids" not in columns
        hint = " (untokenised Axolotl rows: run `axolotl preprocess`, then import its prepared dataset)" if raw else ""
        raise ValueError(f"An {format} teacher dataset has columns {list(needed)}; this one has {columns}{hint}.")
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the student tokenizer ({len(tokenizer)} tokens).")
    vocab_size = vocab_size or len(tokenizer)
    codec = None
    if format == "distillkit":
        codec = find_codec(source, distillkit_config)
        if codec.d < len(tokenizer):
            raise ValueError(
                f"The DistillKit token ids were packed for a vocabulary of {codec.d} ids but the student tokenizer "
                f"has {len(tokenizer)} tokens: the logits come from another tokenizer."
            )
        file_k = codec.k
    else:
        file_k = _file_k(dataset, "target_token_ids")
    k = file_k if k is None else k
    if not 1 <= k <= file_k:
        raise ValueError(f"k={k}: the {format} file stores {file_k} entries per position (1 <= k <= {file_k}).")
    if k > vocab_size:
        raise ValueError(f"The file stores {k} entries per position, more than the student vocabulary ({vocab_size}).")
    return ImportedTopK(format, source, k, file_k, vocab_size, temperature, codec)


def training_rows(dataset: Dataset, id_column: str) -> Dataset:
    """The imported rows to train on: the id column and the token columns, without the teacher's entries."""
    keep = [c for c in (id_column, *TRAINING_COLUMNS) if c in dataset.column_names]
    rows = dataset.select_columns(keep)
    if supervision_rule(keep) in ("attention_mask", "all"):  # DistillKit trains on labels = input_ids

        def labels(row: dict[str, Any]) -> dict[str, list[int]]:
            mask = row.get("attention_mask") or [1] * len(row["input_ids"])
            return {"labels": [int(x) if m == 1 else IGNORE_INDEX for x, m in zip(row["input_ids"], mask)]}

        rows = rows.map(labels)
    if rows.features["input_ids"].feature.dtype != "int64":  # DistillKit stores uint64
        rows = rows.cast_column("input_ids", DatasetSequence(Value("int64")))
    return rows
