"""`cache-teacher --import axolotl|distillkit`: small files written here in each tool's format (Axolotl's prepared KD
rows; DistillKit's compressed Parquet rows, written by `distillkit_encode`, our encoder of its format spec), values
checked after the round trip, one SGD step from each imported cache equal to one from our own cache of the same
values, and the bad inputs refused with a clear error."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import distill_config, make_llama, one_sgd_step, trained_weights
from datasets import Dataset, load_from_disk
from test_cache import PAIRS, build, prompt_completion_rows
from transformers import DataCollatorForSeq2Seq

from hf_distill import DistillationTrainer
from hf_distill.cache import (
    DistillKitCodec,
    TeacherCache,
    import_teacher_logprobs,
    supervised_positions,
    tokenize_for_cache,
)
from hf_distill.cache.distillkit import index_bits
from hf_distill.cli.main import main


TEXTS = [f"{p} {c}" for p, c in PAIRS]
K = 8
LOSSLESS = {"d": 65, "k": K, "exact_k": K, "exact_dtype": "float32", "residual_bins": [], "delta_encoding": True}
LOSSY = {  # 2 exact fp16 values, a cubic + sqrt fit and 4/3-bit residuals of the other 6
    "d": 65,
    "k": K,
    "exact_k": 2,
    "exact_dtype": "float16",
    "polynomial_terms": [0, 1, 2, "sqrt"],
    "term_dtype": "float32",
    "residual_bins": [
        {"scale_dtype": "float16", "element_bits": 4, "num_elements": 4},
        {"scale_dtype": "float32", "element_bits": 3, "num_elements": 2},
    ],
    "delta_encoding": True,
    "error_diffusion": False,
    "normalize_t": False,
}
NP_FLOATS = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


# ----------------------------------------------------------------------------------------------- writers
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """`(n, m)` unsigned ints -> `(n, ceil(m * bits / 8))` uint8, most significant bit first (DistillKit's order)."""
    shifts = np.arange(bits - 1, -1, -1)
    stream = ((values[..., None].astype(np.int64) >> shifts) & 1).reshape(len(values), -1).astype(np.uint8)
    return np.packbits(stream, axis=1)


def distillkit_encode(ids: np.ndarray, values: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our encoder of DistillKit's compressed format (`DistributionQuantizationConfig`, naive quantization), from
    its spec in `hf_distill.cache.distillkit`. Returns `compressed_logprobs` `(n, B)`, `bytepacked_indices` `(n, B_i)`
    and the values a decoder must reconstruct `(n, k)` float64."""
    k, exact_k = config["k"], config["exact_k"]
    order = np.argsort(-values, axis=1, kind="stable")
    ids, values = np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1).astype(np.float64)
    stored = np.concatenate([values[:, :1], np.diff(values, axis=1)], 1) if config["delta_encoding"] else values
    exact = stored[:, :exact_k].astype(NP_FLOATS[config["exact_dtype"]])
    chunks = [np.ascontiguousarray(exact).view(np.uint8).reshape(len(ids), -1)]
    rest, fit = stored[:, exact_k:], np.zeros((len(ids), k - exact_k))
    terms = config.get("polynomial_terms") or []
    if terms:
        x = np.arange(k - exact_k, dtype=np.float64)
        points = np.stack([x**t if isinstance(t, int) else np.sqrt(x) for t in terms], -1)
        coeffs = np.linalg.lstsq(points, rest.T, rcond=None)[0].T.astype(NP_FLOATS[config["term_dtype"]])
        chunks.append(np.ascontiguousarray(coeffs).view(np.uint8).reshape(len(ids), -1))
        fit = coeffs.astype(np.float64) @ points.T
    residual, start = rest - fit, 0
    for b in config["residual_bins"]:
        part, bits = residual[:, start : start + b["num_elements"]], b["element_bits"]
        scale = np.abs(part).max(1, keepdims=True) / 2 ** (bits - 1)
        scale = np.where(scale == 0, 1.0, scale).astype(NP_FLOATS[b["scale_dtype"]])
        q = np.clip(np.round(part / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        chunks += [scale.view(np.uint8).reshape(len(ids), -1), pack_bits(q + 2 ** (bits - 1), bits)]
        fit[:, start : start + b["num_elements"]] += q * scale.astype(np.float64)
        start += b["num_elements"]
    decoded = np.concatenate([exact.astype(np.float64), fit], 1)
    decoded = np.cumsum(decoded, 1) if config["delta_encoding"] else decoded
    return np.concatenate(chunks, 1), pack_bits(ids, index_bits(config["d"])), decoded


def cache_entries(cache: TeacherCache, n_rows: int) -> list:
    return cache.lookup(list(range(n_rows)))


def write_axolotl(path, rows: Dataset, entries: list, temperature: float = 1.0, renormalise: bool = False) -> list:
    """Axolotl's prepared KD rows (`save_to_disk`): per input token j, the distribution of input_ids[j + 1] (padding,
    masked, where labels[j + 1] == -100 and on the last row). Values are `entries`' (optionally renormalised over
    the top k and raised to temperature `temperature`, as Axolotl's chat-template strategy stores them)."""
    out = {c: [] for c in ("input_ids", "labels", "target_token_ids", "target_logprobs", "target_mask")}
    written = []
    for row, entry in zip(rows, entries):
        n = len(row["input_ids"])
        positions = supervised_positions(row, "labels")
        values = entry.logprobs.astype(np.float64)
        if renormalise:
            scaled = values / temperature
            values = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
        written.append(values)
        ids = [list(range(K)) for _ in range(n)]
        logprobs = [[-float("inf")] * K for _ in range(n)]
        mask = [[0] * K for _ in range(n)]
        for i, j in enumerate(positions):
            ids[j - 1], logprobs[j - 1], mask[j - 1] = entry.ids[i].tolist(), values[i].tolist(), [1] * K
        for key, value in zip(out, (row["input_ids"], row["labels"], ids, logprobs, mask)):
            out[key].append(value)
    Dataset.from_dict(out).save_to_disk(str(path))
    return written


def write_distillkit(folder, input_ids: list, ids: list, values: list, config: dict) -> list:
    """DistillKit's sampler output: `data_0.parquet` (`input_ids`, and per token after the first its compressed
    log-probs and packed ids) + `compression_config.yaml`. Returns the values a decoder must reconstruct."""
    folder.mkdir(parents=True, exist_ok=True)
    columns, decoded = {"input_ids": [], "compressed_logprobs": [], "bytepacked_indices": []}, []
    for seq, row_ids, row_values in zip(input_ids, ids, values):
        logprobs, indices, reconstructed = distillkit_encode(row_ids, row_values, config)
        columns["input_ids"].append(seq)
        columns["compressed_logprobs"].append(logprobs.tolist())
        columns["bytepacked_indices"].append(indices.tolist())
        decoded.append(reconstructed)
    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.uint64())),
            ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
            ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
        ]
    )
    pq.write_table(pa.table(columns, schema=schema), folder / "data_0.parquet")
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(config))
    return decoded


