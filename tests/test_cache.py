"""Offline teacher cache: round trip against the teacher's own top-k, resume, training from the cache equals the live
teacher for k = V (values and gradients), k = 8 trains, offline sequence-level KD, CLI, bad inputs."""

import copy
import json

import pytest
import torch
from conftest import distill_config, distill_sft_config, make_llama, make_tokenizer, run_processes
from datasets import Dataset, load_from_disk
from transformers import DataCollatorForSeq2Seq

import hf_distill.cache.scoring as cache_module
from hf_distill import DistillationSFTTrainer, DistillationTrainer
from hf_distill.cache import (
    TeacherCache,
    TeacherCacheCollator,
    cache_teacher,
    input_digest,
    supervised_positions,
    tokenize_for_cache,
)


PAIRS = [
    ("the cat sat on", "the mat"),
    ("one plus two equals", "three"),
    ("a dog", "ran fast and the cat is slow"),
    ("is the dog big", "no the dog is small"),
    ("two plus two", "four"),
    ("the red cat", "sat on the blue mat"),
]


def prompt_completion_rows(tok, pairs=PAIRS) -> Dataset:
    return tokenize_for_cache(
        Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}), tok
    )


def teacher_model():
    return make_llama(4, 64, seed=1)


def build(tmp_path, tok, rows=None, name="cache", **kw):
    kw.setdefault("k", 8)
    kw.setdefault("batch_size", 2)
    return cache_teacher(
        teacher_model(), rows if rows is not None else prompt_completion_rows(tok), tok, tmp_path / name, **kw
    )


def test_round_trip_equals_teacher_topk(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    cache = build(tmp_path, tokenizer, rows, k=8, dtype="float32", rows_per_shard=4)
    teacher = teacher_model().eval()
    assert len(list((tmp_path / "cache" / "shards").glob("*.arrow"))) == 2  # 6 rows, 4 per shard
    entries = cache.lookup(list(range(len(rows))))
    for i, entry in enumerate(entries):
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        with torch.no_grad():  # unpadded, one row at a time, float64 softmax: independent of the batched writer
            logits = teacher(input_ids=torch.tensor([ids])).logits[0].double()
        positions = [j for j in range(1, len(ids)) if labels[j] != -100]
        logp = torch.log_softmax(logits[[j - 1 for j in positions]], -1)
        values, top = logp.topk(8, -1)
        assert entry.ids.shape == (len(positions), 8)
        assert torch.equal(torch.from_numpy(entry.ids).long(), top)
        assert torch.allclose(torch.from_numpy(entry.logprobs).double(), values, atol=1e-5)
        tail = torch.log1p(-values.exp().sum(-1))
        assert torch.allclose(torch.from_numpy(entry.tail).double(), tail, atol=1e-5)
        assert entry.input_digest == input_digest(ids)
    info = json.loads((tmp_path / "cache" / "cache_info.json").read_text())
    assert info["k"] == 8 and info["temperature"] == 1.0 and info["status"] == "complete"
    assert info["tokenizer"]["vocab_size"] == len(tokenizer.get_vocab())
    assert info["teacher"]["model_type"] == "llama" and len(info["teacher"]["config_sha256"]) == 64
    assert info["supervision"] == "labels" and info["ids_from_index"]
    assert cache.dataset.num_rows == 6 and cache.dataset.features["topk_ids"].feature.dtype == "int32"


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-2), ("bfloat16", 0.1)])
def test_half_precision_values(tmp_path, tokenizer, dtype, atol):
    exact = build(tmp_path, tokenizer, name="fp32", dtype="float32").lookup([0, 1])
    low = build(tmp_path, tokenizer, name=dtype, dtype=dtype).lookup([0, 1])
    for a, b in zip(exact, low):
        assert (a.ids == b.ids).all()
        assert abs(a.logprobs - b.logprobs).max() < atol and abs(a.tail - b.tail).max() < atol


