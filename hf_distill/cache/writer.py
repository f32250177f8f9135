"""Writing a teacher cache: `cache_teacher` runs the teacher (a local causal LM, or a served one) once over a
tokenised dataset and stores, per supervised token, its top-k token ids, their log-probabilities and the log of the
remaining tail mass (layout, positions, temperature and sizes in `hf_distill.cache.format`).

Resume and processes: shards are written every `rows_per_shard` rows, to a temporary name then renamed (a kill never
leaves a torn shard). A re-run reads the row ids already cached (checking their input digests), sets unreadable shards
aside (`*.arrow.corrupt`) and recomputes every missing row; the rest is split across processes with
`accelerate.PartialState.split_between_processes` (`accelerate launch` / `torchrun`). The settings check, shard writing
and splitting are `hf_distill.jobs.ResumableJob`'s (docs/resumable_jobs.md).
"""

import logging
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..alignment import chat_template_id, row_conversation
from ..generation.served import ServedLogprobs
from ..jobs import ResumableJob, ShardWriter, shard_paths
from ..losses import IGNORE_INDEX
from ..models.loading import load_tokenizer
from .compact import DEFAULT_VALUE_BITS, checksum
from .format import (
    COMPACT_VERSION,
    COMPRESSIONS,
    CORRUPT_SUFFIX,
    FORMAT,
    INFO_FILE,
    RESUME_DEFAULTS,
    RESUME_KEYS,
    SHARD_DIR,
    TEACHER_TOKENIZER_DIR,
    VALUE_DTYPES,
    VERSION,
    input_digest,
    read_shard,
    supervised_positions,
    supervision_rule,
    tokenizer_identity,
)
from .imports import ImportedTopK, prepare_import
from .reader import TeacherCache
from .scoring import Scorer, cache_record


logger = logging.getLogger(__name__)


def tokenize_for_cache(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    text_column: str = "text",
    max_length: int | None = None,
) -> Dataset:
    """Plain-text rows -> `input_ids` and `labels`, for `cache_teacher` and then for training on the same rows.

    String `prompt` + `completion` columns give `prompt_ids + completion_ids + [eos]` with labels -100 on the prompt;
    a `text` column gives labels equal to the input ids. Other columns (e.g. an id) are kept.

    Args:
        dataset (`Dataset`): rows with `prompt_column` and `completion_column`, or `text_column`.
        tokenizer (`PreTrainedTokenizerBase`): the teacher's tokenizer.
        max_length (`int`, *optional*): rows are cut to this many tokens.
    """
    columns = dataset.column_names
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if prompt_column in columns and completion_column in columns:
        drop = [prompt_column, completion_column]

        def encode(row: dict[str, Any]) -> dict[str, list[int]]:
            prompt = tokenizer(row[prompt_column]).input_ids
            completion = tokenizer(row[completion_column], add_special_tokens=False).input_ids + eos
            ids = (prompt + completion)[:max_length]
            return {"input_ids": ids, "labels": ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]}

    elif text_column in columns:
        drop = [text_column]

        def encode(row: dict[str, Any]) -> dict[str, list[int]]:
            ids = tokenizer(row[text_column]).input_ids[:max_length]
            return {"input_ids": ids, "labels": list(ids)}

    else:
        raise ValueError(
            f"Cannot tokenise columns {columns}: need string `{prompt_column}` + `{completion_column}` columns or a "
            f"`{text_column}` column (or pass an already tokenised dataset with `input_ids`)."
        )
    return dataset.map(encode, remove_columns=drop)


# ----------------------------------------------------------------------------------------------- writing
def _value_array(values: torch.Tensor, dtype: str) -> pa.Array:
    """Flat fp32 tensor -> Arrow array in the cache's value dtype."""
    if dtype == "bfloat16":
        return pa.array(values.to(torch.bfloat16).view(torch.int16).numpy())
    return pa.array(values.numpy().astype(np.float16 if dtype == "float16" else np.float32))


