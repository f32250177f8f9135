"""`hf-distill train --task ...`: dataset preparation per task and end-to-end CLI runs on tiny local models."""

import json

import pytest
import torch
import yaml
from conftest import bert_config, make_t5, make_tokenizer
from datasets import ClassLabel, Dataset, Features
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from hf_distill.cli.main import main
from hf_distill.data.tasks import _align_word_labels, prepare_task_dataset, task_collator, task_label_kwargs


NLI = ["entailment", "neutral", "contradiction"]
ROWS = [
    {"premise": "the cat sat on the mat", "hypothesis": "a cat sat", "label": "entailment"},
    {"premise": "a dog ran fast", "hypothesis": "the dog is slow", "label": "contradiction"},
    {"premise": "the big red dog", "hypothesis": "the dog ran", "label": "neutral"},
    {"premise": "one plus two equals three", "hypothesis": "two plus one is three", "label": "entailment"},
]
TAGGED = [
    {"words": ["the", "cat", "sat"], "tags": ["O", "ANIMAL", "O"]},
    {"words": ["a", "big", "red", "dog", "ran"], "tags": ["O", "O", "O", "ANIMAL", "O"]},
]


def test_label_kwargs_from_names_ids_floats_and_classlabel():
    kwargs = task_label_kwargs(Dataset.from_list(ROWS), "sequence_classification")
    assert kwargs["id2label"] == {0: "contradiction", 1: "entailment", 2: "neutral"}
    assert kwargs["num_labels"] == 3 and kwargs["label2id"]["neutral"] == 2
    assert task_label_kwargs(Dataset.from_dict({"label": [0, 3, 1]}), "sequence_classification") == {"num_labels": 4}
    regression = task_label_kwargs(Dataset.from_dict({"label": [0.5, 1.0]}), "sequence_classification")
    assert regression == {"num_labels": 1, "problem_type": "regression"}
    features = Features({"label": ClassLabel(names=NLI)})
    ordered = task_label_kwargs(Dataset.from_dict({"label": [2, 0]}, features=features), "sequence_classification")
    assert ordered["id2label"] == dict(enumerate(NLI))  # a ClassLabel keeps its own order
    tags = task_label_kwargs(Dataset.from_list(TAGGED), "token_classification", label_column="tags")
    assert tags["id2label"] == {0: "ANIMAL", 1: "O"}
    assert task_label_kwargs(Dataset.from_list(ROWS), "masked_lm") == {}
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['gold'\]"):
        task_label_kwargs(Dataset.from_list(ROWS), "sequence_classification", label_column="gold")
    with pytest.raises(ValueError, match="Unknown task 'nli'"):
        task_label_kwargs(Dataset.from_list(ROWS), "nli")


def test_prepare_sequence_classification_pairs():
    tok = make_tokenizer()
    label2id = {"contradiction": 0, "entailment": 1, "neutral": 2}
    data = prepare_task_dataset(
        Dataset.from_list(ROWS),
        "sequence_classification",
        tok,
        text_column="premise",
        text_pair_column="hypothesis",
        label2id=label2id,
        max_length=6,
    )
    assert data.column_names == ["input_ids", "attention_mask", "labels"]
    assert data["labels"] == [1, 0, 2, 1]
    # no pair special tokens in this tokenizer: premise and hypothesis are joined, then truncated to 6 tokens
    assert data[0]["input_ids"] == tok("the cat sat on the mat a cat sat").input_ids[:6]
    assert data[1]["input_ids"] == tok("a dog ran fast the dog is slow").input_ids[:6]
    with pytest.raises(
        ValueError, match=r"Label 'contradiction' in `label` is not one of the model's labels \['entailment'\]"
    ):
        prepare_task_dataset(
            Dataset.from_list(ROWS), "sequence_classification", tok, text_column="premise", label2id={"entailment": 0}
        )
    batch = task_collator("sequence_classification", tok)([data[0], data[1]])
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 6)


def test_word_labels_on_first_sub_token_only():
    assert _align_word_labels([None, 0, 1, 1, 2, None], [5, 6, 7]) == [-100, 5, 6, -100, 7, -100]
    tok = make_tokenizer()
    data = prepare_task_dataset(
        Dataset.from_list(TAGGED),
        "token_classification",
        tok,
        text_column="words",
        label_column="tags",
        label2id={"ANIMAL": 0, "O": 1},
    )
    assert data["labels"] == [[1, 0, 1], [1, 1, 1, 0, 1]]
    batch = task_collator("token_classification", tok)([data[0], data[1]])
    assert batch["labels"][0].tolist() == [1, 0, 1, -100, -100]  # padded with -100