def text_rows(tok) -> Dataset:
    """Plain-text rows: labels = input_ids, every token after the first supervised (as DistillKit trains)."""
    return tokenize_for_cache(Dataset.from_dict({"text": TEXTS}), tok)


def distillkit_file(tmp_path, tok, config: dict, name: str = "dk"):
    """Our fp32 cache of the tiny teacher on `text_rows`, and a DistillKit folder holding its entries."""
    rows = text_rows(tok)
    reference = build(tmp_path, tok, rows, name=f"{name}_ref", k=K, dtype="float32")
    entries = cache_entries(reference, len(rows))
    decoded = write_distillkit(
        tmp_path / name, rows["input_ids"], [e.ids for e in entries], [e.logprobs for e in entries], config
    )
    return rows, reference, entries, decoded


# ----------------------------------------------------------------------------------------------- round trips
def test_axolotl_round_trip(tmp_path, tokenizer):
    rows = prompt_completion_rows(tokenizer)
    reference = build(tmp_path, tokenizer, rows, name="ref", k=K, dtype="float32")
    entries = cache_entries(reference, len(rows))
    write_axolotl(tmp_path / "axolotl", rows, entries)
    data = load_from_disk(str(tmp_path / "axolotl"))
    cache = import_teacher_logprobs("axolotl", data, tokenizer, tmp_path / "imp", source="axo", dtype="float32",
                                    vocab_size=64)  # fmt: skip
    assert cache.k == K and cache.info["teacher"]["imported_from"] == "axolotl" and len(cache) == len(rows)
    for ref, got in zip(entries, cache_entries(cache, len(rows))):
        assert np.array_equal(ref.ids, got.ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-7)
        np.testing.assert_allclose(got.tail, ref.tail, rtol=1e-5)  # log(1 - sum p) here, logsumexp of the rest there