def _list_array(flat: pa.Array, lengths: list[int]) -> pa.Array:
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _write_shard(shards: ShardWriter, records: list[dict[str, Any]], dtype: str, row_id_type: pa.DataType) -> None:
    """One Arrow stream file from per-row records, the next shard of `shards` (written to a temporary name and
    renamed)."""
    columns = {
        "row_id": pa.array([r["row_id"] for r in records], type=row_id_type),
        "input_digest": pa.array([r["input_digest"] for r in records], type=pa.int64()),
        "num_tokens": pa.array([r["num_tokens"] for r in records], type=pa.int32()),
    }
    if "payload" in records[0]:  # compact rows (`cache.compact`)
        columns["id_golomb_order"] = pa.array([r["id_golomb_order"] for r in records], type=pa.uint8())
        columns["crc32"] = pa.array([checksum(r["payload"]) for r in records], type=pa.uint32())
        columns["payload"] = pa.array([r["payload"] for r in records], type=pa.binary())
    else:
        k_lengths = [len(r["topk_ids"]) for r in records]
        ids = pa.array(np.concatenate([r["topk_ids"] for r in records]).astype(np.int32))
        columns["topk_ids"] = _list_array(ids, k_lengths)
        values = _value_array(torch.cat([r["topk_logprobs"] for r in records]), dtype)
        columns["topk_logprobs"] = _list_array(values, k_lengths)
        tails = _value_array(torch.cat([r["tail_logmass"] for r in records]), dtype)
        columns["tail_logmass"] = _list_array(tails, [r["num_tokens"] for r in records])
    for key in ("input_ids", "labels", "teacher_input_ids", "teacher_offsets"):
        if key in records[0]:
            lengths = [len(r[key]) for r in records]
            flat = pa.array(np.concatenate([np.asarray(r[key], dtype=np.int32) for r in records]))
            columns[key] = _list_array(flat, lengths)
    if "target_logprobs" in records[0]:
        values = _value_array(torch.cat([r["target_logprobs"] for r in records]), dtype)
        columns["target_logprobs"] = _list_array(values, [r["num_tokens"] for r in records])
    table = pa.table(columns)

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)

    shards.write(write)


def set_aside_corrupt_shards(shard_dir: Path) -> list[Path]:
    """Rename every unreadable shard `X.arrow` (truncated, or a compact row failing its CRC-32) to `X.arrow.corrupt`
    (with a warning), so that a resumed `cache_teacher` recomputes its rows. Returns the new paths."""
    moved = []
    for path in sorted(shard_dir.glob("*.arrow")):
        try:
            read_shard(path, verify=True)
        except ValueError as error:
            target = path.with_name(path.name + CORRUPT_SUFFIX)
            os.replace(path, target)
            logger.warning("%s Set aside as %s; its rows are recomputed.", error.args[0].split(";")[0], target)
            moved.append(target)
    return moved


def _read_finished(shard_dir: Path) -> dict[Any, int]:
    """row_id -> input_digest of the rows in finished shards."""
    finished = {}
    for path in shard_paths(shard_dir, ".arrow"):
        table = read_shard(path).select(["row_id", "input_digest"])
        finished.update(zip(table.column("row_id").to_pylist(), table.column("input_digest").to_pylist()))
    return finished


