"""On-policy student samples (GKD `lmbda`) and sequence-level KD (`seq_kd`) on tiny models: prompts are kept, the
completions are really generated, the loss covers the generated tokens, lmbda = 0 is the off-policy loss."""

import copy
import types

import pytest
import torch
from conftest import distill_config, distill_sft_config, make_llama, make_lm_trainer, make_t5, one_sgd_step
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq

from hf_distill import DistillationSFTTrainer, DistillationTrainer
from hf_distill.cache import tokenize_for_cache
from hf_distill.generation.onpolicy import PolicyBatchRewriter, generate_completions, rebuild_batch, split_prompts


PAIRS = [
    ("the cat sat on", "the mat"),
    ("one plus two equals", "three"),
    ("a dog", "ran fast and the cat is slow"),
    ("is the dog big", "no the dog is small"),
]


def rows(tok) -> Dataset:
    data = Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "completion": [c for _, c in PAIRS]})
    return tokenize_for_cache(data, tok)


def config(tmp_path, **kw):
    return distill_config(tmp_path, **{"max_new_tokens": 6, **kw})


def trainer(tmp_path, tok, student=None, **kw):
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    return make_lm_trainer(tmp_path, tok, rows(tok), student=student, collator=collator, **{"max_new_tokens": 6, **kw})


def first_batch(t):
    return next(iter(t.get_train_dataloader()))


def dataset_parts(batch):
    """(prompt, completion) token lists of each row of a right-padded batch."""
    parts = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
        cut = next(i for i, y in enumerate(labels) if y != -100)
        parts.append((ids[:cut], ids[cut:]))
    return parts


def test_split_prompts_right_and_left_padding():
    batch = {
        "input_ids": torch.tensor([[7, 8, 9, 10, 0], [0, 0, 7, 11, 12]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 9, 10, -100], [-100, -100, -100, 11, 12]]),
    }
    assert split_prompts(batch) == [[7, 8], [7]]
    assert split_prompts(batch, is_encoder_decoder=True) == [[7, 8, 9, 10], [7, 11, 12]]
    plain = {**batch, "labels": batch["input_ids"].clone()}
    with pytest.raises(ValueError, match="supervised from its first token, so it has no prompt"):
        split_prompts(plain)