def test_axolotl_renormalised_at_temperature_is_brought_back_to_one(tmp_path, tokenizer):
    """Axolotl stores the top k renormalised at its kd_temperature; `temperature=` undoes the temperature."""
    rows = prompt_completion_rows(tokenizer)
    entries = cache_entries(build(tmp_path, tokenizer, rows, name="ref", k=K, dtype="float32"), len(rows))
    write_axolotl(tmp_path / "axolotl", rows, entries, temperature=2.0, renormalise=True)
    data = load_from_disk(str(tmp_path / "axolotl"))
    cache = import_teacher_logprobs("axolotl", data, tokenizer, tmp_path / "imp", source="a", temperature=2.0,
                                    k=4, dtype="float32", vocab_size=64)  # fmt: skip
    for ref, got in zip(entries, cache_entries(cache, len(rows))):
        renormalised = ref.logprobs - np.log(np.exp(ref.logprobs.astype(np.float64)).sum(-1, keepdims=True))
        assert np.array_equal(got.ids, ref.ids[:, :4])
        np.testing.assert_allclose(got.logprobs, renormalised[:, :4], atol=2e-6)
        tail = np.log1p(-np.exp(renormalised[:, :4]).sum(-1))  # the top 8 hold all the mass: 4 of them leave a tail
        np.testing.assert_allclose(got.tail, tail, atol=1e-5)


@pytest.mark.parametrize("config", [LOSSLESS, LOSSY], ids=["exact-fp32", "polynomial-residual"])
def test_distillkit_round_trip(tmp_path, tokenizer, config):
    rows, _, entries, decoded = distillkit_file(tmp_path, tokenizer, config)
    codec = DistillKitCodec.from_dict(config)
    assert codec.index_bytes == (K * 7 + 7) // 8  # d = 65 -> 7 bits per id
    data = Dataset.from_parquet(str(tmp_path / "dk" / "data_0.parquet"))
    cache = import_teacher_logprobs("distillkit", data, tokenizer, tmp_path / "imp", source=str(tmp_path / "dk"),
                                    dtype="float32", vocab_size=64)  # fmt: skip
    for ref, want, got in zip(entries, decoded, cache_entries(cache, len(rows))):
        order = np.argsort(-want, axis=1, kind="stable")
        assert np.array_equal(got.ids, np.take_along_axis(ref.ids, order, 1))
        np.testing.assert_allclose(got.logprobs, np.take_along_axis(want, order, 1), atol=2e-6)
        if config is LOSSLESS:
            np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=2e-6)
        else:  # what the format loses: 4- and 3-bit residuals
            assert np.abs(np.sort(got.logprobs, 1) - np.sort(ref.logprobs, 1)).max() < 0.5


# ----------------------------------------------------------------------------------------------- one SGD step
def one_step(tmp_path, tok, cache_dir, dataset: Dataset) -> dict[str, torch.Tensor]:
    trainer = DistillationTrainer(
        model=make_llama(2, 32),
        args=distill_config(tmp_path, teacher_cache=str(cache_dir), **one_sgd_step(len(dataset), 1)),
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        processing_class=tok,
    )
    return trained_weights(trainer)


