"""RationaleCollator: the two task views, token by token, for causal LMs (with and without a chat template) and T5."""

import doctest
import logging

import pytest
from conftest import make_llama, make_t5, make_tokenizer
from datasets import Dataset

import hf_distill.data.collators
from hf_distill import DistillationConfig, DistillationTrainer, RationaleCollator


ROWS = [
    {"input": "the cat sat", "label": "yes", "rationale": "because the cat is big"},
    {"input": "a dog ran", "label": "no", "rationale": "the dog is slow"},
]


def ids(tok, tokens: str) -> list[int]:
    """Ids of whitespace-separated token strings, looked up one by one (independent of the collator's tokenizing)."""
    return tok.convert_tokens_to_ids(tokens.split())


def unpad(batch, i):
    n = int(batch["attention_mask"][i].sum())
    return batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist(), n


def test_doctest():
    result = doctest.testmod(hf_distill.data.collators)
    assert result.attempted >= 5 and result.failed == 0


def test_causal_chat_template_views(tokenizer):
    batch = RationaleCollator(tokenizer)(ROWS)
    assert batch["task"].tolist() == [0, 1, 0, 1]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    expected = [  # (prompt tokens, completion tokens); "[" and "]" are not in the vocabulary
        ("<|im_start|> user <unk> label <unk> the cat sat <|im_end|> <|im_start|> assistant", "yes <|im_end|>"),
        (
            "<|im_start|> user <unk> rationale <unk> the cat sat <|im_end|> <|im_start|> assistant",
            "because the cat is big <|im_end|>",
        ),
        ("<|im_start|> user <unk> label <unk> a dog ran <|im_end|> <|im_start|> assistant", "no <|im_end|>"),
        (
            "<|im_start|> user <unk> rationale <unk> a dog ran <|im_end|> <|im_start|> assistant",
            "the dog is slow <|im_end|>",
        ),
    ]
    width = batch["input_ids"].shape[1]
    assert width == max(len(ids(tokenizer, p)) + len(ids(tokenizer, c)) for p, c in expected)
    for i, (prompt, completion) in enumerate(expected):
        p, c = ids(tokenizer, prompt), ids(tokenizer, completion)
        row_ids, row_labels, n = unpad(batch, i)
        assert row_ids == p + c
        assert row_labels == [-100] * len(p) + c  # loss on the completion (assistant turn) only
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i, n:].eq(-100).all()
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()


def test_causal_without_chat_template_appends_eos():
    tok = make_tokenizer(chat_template=False)
    collator = RationaleCollator(tok)
    assert not collator.use_chat_template
    batch = collator(ROWS[:1])
    for i, (prompt, completion) in enumerate(
        [
            ("<unk> label <unk> the cat sat", "yes </s>"),
            ("<unk> rationale <unk> the cat sat", "because the cat is big </s>"),
        ]
    ):
        row_ids, row_labels, _ = unpad(batch, i)
        assert row_ids == ids(tok, prompt) + ids(tok, completion)
        assert row_labels == [-100] * len(ids(tok, prompt)) + ids(tok, completion)
    # the prompt used at inference is the training prompt
    assert collator.prompt_ids("the cat sat", "label") == ids(tok, "<unk> label <unk> the cat sat")


def test_seq2seq_views(tokenizer, tiny_t5):
    collator = RationaleCollator(tokenizer, model=tiny_t5)
    assert collator.seq2seq and not collator.use_chat_template
    batch = collator(ROWS)
    assert batch["task"].tolist() == [0, 1, 0, 1]
    sources = [
        "<unk> label <unk> the cat sat",
        "<unk> rationale <unk> the cat sat",
        "<unk> label <unk> a dog ran",
        "<unk> rationale <unk> a dog ran",
    ]
    targets = ["yes </s>", "because the cat is big </s>", "no </s>", "the dog is slow </s>"]
    assert batch["labels"].shape == (4, max(len(ids(tokenizer, t)) for t in targets))
    for i, (source, target) in enumerate(zip(sources, targets)):
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == ids(tokenizer, source)
        t = ids(tokenizer, target)
        assert batch["labels"][i].tolist() == t + [-100] * (batch["labels"].shape[1] - len(t))
    # decoder inputs the trainer builds from these labels: start token, then the target shifted right
    decoder_inputs = tiny_t5.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert decoder_inputs[0].tolist() == [0, *ids(tokenizer, "yes </s>")] + [0] * (batch["labels"].shape[1] - 3)


