"""The offline teacher cache: each supervised token's top-k teacher log-probs, written once and read at training
time with no teacher in memory.

- `format.py`: the on-disk layout (cache_info.json + Arrow shards), identities, supervised positions.
- `writer.py`: `cache_teacher` (resumable, sharded across processes) and `tokenize_for_cache`.
- `reader.py`: `TeacherCache`; `collator.py`: `TeacherCacheCollator` (entries into each training batch).
- `compact.py`: the compact row codec (format version 2); `quality.py`: what its quantization costs.
- `cross_tokenizer.py`: caches on the teacher's own tokenization (`cross_tokenizer_loss`).
- `imports.py`: other tools' top-k log-prob datasets (Axolotl, DistillKit) as the source of a cache;
  `distillkit.py`: DistillKit's compressed rows, decoded.
"""

from .collator import TeacherCacheCollator
from .compact import DEFAULT_VALUE_BITS, decode_row, encode_row
from .cross_tokenizer import cross_cache_batch, score_cross_rows
from .distillkit import DistillKitCodec
from .format import (
    CACHE_BATCH_KEYS,
    COMPRESSIONS,
    CROSS_CACHE_BATCH_KEYS,
    INFO_FILE,
    SHARD_DIR,
    TEACHER_TOKENIZER_DIR,
    CachedRow,
    input_digest,
    supervised_positions,
    supervision_rule,
    teacher_identity,
    tokenizer_identity,
)
from .imports import IMPORT_FORMATS, ImportedTopK, prepare_import, training_rows
from .quality import quantization_error
from .reader import TeacherCache
from .scoring import score_rows
from .writer import cache_teacher, import_teacher_logprobs, set_aside_corrupt_shards, tokenize_for_cache


__all__ = [
    "CACHE_BATCH_KEYS",
    "COMPRESSIONS",
    "CROSS_CACHE_BATCH_KEYS",
    "DEFAULT_VALUE_BITS",
    "IMPORT_FORMATS",
    "INFO_FILE",
    "SHARD_DIR",
    "TEACHER_TOKENIZER_DIR",
    "CachedRow",
    "DistillKitCodec",
    "ImportedTopK",
    "TeacherCache",
    "TeacherCacheCollator",
    "cache_teacher",
    "cross_cache_batch",
    "decode_row",
    "encode_row",
    "import_teacher_logprobs",
    "input_digest",
    "prepare_import",
    "quantization_error",
    "score_cross_rows",
    "score_rows",
    "set_aside_corrupt_shards",
    "supervised_positions",
    "supervision_rule",
    "teacher_identity",
    "tokenize_for_cache",
    "tokenizer_identity",
    "training_rows",
]