def max_weight_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def cli_import(tmp_path, tok, fmt: str, dataset, out, *options: str):
    tok.save_pretrained(tmp_path / "student_tok")
    argv = ["cache-teacher", "--import", fmt, "--dataset", str(dataset), "--tokenizer", str(tmp_path / "student_tok")]
    main([*argv, "--output_dir", str(out), "--dtype", "float32", "--batch_size", "4", "--rows_per_shard", "4",
          "--vocab_size", "64", *options])  # fmt: skip
    return TeacherCache(out), load_from_disk(str(out / "train_dataset"))


def test_axolotl_file_trains_like_our_cache(tmp_path, tokenizer):
    """Must show: one SGD step (lr 1) from the imported Axolotl file == one step from `cache-teacher`'s cache of
    the same values, to 1e-5."""
    rows = prompt_completion_rows(tokenizer)
    reference = build(tmp_path, tokenizer, rows, name="ref", k=K, dtype="float32")
    write_axolotl(tmp_path / "axolotl", rows, cache_entries(reference, len(rows)))
    cache, train = cli_import(tmp_path, tokenizer, "axolotl", tmp_path / "axolotl", tmp_path / "imp")
    assert set(train.column_names) == {"row_id", "input_ids", "labels"} and cache.supervision == "labels"
    ours = one_step(tmp_path, tokenizer, reference.path, rows)
    imported = one_step(tmp_path, tokenizer, cache.path, train)
    start = make_llama(2, 32).state_dict()
    assert max_weight_difference(ours, start) > 1e-3  # the step moved the weights
    difference = max_weight_difference(ours, imported)
    print(f"axolotl: max |w_ours - w_imported| after one SGD step = {difference:.3g}")
    assert difference < 1e-5


def test_distillkit_file_trains_like_our_cache(tmp_path, tokenizer):
    """Must show: one SGD step from the imported DistillKit folder (fp32 exact values, delta-coded) == one step from
    `cache-teacher`'s cache of the same values, to 1e-5. Also resumable: a second run adds nothing."""
    rows, reference, _, _ = distillkit_file(tmp_path, tokenizer, LOSSLESS)
    cache, train = cli_import(tmp_path, tokenizer, "distillkit", tmp_path / "dk", tmp_path / "imp")
    assert train["labels"] == train["input_ids"] == rows["input_ids"]  # DistillKit trains on every token
    assert len(list((tmp_path / "imp" / "shards").glob("*.arrow"))) == 2  # 6 rows, 4 per shard
    ours = one_step(tmp_path, tokenizer, reference.path, rows)
    imported = one_step(tmp_path, tokenizer, cache.path, train)
    difference = max_weight_difference(ours, imported)
    print(f"distillkit: max |w_ours - w_imported| after one SGD step = {difference:.3g}")
    assert difference < 1e-5
    again, _ = cli_import(tmp_path, tokenizer, "distillkit", tmp_path / "dk", tmp_path / "imp")
    assert len(list((tmp_path / "imp" / "shards").glob("*.arrow"))) == 2 and len(again) == len(rows)


# ----------------------------------------------------------------------------------------------- bad inputs
def axolotl_data(tmp_path, tok, edit=None) -> Dataset:
    rows = prompt_completion_rows(tok)
    entries = cache_entries(build(tmp_path, tok, rows, name="ref", k=K, dtype="float32"), len(rows))
    write_axolotl(tmp_path / "axolotl", rows, entries)
    data = load_from_disk(str(tmp_path / "axolotl"))
    return data if edit is None else Dataset.from_list([edit(dict(r)) if i == 2 else r for i, r in enumerate(data)])


def first_supervised(row) -> int:
    return int(supervised_positions(row, "labels")[0]) - 1  # Axolotl's row of the first supervised token


def set_entry(column: str, value, entry: int = 0):
    def edit(row):
        j = first_supervised(row)
        row[column] = [list(x) for x in row[column]]
        row[column][j][entry] = value
        return row

    return edit


def drop_last(column: str):
    def edit(row):
        row[column] = row[column][:-1]
        return row

    return edit


def shift_mask(row):  # the mask of an older alignment: row j masked by labels[j], not labels[j + 1]
    j = first_supervised(row)
    row["target_mask"] = [list(x) for x in row["target_mask"]]
    row["target_mask"][j] = [0] * K
    return row


