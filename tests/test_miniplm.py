"""MiniPLM Difference Sampling: scores vs unpadded per-instance references, chunking, resume, select, CLI, 2 procs."""

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, make_llama, make_tokenizer, run_processes
from datasets import Dataset, load_from_disk

from hf_distill.cli.main import main
from hf_distill.cli.miniplm import COMMANDS, make_parser
from hf_distill.data.miniplm import kept_count, load_scores, mean_token_nll, score, select


ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HF_DISTILL_DATA", ROOT.parent / "shared" / "data"))
TEXTS = [
    "the cat sat on the mat",
    "",
    "a dog ran fast </s> and the cat",  # EOS inside a text: masks must not come from the pad/EOS id
    "one",  # a single token: nothing to predict, skipped as too short
    "   ",
    " ".join(WORDS[i % len(WORDS)] for i in range(23)),  # 23 tokens: windows of 8, 8, 7
    " ".join(WORDS[(3 * i) % len(WORDS)] for i in range(17)),  # 17 tokens: 8, 8 and a 1-token tail (too short)
    "yes no yes",
    "the big red dog is fast",
]


@pytest.fixture
def models():
    return make_llama(num_layers=3, hidden=64, seed=1), make_llama(num_layers=1, hidden=32, seed=2)


def reference_nll(model, ids: list[int]) -> float:
    """Mean next-token NLL of one unpadded window, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])
    return float(-logp.mean())


def expected_scores(teacher, reference, tokenizer, texts, max_length):
    out = []
    for row, text in enumerate(texts):
        if not text.strip():
            continue
        ids = tokenizer(text)["input_ids"]
        for chunk, start in enumerate(range(0, len(ids), max_length)):
            window = ids[start : start + max_length]
            if len(window) >= 2:
                nll_t, nll_r = reference_nll(teacher, window), reference_nll(reference, window)
                out.append(
                    {"id": f"{row}:{chunk}", "nll_teacher": nll_t, "nll_reference": nll_r, "score": nll_r - nll_t}
                )
    return out


def counting(model):
    """Attach a counter of sequences passed through `model.forward`."""
    seen = {"n": 0}
    model.register_forward_hook(lambda m, i, o: seen.__setitem__("n", seen["n"] + o.logits.shape[0]))
    return seen


def assert_scores_equal(got: Dataset, expected: list[dict], atol: float = 1e-5):
    assert got["id"] == [e["id"] for e in expected]
    for key in ("nll_teacher", "nll_reference", "score"):
        np.testing.assert_allclose(got[key], [e[key] for e in expected], atol=atol, rtol=0)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_scores_match_unpadded_per_instance_reference(models, tmp_path, pad_is_eos):
    tokenizer = make_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2: padding must not mask the real EOS inside row 2
    teacher, reference = models
    got = score(teacher, reference, Dataset.from_dict({"text": TEXTS}), tokenizer, output_dir=tmp_path,
                max_length=8, batch_size=3, flush_every=2)  # fmt: skip
    assert_scores_equal(got, expected_scores(teacher, reference, tokenizer, TEXTS, 8))
    assert got["id"][:3] == ["0:0", "2:0", "5:0"] and got["chunked"][:3] == [False, False, True]
    assert got["n_tokens"] == [6, 8, 8, 8, 7, 8, 8, 3, 6] and got["start"][2:5] == [0, 8, 16]
    assert load_scores(tmp_path)["id"] == got["id"]  # the merged file holds the same rows
    report = json.loads((tmp_path / "score_report.json").read_text())
    assert (report["empty"], report["too_short"], report["n_instances"]) == (2, 2, 9)


def test_mean_token_nll_ignores_padding_and_pad_id(models):
    teacher, _ = models
    seqs = [[6, 7, 3, 8, 3], [9, 3, 3]]  # id 3 = EOS; the second row is padded with 3 as well
    ids = torch.tensor([seqs[0], seqs[1] + [3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        nll = mean_token_nll(teacher(input_ids=ids, attention_mask=mask).logits, ids, mask)
    np.testing.assert_allclose(nll.tolist(), [reference_nll(teacher, s) for s in seqs], atol=1e-5)
    left = torch.tensor([[0, 0, 9, 3, 3]])  # left padding takes the general (non-prefix) path
    left_mask, position_ids = torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 1, 2]])
    with torch.no_grad():
        logits = teacher(input_ids=left, attention_mask=left_mask, position_ids=position_ids).logits
    np.testing.assert_allclose(mean_token_nll(logits, left, left_mask).tolist(), [reference_nll(teacher, seqs[1])],
                               atol=1e-5)  # fmt: skip


def test_pretokenised_and_id_column(models, tmp_path):
    tokenizer, (teacher, reference) = make_tokenizer(), models
    texts = [t for t in TEXTS if t.strip()]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    data = Dataset.from_dict({"input_ids": ids, "doc": [f"doc{i}" for i in range(len(texts))]})
    got = score(teacher, reference, data, output_dir=tmp_path / "a", max_length=8, id_column="doc", batch_size=4)
    expected = expected_scores(teacher, reference, tokenizer, texts, 8)
    for e in expected:
        row, chunk = e["id"].split(":")
        e["id"] = f"doc{row}:{chunk}"
    assert_scores_equal(got, expected)
    data = data.map(lambda row: {"doc": "same"})
    with pytest.raises(ValueError, match="duplicate"):
        score(teacher, reference, data, output_dir=tmp_path / "b", max_length=8, id_column="doc")
    with pytest.raises(ValueError, match="neither a 'text' text column nor an `input_ids`"):
        score(teacher, reference, Dataset.from_dict({"body": ["a b"]}), tokenizer, output_dir=tmp_path / "c")


class Interrupt(Exception):
    pass


def test_kill_and_resume_scores_each_instance_once(models, tmp_path):
    tokenizer, (teacher, reference) = make_tokenizer(), models
    data = Dataset.from_dict({"text": TEXTS * 3})
    full = score(teacher, reference, data, tokenizer, output_dir=tmp_path / "full", max_length=8, batch_size=2)
    n = len(full)
    seen_t, seen_r = counting(teacher), counting(reference)

    def crash_after_3(n_batches: int) -> None:
        if n_batches == 3:
            raise Interrupt  # stands in for a kill right after the third shard was written

    kwargs = dict(output_dir=tmp_path / "run", max_length=8, batch_size=2, flush_every=1)
    with pytest.raises(Interrupt):
        score(teacher, reference, data, tokenizer, callback=crash_after_3, **kwargs)
    assert seen_t["n"] == seen_r["n"] == 6 and not (tmp_path / "run" / "scores.parquet").exists()
    assert json.loads((tmp_path / "run" / "state.json").read_text())["status"] == "running"
    (tmp_path / "run" / "shards" / ".torn-write.jsonl.tmp").write_text('{"id": "0:0", "sco')  # a killed writer's tmp
    resumed = score(teacher, reference, data, tokenizer, **kwargs)
    assert seen_t["n"] == seen_r["n"] == n  # the 6 finished instances were not recomputed
    assert resumed["id"] == full["id"] and len(set(resumed["id"])) == n
    for key in ("nll_teacher", "nll_reference", "score"):
        np.testing.assert_allclose(resumed[key], full[key], atol=1e-6, rtol=0)
    again = score(teacher, reference, data, tokenizer, **kwargs)  # finished: nothing to do, same file
    assert seen_t["n"] == n and again["score"] == resumed["score"]
    merged = score(str(tmp_path / "no-such-model"), reference, data, tokenizer, **kwargs)  # no model is even loaded
    assert merged["score"] == resumed["score"]
    with pytest.raises(ValueError, match="different max_length"):
        score(teacher, reference, data, tokenizer, **{**kwargs, "max_length": 6})


def test_tokenizers_must_match(models, tmp_path):
    teacher, reference = models
    other = make_tokenizer(words=list(reversed(WORDS)))
    with pytest.raises(ValueError, match="Teacher and reference tokenizers differ"):
        score(teacher, reference, Dataset.from_dict({"text": TEXTS}), make_tokenizer(), reference_tokenizer=other,
              output_dir=tmp_path)  # fmt: skip


@pytest.mark.parametrize(("alpha", "n", "k"), [(0.5, 10, 5), (0.5, 9, 5), (0.7, 10, 7), (0.3, 10, 3), (1.0, 7, 7),
                                               (1e-6, 7, 1), (0.29, 100, 29), (0.57, 100, 57)])  # fmt: skip
def test_kept_count_is_ceil(alpha, n, k):
    assert kept_count(alpha, n) == k == min(n, math.ceil(round(alpha * n, 9)))


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.01, 2.0, float("nan")])
def test_alpha_outside_unit_interval_raises(alpha, tmp_path):
    scores = Dataset.from_dict({"row": [0, 1], "score": [0.1, 0.2]})
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        select(scores, Dataset.from_dict({"text": ["a", "b"]}), alpha=alpha, output_dir=tmp_path)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.7, 1.0])
def test_select_keeps_top_scores_in_corpus_order(tmp_path, alpha):
    rng = np.random.default_rng(0)
    values = rng.normal(size=10).round(2)
    values[7] = values[2] = 5.0  # a tie at the top
    data = Dataset.from_dict({"text": [f"t{i}" for i in range(12)], "label": list(range(12))})
    rows = [0, 1, 2, 3, 5, 6, 7, 8, 9, 11]  # rows 4 and 10 were empty, so unscored
    scores = Dataset.from_dict({"id": [f"{r}:0" for r in rows], "row": rows, "score": values.tolist(),
                                "chunked": [False] * 10})  # fmt: skip
    refined = select(scores, data, alpha=alpha, output_dir=tmp_path)
    k = math.ceil(round(alpha * 10, 9))
    top = sorted(range(10), key=lambda i: (-values[i], i))[:k]
    assert refined["label"] == [rows[i] for i in sorted(top)]  # original order, all columns kept
    assert load_from_disk(str(tmp_path / "dataset"))["label"] == refined["label"]
    assert Dataset.from_parquet(str(tmp_path / "data.parquet"))["text"] == refined["text"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["n"], report["kept"], report["threshold"]) == (10, k, values[top[-1]])
    text = (tmp_path / "report.txt").read_text()
    assert f"kept: {k}" in text and "score histogram" in text
    assert sum(int(re.search(r"kept=(\d+)", line)[1]) for line in report["histogram"]) == k
    assert (tmp_path / "score_hist.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_select_chunked_corpus_returns_windows(models, tmp_path):
    tokenizer, (teacher, reference) = make_tokenizer(), models
    data = Dataset.from_dict({"text": TEXTS})
    scores = score(teacher, reference, data, tokenizer, output_dir=tmp_path / "s", max_length=8)
    with pytest.raises(ValueError, match="pass a `tokenizer`"):
        select(scores, data, alpha=0.5, output_dir=tmp_path / "x")
    refined = select(tmp_path / "s", data, alpha=0.5, output_dir=tmp_path / "r", tokenizer=tokenizer)
    top = sorted(range(len(scores)), key=lambda i: (-scores["score"][i], i))[:5]
    assert refined["id"] == [scores["id"][i] for i in sorted(top)]
    for inst_id, row, window in zip(refined["id"], refined["row"], refined["input_ids"]):
        chunk = int(inst_id.split(":")[1])
        assert window == tokenizer(TEXTS[row])["input_ids"][8 * chunk : 8 * chunk + 8]


def test_cli_score_and_select(models, tmp_path, capsys):
    tokenizer, (teacher, reference) = make_tokenizer(), models
    for name, model in {"teacher": teacher, "reference": reference}.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    main(["miniplm", "score", "--teacher", str(tmp_path / "teacher"), "--reference", str(tmp_path / "reference"),
          "--dataset", str(tmp_path / "data.jsonl"), "--output_dir", str(tmp_path / "s"), "--max_length", "16",
          "--batch_size", "4"])  # fmt: skip
    main(["miniplm", "select", "--scores", str(tmp_path / "s"), "--dataset", str(tmp_path / "data.jsonl"),
          "--alpha", "0.4", "--output_dir", str(tmp_path / "r")])  # fmt: skip
    assert "Kept 3 instances" in capsys.readouterr().out  # 6 scorable rows (2 empty, "one" too short) -> ceil(2.4)
    assert_scores_equal(load_scores(tmp_path / "s"), expected_scores(teacher, reference, tokenizer, TEXTS, 16))
    assert len(load_from_disk(str(tmp_path / "r" / "dataset"))) == 3


@pytest.mark.parametrize("command", ["score", "select"])
def test_cli_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as err:
        main(["miniplm", command, "--help"])
    assert err.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, spec in COMMANDS[command].__dataclass_fields__.items():
        assert f"--{name}" in out and " ".join(spec.metadata["help"].split()) in out


def test_cli_usage_and_unknown_command(capsys):
    main(["miniplm"])
    assert "score" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["miniplm", "rank"])
    assert err.value.code == 2


@pytest.mark.distributed
def test_two_processes_match_one(models, tmp_path):
    tokenizer, (teacher, reference) = make_tokenizer(), models
    for name, model in {"teacher": teacher, "reference": reference}.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    texts = TEXTS * 3
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    one = score(teacher, reference, Dataset.from_dict({"text": texts}), tokenizer, output_dir=tmp_path / "one",
                max_length=8, batch_size=3)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests/distributed/miniplm_score.py"), "--teacher", str(tmp_path / "teacher"),
           "--reference", str(tmp_path / "reference"), "--dataset", str(tmp_path / "data.jsonl"),
           "--output_dir", str(tmp_path / "two"), "--counts_dir", str(tmp_path / "counts")]  # fmt: skip
    run_processes(cmd, timeout=180)
    two = load_scores(tmp_path / "two")
    assert two["id"] == one["id"]
    for key in ("nll_teacher", "nll_reference", "score"):
        np.testing.assert_allclose(two[key], one[key], atol=1e-6, rtol=0)
    counts = [json.loads((tmp_path / "counts" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [c["world"] for c in counts] == [2, 2] and all(c["n_scores"] == len(one) for c in counts)
    assert sum(c["teacher"] for c in counts) == sum(c["reference"] for c in counts) == len(one)
    assert all(c["teacher"] > 0 for c in counts)  # both processes did work
    by_rank = {0: set(), 1: set()}
    for path in (tmp_path / "two" / "shards").glob("*.jsonl"):
        rank = int(path.name.split("-rank")[1][:5])
        by_rank[rank] |= {json.loads(line)["id"] for line in path.read_text().splitlines()}
    assert not by_rank[0] & by_rank[1] and by_rank[0] | by_rank[1] == set(one["id"])


@pytest.mark.slow
def test_smollm2_scores_real_text(tmp_path):
    if not (DATA / "esnli" / "train.jsonl").exists():
        pytest.skip(f"no task data at {DATA}")
    pytest.importorskip("gguf")
    from hf_distill.models import load_model, load_tokenizer

    rows = [json.loads(line) for line in (DATA / "esnli" / "train.jsonl").read_text().splitlines()[:6]]
    texts = [f"{r['premise']} {r['explanation']}" for r in rows]
    teacher, tokenizer = load_model("smollm2"), load_tokenizer("smollm2")
    reference = make_llama(num_layers=1, hidden=32, vocab_size=teacher.config.vocab_size, seed=3)
    got = score(teacher, reference, Dataset.from_dict({"text": texts}), tokenizer, output_dir=tmp_path, batch_size=3)
    expected = expected_scores(teacher, reference, tokenizer, texts, 1024)
    assert_scores_equal(got, expected, atol=1e-4)
    assert max(got["nll_teacher"]) < 8 and min(got["nll_reference"]) > 10  # a real LM vs a random one (log V = 10.8)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes" / "miniplm").glob("s[ce]*_*.yaml")), ids=lambda p: p.name)
def test_cli_recipes_parse(recipe):
    command = recipe.name.split("_")[0]
    (args,) = make_parser(command=command).parse_args_and_config(["--config", str(recipe), "--output_dir", "/tmp/x"])
    assert args.output_dir == "/tmp/x" and args.dataset


@pytest.mark.parametrize("length_bins", [2, 3])
def test_select_length_bins_keeps_alpha_of_every_length_bin(tmp_path, length_bins):
    n, alpha = 12, 0.5
    lengths = [3, 9, 4, 10, 5, 11, 6, 12, 7, 13, 8, 14]  # corpus order mixes short and long rows
    values = [float(x) for x in lengths]  # the score favours long rows, as it can on short-row corpora
    values[0] = 100.0  # the shortest row is the best of its bin
    data = Dataset.from_dict({"label": list(range(n))})
    scores = Dataset.from_dict({"row": list(range(n)), "score": values, "n_tokens": lengths})
    plain = select(scores, data, alpha=alpha, output_dir=tmp_path / "plain")
    binned = select(scores, data, alpha=alpha, output_dir=tmp_path / "binned", length_bins=length_bins)
    assert len(plain) == len(binned) == 6
    assert plain["label"] == [0, 3, 5, 7, 9, 11]  # top scores (row 0 and the five longest rows), in corpus order
    assert binned["label"] == sorted(binned["label"])  # corpus order
    by_length = sorted(range(n), key=lambda i: lengths[i])
    for members in np.array_split(np.asarray(by_length), length_bins):
        kept = [i for i in members if i in binned["label"]]
        assert len(kept) == len(members) // 2  # alpha of every bin
        best = sorted(members, key=lambda i: -values[i])[: len(kept)]
        assert sorted(kept) == sorted(best)  # and within a bin, the best scores
    report = json.loads((tmp_path / "binned" / "report.json").read_text())
    assert report["length_bins"] == length_bins and "n_tokens bins" in report["rule"]


def test_select_length_bins_errors(tmp_path):
    data = Dataset.from_dict({"label": [0, 1]})
    with pytest.raises(ValueError, match="n_tokens"):
        select(Dataset.from_dict({"row": [0, 1], "score": [1.0, 2.0]}), data, output_dir=tmp_path, length_bins=2)
    scores = Dataset.from_dict({"row": [0, 1], "score": [1.0, 2.0], "n_tokens": [3, 4]})
    with pytest.raises(ValueError, match="positive integer"):
        select(scores, data, output_dir=tmp_path, length_bins=0)