def cache_teacher(
    teacher: "PreTrainedModel | str | ServedLogprobs | ImportedTopK",
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase | str,
    output_dir: str | os.PathLike,
    *,
    k: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: torch.dtype | str = torch.float16,
    id_column: str = "row_id",
    rows_per_shard: int = 1024,
    generate: bool = False,
    max_new_tokens: int = 128,
    generate_do_sample: bool = False,
    generation_temperature: float = 1.0,
    teacher_init_kwargs: dict[str, Any] | None = None,
    use_cpu: bool = False,
    compression: str = "none",
    value_bits: int = DEFAULT_VALUE_BITS,
    teacher_tokenizer: PreTrainedTokenizerBase | str | None = None,
) -> "TeacherCache":
    """Run the teacher once over `dataset` and store its top-k distribution at every supervised token.

    Runs in one process or under `accelerate launch` / `torchrun` (each process caches a disjoint part of the rows not
    cached yet); resumable. Layout, positions and sizes: see `hf_distill.cache.format`.

    Args:
        teacher (`PreTrainedModel`, `str` or `ServedLogprobs`): a causal LM, a name/path for
            `hf_distill.models.load_model` (`"smollm2"` = the wheel's SmolLM2-135M-Instruct), or a served teacher
            (`hf_distill.generation.served.ServedLogprobs`, its `k` the cache's: its replies' top-k log-probs are
            stored, the tail mass computed from them; DistillKit's capture with vLLM, without its separate script),
            or another tool's stored top-k log-probs (`ImportedTopK`, from `cache.imports.prepare_import`; see
            `import_teacher_logprobs`).
        dataset (`Dataset`): tokenised rows: `input_ids`, and `labels` (-100 = not supervised) or TRL's
            `completion_mask` / `assistant_masks`, or `attention_mask`; optional id column.
        tokenizer (`PreTrainedTokenizerBase` or `str`): the teacher's tokenizer (its identity is recorded; training
            with another tokenizer is refused).
        output_dir (`str`): the cache folder (shared by all processes).
        k (`int`): tokens kept per position, 1 <= k <= V.
        batch_size (`int`): rows per teacher forward or request (per process).
        max_length (`int`, *optional*): rows are cut to this many tokens (the trainer's collator cuts them alike).
        dtype (`torch.dtype` or `str`): stored value dtype: float16 (default), bfloat16 or float32.
        id_column (`str`): column of unique row ids; when the dataset lacks it, row indices are used (and the trainer
            adds the same index column to a training set that lacks it).
        rows_per_shard (`int`): rows per shard file; a kill loses at most this many rows of work per process.
        generate (`bool`): sequence-level KD offline: replace each row's completion (from its first supervised token)
            by the teacher's generation, then cache the distributions on the new tokens. The shards then hold
            `input_ids` and `labels` too; train on `TeacherCache(output_dir).training_dataset()`.
        max_new_tokens, generate_do_sample, generation_temperature: generation settings (greedy by default).
        teacher_init_kwargs (`dict`, *optional*): `from_pretrained` kwargs when `teacher` is a name.
        use_cpu (`bool`): force CPU even when a GPU is visible.
        compression (`str`): "none" (int32 ids + `dtype` values, format version 1) or "compact" (about 2 bytes per
            entry, version 2: delta + exp-Golomb coded ids, log-probs quantized in `value_bits` bits against each
            position's top log-prob, fp16 tail; `hf_distill.cache.compact`, docs/teacher_cache.md).
        value_bits (`int`): bits per quantized log-prob with compression="compact" (default 6).
        teacher_tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*): the teacher's own tokenizer, when it
            differs from `tokenizer` (then the dataset's, i.e. the student's): a cross-tokenizer cache for
            `cross_tokenizer_loss`. Each row's ids are decoded with `tokenizer` and the teacher reads its own
            tokenization of that text, as the live `CrossTokenizerTeacher` does; every teacher position is cached
            (`k >= V` makes the loss exact; see `hf_distill.cache.cross_tokenizer`). Rows that carry their
            conversation (a `messages` or conversational `prompt` + `completion` column) are read rendered with the
            teacher's chat template when it has one, as the live teacher reads a batch with `messages`
            (`teacher_chat_template` in cache_info.json). Needs compression="none" and generate=False. A tokenizer
            with `tokenizer`'s token -> id map is an ordinary cache.

    Returns:
        `TeacherCache`: the cache (all rows of `dataset` included).
    """
    from accelerate import PartialState

    dtype_name = _check_cache_arguments(dataset, k, batch_size, rows_per_shard, dtype, compression, value_bits)
    compact = compression == "compact"
    state = PartialState(cpu=use_cpu)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(teacher_tokenizer, str):
        teacher_tokenizer = load_tokenizer(teacher_tokenizer)
    vocab_hash = lambda tok: tokenizer_identity(tok)["vocab_sha256"]  # noqa: E731
    if teacher_tokenizer is not None and vocab_hash(teacher_tokenizer) == vocab_hash(tokenizer):
        teacher_tokenizer = None  # the same token -> id map: an ordinary cache
    if teacher_tokenizer is not None and (generate or compact):
        raise ValueError(
            "A cross-tokenizer teacher cache (`teacher_tokenizer` differs from `tokenizer`) supports "
            "compression='none' and generate=False only; drop --compression compact / --generate."
        )
    chat_template = None  # a cross-tokenizer cache of conversations: the teacher reads them with its own template
    if teacher_tokenizer is not None and len(dataset):
        conversational = row_conversation(dataset[0]) is not None
        chat_template = chat_template_id(teacher_tokenizer) if conversational else None
    scorer = Scorer.build(teacher, tokenizer, teacher_tokenizer, k, teacher_init_kwargs, state, generate,
                           chat_template)  # fmt: skip
    rule = "labels" if generate else supervision_rule(dataset.column_names)
    source_rule = supervision_rule(dataset.column_names)
    if generate and source_rule not in ("labels", "completion_mask", "assistant_masks"):
        raise ValueError(
            "generate=True needs prompt/completion rows: a `labels` (-100 on the prompt), `completion_mask` or "
            f"`assistant_masks` column (the dataset has {dataset.column_names})."
        )
    ids_from_index = id_column not in dataset.column_names
    row_ids = list(range(len(dataset))) if ids_from_index else list(dataset[id_column])
    if len(set(row_ids)) != len(row_ids):
        raise ValueError(f"The id column `{id_column}` has duplicate values; the cache needs one id per row.")
    row_id_type = pa.string() if row_ids and isinstance(row_ids[0], str) else pa.int64()
    generation = (
        {"max_new_tokens": max_new_tokens, "do_sample": generate_do_sample, "temperature": generation_temperature}
        if generate
        else None
    )
    info = {
        "format": FORMAT,
        "version": COMPACT_VERSION if compact else VERSION,
        "compression": compression,
        **({"value_bits": value_bits} if compact else {}),
        "k": k,
        "dtype": dtype_name,
        "vocab_size": scorer.vocab_size,
        "temperature": 1.0,
        "temperature_note": "log-probs at T=1; hf_distill.losses.sparse renormalises top-k/T + tempered tail bucket",
        "tokenizer": tokenizer_identity(tokenizer),
        "teacher_tokenizer": tokenizer_identity(teacher_tokenizer) if teacher_tokenizer is not None else None,
        "teacher_chat_template": chat_template,
        "teacher": scorer.identity,
        "supervision": rule,
        "max_length": max_length,
        "id_column": id_column,
        "ids_from_index": ids_from_index,
        "generate": generation,
        "status": "running",
    }
    out = Path(output_dir)
    shard_dir = out / SHARD_DIR
    job = ResumableJob(
        out,
        info,
        what="a teacher cache",
        settings_file=INFO_FILE,
        keys=RESUME_KEYS,
        defaults=RESUME_DEFAULTS,
        state=state,
    )
    if job.is_main_process:
        shard_dir.mkdir(parents=True, exist_ok=True)
        set_aside_corrupt_shards(shard_dir)  # a truncated shard (killed copy, full disk) is recomputed, not fatal
    job.wait()
    job.check_settings()
    if job.is_main_process and teacher_tokenizer is not None:  # after the check: a refused resume writes nothing
        teacher_tokenizer.save_pretrained(out / TEACHER_TOKENIZER_DIR)  # the cached source reads it from here
    finished = _read_finished(shard_dir)
    todo = []
    for index, rid in enumerate(row_ids):
        if rid not in finished:
            todo.append(index)
        elif not generate and finished[rid] != input_digest(dataset[index]["input_ids"][:max_length]):
            raise ValueError(
                f"Row id {rid!r} is already cached with other input_ids; ids must be unique across the datasets "
                "added to one cache (give each dataset an id column with distinct values)."
            )
    job.wait()  # every process has read the same finished set before anyone writes a shard
    job.record_settings()
    if job.is_main_process and len(todo) < len(row_ids):
        logger.info("Resuming: %d of %d rows already cached.", len(row_ids) - len(todo), len(row_ids))
    generation_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=generate_do_sample,
                             temperature=generation_temperature)  # fmt: skip
    with job.split(todo) as mine:
        shards = job.shard_writer(shard_dir, ".arrow")
        progress = tqdm(total=len(mine), desc="Caching teacher top-k", unit="row", disable=not state.is_main_process)
        buffer, n_tokens = [], 0
        for batch in job.batched(mine, batch_size):
            chunk = dataset[batch]
            rows = [{column: values[j] for column, values in chunk.items()} for j in range(len(batch))]
            seqs = [list(r["input_ids"][:max_length]) for r in rows]
            positions = [supervised_positions(r, source_rule, max_length) for r in rows]
            if generate:
                seqs, positions, extra = scorer.regenerate([row_ids[i] for i in batch], seqs, positions,
                                                           generation_kwargs)  # fmt: skip
            else:
                extra = [{} for _ in rows]
            scored, positions, extra = scorer.score(rows, [row_ids[i] for i in batch], seqs, positions, extra)
            for i, seq, pos, (ids, values, tail), more in zip(batch, seqs, positions, scored, extra):
                buffer.append(cache_record(row_ids[i], seq, pos, ids, values, tail, more, compact, scorer.vocab_size,
                                      value_bits))  # fmt: skip
                n_tokens += len(pos)
            progress.update(len(batch))
            if len(buffer) >= rows_per_shard:
                _write_shard(shards, buffer, dtype_name, row_id_type)
                buffer = []
        if buffer:
            _write_shard(shards, buffer, dtype_name, row_id_type)
        progress.close()
    logger.info("Teacher cache, process %d: %d rows, %d supervised tokens.", state.process_index, len(mine), n_tokens)
    job.wait()
    cache = TeacherCache(out)
    missing = cache.missing(row_ids)
    if missing:
        raise RuntimeError(f"{len(missing)} rows were not cached (e.g. {missing[:5]}); run cache_teacher again.")
    job.record_settings(status="complete", num_rows=len(cache))
    job.wait()
    return TeacherCache(out)