def input_id_out_of_range(row):
    row["input_ids"] = [*row["input_ids"][:-1], 64]
    return row


@pytest.mark.parametrize(
    "edit, match",
    [
        (set_entry("target_token_ids", 64), r"Row 2: token id 64 is outside the student's vocabulary \(64 tokens\)"),
        (input_id_out_of_range, r"Row 2: input id 64 is outside the student's vocabulary"),
        (drop_last("target_token_ids"), r"Row 2: `target_token_ids` has \d+ positions but `input_ids` has"),
        (drop_last("target_mask"), r"Row 2: `target_mask` has \d+ positions"),
        (shift_mask, r"Row 2: token \d+ is supervised \(labels\) but `target_mask\[\d+\]` is not all 1"),
        (set_entry("target_logprobs", 2.5), r"Row 2: the top-k probabilities sum to .* not log-probabilities"),
        (set_entry("target_logprobs", -float("inf"), 7), r"Row 2: non-finite log-probs"),
        (set_entry("target_token_ids", -1), r"Row 2: token id -1 is outside"),
    ],
    ids=[
        "id-out-of-vocab",
        "input-id-out-of-vocab",
        "fewer-rows",
        "mask-length",
        "mask-alignment",
        "logits",
        "missing-entry",
        "negative-id",
    ],
)
def test_axolotl_bad_rows_are_refused(tmp_path, tokenizer, edit, match):
    """Each of these would be written without its check (the entries are read by index), misaligned or out of the
    student's vocabulary: the error names the row."""
    data = axolotl_data(tmp_path, tokenizer, edit)
    with pytest.raises(ValueError, match=match):
        import_teacher_logprobs("axolotl", data, tokenizer, tmp_path / "imp", source="a", vocab_size=64)


def test_axolotl_duplicate_ids_and_ragged_k_are_refused(tmp_path, tokenizer):
    def duplicate(row):
        j = first_supervised(row)
        row["target_token_ids"] = [list(x) for x in row["target_token_ids"]]
        row["target_token_ids"][j][1] = row["target_token_ids"][j][0]
        return row

    def ragged(row):
        j = first_supervised(row)
        for column in ("target_token_ids", "target_logprobs", "target_mask"):
            row[column] = [list(x) for x in row[column]]
            row[column][j] = row[column][j][:-1]
        return row

    with pytest.raises(ValueError, match="Row 2: a position lists the same token id twice"):
        import_teacher_logprobs("axolotl", axolotl_data(tmp_path, tokenizer, duplicate), tokenizer, tmp_path / "i",
                                source="a", vocab_size=64)  # fmt: skip
    with pytest.raises(ValueError, match=r"Row 2: `target_token_ids` has positions of different lengths \[7, 8\]"):
        import_teacher_logprobs("axolotl", axolotl_data(tmp_path, tokenizer, ragged), tokenizer, tmp_path / "j",
                                source="a", vocab_size=64)  # fmt: skip
    with pytest.raises(ValueError, match=r"Row 0: token id \d+ is outside the student's vocabulary \(55 tokens\)"):
        import_teacher_logprobs("axolotl", axolotl_data(tmp_path, tokenizer), tokenizer, tmp_path / "k", source="a")
    with pytest.raises(ValueError, match="vocab_size=50 is smaller than the student tokenizer"):
        import_teacher_logprobs("axolotl", axolotl_data(tmp_path, tokenizer), tokenizer, tmp_path / "l", source="a",
                                vocab_size=50)  # fmt: skip


