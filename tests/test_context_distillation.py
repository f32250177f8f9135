"""Context distillation (`teachers/context.py`, `data/context.py`): a teacher that reads a system prompt or a per-row
context the student never sees; `teacher_model_name_or_path: self`."""

import copy

import pytest
import torch
from conftest import distill_config, distill_sft_config, make_llama, make_tokenizer, one_sgd_step, trained_weights
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq

from hf_distill import DistillationConfig, DistillationSFTTrainer, DistillationTrainer
from hf_distill.data.context import ContextCollator, TeacherContext
from hf_distill.heads import detect_head
from hf_distill.terms import SupervisedView


PAIRS = [  # (prompt, completion, context): prompts and contexts of different lengths
    ("the cat sat on the mat", "yes", "one two"),
    ("is the dog big", "no the dog is small", "the dog is small because it is a small dog"),
    ("one plus two equals", "three", ""),
    ("a dog ran", "fast and the cat is slow", "red"),
]
SYSTEM = "answer yes or no"


def rows(tok, pairs=PAIRS) -> Dataset:
    """Tokenized prompt + completion rows (labels -100 on the prompt) with a `context` column."""

    def row(prompt, completion, context):
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"] + [tok.eos_token_id]
        return {"input_ids": p + c, "labels": [-100] * len(p) + c, "context": context}

    return Dataset.from_list([row(*x) for x in pairs])


def trainer(tmp_path, tok=None, student=None, data=None, **fields):
    tok = tok or make_tokenizer()
    fields = {"teacher_model_name_or_path": "self", "kd_weight": 1.0, "ce_weight": 0.5, "max_steps": 1, **fields}
    config = distill_config(tmp_path, **fields)
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    return DistillationTrainer(model=student or make_llama(), args=config, train_dataset=data or rows(tok),
                               data_collator=collator, processing_class=tok)  # fmt: skip


def first_logged(t, key="kd_loss"):
    t.train()
    return next(e[key] for e in t.state.log_history if key in e)


def first_batch(t):
    return next(iter(t.get_train_dataloader()))


# ----------------------------------------------------------------------------------------------- the bar
@pytest.mark.parametrize("fused", [True, False])
def test_self_with_nothing_extra_gives_exactly_zero_kd(tmp_path, fused):
    t = trainer(tmp_path, use_fused_kd_loss=fused)
    assert t.teacher_source.name == ("self-fused" if fused else "self")
    assert t.teacher_source.models[0] is not t.model  # a frozen copy
    assert first_logged(t) == 0.0


@pytest.mark.parametrize("fields", [{"teacher_system_prompt": SYSTEM}, {"teacher_context_column": "context"}])
def test_system_prompt_or_context_gives_positive_kd(tmp_path, fields):
    t = trainer(tmp_path, **fields)
    assert t.teacher_source.name.endswith("+context")
    assert first_logged(t) > 0.0


# ----------------------------------------------------------------------------------------------- alignment
def reference_rows(teacher, tok, pairs, system=None):
    """Per row, the float64 teacher log-probs at the positions predicting the completion, from its own text."""
    model = copy.deepcopy(teacher).double().eval()
    out = []
    for prompt, completion, context in pairs:
        text = (f"{system} " if system else "") + f"{context} {prompt}"
        p, c = tok(text)["input_ids"], tok(completion)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0]
        out.append(logits[len(p) - 1 : len(p) + len(c) - 1].log_softmax(-1))
    return torch.cat(out)


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_teacher_rows_equal_a_float64_reference(tmp_path, system):
    tok = make_tokenizer()
    t = trainer(tmp_path, tok, teacher_context_column="context", teacher_system_prompt=system, use_fused_kd_loss=False)
    batch = first_batch(t)
    order = [PAIRS.index(next(p for p in PAIRS if tok(p[0])["input_ids"] == _prompt(row, lab)))
             for row, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]  # fmt: skip
    source = t.teacher_source
    outputs = source.outputs(t._model_inputs(batch), batch)
    view = SupervisedView.from_batch(batch, detect_head(t.model)).with_teacher_labels(batch["teacher_labels"])
    got = view.teacher_rows(outputs.logits).double().log_softmax(-1)
    want = reference_rows(source.models[0], tok, [PAIRS[i] for i in order], system)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got.shape[0] == view.n_items  # one teacher row per supervised student token


def _prompt(ids, labels):
    cut = next(i for i, y in enumerate(labels) if y != -100)
    return ids[:cut]


