"""Data-free transfer set: columns, splits, real teacher tokens, EOS / padding handling, cache and resume."""

import json
import os
from unittest import mock

import pytest
import torch
from conftest import make_llama, make_t5, make_tokenizer

from hf_distill.data.transfer_set import PROMPT_TEMPLATES, PROMPT_TOPICS, build_transfer_set, default_prompts


PROMPTS = [
    "the cat sat on the mat",
    "is a dog big",
    "one plus two",
    "the red dog ran fast and the blue cat was slow",
    "yes",
    "what is the answer to this question",
]
SPECIAL_IDS = [0, 1, 2, 4, 5]  # <pad> <unk> <s> <|im_start|> <|im_end|> (EOS </s> = 3 stays possible)


def _teacher(seed: int = 1):
    """A tiny Llama that never samples special tokens except EOS and writes at least one token."""
    model = make_llama(num_layers=2, seed=seed).eval()
    model.generation_config.suppress_tokens = SPECIAL_IDS
    model.generation_config.min_new_tokens = 1
    return model


def _rows(split):
    return [(r["prompt"], r["completion"]) for r in split]


def test_default_prompts_are_varied():
    prompts = default_prompts()
    assert len(prompts) == len(set(prompts)) == len(PROMPT_TEMPLATES) * len(PROMPT_TOPICS) >= 100
    assert prompts == default_prompts()
    first = prompts[:40]  # any prefix mixes templates and topics
    assert len({t for t in PROMPT_TEMPLATES for p in first if p.startswith(t.split("{")[0])}) >= 10
    assert len({t for t in PROMPT_TOPICS for p in first if t in p}) >= 10