def test_rebuild_batch():
    out = rebuild_batch([[7, 8], [9]], [[10, 3], [11, 12, 13]], pad_token_id=0)
    assert out["input_ids"].tolist() == [[7, 8, 10, 3], [9, 11, 12, 13]]
    assert out["labels"].tolist() == [[-100, -100, 10, 3], [-100, 11, 12, 13]]
    seq2seq = rebuild_batch([[7, 8], [9]], [[10, 3], [11]], pad_token_id=0, is_encoder_decoder=True)
    assert seq2seq["labels"].tolist() == [[10, 3], [11, -100]]
    assert seq2seq["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_rebuild_batch_pads_with_trl_and_keeps_one_column_for_empty_completions():
    out = rebuild_batch([[7], [8, 9]], [[], []], pad_token_id=5, is_encoder_decoder=True)
    assert out["input_ids"].tolist() == [[7, 5], [8, 9]] and out["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert out["labels"].tolist() == [[-100], [-100]] and out["labels"].dtype == torch.long
    causal = rebuild_batch([[7], [8, 9]], [[3], []], pad_token_id=5)
    assert causal["input_ids"].tolist() == [[7, 3], [8, 9]] and causal["labels"].tolist() == [[-100, 3], [-100, -100]]


def test_greedy_generation_matches_generate_and_stops_at_eos():
    model = make_llama(4, 64, seed=1).eval()
    prompts = [[7, 8, 9], [10]]
    got = generate_completions(model, prompts, pad_token_id=0, eos_token_id=None, max_new_tokens=5, do_sample=False)
    for prompt, completion in zip(prompts, got):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert completion == ref[0, len(prompt) :].tolist()
    eos = got[0][2]
    cut = generate_completions(model, prompts[:1], pad_token_id=0, eos_token_id=eos, max_new_tokens=5, do_sample=False)
    assert cut == [got[0][: got[0].index(eos) + 1]]


def test_lmbda_one_generates_student_completions(tmp_path, tokenizer):
    t = trainer(tmp_path, tokenizer, lmbda=1.0, generation_temperature=1.0)
    batch = first_batch(t)
    (new,), num_items = t.get_batch_samples(iter([batch]), 1, t.args.device)
    old_parts, new_parts = dataset_parts(batch), dataset_parts(new)
    assert [p for p, _ in new_parts] == [p for p, _ in old_parts]  # prompts kept
    assert any(n != o for (_, n), (_, o) in zip(new_parts, old_parts))  # completions were generated
    for _, completion in new_parts:
        assert 1 <= len(completion) <= 6
        assert completion[-1] == tokenizer.eos_token_id or len(completion) == 6
    assert num_items == (new["labels"][:, 1:] != -100).sum()  # the loss is normalised by the generated tokens
    assert t._policy.num_student_batches == 1
    t.train()
    assert t._policy.num_student_batches == 3
    assert any("kd_loss" in e for e in t.state.log_history)


def test_lmbda_zero_is_the_off_policy_loss(tmp_path, tokenizer):
    student = make_llama(2, 32)
    plain = trainer(tmp_path / "a", tokenizer, student=copy.deepcopy(student))
    zero = trainer(tmp_path / "b", tokenizer, student=copy.deepcopy(student), lmbda=0.0, generation_temperature=0.5)
    batch = first_batch(plain)
    (same,), _ = zero.get_batch_samples(iter([batch]), 1, zero.args.device)
    assert same is batch
    assert torch.equal(plain.compute_loss(plain.model, batch), zero.compute_loss(zero.model, same))
    for t in (plain, zero):
        t.args.max_steps = 1
        t.train()
    for p, q in zip(plain.model.parameters(), zero.model.parameters()):
        assert torch.equal(p, q)


def test_lmbda_fraction_is_seeded_and_shared():
    class Args:
        lmbda, seq_kd, seed, max_new_tokens, generation_temperature, seq_kd_do_sample = 0.3, False, 0, 2, 1.0, False

    a, b = (PolicyBatchRewriter(Args, 0, 3, False) for _ in range(2))
    draws_a = [a.rng.random() < Args.lmbda for _ in range(1000)]
    draws_b = [b.rng.random() < Args.lmbda for _ in range(1000)]
    assert draws_a == draws_b  # every process makes the same choices
    assert 0.25 < sum(draws_a) / 1000 < 0.35


def test_seq_kd_uses_teacher_greedy_generations(tmp_path, tokenizer):
    t = trainer(tmp_path, tokenizer, seq_kd=True)
    batch = first_batch(t)
    (new,), num_items = t.get_batch_samples(iter([batch]), 1, t.args.device)
    for prompt, completion in dataset_parts(new):
        ref = generate_completions(
            t.teacher, [prompt], pad_token_id=0, eos_token_id=tokenizer.eos_token_id, max_new_tokens=6, do_sample=False
        )
        assert completion == ref[0]
    assert t._policy.num_teacher_batches == 1 and t._policy.num_student_batches == 0
    loss = t.compute_loss(t.model, new)
    assert torch.isfinite(loss) and t._metrics["train"]["kd_loss"][-1][1] == num_items.item()


def test_sft_trainer_on_policy(tmp_path, tokenizer):
    data = Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "completion": [" " + c for _, c in PAIRS]})
    t = DistillationSFTTrainer(
        model=make_llama(2, 32),
        teacher_model=make_llama(4, 64, seed=1),
        train_dataset=data,
        processing_class=tokenizer,
        args=distill_sft_config(tmp_path, lmbda=1.0, max_new_tokens=4),
    )
    t.train()
    assert t._policy.num_student_batches == 2
    assert any("kd_loss" in e for e in t.state.log_history)


def test_seq2seq_on_policy(tmp_path, tokenizer):
    data = Dataset.from_dict(
        {
            "input_ids": [tokenizer(p).input_ids for p, _ in PAIRS],
            "labels": [tokenizer(c).input_ids + [tokenizer.eos_token_id] for _, c in PAIRS],
        }
    )
    t = DistillationTrainer(
        model=make_t5(),
        teacher_model=make_t5(seed=1),
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        args=config(tmp_path, lmbda=1.0, max_new_tokens=3, per_device_train_batch_size=2),
    )
    batch = first_batch(t)
    (new,), _ = t.get_batch_samples(iter([batch]), 1, t.args.device)
    assert torch.equal(new["input_ids"], batch["input_ids"])  # encoder inputs are the prompts
    assert new["labels"].shape[1] <= 3 and not torch.equal(new["labels"], batch["labels"][:, : new["labels"].shape[1]])
    t.train()
    assert t._policy.num_student_batches == 3


