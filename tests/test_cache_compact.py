"""Compact teacher cache (`compression="compact"`): encode/decode round trips with error bounds (vocabularies 64,
49152 and 262144), caches written compactly against fp32 caches of the same teacher, the quantization-error function,
byte-identical resume, corrupt shards, training and the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import distill_config, make_llama
from datasets import Dataset
from test_cache import PAIRS, build, cache_teacher_argv, prompt_completion_rows, shard_files
from transformers import DataCollatorForSeq2Seq

import hf_distill.cache.scoring as cache_module
from hf_distill import DistillationTrainer
from hf_distill.cache import TeacherCache, decode_row, encode_row, quantization_error
from hf_distill.losses.sparse import teacher_bucket_log_probs


def lm_like_topk(vocab: int, n: int, k: int, seed: int = 0):
    """Top-k of n LM-like distributions over `vocab` (Zipf-shaped logits, frequent tokens at small ids, noise)."""
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.log1p(torch.arange(vocab, dtype=torch.float64))
    logits = base + 2.5 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(k, -1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1) if k < vocab else torch.full((n,), float("-inf"))
    return ids.numpy(), values.numpy(), tail.numpy()


def by_id(ids, values):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


@pytest.mark.parametrize("vocab, k", [(262144, 64), (262144, 128), (49152, 64), (49152, 128), (64, 8)])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_round_trip_error_bounds(vocab, k, bits):
    ids, values, tail = lm_like_topk(vocab, 40, k, seed=vocab + k)
    payload, order = encode_row(ids, values.astype(np.float32), tail.astype(np.float32), vocab, bits)
    got_ids, got_values, got_tail = decode_row(payload, 40, k, order, bits)
    assert got_ids.dtype == np.int32 and got_values.dtype == np.float32 and got_values.shape == (40, k)
    assert (np.diff(got_values, axis=1) <= 0).all()  # most likely first, as uncompressed rows
    ref_ids, ref_values = by_id(ids, values)
    dec_ids, dec_values = by_id(got_ids, got_values.astype(np.float64))
    assert np.array_equal(ref_ids, dec_ids)  # ids are lossless
    assert np.allclose(got_tail, tail, rtol=1e-3, atol=1e-6)  # tail: fp16
    # differences to the top: the quantizer's bound (module docstring) + fp16 rounding of the span
    levels = 2**bits - 1
    top = ref_values.max(1, keepdims=True)
    span = top - ref_values.min(1, keepdims=True)
    u = np.sqrt((top - ref_values) / span)
    bound = span * (u / levels + 1 / (4 * levels**2)) + span * 2**-10
    dec_top = dec_values.max(1, keepdims=True)
    assert (np.abs((dec_top - dec_values) - (top - ref_values)) <= bound + 1e-6).all()
    # the top is derived from the tail: off by at most the largest difference error (+ fp16 of the tail)
    assert (np.abs(dec_top - top) <= bound.max(1, keepdims=True) + 2e-3).all()
    # decoded positions are normalised with their tail
    total = np.logaddexp(np.logaddexp.reduce(dec_values, axis=1), got_tail.astype(np.float64))
    assert np.allclose(total, 0.0, atol=1e-5)
    # bucket KL: 4 bits ~1e-2, 6 bits ~1e-3, 8 bits ~1e-4 nats at most
    p = teacher_bucket_log_probs(torch.from_numpy(ref_values), torch.from_numpy(tail), vocab)
    q = teacher_bucket_log_probs(torch.from_numpy(dec_values), torch.from_numpy(got_tail).double(), vocab)
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() < {4: 3e-2, 6: 2e-3, 8: 2e-4}[bits]
    # size: 2 B per entry or less on these vocabularies at 6 bits (the ids are ~ 9-11 bits each here)
    if bits == 6 and vocab > 64:
        assert len(payload) / ids.size < 2.3


def test_round_trip_edge_cases():
    ids, values, tail = lm_like_topk(64, 5, 64)  # k = V: no tail (-inf)
    payload, order = encode_row(ids, values, tail, 64)
    got_ids, got_values, got_tail = decode_row(payload, 5, 64, order)
    assert np.array_equal(by_id(ids, values)[0], by_id(got_ids, got_values)[0]) and np.isneginf(got_tail).all()
    assert np.allclose(np.logaddexp.reduce(got_values.astype(np.float64), axis=1), 0.0, atol=1e-5)
    empty = encode_row(np.zeros((0, 8), np.int64), np.zeros((0, 8), np.float32), np.zeros(0, np.float32), 64)
    got = decode_row(*empty[:1], 0, 8, empty[1])
    assert [x.shape for x in got] == [(0, 8), (0, 8), (0,)]
    with pytest.raises(ValueError, match="distinct"):
        encode_row(np.array([[3, 3]]), np.array([[-1.0, -2.0]]), np.array([-0.5]), 64)
    with pytest.raises(ValueError, match=r"must lie in \[0, 64\)"):
        encode_row(np.array([[3, 64]]), np.array([[-1.0, -2.0]]), np.array([-0.5]), 64)
    with pytest.raises(ValueError, match="shorter than"):
        decode_row(payload[:10], 5, 64, order)


def test_compact_cache_matches_fp32_cache(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    exact = build(tmp_path, tokenizer, rows, name="fp32", dtype="float32")
    compact = build(tmp_path, tokenizer, rows, name="compact", compression="compact", value_bits=6)
    info = json.loads((compact.path / "cache_info.json").read_text())
    assert info["version"] == 2 and info["compression"] == "compact" and info["value_bits"] == 6
    assert compact.compact and not exact.compact and len(compact) == 6
    assert set(compact.dataset.column_names) == {
        "row_id",
        "input_digest",
        "num_tokens",
        "id_golomb_order",
        "crc32",
        "payload",
    }
    for a, b in zip(exact.lookup(list(range(6))), compact.lookup(list(range(6)))):
        assert a.input_digest == b.input_digest and a.ids.shape == b.ids.shape
        ids_a, lp_a = by_id(a.ids, a.logprobs)
        ids_b, lp_b = by_id(b.ids, b.logprobs)
        assert np.array_equal(ids_a, ids_b)
        assert np.abs(lp_a - lp_b).max() < 0.15 and np.abs(a.tail - b.tail).max() < 2e-3
    measured = quantization_error(compact, reference=exact)
    predicted = quantization_error(exact, value_bits=6)  # in-memory round trip of the fp32 cache
    assert measured["positions"] == predicted["positions"] == sum(compact.dataset["num_tokens"])
    assert 0 < measured["kl_mean"] < 2e-3 and measured["kl_max"] < 5e-3
    assert measured["kl_mean"] == pytest.approx(predicted["kl_mean"], rel=1e-6)
    assert measured["bytes_per_entry"] == pytest.approx(predicted["bytes_per_entry"])
    assert quantization_error(exact, value_bits=8)["kl_mean"] < measured["kl_mean"] / 4
    with pytest.raises(ValueError, match="no longer holds the fp16 values"):
        quantization_error(compact)
    with pytest.raises(ValueError, match="keeps its scalars in float16"):
        build(tmp_path, tokenizer, rows, name="bad", compression="compact", dtype="float32")
    with pytest.raises(ValueError, match="different compression"):
        build(tmp_path, tokenizer, rows, name="compact")  # resuming a compact cache uncompressed


def stored_rows(cache: TeacherCache) -> dict:
    """row_id -> every stored column of the row, as bytes / ints (what the shards hold, independent of sharding)."""
    table = cache.dataset.with_format("arrow")[:]
    return {r["row_id"]: r for r in table.to_pylist()}


def test_resumed_compact_cache_is_byte_identical(tmp_path, tokenizer, monkeypatch):
    rows = prompt_completion_rows(tokenizer, PAIRS * 2)
    whole = build(tmp_path, tokenizer, rows, name="whole", compression="compact", rows_per_shard=4)
    calls = []
    original = cache_module.score_rows

    def dies_on_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill after the first shard (2 batches of 2 rows) was written
        return original(*args)

    monkeypatch.setattr(cache_module, "score_rows", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, tokenizer, rows, name="resumed", compression="compact", rows_per_shard=4)
    assert len(shard_files(tmp_path / "resumed")) == 1
    resumed = build(tmp_path, tokenizer, rows, name="resumed", compression="compact", rows_per_shard=4)
    assert len(calls) > 3 and len(resumed) == len(whole) == 12
    assert stored_rows(resumed) == stored_rows(whole)


def test_corrupt_compact_shard(tmp_path, tokenizer, caplog):
    rows = prompt_completion_rows(tokenizer)
    cache = build(tmp_path, tokenizer, rows, compression="compact", rows_per_shard=3)
    reference = stored_rows(cache)
    shard = shard_files(cache.path)[0]
    data = bytearray(shard.read_bytes())
    row = reference[0]["payload"]
    at = bytes(data).index(row) + len(row) // 2
    data[at] ^= 0xFF  # one flipped byte inside row 0's payload: the file still parses
    shard.write_bytes(bytes(data))
    broken = TeacherCache(cache.path)
    with pytest.raises(
        ValueError, match=rf"Row 0 of the teacher cache shard {shard} is corrupt \(checksum mismatch\)"
    ):
        broken.lookup([0])
    with caplog.at_level("WARNING", logger="hf_distill.cache.writer"):
        repaired = build(tmp_path, tokenizer, rows, compression="compact", rows_per_shard=3)
    assert shard.with_name(shard.name + ".corrupt").exists()
    assert any("checksum mismatch" in r.getMessage() for r in caplog.records)
    assert stored_rows(repaired) == reference
    shard = shard_files(cache.path)[-1]
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated
    with pytest.raises(ValueError, match=rf"shard {shard} is unreadable"):
        TeacherCache(cache.path)


def test_trains_from_compact_cache_like_fp32_cache(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    exact = build(tmp_path, tokenizer, rows, name="fp32", dtype="float32", k=16)
    compact = build(tmp_path, tokenizer, rows, name="compact", compression="compact", k=16, value_bits=8)
    losses = {}
    for name, cache in (("fp32", exact), ("compact", compact)):
        trainer = DistillationTrainer(
            model=make_llama(2, 32),
            args=distill_config(tmp_path, per_device_train_batch_size=3, max_steps=2, teacher_cache=str(cache.path)),
            train_dataset=rows,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            processing_class=tokenizer,
        )
        batch = trainer.data_collator([{**rows[i], "row_id": i} for i in (0, 2, 3)])
        losses[name] = trainer.compute_loss(trainer.model, batch).item()
        trainer.train()
        assert all(np.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert losses["compact"] == pytest.approx(losses["fp32"], abs=2e-3)


def test_cli_compression_compact(tmp_path, tokenizer):
    from hf_distill.cli.main import main

    out = tmp_path / "cli_compact"
    main(cache_teacher_argv(tmp_path, tokenizer, PAIRS, out, 8, "--compression", "compact", "--value_bits", "5"))
    cache = TeacherCache(out)
    assert cache.compact and cache.info["value_bits"] == 5 and len(cache) == len(PAIRS)


def test_value_bits_without_compact_compression_is_refused(tmp_path, tokenizer, capsys):
    """--value_bits only shapes a compact cache: with compression none it would be ignored, so it is refused."""
    from hf_distill.cli.main import main

    with pytest.raises(ValueError, match=r"value_bits=3 applies to compression='compact' only"):
        build(tmp_path, tokenizer, value_bits=3)
    assert not (tmp_path / "cache" / "shards").exists()
    with pytest.raises(SystemExit):
        main(cache_teacher_argv(tmp_path, tokenizer, PAIRS, tmp_path / "cli", 8, "--value_bits", "3"))
    assert "--compression compact" in capsys.readouterr().err


def test_version_1_cache_without_compression_key_resumes(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    build(tmp_path, tokenizer, rows.select(range(3)))
    info_path = tmp_path / "cache" / "cache_info.json"
    info = json.loads(info_path.read_text())
    del info["compression"]  # as written before compact caches existed
    info_path.write_text(json.dumps(info))
    assert len(build(tmp_path, tokenizer, rows)) == 6
    assert isinstance(Dataset.from_file(str(shard_files(tmp_path / "cache")[0])), Dataset)