def count_scored_rows(monkeypatch) -> list:
    """Make `cache_module.score_rows` record every sequence it scores; returns that (growing) list."""
    scored = []
    original = cache_module.score_rows

    def counting(teacher, seqs, *args):
        scored.extend(seqs)
        return original(teacher, seqs, *args)

    monkeypatch.setattr(cache_module, "score_rows", counting)
    return scored


def test_resume_skips_cached_rows_and_checks_settings(tmp_path, tokenizer, monkeypatch):
    rows = prompt_completion_rows(tokenizer)
    scored = count_scored_rows(monkeypatch)
    build(tmp_path, tokenizer, rows.select(range(2)))  # a run that stopped after two rows
    assert len(scored) == 2
    cache = build(tmp_path, tokenizer, rows)
    assert len(scored) == 6 and len(cache) == 6  # only the four missing rows were scored
    assert json.loads((tmp_path / "cache" / "cache_info.json").read_text())["num_rows"] == 6
    with pytest.raises(ValueError, match=r"different k \(8, now 4\)"):
        build(tmp_path, tokenizer, rows, k=4)
    other = prompt_completion_rows(tokenizer, PAIRS[::-1])  # same ids (row index), other tokens
    with pytest.raises(ValueError, match="Row id 0 is already cached with other input_ids"):
        build(tmp_path, tokenizer, other)


def test_supervision_rules():
    row = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "attention_mask": [1, 1, 1, 0]}
    assert supervised_positions(row, "labels").tolist() == [2, 3]
    assert supervised_positions(row, "attention_mask").tolist() == [1, 2]
    assert supervised_positions(row, "all", max_length=3).tolist() == [1, 2]
    assert supervised_positions({**row, "completion_mask": [0, 0, 1, 1]}, "completion_mask").tolist() == [2]


def trainer_args(tmp_path, **kw):
    return distill_config(tmp_path, **{"per_device_train_batch_size": 3, **kw})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_cache_equals_live_forward_kl(tmp_path, tokenizer, temperature):
    rows = prompt_completion_rows(tokenizer)
    build(tmp_path, tokenizer, rows, k=64, dtype="float32")  # k = V = 64
    student = make_llama(2, 32)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    live = DistillationTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher_model(),
        args=trainer_args(tmp_path, temperature=temperature),
        train_dataset=rows,
        data_collator=collator,
        processing_class=tokenizer,
    )
    cached = DistillationTrainer(
        model=copy.deepcopy(student),
        args=trainer_args(tmp_path, temperature=temperature, teacher_cache=str(tmp_path / "cache")),
        train_dataset=rows,
        data_collator=collator,
        processing_class=tokenizer,
    )
    assert cached.teacher is None and cached.teachers == []
    features = [{**rows[i], "row_id": i} for i in (0, 2, 3)]  # ragged lengths -> padding
    batch_live = collator([{k: v for k, v in f.items() if k != "row_id"} for f in features])
    batch_cached = cached.data_collator(features)
    assert torch.equal(batch_live["input_ids"], batch_cached["input_ids"])
    loss_live = live.compute_loss(live.model, batch_live)
    loss_cached = cached.compute_loss(cached.model, batch_cached)
    assert torch.allclose(loss_live, loss_cached, atol=1e-5)
    loss_live.backward()
    loss_cached.backward()
    for (name, p_live), p_cached in zip(live.model.named_parameters(), cached.model.parameters()):
        assert torch.allclose(p_live.grad, p_cached.grad, atol=1e-5), name
    kd_live, kd_cached = (t._metrics["train"]["kd_loss"][-1] for t in (live, cached))
    assert kd_live[1] == kd_cached[1] and abs(kd_live[0] - kd_cached[0]) < 1e-4