def test_fused_equals_dense(tmp_path):
    fields = {"teacher_context_column": "context", "teacher_system_prompt": SYSTEM, "max_steps": 2}
    fused = trainer(tmp_path / "f", use_fused_kd_loss=True, **fields)
    dense = trainer(tmp_path / "d", use_fused_kd_loss=False, **fields)
    fused.train(), dense.train()
    for key in ("kd_loss", "ce_loss", "loss"):
        a = [e[key] for e in fused.state.log_history if key in e]
        b = [e[key] for e in dense.state.log_history if key in e]
        assert a == pytest.approx(b, rel=1e-5)


def test_rows_of_different_prompt_lengths_add_up_to_the_batch(tmp_path):
    """Padding never counts: the batch's KD sum is the sum of each row alone."""
    tok = make_tokenizer()
    t = trainer(tmp_path, tok, teacher_context_column="context", teacher_system_prompt=SYSTEM)
    collator, source = t.data_collator, t.teacher_source
    data = rows(tok)

    def kd(features):
        batch = collator(features)
        with torch.no_grad():
            terms, _, _ = t._terms(t.model, batch)
        return terms.sums["kd"]

    lengths = {len(r) for r in collator([dict(x) for x in data])["teacher_prompt_ids"]}
    assert len(lengths) > 1
    whole = kd([dict(x) for x in data])
    alone = sum(kd([dict(x)]) for x in data)
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)
    assert source.name == "self-fused+context"


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_accumulation_2x2_equals_batch_of_4(tmp_path, fused):
    fields = {"teacher_context_column": "context", "teacher_system_prompt": SYSTEM, "use_fused_kd_loss": fused}
    full = trained_weights(trainer(tmp_path / "full", **{**one_sgd_step(4, 1), **fields}))
    accumulated = trained_weights(trainer(tmp_path / "ga", **{**one_sgd_step(2, 2), **fields}))
    start = make_llama().state_dict()
    assert max((full[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in full:
        torch.testing.assert_close(full[key], accumulated[key], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- on-policy
def test_on_policy_rebuilds_teacher_rows_from_the_new_completions(tmp_path):
    tok = make_tokenizer()
    t = trainer(tmp_path, tok, teacher_context_column="context", lmbda=1.0, max_new_tokens=4, max_steps=2)
    batch = first_batch(t)
    samples, _ = t.get_batch_samples(iter([batch]), 1, t.args.device)
    new = samples[0]
    assert new is not batch and t._policy.num_student_batches == 1
    for b, prompt in enumerate(batch["teacher_prompt_ids"]):
        ids, labels = new["input_ids"][b].tolist(), new["labels"][b].tolist()
        cut = next(i for i, y in enumerate(labels) if y != -100)
        end = int(new["attention_mask"][b].sum())
        completion = ids[cut:end]
        t_ids = new["teacher_input_ids"][b].tolist()
        assert t_ids[: len(prompt) + len(completion)] == prompt + completion  # the same prompt, the new completion
        t_labels = new["teacher_labels"][b].tolist()
        assert [y for y in t_labels if y != -100] == [y for y in labels[1:] if y != -100]
    assert t.train().training_loss > 0


# ----------------------------------------------------------------------------------------------- PEFT and EMA
def test_peft_self_teacher_is_the_student_with_adapters_off(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    student = get_peft_model(make_llama(), lora)
    t = trainer(tmp_path, student=student, teacher_context_column="context", use_fused_kd_loss=False)
    source = t.teacher_source
    assert source.models[0] is t.accelerator.unwrap_model(t.model)  # no copy
    batch = first_batch(t)
    got = source.outputs(t._model_inputs(batch), batch).logits
    reference = copy.deepcopy(student)
    with reference.disable_adapter(), torch.no_grad():
        want = reference.eval()(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"])
    torch.testing.assert_close(got, want.logits)
    assert t.model.training  # the student's mode is back after the teacher's forward


def test_ema_teacher_reads_the_context(tmp_path):
    t = trainer(tmp_path, teacher_model_name_or_path=None, teacher_ema_decay=0.9, teacher_system_prompt=SYSTEM)
    assert t.teacher_source.name.startswith("ema") and t.teacher_source.name.endswith("+context")
    assert first_logged(t) > 0.0


def test_another_teacher_reads_the_context(tmp_path):
    tok = make_tokenizer()
    config = distill_config(tmp_path, teacher_system_prompt=SYSTEM, max_steps=1)
    t = DistillationTrainer(model=make_llama(), teacher_model=make_llama(seed=3), args=config, train_dataset=rows(tok),
                            data_collator=DataCollatorForSeq2Seq(tok, padding=True), processing_class=tok)  # fmt: skip
    assert t.teacher_source.kind == "context" and t.teacher is not None
    assert first_logged(t) > 0.0


# ----------------------------------------------------------------------------------------------- tools
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system {% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|im_end|> "
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant "
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %} {% else %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "plus", "description": "add", "parameters": {}}}]


def tool_rows():
    prompt = [{"role": "user", "content": "one plus two"}]
    completion = [
        {"role": "assistant", "content": "plus one two"},
        {"role": "tool", "content": "three"},
        {"role": "assistant", "content": "it is three"},
    ]
    return Dataset.from_list([{"prompt": prompt, "completion": completion, "tools": TOOLS, "context": "a b"}] * 2)


def test_tools_reach_both_templates_and_tool_results_are_never_supervised(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    config = distill_sft_config(tmp_path, teacher_model_name_or_path="self", teacher_system_prompt=SYSTEM,
                                teacher_context_column="context", kd_weight=1.0, max_steps=1)  # fmt: skip
    t = DistillationSFTTrainer(model=make_llama(), args=config, train_dataset=tool_rows(), processing_class=tok)
    batch = first_batch(t)
    words = lambda ids: tok.convert_ids_to_tokens([i for i in ids if i != tok.pad_token_id])  # noqa: E731
    student, teacher = words(batch["input_ids"][0].tolist()), words(batch["teacher_input_ids"][0].tolist())
    assert student[:4] == ["<|im_start|>", "system", "plus", "<|im_end|>"]  # the tool's name, rendered for both
    assert teacher[:4] == ["<|im_start|>", "system", "plus", "<|im_end|>"]
    assert "answer" in teacher and "answer" not in student  # the system prompt, teacher only
    for ids, labels in ((batch["input_ids"][0], batch["labels"][0]),
                        (batch["teacher_input_ids"][0], batch["teacher_labels"][0])):  # fmt: skip
        tokens = tok.convert_ids_to_tokens(ids.tolist())
        result, answer = [i for i, w in enumerate(tokens) if w == "three"]  # the tool's result, then the answer
        assert tokens[result - 2 : result + 2] == ["<|im_start|>", "<unk>", "three", "<|im_end|>"]  # role "tool"
        assert (labels[result - 2 : result + 2] == -100).all()  # the tool result is never supervised
        assert labels[answer] != -100 and labels[result - 3] != -100  # both assistant turns are
    assert first_logged(t) > 0.0


# ----------------------------------------------------------------------------------------------- faults
def test_missing_context_column_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="teacher_context_column.*'demos'"):
        trainer(tmp_path, teacher_context_column="demos")


def test_row_without_context_is_an_error():
    tok = make_tokenizer()
    collator = ContextCollator(DataCollatorForSeq2Seq(tok, padding=True), TeacherContext(tok, column="context"))
    row = dict(rows(tok)[0])
    row["context"] = None
    with pytest.raises(TypeError, match="Row 0 .* context column 'context'"):
        collator([row])
    del row["context"]
    with pytest.raises(ValueError, match="no 'context' column"):
        collator([row])


def test_empty_system_prompt_file_is_an_error(tmp_path):
    path = tmp_path / "system.txt"
    path.write_text("  \n")
    with pytest.raises(ValueError, match="file .* is empty"):
        DistillationConfig(
            output_dir=str(tmp_path), teacher_model_name_or_path="self", teacher_system_prompt=str(path)
        )
    path.write_text(SYSTEM)
    t = trainer(tmp_path, teacher_system_prompt=str(path))
    assert t.teacher_source.reader.system_prompt == SYSTEM


def test_context_over_max_length_is_an_error_never_a_cut(tmp_path):
    tok = make_tokenizer()
    long = [(p, c, " ".join(["dog"] * 130)) for p, c, _ in PAIRS]  # the tiny teacher has 128 positions
    t = trainer(tmp_path, tok, data=rows(tok, long), teacher_context_column="context")
    with pytest.raises(ValueError, match="over the limit of 128 .* never cut"):
        first_batch(t)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"teacher_context_column": "c", "teacher_context_template": "{context}"}, "exactly once"),
        ({"teacher_context_template": "{context} {prompt} x"}, "never read"),
        ({"teacher_system_prompt": " "}, "is empty"),
        ({"teacher_model_name_or_path": "self", "kd_weight": 0.0}, "kd_weight"),
        ({"teacher_model_name_or_path": ["self", "x"]}, "not in a list"),
        ({"teacher_system_prompt": "x", "seq_kd": True, "teacher_model_name_or_path": "t"}, "seq_kd"),
        ({"teacher_model_name_or_path": "self", "cross_tokenizer_loss": "uld"}, "cross_tokenizer_loss"),
    ],
)
def test_config_checks(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(output_dir=str(tmp_path), **fields)


def test_context_without_a_teacher_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="need a teacher to read them"):
        trainer(tmp_path, teacher_model_name_or_path=None, teacher_system_prompt=SYSTEM)