def test_prepare_seq2seq_targets():
    tok = make_tokenizer()
    data = prepare_task_dataset(
        Dataset.from_list(ROWS), "seq2seq", tok, text_column="premise", text_pair_column="hypothesis"
    )
    assert data[2]["labels"] == tok("neutral").input_ids
    model = make_t5()
    batch = task_collator("seq2seq", tok, model)([data[0], data[1]])
    assert batch["labels"].shape[0] == 2 and "decoder_input_ids" in batch
    assert (batch["labels"] == -100).sum() == 0  # both targets are one word


# ----------------------------------------------------------------------------------------------- CLI end to end
def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def save_models(folder, tok, **models) -> None:
    """Save each model, with `tok`, under `folder / <name>`."""
    for name, model in models.items():
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)


def run_recipe(tmp_path, **recipe):
    base = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "max_length": 16,
        "learning_rate": 1e-2,
    }
    base.update(recipe)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    main(["train", "--config", str(path)])
    return tmp_path / "out"


def test_cli_sequence_classification(tmp_path):
    tok = make_tokenizer()
    torch.manual_seed(0)
    names = {0: "contradiction", 1: "entailment", 2: "neutral"}
    save_models(
        tmp_path,
        tok,
        student=BertModel(bert_config(2)),  # no head yet: the task adds one
        teacher=BertForSequenceClassification(bert_config(4, id2label=names)),
    )
    out = run_recipe(
        tmp_path,
        task="sequence_classification",
        model_name_or_path=str(tmp_path / "student"),
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        dataset_name=write_rows(tmp_path / "train.jsonl", ROWS),
        eval_dataset_name=write_rows(tmp_path / "val.jsonl", ROWS[:2]),
        eval_strategy="steps",
        eval_steps=2,
        text_column="premise",
        text_pair_column="hypothesis",
        temperature=2.0,
    )
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(reloaded) is BertForSequenceClassification
    assert reloaded.config.id2label == names and reloaded.config.num_hidden_layers == 2
    state = json.loads((out / "trainer_state.json").read_text())  # written by `train` after training
    assert state["global_step"] == 2
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2]  # the last step, evaluated once


def test_cli_rejects_a_teacher_with_other_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_DEBUG", "1")  # the exception itself, not the CLI's one-line report
    tok = make_tokenizer()
    save_models(
        tmp_path,
        tok,
        student=BertModel(bert_config(2)),
        teacher=BertForSequenceClassification(bert_config(4, num_labels=2)),
    )
    with pytest.raises(ValueError, match=r"student num_labels=3.*teacher num_labels=2"):
        run_recipe(
            tmp_path,
            task="sequence_classification",
            model_name_or_path=str(tmp_path / "student"),
            teacher_model_name_or_path=str(tmp_path / "teacher"),
            dataset_name=write_rows(tmp_path / "train.jsonl", ROWS),
            text_column="premise",
        )


def test_cli_token_classification_and_masked_lm(tmp_path):
    tok = make_tokenizer()
    tok.add_special_tokens({"mask_token": "<mask>"})
    torch.manual_seed(0)
    save_models(
        tmp_path,
        tok,
        tc_student=BertForTokenClassification(bert_config(2, num_labels=2)),
        tc_teacher=BertForTokenClassification(bert_config(4, id2label={0: "ANIMAL", 1: "O"})),
        mlm_student=BertForMaskedLM(bert_config(2)),
        mlm_teacher=BertForMaskedLM(bert_config(4)),
    )
    out = run_recipe(
        tmp_path / "tc",
        task="token_classification",
        model_name_or_path=str(tmp_path / "tc_student"),
        teacher_model_name_or_path=str(tmp_path / "tc_teacher"),
        dataset_name=write_rows(tmp_path / "tags.jsonl", TAGGED * 2),
        text_column="words",
        label_column="tags",
    )
    assert type(AutoModelForTokenClassification.from_pretrained(out)) is BertForTokenClassification
    out = run_recipe(
        tmp_path / "mlm",
        task="masked_lm",
        model_name_or_path=str(tmp_path / "mlm_student"),
        teacher_model_name_or_path=str(tmp_path / "mlm_teacher"),
        dataset_name=write_rows(tmp_path / "text.jsonl", ROWS * 2),
        text_column="premise",
        text_pair_column="hypothesis",
    )
    assert type(AutoModelForMaskedLM.from_pretrained(out)) is BertForMaskedLM


def test_cli_seq2seq_t5(tmp_path):
    tok = make_tokenizer()
    save_models(tmp_path, tok, student=make_t5(num_layers=2), teacher=make_t5(num_layers=3, seed=1))
    out = run_recipe(
        tmp_path,
        task="seq2seq",
        model_name_or_path=str(tmp_path / "student"),
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        dataset_name=write_rows(tmp_path / "train.jsonl", ROWS),
        text_column="premise",
        text_pair_column="hypothesis",
    )
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert reloaded.config.num_layers == 2