def test_topk_cache_trains_and_logs_without_teacher(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    cache = build(tmp_path, tokenizer, rows, k=8)  # fp16 values
    trainer = DistillationTrainer(
        model=make_llama(2, 32),
        args=trainer_args(tmp_path, max_steps=3, teacher_cache=str(cache.path), kd_loss="reverse_kl"),
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logs) == 3 and {"kd_loss", "ce_loss", "top1_agreement", "loss"} <= set(logs[0])
    assert all(e["kd_loss"] > 0 for e in logs)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    metrics = trainer.evaluate(rows.add_column("row_id", list(range(len(rows)))))
    assert "eval_kd_loss" in metrics


def test_sft_trainer_trains_from_cache(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    cache = build(tmp_path, tokenizer, rows, k=8)
    trainer = DistillationSFTTrainer(
        model=make_llama(2, 32),
        train_dataset=rows,
        processing_class=tokenizer,
        args=distill_sft_config(tmp_path, teacher_cache=str(cache.path)),
    )
    trainer.train()
    assert any("kd_loss" in e for e in trainer.state.log_history)


def test_offline_sequence_level_kd(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    cache = build(tmp_path, tokenizer, rows, k=8, generate=True, max_new_tokens=5)
    data = cache.training_dataset()
    teacher = teacher_model().eval()
    for i in range(len(rows)):
        prompt = [t for t, y in zip(rows[i]["input_ids"], rows[i]["labels"]) if y == -100]
        with torch.no_grad():
            out = teacher.generate(
                torch.tensor([prompt]),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id,
            )
        completion = out[0, len(prompt) :].tolist()
        if tokenizer.eos_token_id in completion:
            completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
        assert data[i]["input_ids"] == prompt + completion
        assert data[i]["labels"] == [-100] * len(prompt) + completion
    trainer = DistillationTrainer(
        model=make_llama(2, 32),
        args=trainer_args(tmp_path, teacher_cache=str(cache.path)),
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    trainer.train()
    assert any("kd_loss" in e for e in trainer.state.log_history)


def cache_teacher_argv(tmp_path, tokenizer, pairs, output_dir, k: int, *options: str) -> list[str]:
    """Save the teacher (and tokenizer) under `tmp_path/teacher`, write `pairs` to `tmp_path/data.jsonl`, and return
    the `cache-teacher` command line over them (`options` appended)."""
    teacher_model().save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    teacher = ["--teacher", str(tmp_path / "teacher"), "--dataset", str(data)]
    return ["cache-teacher", *teacher, "--output_dir", str(output_dir), "--k", str(k), *options]


def test_cli_caches_text_dataset(tmp_path, tokenizer):
    from hf_distill.cli.main import main

    out = tmp_path / "cli_cache"
    main(cache_teacher_argv(tmp_path, tokenizer, PAIRS, out, 4, "--batch_size", "4"))
    cache = TeacherCache(out)
    assert len(cache) == len(PAIRS) and cache.k == 4
    train = load_from_disk(str(out / "train_dataset"))
    assert set(train.column_names) == {"row_id", "input_ids", "labels"}
    collator = TeacherCacheCollator(cache, DataCollatorForSeq2Seq(tokenizer, padding=True))
    batch = collator([train[0], train[1]])
    assert batch["teacher_cache_mask"].sum() == sum(cache.lookup([0, 1])[i].ids.shape[0] for i in range(2))


def test_cli_help(capsys):
    from hf_distill.cli.main import main

    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    assert "--k" in capsys.readouterr().out


def test_collator_left_padding_and_errors(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    cache = build(tmp_path, tokenizer, rows.select(range(3)), dtype="float32")
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    collator = TeacherCacheCollator(cache, DataCollatorForSeq2Seq(left, padding=True))
    features = [{**rows[i], "row_id": i} for i in (0, 2)]
    batch = collator(features)
    entry = cache.lookup([0])[0]
    width, n = batch["input_ids"].shape[1], len(rows[0]["input_ids"])
    first = width - n + 1 + rows[0]["labels"][1:].index(next(y for y in rows[0]["labels"] if y != -100))
    assert batch["teacher_cache_mask"][0].nonzero().flatten()[0].item() == first
    assert torch.equal(batch["teacher_topk_ids"][0, first], torch.from_numpy(entry.ids[0]))
    with pytest.raises(ValueError, match=r"no entries for 2 row\(s\) of this batch: ids \[4, 5\]"):
        collator([{**rows[i], "row_id": i} for i in (0, 4, 5)])
    with pytest.raises(ValueError, match="have no `row_id` column"):
        collator([rows[0]])
    with pytest.raises(ValueError, match="input_ids differ from those the teacher cache was built on"):
        collator([{**rows[1], "row_id": 0}])


def test_bad_inputs(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    with pytest.raises(ValueError, match=r"k=65 must be between 1 and the teacher's vocabulary size \(64\)"):
        build(tmp_path, tokenizer, rows, k=65)
    cache = build(tmp_path, tokenizer, rows.select(range(4)))
    other_tok = make_tokenizer(words=list(reversed(make_tokenizer().get_vocab())))
    with pytest.raises(ValueError, match="built with another tokenizer"):
        DistillationTrainer(
            model=make_llama(2, 32),
            args=trainer_args(tmp_path, teacher_cache=str(cache.path)),
            train_dataset=rows.select(range(4)),
            processing_class=other_tok,
        )
    with pytest.raises(ValueError, match=r"no entries for 2 of the 6 training rows \(ids \[4, 5\]\)"):
        DistillationTrainer(  # refused when the trainer is built, not at the first batch reaching row 4
            model=make_llama(2, 32),
            args=trainer_args(tmp_path, teacher_cache=str(cache.path), per_device_train_batch_size=6),
            train_dataset=rows,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="Pass either `teacher_model` or `teacher_cache`"):
        DistillationTrainer(
            model=make_llama(2, 32),
            teacher_model=teacher_model(),
            args=trainer_args(tmp_path, teacher_cache=str(cache.path)),
            train_dataset=rows,
        )
    with pytest.raises(ValueError, match="cannot score on-policy samples"):
        trainer_args(tmp_path, teacher_cache=str(cache.path), lmbda=0.5)
    with pytest.raises(ValueError, match="is not a teacher cache"):
        TeacherCache(tmp_path)
    with pytest.raises(ValueError, match="needs a tokenised dataset"):
        cache_teacher(teacher_model(), Dataset.from_dict({"text": ["a"]}), tokenizer, tmp_path / "x")
    with pytest.raises(ValueError, match="has no `row_id` column"):
        TeacherCache(
            build(tmp_path, tokenizer, rows.add_column("row_id", [f"r{i}" for i in range(6)]), name="named").path
        ).attach_row_ids(rows)


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path, tokenizer):
    import sys

    argv = cache_teacher_argv(tmp_path, tokenizer, PAIRS * 2, tmp_path / "two", 8, "--batch_size", "2")
    one = build(tmp_path, tokenizer, prompt_completion_rows(tokenizer, PAIRS * 2), name="one", dtype="float32")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "hf_distill.cli.main",
        *argv,
        "--rows_per_shard",
        "2",
        "--dtype",
        "float32",
        "--use_cpu",
    ]
    run_processes(cmd, timeout=180)
    two = TeacherCache(tmp_path / "two")
    ids = list(range(len(PAIRS) * 2))
    for a, b in zip(one.lookup(ids), two.lookup(ids)):
        assert (a.ids == b.ids).all() and abs(a.logprobs - b.logprobs).max() < 1e-5
    by_rank = {0: set(), 1: set()}
    for path in (tmp_path / "two" / "shards").glob("*.arrow"):
        rank = int(path.name.split("-rank")[1][:5])
        by_rank[rank] |= set(Dataset.from_file(str(path))["row_id"])
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1] and by_rank[0] | by_rank[1] == set(ids)


def shard_files(cache_dir) -> list:
    return sorted((cache_dir / "shards").glob("*.arrow"))


def test_lost_shard_is_refused_at_open_and_rebuilt(tmp_path, tokenizer, monkeypatch):
    rows = prompt_completion_rows(tokenizer)
    full = build(tmp_path, tokenizer, rows, rows_per_shard=2, dtype="float32")
    reference = {e.row_id: e for e in full.lookup(list(range(6)))}
    lost = Dataset.from_file(str(shard_files(full.path)[1]))["row_id"]
    shard_files(full.path)[1].unlink()  # two rows gone; cache_info.json still says complete with 6 rows
    expected = rf"lost 2 of its 6 rows \(ids \{sorted(lost)}\).*Re-run `hf-distill cache-teacher`"
    with pytest.raises(ValueError, match=expected):
        TeacherCache(full.path)
    with pytest.raises(ValueError, match=expected):
        DistillationTrainer(
            model=make_llama(2, 32),
            args=trainer_args(tmp_path, teacher_cache=str(full.path)),
            train_dataset=rows,
            processing_class=tokenizer,
        )
    scored = count_scored_rows(monkeypatch)
    repaired = build(tmp_path, tokenizer, rows, rows_per_shard=2, dtype="float32")  # the documented repair
    assert len(scored) == 2 and len(repaired) == 6  # only the lost rows were recomputed
    for entry in repaired.lookup(list(range(6))):
        assert (entry.ids == reference[entry.row_id].ids).all()
        assert abs(entry.logprobs - reference[entry.row_id].logprobs).max() < 1e-6


def test_truncated_shard_names_the_file_and_is_recomputed(tmp_path, tokenizer, caplog):
    rows = prompt_completion_rows(tokenizer)
    full = build(tmp_path, tokenizer, rows, rows_per_shard=2, dtype="float32")
    reference = {e.row_id: e for e in full.lookup(list(range(6)))}
    shard = shard_files(full.path)[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn copy
    with pytest.raises(ValueError, match=rf"shard {shard} is unreadable.*truncated or corrupt.*cache-teacher"):
        TeacherCache(full.path)
    with pytest.raises(ValueError, match=rf"shard {shard} is unreadable"):
        DistillationTrainer(
            model=make_llama(2, 32),
            args=trainer_args(tmp_path, teacher_cache=str(full.path)),
            train_dataset=rows,
            processing_class=tokenizer,
        )
    with caplog.at_level("WARNING", logger="hf_distill.cache.writer"):
        repaired = build(tmp_path, tokenizer, rows, rows_per_shard=2, dtype="float32")
    assert not shard.exists() and shard.with_name(shard.name + ".corrupt").exists()
    assert any("Set aside as" in r.getMessage() and shard.name in r.getMessage() for r in caplog.records)
    assert len(repaired) == 6
    for entry in repaired.lookup(list(range(6))):
        assert (entry.ids == reference[entry.row_id].ids).all()
        assert abs(entry.logprobs - reference[entry.row_id].logprobs).max() < 1e-6


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_chunked_sparse_loss_equals_the_full_logits(tmp_path, tokenizer, kd_loss):
    """From the student's hidden states a few rows at a time (no (N, V) logits): the loss and the gradients of the
    full-logit sparse loss (`use_fused_kd_loss=False`)."""
    rows = prompt_completion_rows(tokenizer)
    cache = build(tmp_path, tokenizer, rows, k=8)
    losses, grads = {}, {}
    for name, fields in {"chunked": {"kd_chunk_size": 2}, "full": {"use_fused_kd_loss": False}}.items():
        torch.manual_seed(0)
        trainer = DistillationTrainer(
            model=make_llama(2, 32),
            args=trainer_args(
                tmp_path / name, teacher_cache=str(cache.path), kd_loss=kd_loss, temperature=2.0, **fields
            ),
            train_dataset=rows,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            processing_class=tokenizer,
        )
        batch = trainer.data_collator([{**rows[i], "row_id": i} for i in range(4)])
        if name == "chunked":
            assert "logits_to_keep" in trainer.teacher_source.student_forward_kwargs()
        losses[name] = trainer.compute_loss(trainer.model, batch)
        losses[name].backward()
        grads[name] = [p.grad.clone() for p in trainer.model.parameters()]
    torch.testing.assert_close(losses["chunked"], losses["full"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["chunked"], grads["full"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