# ----------------------------------------------------------------------------------------------- cross-tokenizer
def test_cross_tokenizer_teacher_reads_the_context_in_its_own_template():
    from test_cross_tokenizer_teacher import chat_batch, chat_source, make_batch, make_source, run_terms

    from hf_distill.data.collators import CHAT_KWARGS_KEY, CONTEXT_KEY

    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    fields = {"teacher_system_prompt": SYSTEM, "teacher_context_column": "context",
              "teacher_context_template": "{context}\n\n{prompt}"}  # fmt: skip
    contexts = ["red dog", "", "the cat is big", "one two three"]
    s_tok = make_tokenizer()
    for make, batch in ((chat_source, chat_batch(s_tok)), (make_source, make_batch(s_tok))):
        none_terms, _ = run_terms(make(student, "uld")[0], student, batch)  # no context at all
        source = make(student, "uld", **fields)[0]
        batch[CONTEXT_KEY] = contexts
        terms, t_out = run_terms(source, student, batch)
        for b, text in enumerate(t_out.texts):
            assert text.count(SYSTEM) == 1 and contexts[b] in text
        aligned = terms.metrics["cross_tokenizer_aligned"][0]
        assert aligned == none_terms.metrics["cross_tokenizer_aligned"][0] and aligned > 0  # the same answers
        assert not torch.equal(terms.sums["kd"], none_terms.sums["kd"])
    source, _, t_tok = chat_source(student, "uld")
    t_tok.chat_template = (
        "{% if tools %}### tools: {{ tools[0]['function']['name'] }}\n{% endif %}" + t_tok.chat_template
    )
    batch = chat_batch(s_tok)
    batch[CHAT_KWARGS_KEY] = [{"tools": TOOLS}] * len(batch["messages"])
    _, t_out = run_terms(source, student, batch)
    assert all(text.startswith("### tools: plus\n") for text in t_out.texts)  # TRL's `tools` reach its template