def import_teacher_logprobs(
    format: str,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase | str,
    output_dir: str | os.PathLike,
    *,
    source: str,
    k: int | None = None,
    temperature: float = 1.0,
    distillkit_config: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    **cache_kwargs: Any,
) -> TeacherCache:
    """Convert another tool's top-k teacher log-prob dataset into a teacher cache, checked against the student
    tokenizer (`hf-distill cache-teacher --import axolotl|distillkit`; formats in `hf_distill.cache.imports`).

    Resumable and sharded like `cache_teacher`, which writes it. Train on the same rows without the teacher's
    columns: `cache.imports.training_rows(dataset, id_column)`.

    Args:
        format (`str`): "axolotl" (prepared KD rows: `target_token_ids` / `target_logprobs` / `target_mask`, T rows
            of K per row of T tokens) or "distillkit" (`compressed_logprobs` / `bytepacked_indices`, T - 1 rows).
        dataset (`Dataset`): the rows, with `input_ids`.
        tokenizer (`PreTrainedTokenizerBase` or `str`): the student's tokenizer.
        output_dir (`str`): the cache folder.
        source (`str`): the dataset's name or path (recorded; DistillKit's `compression_config.yaml` is looked for
            beside it).
        k (`int`, *optional*): entries kept per position (default: all of the file's).
        temperature (`float`): the temperature the stored values are at (brought back to 1).
        distillkit_config (`str`, *optional*): DistillKit's `compression_config.yaml`.
        vocab_size (`int`, *optional*): V, the logits' width when the model's embedding is padded beyond the
            tokenizer (default `len(tokenizer)`).
        cache_kwargs: `cache_teacher`'s other arguments (`batch_size`, `dtype`, `compression`, `id_column`, ...).

    Returns:
        `TeacherCache`: the cache, `k` entries per supervised position.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    imported = prepare_import(format, dataset, tokenizer, source=source, k=k, temperature=temperature,
                              distillkit_config=distillkit_config, vocab_size=vocab_size)  # fmt: skip
    return cache_teacher(imported, dataset, tokenizer, output_dir, k=imported.k, **cache_kwargs)


def _check_cache_arguments(
    dataset: Dataset, k: int, batch_size: int, rows_per_shard: int, dtype: Any, compression: str, value_bits: int
) -> str:
    """The checks of `cache_teacher`'s plain arguments; returns the value dtype's name."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1 (the top-k log-probs stored per position), got {k!r}.")
    if batch_size < 1 or rows_per_shard < 1:
        raise ValueError(f"`batch_size` and `rows_per_shard` must be >= 1, got {batch_size} and {rows_per_shard}.")
    dtype_name = str(dtype).replace("torch.", "")
    if dtype_name not in VALUE_DTYPES:
        raise ValueError(f"`dtype` must be one of {list(VALUE_DTYPES)}, got {dtype!r}.")
    if compression not in COMPRESSIONS:
        raise ValueError(f"`compression` must be one of {list(COMPRESSIONS)}, got {compression!r}.")
    if compression == "compact" and dtype_name != "float16":
        raise ValueError(
            f"compression='compact' quantizes the log-probs itself (`value_bits`) and keeps its scalars in float16; "
            f"dtype={dtype_name!r} applies to compression='none' only."
        )
    if compression == "compact" and not 1 <= value_bits <= 16:
        raise ValueError(f"`value_bits` must be between 1 and 16, got {value_bits}.")
    if compression != "compact" and value_bits != DEFAULT_VALUE_BITS:
        raise ValueError(
            f"value_bits={value_bits} applies to compression='compact' only; this cache stores {dtype_name} "
            "log-probs (compression='none'). Add --compression compact, or drop --value_bits."
        )
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"cache_teacher needs a tokenised dataset with `input_ids` (columns: {dataset.column_names}); tokenise it "
            "first, the same way as for training."
        )
    return dtype_name