def test_bad_inputs(tmp_path, tokenizer):
    for kw, message in [
        ({"lmbda": 1.5}, r"`lmbda` must be in \[0, 1\]"),
        ({"generation_temperature": -1.0}, r"`generation_temperature` must be >= 0 \(0 = greedy\)"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            config(tmp_path, **kw)
    plain = Dataset.from_dict({"input_ids": [tokenizer("the cat sat").input_ids] * 2})
    t = DistillationTrainer(
        model=make_llama(2, 32),
        teacher_model=make_llama(4, 64, seed=1),
        args=config(tmp_path, lmbda=1.0),
        train_dataset=plain,
        processing_class=tokenizer,
        data_collator=_lm_collator(tokenizer),
    )
    with pytest.raises(ValueError, match="has no prompt to generate from"):
        t.train()
    with pytest.raises(ValueError, match="No teacher given"):
        DistillationTrainer(
            model=make_llama(2, 32),
            args=config(tmp_path, seq_kd=True, kd_weight=0.0),
            train_dataset=rows(tokenizer),
            processing_class=tokenizer,
        )


def _lm_collator(tok):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tok, mlm=False)


def _seq_kd_weights(tmp_path, tok, batch_size, accumulation):
    t = trainer(
        tmp_path,
        tok,
        seq_kd=True,
        **one_sgd_step(batch_size, accumulation),
    )
    seen = []
    compute_loss = t.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(((inputs["labels"][:, 1:] != -100).sum().item(), int(num_items_in_batch)))
        return compute_loss(model, inputs, return_outputs, num_items_in_batch)

    t.compute_loss = recording
    t.train()
    assert len(seen) == accumulation
    assert all(n == sum(count for count, _ in seen) for _, n in seen)  # normalised by the generated tokens
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_rewritten_batches_keep_accumulation_exact(tmp_path, tokenizer):
    """Teacher targets (greedy, deterministic) in 2 x 2 accumulation give the update of one batch of 4, and every
    micro-batch's loss is divided by the window's count of generated tokens."""
    start = make_llama(2, 32).state_dict()
    full = _seq_kd_weights(tmp_path / "full", tokenizer, 4, 1)
    accumulated = _seq_kd_weights(tmp_path / "ga", tokenizer, 2, 2)
    assert max((full[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in full:
        assert torch.allclose(full[key], accumulated[key], atol=1e-5), key


def test_rewriter_for_student_takes_the_tokenizers_ids_then_the_configs():
    args = types.SimpleNamespace(seed=0)
    config = types.SimpleNamespace(pad_token_id=None, eos_token_id=3)
    rewriter = PolicyBatchRewriter.for_student(
        args, types.SimpleNamespace(pad_token_id=1, eos_token_id=2), config, False
    )
    assert (rewriter.pad_token_id, rewriter.eos_token_id) == (1, 2)
    rewriter = PolicyBatchRewriter.for_student(args, None, config, True)
    assert (rewriter.pad_token_id, rewriter.eos_token_id, rewriter.is_encoder_decoder) == (0, 3, True)


def test_log_completions_on_the_generate_path(tmp_path, tokenizer):
    """Every on-policy row in output_dir/completions.jsonl: the step that trains on it (1-based), the weights' step,
    prompt and completion ids and text; greedy (`generation_temperature: 0`) rows are the student's greedy output."""
    from hf_distill.generation.completion_log import read_completions

    t = trainer(tmp_path, tokenizer, lmbda=1.0, generation_temperature=0.0, log_completions=True, max_steps=2,
                learning_rate=0.0)  # fmt: skip
    t.train()
    logged = read_completions(t.args.output_dir)
    assert [r["step"] for r in logged] == [1] * 4 + [2] * 4 and all(r["policy_step"] == r["step"] - 1 for r in logged)
    for r in logged:
        assert r["prompt"] == tokenizer.decode(r["prompt_ids"], skip_special_tokens=False)
        assert r["completion"] == tokenizer.decode(r["completion_ids"], skip_special_tokens=False)
        ref = generate_completions(t.model, [r["prompt_ids"]], pad_token_id=0, eos_token_id=tokenizer.eos_token_id,
                                   max_new_tokens=6, do_sample=False)  # fmt: skip
        assert r["completion_ids"] == ref[0]  # lr 0: the weights never move
    again = trainer(tmp_path, tokenizer, lmbda=1.0, generation_temperature=0.0, log_completions=True, max_steps=1)
    again.train()  # a new run from step 1 into the same output_dir starts a new file
    assert [r["step"] for r in read_completions(again.args.output_dir)] == [1] * 4