@pytest.mark.parametrize("views", [("label",), ("label", "rationale")])
def test_rationale_as_privileged_context_with_task_views(tmp_path, views):
    """The step-by-step setting: the teacher reads the rationale, the student the input; one or two task views."""
    from hf_distill import RationaleCollator

    tok = make_tokenizer(chat_template=False)
    data = Dataset.from_list([{"input": p, "label": c, "rationale": x or "no"} for p, c, x in PAIRS])
    config = distill_config(tmp_path, teacher_model_name_or_path="self", teacher_context_column="rationale",
                            teacher_context_template="{context} so {prompt}", max_steps=1, label_weight=0.5,
                            rationale_weight=0.0 if len(views) == 1 else 0.5)  # fmt: skip
    collator = RationaleCollator(tok, views=views, use_chat_template=False)
    t = DistillationTrainer(model=make_llama(), args=config, train_dataset=data, data_collator=collator,
                            processing_class=tok)  # fmt: skip
    batch = first_batch(t)
    assert batch["teacher_input_ids"].shape[0] == len(views) * 4
    assert first_logged(t, "label_kd_loss") > 0.0


def test_model_card_names_the_self_teacher_and_what_only_it_read(tmp_path):
    from hf_distill.card_sections import check_card

    tok = make_tokenizer()
    t = trainer(tmp_path, tok, teacher_context_column="context", teacher_system_prompt=SYSTEM)
    line = t.teacher_source.card_teacher().description
    assert "the student itself" in line and f"a system prompt of {len(SYSTEM)} characters" in line
    assert "the context column `context`" in line and SYSTEM not in line  # the prompt's text stays out of the card
    t.train()
    t.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "the student itself" in card and "context distillation" in card
    assert "distillation" in check_card(card).tags
