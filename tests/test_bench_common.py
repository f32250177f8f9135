"""benchmarks/_common.py helpers used by the seeded, resumable benchmarks: mean +- spread, one JSON per run, plots."""

import json
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import cached_run, greedy_ids, mean_spread, plot_panels, plot_series


def test_mean_spread_is_half_the_range():
    assert mean_spread([0.70, 0.74]) == pytest.approx({"mean": 0.72, "spread": 0.02, "min": 0.70, "max": 0.74, "n": 2})
    assert mean_spread([0.5])["spread"] == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        mean_spread([])


def test_cached_run_computes_once_and_reads_back(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"accuracy": 0.5, "curve": [{"step": 10, "accuracy": 0.4}]}

    path = tmp_path / "runs" / "kd-seed0.json"
    first = cached_run(path, compute)
    second = cached_run(path, compute)  # a rerun skips the finished run
    assert calls == [1] and first == second == json.loads(path.read_text())
    assert not path.with_suffix(".tmp").exists()


def test_cached_run_refuses_a_file_written_with_other_settings(tmp_path, capsys):
    path = tmp_path / "kd-seed0.json"
    first = cached_run(path, lambda: {"accuracy": 0.5}, settings={"steps": 80, "lr": 1e-4})
    assert first["run_settings"] == {"steps": 80, "lr": 1e-4}
    assert cached_run(path, lambda: {"accuracy": 0.9}, settings={"lr": 1e-4, "steps": 80}) == first
    with pytest.raises(ValueError, match=r"other settings \(steps: 80 there, 240 now\).*another --out"):
        cached_run(path, lambda: {"accuracy": 0.9}, settings={"steps": 240, "lr": 1e-4})
    old = tmp_path / "old.json"  # written before settings were recorded: read back, with a note
    old.write_text(json.dumps({"accuracy": 0.4}))
    assert cached_run(old, lambda: {"accuracy": 0.9}, settings={"steps": 80}) == {"accuracy": 0.4}
    assert "before its settings were recorded" in capsys.readouterr().out


def test_cached_run_leaves_no_file_when_the_run_fails(tmp_path):
    def broken():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached_run(tmp_path / "run.json", broken)
    assert not (tmp_path / "run.json").exists()  # so the next invocation runs it again


def test_plot_series_writes_a_png(tmp_path):
    path = plot_series(
        tmp_path / "plot.png",
        {"kd": [(0, 0.3, 0.0), (20, 0.5, 0.02)], "ce": [(0, 0.3, 0.0), (20, 0.45, 0.01)]},
        xlabel="step",
        ylabel="accuracy",
        title="t",
        hline={"teacher": 0.8},
    )
    assert path == tmp_path / "plot.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_panels_writes_one_png_with_a_panel_each(tmp_path):
    from PIL import Image

    series = {"kd": [(0, 0.1, 0.0), (10, 0.2, 0.01)], "ce": [(0, 0.1, 0.0), (10, 0.15, 0.0)]}
    path = plot_panels(
        tmp_path / "panels.png", {"2-layer": series, "4-layer": series, "6-layer": {"kd": series["kd"]}},
        xlabel="step", ylabel="acceptance", suptitle="drafts",
    )  # fmt: skip
    one = plot_series(tmp_path / "one.png", series, xlabel="step", ylabel="acceptance", title="t")
    assert path == tmp_path / "panels.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).width > 1.5 * Image.open(one).width  # three panels side by side


def test_greedy_ids_batched_equals_one_prompt_at_a_time_and_cuts_at_eos():
    import torch
    from conftest import make_llama

    model = make_llama(num_layers=1).eval()
    prompts = [[2, 7, 9], [2, 11], [2, 5, 6, 7, 8]]  # unequal lengths: left padding in a batch of 2

    def alone(p: list[int], **kwargs) -> list[int]:
        out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)
        return out[0, len(p) :].tolist()

    model.generation_config.eos_token_id = None  # no stop token: every row is 6 tokens
    rows = greedy_ids(model, prompts, 6, pad_token_id=0, batch=2)
    assert rows == [alone(p) for p in prompts] and all(len(r) == 6 for r in rows)
    eos = rows[0][2]  # a token the first row generates: it must end there
    cut = greedy_ids(model, prompts, 6, pad_token_id=0, eos_token_id=eos, batch=2)
    assert cut[0] == rows[0][: rows[0].index(eos) + 1]
    assert all(r == alone(p, eos_token_id=eos)[: len(r)] and (eos not in r[:-1]) for r, p in zip(cut, prompts))
