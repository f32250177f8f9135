"""benchmarks/quickstart_seeds.py: the multi-seed summary of quickstart reports (no training here)."""

import importlib.util
import json
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quickstart_seeds.py"


@pytest.fixture(scope="module")
def qs():
    spec = importlib.util.spec_from_file_location("quickstart_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_report(kd: list[float], ce: list[float], steps=(40, 80)) -> dict:
    def point(step, kl):
        return {"step": step, "kl": kl, "top1_agreement": 0.2, "perplexity": 100.0 + kl, "tokens": 10}

    return {
        "kl_ratio_kd_over_ce": kd[-1] / ce[-1],
        "results": {
            "kd_student": point(steps[-1], kd[-1]),
            "ce_only_student": point(steps[-1], ce[-1]),
            "teacher": {"kl": 0.0, "top1_agreement": 1.0, "perplexity": 4.5},
        },
        "curves": {
            "kd_student": [point(s, v) for s, v in zip(steps, kd)],
            "ce_only_student": [point(s, v) for s, v in zip(steps, ce)],
        },
        "seconds": {"total": 1.0},
        "settings": {"steps": steps[-1]},
    }


def test_summary_is_mean_and_half_range_over_seeds(qs):
    reports = {0: fake_report([3.0, 2.0], [4.0, 2.5]), 1: fake_report([3.2, 2.4], [4.0, 3.0])}
    result = qs.summarise(reports, {0: 60.0, 1: None})
    summary = result["summary"]
    ratio = summary["kl_ratio_kd_over_ce"]
    assert ratio["mean"] == pytest.approx((2.0 / 2.5 + 2.4 / 3.0) / 2)
    assert ratio["spread"] == pytest.approx(0.0)
    assert [p["step"] for p in summary["curves"]["kd_student"]] == [40, 80]
    assert summary["curves"]["kd_student"][1]["mean"] == pytest.approx(2.2)
    assert summary["curves"]["kd_student"][1]["spread"] == pytest.approx(0.2)
    assert summary["kl_ratio_by_step"][0]["mean"] == pytest.approx((3.0 / 4.0 + 3.2 / 4.0) / 2)
    assert summary["final"]["ce_only_student"]["kl"]["max"] == pytest.approx(3.0)
    assert result["per_seed"][0]["cpu_seconds"] == 60.0


def test_a_step_missing_in_one_seed_is_left_out_of_the_curve(qs):
    reports = {0: fake_report([3.0, 2.0], [4.0, 2.5]), 1: fake_report([2.4], [3.0], steps=(80,))}
    summary = qs.summarise(reports, {})["summary"]
    assert [p["step"] for p in summary["curves"]["kd_student"]] == [80]


def test_finished_seeds_are_read_back_and_not_rerun(qs, tmp_path):
    for seed, report in {0: fake_report([3.0, 2.0], [4.0, 2.5]), 1: fake_report([3.2, 2.4], [4.0, 3.0])}.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(report))
    result = qs.main(["--out", str(tmp_path), "--seeds", "0,1"])
    assert result["summary"]["seeds"] == [0, 1]
    assert json.loads((tmp_path / "quickstart_seeds.json").read_text())["summary"]["kl_ratio_kd_over_ce"]["n"] == 2


def test_seed_and_output_dir_flags_are_refused(qs, tmp_path):
    with pytest.raises(SystemExit, match="--seeds and --out"):
        qs.run_seed(0, tmp_path, ["--seed", "3"])
