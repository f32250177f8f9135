"""The teacher cache's on-disk format (shared by the writer `cache.writer` and the reader `cache.reader`).

Offline teacher: `cache_teacher` runs a causal-LM teacher once over a tokenised dataset and stores, per supervised
token, its top-k token ids, their log-probabilities and the log of the remaining tail mass; the trainer then distils
from the cache with no teacher in memory (`teacher_cache=path`, `TeacherCacheCollator`, `losses/sparse.py`).

Layout of `output_dir`:

    cache_info.json   format version, tokenizer identity (sha256 of its token -> id map), teacher identity (name or
                      path + sha256 of its config), k, value dtype, vocab_size, temperature (1.0), supervision rule,
                      max_length, id column, status
    shards/*.arrow    Arrow stream files (`datasets.Dataset.from_file`; `TeacherCache(path).dataset` concatenates
                      them), one row per dataset row:
        row_id          int64 | string   the dataset's id column (default: the row index)
        input_digest    int64            hash of the row's input_ids (after max_length): catches a cache built on
                                         other data
        num_tokens      int32            n, the supervised positions cached for the row
        topk_ids        list<int32>      n * k token ids, position-major, most likely first
        topk_logprobs   list<float16>    n * k teacher log-probabilities at temperature 1 (bfloat16 is stored as its
                                         int16 bit pattern, float32 as float32)
        tail_logmass    list<float16>    n values, log(1 - sum of the k probabilities), computed as the logsumexp of
                                         the other V - k log-probabilities (-inf when k = V); same dtype as above
        input_ids, labels  list<int32>   only in `generate=True` caches: the rows with teacher-written completions
      A cross-tokenizer cache (`teacher_tokenizer=` differs from `tokenizer`, for `cross_tokenizer_loss`) caches every
      position j >= 1 of the teacher's own tokenization of the row's decoded text (`n` = its length - 1), and adds
        teacher_input_ids list<int32>    the teacher's tokens (its BOS first)
        teacher_offsets   list<int32>    2 per teacher token: its character span in the text (-1, -1: special)
        target_logprobs   list<float16>  n values, the log-prob of the actual token j; same dtype as above
      cache_info.json then records both tokenizers (`tokenizer`: the dataset's, i.e. the student's;
      `teacher_tokenizer`: the teacher's), and `teacher_tokenizer/` holds a copy of the teacher's tokenizer.
      With `compression="compact"` (format version 2) the three top-k columns are replaced by
        id_golomb_order uint8            the row's exp-Golomb order for its delta-coded ids
        crc32           uint32           CRC-32 of the payload (checked on every read; cache-teacher sets aside a shard
                                         whose rows fail it)
        payload         binary           ids, quantized log-probs and tail of the row (`cache.compact`)
      Version-1 (uncompressed) caches are still read and still written by compression="none".

Positions. Causal LM: the cached distribution for label position j (j >= 1) is the teacher's softmax of the logits at
j - 1. A row's supervised label positions are those with labels[j] != -100 when the dataset has `labels`, else
completion_mask / assistant_masks == 1 (TRL's columns), else attention_mask == 1, else all j >= 1.

Temperature. Log-probabilities are stored at T = 1; at train time the KD temperature T is applied by renormalising
the top-k log-probabilities divided by T together with a tail bucket of tempered mass (exact definition in
`hf_distill.losses.sparse`). So one cache serves every temperature.

Size per supervised token: k * (4 + 2) bytes of ids and fp16 values plus 2 bytes of tail, plus per row about 32 bytes
(id, digest, count, list offsets), i.e. <= 6k + 8 bytes for rows of a few supervised tokens or more. Compact: about
2 bytes per entry (SmolLM2 top-64 on e-SNLI: ~9.3 bits per id + 6 bits per log-prob + 4 bytes per token; measured
figures and the quantization error in docs/teacher_cache.md).

Integrity. A cache marked complete must hold its `num_rows` rows when opened, and the trainer checks that it holds
every id of the training set before training; an unreadable shard raises an error naming the file. Re-running
`cache_teacher` on the same output_dir sets unreadable shards aside (`*.arrow.corrupt`, with a warning) and recomputes
every missing row.

Resume and processes. Shards are written every `rows_per_shard` rows, to a temporary name then renamed (a kill never
leaves a torn shard). A re-run reads the row ids already cached (checking their input digests), splits the rest across
processes with `accelerate.PartialState.split_between_processes` (`accelerate launch` / `torchrun`) and caches only
those. Rows of another dataset may be added to the same cache (e.g. an evaluation split) if their ids are distinct.
The settings check, shard writing and splitting are `hf_distill.jobs.ResumableJob`'s (docs/resumable_jobs.md).
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..jobs import fingerprint
from ..losses import IGNORE_INDEX
from .compact import checksum


INFO_FILE = "cache_info.json"


TEACHER_TOKENIZER_DIR = "teacher_tokenizer"  # a cross-tokenizer cache's copy of the teacher's tokenizer


SHARD_DIR = "shards"


CORRUPT_SUFFIX = ".corrupt"  # unreadable shards are renamed so, then recomputed, by a resumed `cache_teacher`


FORMAT = "hf-distill-teacher-cache"


VERSION = 1  # uncompressed rows (int32 ids + fp16/bf16/fp32 values); still written by compression="none"


COMPACT_VERSION = 2  # compression="compact": one encoded payload per row (`cache.compact`)


VERSIONS = {VERSION: "none", COMPACT_VERSION: "compact"}


COMPRESSIONS = tuple(VERSIONS.values())


VALUE_DTYPES = {"float16": pa.float16(), "bfloat16": pa.int16(), "float32": pa.float32()}


SUPERVISION_COLUMNS = ("labels", "completion_mask", "assistant_masks", "attention_mask")


# Keys the collator adds to a batch (label-position indexed, `(B, T, k)` / `(B, T)`); they are not model inputs.
CACHE_BATCH_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logmass", "teacher_cache_mask")


# Checked when a run resumes into an existing cache: a change in any of them would mix incompatible rows.
RESUME_KEYS = (
    "k",
    "dtype",
    "vocab_size",
    "tokenizer",
    "teacher",
    "supervision",
    "max_length",
    "id_column",
    "generate",
    "compression",
    "value_bits",
    "teacher_tokenizer",
    "teacher_chat_template",
)


# keys that caches written before them lack
RESUME_DEFAULTS = {"compression": "none", "teacher_tokenizer": None, "teacher_chat_template": None}


# Cross-tokenizer caches (`teacher_tokenizer=`): per row the teacher's own tokens, their character offsets in the
# row's decoded text, and the log-prob of each actual next token; added to the batch by `TeacherCacheCollator`.
CROSS_CACHE_COLUMNS = ("teacher_input_ids", "teacher_offsets", "target_logprobs")


CROSS_CACHE_BATCH_KEYS = ("teacher_input_ids", "teacher_offsets", "teacher_target_logprobs")


# ----------------------------------------------------------------------------------------------- identities
def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """`{"name_or_path", "vocab_size", "vocab_sha256"}`: two tokenizers with the same token -> id map match."""
    vocab = tokenizer.get_vocab()
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None) or None,
        "vocab_size": len(vocab),
        "vocab_sha256": fingerprint(sorted(vocab.items(), key=lambda kv: kv[1])),
    }


def teacher_identity(teacher: nn.Module, name_or_path: str | None = None) -> dict[str, Any]:
    """`{"name_or_path", "model_type", "config_sha256"}` (config without paths, versions and dtype)."""
    config = getattr(teacher, "config", None)
    as_dict = config.to_dict() if config is not None else {}
    volatile = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config", "_commit_hash"}
    return {
        "name_or_path": name_or_path or as_dict.get("_name_or_path") or type(teacher).__name__,
        "model_type": as_dict.get("model_type"),
        "config_sha256": fingerprint({k: v for k, v in as_dict.items() if k not in volatile}),
    }


def input_digest(input_ids: Sequence[int]) -> int:
    """A signed 64-bit hash of a row's token ids."""
    data = np.asarray(input_ids, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


# ----------------------------------------------------------------------------------------------- positions
def supervision_rule(columns: Sequence[str]) -> str:
    """Which column marks supervised tokens: the first of labels, completion_mask, assistant_masks, attention_mask
    present, else "all"."""
    return next((c for c in SUPERVISION_COLUMNS if c in columns), "all")


def supervised_positions(row: dict[str, Any], rule: str, max_length: int | None = None) -> np.ndarray:
    """Label positions j >= 1 of one row whose target is supervised (see the module docstring).

    Args:
        row (`dict`): `input_ids` and the `rule` column (and `attention_mask` if present), lists of length T.
        rule (`str`): a name of `SUPERVISION_COLUMNS` or "all".
        max_length (`int`, *optional*): the row is cut to this many tokens first.

    Returns:
        `np.ndarray`: int64 positions, ascending.
    """
    n = len(row["input_ids"][:max_length])
    if rule == "all":
        keep = np.ones(n, dtype=bool)
    else:
        if rule not in row:
            raise ValueError(f"The row has no `{rule}` column, which the teacher cache used to find its targets.")
        values = np.asarray(row[rule][:max_length])
        if len(values) != n:
            raise ValueError(f"`{rule}` has {len(values)} entries but `input_ids` has {n}.")
        keep = values != IGNORE_INDEX if rule == "labels" else values == 1
        if rule in ("completion_mask", "assistant_masks") and "attention_mask" in row:
            keep &= np.asarray(row["attention_mask"][:max_length]) == 1
    keep[:1] = False  # position 0 is never predicted by a causal LM
    return np.nonzero(keep)[0]


def unreadable_shard(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"The teacher cache shard {path} is unreadable ({type(error).__name__}: {error}); the file is truncated or "
        "corrupt. Re-run `hf-distill cache-teacher` with the same settings and output_dir: it sets the shard aside "
        f"as {path.name}{CORRUPT_SUFFIX} and recomputes its rows."
    )


def read_shard(path: Path, verify: bool = False) -> pa.Table:
    """The whole table of one shard file (memory-mapped); a ValueError names the file when it cannot be read, or with
    `verify` when a compact row's payload does not match its CRC-32."""
    try:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (pa.ArrowException, OSError) as error:
        raise unreadable_shard(path, error) from error
    if verify and "crc32" in table.column_names:
        crcs = table.column("crc32").to_pylist()
        bad = [i for i, (x, c) in enumerate(zip(table.column("payload").to_pylist(), crcs)) if checksum(x) != c]
        if bad:
            raise unreadable_shard(path, ValueError(f"checksum mismatch in {len(bad)} row(s)"))
    return table


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class CachedRow:
    """One cached row: `ids` `(n, k)` int32, `logprobs` `(n, k)` fp32, `tail` `(n,)` fp32, and its input digest; in
    a cross-tokenizer cache also `teacher`: `teacher_input_ids` `(n + 1,)`, `teacher_offsets` `(n + 1, 2)` and
    `target_logprobs` `(n,)`."""

    row_id: Any
    input_digest: int
    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    teacher: dict[str, np.ndarray] | None = None