def test_columns_splits_and_messages(tokenizer):
    data = build_transfer_set(
        _teacher(), tokenizer, num_samples=10, max_new_tokens=5, batch_size=4, prompts=PROMPTS, held_out_fraction=0.2
    )
    assert set(data) == {"train", "test"}
    for split in data.values():
        assert split.column_names == ["messages", "prompt", "completion"]
    # 6 distinct prompts used, round(0.2 * 6) = 1 held out (the last): its 2 samples (i = 5, 11 -> only 5) go to test
    assert [r["prompt"] for r in data["test"]] == [PROMPTS[5]]
    assert len(data["train"]) == 9
    assert [r["prompt"] for r in data["train"]] == [PROMPTS[i % 6] for i in range(10) if i % 6 != 5]
    for row in list(data["train"]) + list(data["test"]):
        assert row["messages"] == [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        assert row["completion"] and "</s>" not in row["completion"]
        assert 1 <= len(row["completion"].split()) <= 5
        assert all(w in tokenizer.get_vocab() for w in row["completion"].split())
    # chat-formatted messages render with the tokenizer's template
    text = tokenizer.apply_chat_template(data["train"][0]["messages"], tokenize=False)
    assert text.startswith("<|im_start|>user the cat sat on the mat<|im_end|>")

    no_test = build_transfer_set(
        _teacher(), tokenizer, num_samples=4, max_new_tokens=2, prompts=PROMPTS, held_out_fraction=0
    )
    assert (len(no_test["train"]), len(no_test["test"])) == (4, 0)


def test_greedy_completions_are_the_teachers_own_tokens(tokenizer):
    """temperature=0: each batched, left-padded completion equals the teacher's unpadded greedy continuation."""
    teacher = _teacher(seed=2)
    data = build_transfer_set(
        teacher,
        tokenizer,
        num_samples=6,
        max_new_tokens=6,
        temperature=0,
        batch_size=3,
        prompts=PROMPTS,
        held_out_fraction=0,
    )
    assert len(data["train"]) == 6
    for row in data["train"]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        out = teacher.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=3, pad_token_id=0)[
            0, ids.shape[1] :
        ]
        tokens = out.tolist()
        tokens = tokens[: tokens.index(3)] if 3 in tokens else tokens
        assert row["completion"] == tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_sampling_is_seeded(tokenizer, tmp_path):
    kwargs = {"num_samples": 8, "max_new_tokens": 6, "batch_size": 4, "prompts": PROMPTS, "held_out_fraction": 0}
    teacher = _teacher()
    state = torch.random.get_rng_state()
    a = build_transfer_set(teacher, tokenizer, seed=3, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    b = build_transfer_set(_teacher(), tokenizer, seed=3, cache_dir=str(tmp_path), **kwargs)
    c = build_transfer_set(_teacher(), tokenizer, seed=4, **kwargs)
    assert _rows(a["train"]) == _rows(b["train"])
    assert _rows(a["train"]) != _rows(c["train"])


def test_pad_equals_eos_stop_at_eos_and_drop_empty():
    """pad == EOS (as SmolLM2): the mask comes from prompt lengths even though prompts contain the EOS token;
    completions stop at the first EOS; empty completions are dropped."""
    tokenizer = make_tokenizer()
    tokenizer.eos_token = "<|im_end|>"  # id 5, appears inside every chat-formatted prompt
    tokenizer.pad_token = "<|im_end|>"
    teacher = make_llama(num_layers=1, seed=3).eval()
    teacher.generation_config.eos_token_id = 5
    lengths = [
        len(
            tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for p in PROMPTS[:3]
    ]
    cat, dog, sat = (tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "sat"))
    seen = {}

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen.update(mask=attention_mask.clone(), ids=input_ids.clone(), kwargs=kwargs)
        new = torch.tensor([[cat, 5, dog, 5], [5, 5, 5, 5], [sat, cat, dog, sat]])  # EOS early / at once / never
        return torch.cat([input_ids, new], dim=1)

    with mock.patch.object(teacher, "generate", side_effect=fake_generate):
        data = build_transfer_set(teacher, tokenizer, num_samples=3, prompts=PROMPTS[:3], held_out_fraction=0)
    width = max(lengths)
    assert seen["mask"].sum(1).tolist() == lengths
    assert all(
        seen["mask"][r, width - n :].all() and not seen["mask"][r, : width - n].any() for r, n in enumerate(lengths)
    )
    assert (seen["ids"] == 5).sum() > (seen["mask"] == 0).sum()  # EOS inside the prompts, yet attended
    assert seen["kwargs"]["pad_token_id"] == 5 and seen["kwargs"]["eos_token_id"] == [5]
    assert seen["kwargs"]["do_sample"] and seen["kwargs"]["top_p"] == 0.95
    assert [r["completion"] for r in data["train"]] == ["cat", "sat cat dog sat"]
    assert [r["prompt"] for r in data["train"]] == [PROMPTS[0], PROMPTS[2]]


def test_cache_hit_does_not_regenerate(tokenizer, tmp_path):
    kwargs = {"num_samples": 7, "max_new_tokens": 4, "batch_size": 3, "prompts": PROMPTS, "cache_dir": str(tmp_path)}
    teacher = _teacher()
    with mock.patch.object(teacher, "generate", wraps=teacher.generate) as spy:
        first = build_transfer_set(teacher, tokenizer, **kwargs)
        assert spy.call_count == 3
        second = build_transfer_set(teacher, tokenizer, **kwargs)
        assert spy.call_count == 3  # loaded from disk
        build_transfer_set(teacher, tokenizer, **{**kwargs, "temperature": 0.5})
        assert spy.call_count == 6  # different sampling settings -> different key
    for split in ("train", "test"):
        assert _rows(first[split]) == _rows(second[split])
    other = _teacher(seed=9)  # same config, different weights -> different key
    with mock.patch.object(other, "generate", wraps=other.generate) as spy:
        build_transfer_set(other, tokenizer, **kwargs)
        assert spy.call_count == 3
    folders = sorted(os.listdir(tmp_path))
    assert len(folders) == 3 and all(f.startswith("transfer-") for f in folders)
    with open(tmp_path / folders[0] / "identity.json") as f:
        assert json.load(f)["num_samples"] == 7


def test_interrupted_run_resumes_remaining_batches(tokenizer, tmp_path):
    kwargs = {"num_samples": 10, "max_new_tokens": 5, "batch_size": 3, "prompts": PROMPTS, "seed": 5}
    reference = build_transfer_set(_teacher(), tokenizer, **kwargs)

    teacher = _teacher()
    original = teacher.generate
    calls = []

    def crash_after_first_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kw)

    with (
        mock.patch.object(teacher, "generate", side_effect=crash_after_first_batch),
        pytest.raises(KeyboardInterrupt),
    ):
        build_transfer_set(teacher, tokenizer, cache_dir=str(tmp_path), **kwargs)
    (folder,) = os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / folder / "batches")) == ["batch-000000.json"]
    assert not os.path.exists(tmp_path / folder / "dataset")
    assert not teacher.training

    with mock.patch.object(teacher, "generate", wraps=original) as spy:
        resumed = build_transfer_set(teacher, tokenizer, cache_dir=str(tmp_path), **kwargs)
    assert spy.call_count == 3  # 4 batches, the first one was on disk
    for split in ("train", "test"):
        assert _rows(resumed[split]) == _rows(reference[split])  # per-batch seeds: same samples as one clean run


def test_usable_by_sft_trainer(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    data = build_transfer_set(_teacher(), tokenizer, num_samples=4, max_new_tokens=4, prompts=PROMPTS)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to=[], use_cpu=True, max_steps=1)
    trainer = SFTTrainer(
        model=make_llama(num_layers=1),
        args=args,
        train_dataset=data["train"].select_columns(["messages"]),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    supervised = [label for label in row["labels"] if label != -100]  # the assistant turn only
    assert tokenizer.decode(supervised, skip_special_tokens=True).strip() == data["train"][0]["completion"]
    assert len(supervised) < len(row["input_ids"])


def test_errors(tokenizer):
    teacher = _teacher()
    for kwargs, match in [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2, "held_out_fraction": 1.0}, "held_out_fraction"),
        ({"num_samples": 2, "top_p": 0}, "top_p"),
        ({"num_samples": 2, "prompts": []}, "prompts"),
        ({"num_samples": 2, "batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_transfer_set(teacher, tokenizer, **kwargs)
    with pytest.raises(ValueError, match="encoder-decoder"):
        build_transfer_set(make_t5(), tokenizer, num_samples=2)