def test_custom_columns_prefixes_views_and_padding(tokenizer):
    rows = [{"q": "the cat", "a": "yes", "why": "it is"}]
    collator = RationaleCollator(
        tokenizer,
        input_column="q",
        label_column="a",
        rationale_column="why",
        label_prefix="answer: ",
        rationale_prefix="because: ",
        pad_to_multiple_of=8,
        use_chat_template=False,
    )
    batch = collator(rows)
    assert collator.dataset_columns == ("q", "a", "why")
    assert batch["input_ids"].shape[1] % 8 == 0
    assert unpad(batch, 0)[0] == ids(tokenizer, "answer <unk> the cat yes </s>")
    assert unpad(batch, 1)[0] == ids(tokenizer, "because <unk> the cat it is </s>")
    label_only = RationaleCollator(tokenizer, views=("label",))
    out = label_only([{"input": "the cat", "label": "yes"}])  # no rationale column needed
    assert out["task"].tolist() == [0] and label_only.dataset_columns == ("input", "label")
    with pytest.raises(ValueError, match="`views` must be distinct names"):
        RationaleCollator(tokenizer, views=("label", "answer"))


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [ROWS[0], {"input": "a dog", "label": "no"}],
            r"Row 1 of the batch has no 'rationale' column \(it has \['input'",
        ),
        ([{"input": "a dog", "rationale": "it is"}], r"Row 0 of the batch has no 'label' column"),
        (
            [ROWS[0], {"input": "a", "label": "no", "rationale": "  "}],
            r"Row 1 of the batch has an empty rationale in col",
        ),
        (
            [{"input": "a", "label": None, "rationale": "x", "id": "e-7"}],
            r"Row 0 of the batch \(id 'e-7'\) has an empty l",
        ),
    ],
)
def test_bad_rows_name_column_and_row(tokenizer, rows, message):
    with pytest.raises(ValueError, match=message):
        RationaleCollator(tokenizer)(rows)


def test_validate_names_dataset_row(tokenizer):
    data = Dataset.from_list([dict(ROWS[0]) for _ in range(5)])
    data = data.map(lambda row, i: {"rationale": "" if i == 3 else row["rationale"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"Row 3 of the dataset has an empty rationale in column 'rationale'"):
        RationaleCollator(tokenizer).validate(data)


def test_long_rationale_is_truncated_and_counted(tokenizer, caplog):
    long_row = {"input": "the cat sat", "label": "yes", "rationale": " ".join(["the cat is big"] * 20)}
    collator = RationaleCollator(tokenizer, max_length=20)
    with caplog.at_level(logging.WARNING, logger="hf_distill.data.collators"):
        batch = collator([ROWS[0], long_row])
    assert collator.num_truncated == {"input": 0, "label": 0, "rationale": 1}
    assert "truncated 1 rationale" in caplog.text and "max_length=20" in caplog.text
    assert batch["input_ids"].shape[1] == 20 and int(batch["attention_mask"][3].sum()) == 20
    prompt = ids(tokenizer, "<|im_start|> user <unk> rationale <unk> the cat sat <|im_end|> <|im_start|> assistant")
    assert batch["labels"][3].tolist() == [-100] * len(prompt) + ids(tokenizer, "the cat is big the cat is big the")
    assert unpad(batch, 2)[0][-2:] == ids(tokenizer, "yes <|im_end|>")  # the label view is whole
    collator([long_row])
    assert collator.num_truncated["rationale"] == 2
    seq2seq = RationaleCollator(tokenizer, seq2seq=True, max_target_length=5)
    out = seq2seq([long_row])
    assert out["labels"].shape[1] == 5 and seq2seq.num_truncated["rationale"] == 1


def test_collator_kind_must_match_model(tokenizer, tiny_t5):
    llama = make_llama()
    with pytest.raises(ValueError, match=r"seq2seq=True\) builds encoder inputs.*LlamaForCausalLM is a causal LM"):
        RationaleCollator(tokenizer, seq2seq=True, model=llama)
    with pytest.raises(ValueError, match=r"seq2seq=False\) builds prompt \+ completion.*T5ForConditionalGeneration"):
        RationaleCollator(tokenizer, seq2seq=False).check_model(tiny_t5)
    assert RationaleCollator(tokenizer, model=tiny_t5).seq2seq
    assert not RationaleCollator(tokenizer, model=llama).seq2seq
    data = Dataset.from_list(ROWS)
    args = DistillationConfig(output_dir="unused", kd_weight=0.0, ce_weight=1.0, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM is a causal LM"):
        DistillationTrainer(
            model=llama,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            data_collator=RationaleCollator(tokenizer, seq2seq=True),
        )
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration is an encoder-decoder"):
        DistillationTrainer(
            model=make_t5(),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            data_collator=RationaleCollator(tokenizer, seq2seq=False, use_chat_template=False),
        )


def test_trainer_keeps_raw_columns_and_names_missing_ones(tokenizer):
    args = DistillationConfig(
        output_dir="unused", kd_weight=0.0, ce_weight=1.0, report_to=[], use_cpu=True, per_device_train_batch_size=2
    )
    collator = RationaleCollator(tokenizer)
    trainer = DistillationTrainer(
        model=make_llama(),
        args=args,
        train_dataset=Dataset.from_list(ROWS * 2),
        processing_class=tokenizer,
        data_collator=collator,
    )
    batch = next(iter(trainer.get_train_dataloader()))  # remove_unused_columns=True keeps input/label/rationale
    assert batch["task"].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"needs one of input\+label\+rationale"):
        DistillationTrainer(
            model=make_llama(),
            args=args,
            train_dataset=Dataset.from_list([{"input": "a", "label": "b"}]),
            processing_class=tokenizer,
            data_collator=collator,
        )