def test_import_arguments_are_checked(tmp_path, tokenizer, capsys):
    data = axolotl_data(tmp_path, tokenizer)
    with pytest.raises(ValueError, match=r"k=9: the axolotl file stores 8 entries per position"):
        import_teacher_logprobs("axolotl", data, tokenizer, tmp_path / "imp", source="a", k=9)
    with pytest.raises(ValueError, match=r"An axolotl teacher dataset has columns .*target_token_ids"):
        import_teacher_logprobs(
            "axolotl", data.remove_columns("target_logprobs"), tokenizer, tmp_path / "i", source=""
        )
    with pytest.raises(ValueError, match="run `axolotl preprocess`"):
        raw = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]], "logprobs": [[]]})
        import_teacher_logprobs("axolotl", raw, tokenizer, tmp_path / "i", source="a")
    with pytest.raises(ValueError, match=r"--import must be one of \['axolotl', 'distillkit'\]"):
        import_teacher_logprobs("trl", data, tokenizer, tmp_path / "imp", source="a")
    with pytest.raises(SystemExit):  # the student's tokenizer is what the ids are checked against
        main(["cache-teacher", "--import", "axolotl", "--dataset", str(tmp_path / "axolotl"), "--output_dir",
              str(tmp_path / "cli")])  # fmt: skip
    assert "give --tokenizer (the student's" in capsys.readouterr().err


def test_distillkit_bad_inputs_are_refused(tmp_path, tokenizer):
    rows, _, _, _ = distillkit_file(tmp_path, tokenizer, LOSSLESS)
    data = Dataset.from_parquet(str(tmp_path / "dk" / "data_0.parquet"))
    source = str(tmp_path / "dk")

    outputs = iter(range(100))

    def run(dataset, config=None, **kw):
        if config is not None:
            (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
            kw["distillkit_config"] = tmp_path / "cfg.yaml"
        kw.setdefault("vocab_size", 64)
        out = tmp_path / f"imp{next(outputs)}"
        return import_teacher_logprobs("distillkit", dataset, tokenizer, out, source=source, **kw)

    with pytest.raises(ValueError, match=r"packed for a vocabulary of 50 ids but the student tokenizer has 55"):
        run(data, {**LOSSLESS, "d": 50})
    with pytest.raises(ValueError, match=r"holds 32 bytes per position but the compression config needs 16"):
        run(data, {**LOSSLESS, "exact_dtype": "float16"})
    with pytest.raises(ValueError, match=r"`bytepacked_indices` holds 7 bytes per position but .* needs 8"):
        run(data, {**LOSSLESS, "d": 129})  # ids packed in 7 bits, read as 8
    with pytest.raises(ValueError, match="legacy logit compression config"):
        run(data, {"k": 8, "exact_k": 8, "polynomial_degree": 2, "vocab_size": 64})
    longer = data.to_dict()
    longer["compressed_logprobs"][1] = [*longer["compressed_logprobs"][1], longer["compressed_logprobs"][1][-1]]
    longer["bytepacked_indices"][1] = [*longer["bytepacked_indices"][1], longer["bytepacked_indices"][1][-1]]
    with pytest.raises(ValueError, match=r"Row 1: `compressed_logprobs` has (\d+) positions but `input_ids` has \1"):
        run(Dataset.from_dict(longer))
    (tmp_path / "dk" / "compression_config.yaml").unlink()
    with pytest.raises(ValueError, match="No compression_config.yaml next to .*--distillkit_config"):
        run(data)
    assert len(rows) == len(data)


def test_import_written_compact(tmp_path, tokenizer):
    """The import is a `cache_teacher` source: `compression="compact"` applies to it as to a teacher's cache."""
    rows = prompt_completion_rows(tokenizer)
    entries = cache_entries(build(tmp_path, tokenizer, rows, name="ref", k=K, dtype="float32"), len(rows))
    write_axolotl(tmp_path / "axolotl", rows, entries)
    data = load_from_disk(str(tmp_path / "axolotl"))
    cache = import_teacher_logprobs("axolotl", data, tokenizer, tmp_path / "imp", source="a", vocab_size=64,
                                    compression="compact", value_bits=8)  # fmt: skip
    assert cache.compact
    for ref, got in zip(entries, cache_entries(cache, len(rows))):  # near-ties may swap: compare by id
        ref_order, got_order = np.argsort(ref.ids, 1), np.argsort(got.ids, 1)
        assert np.array_equal(np.sort(ref.ids, 1), np.sort(got.ids, 1))
        ref_values = np.take_along_axis(ref.logprobs, ref_order, 1)
        np.testing.assert_allclose(np.take_along_axis(got.logprobs, got_order, 1), ref_values, atol=0.05)
