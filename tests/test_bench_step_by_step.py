"""benchmarks/step_by_step.py --summary_only: the data-efficiency summary of the runs that exist (no training here)."""

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def sbs():
    if not (DATA / "esnli" / "train.jsonl").exists():
        pytest.skip(f"no e-SNLI data at {DATA / 'esnli'} (see ../shared/data/README.md)")
    spec = importlib.util.spec_from_file_location("step_by_step", ROOT / "benchmarks" / "step_by_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(method: str, seed: int, rows: int, accuracy: float) -> dict:
    return {"method": method, "seed": seed, "train_rows": rows, "accuracy": accuracy, "best_step": 25,
            "steps_run": 75, "best_dev_accuracy": 0.5, "cpu_minutes": 2.0}  # fmt: skip


def test_summary_only_summarises_the_finished_runs_and_trains_nothing(sbs, tmp_path, monkeypatch):
    runs = tmp_path / "step_by_step_runs"
    runs.mkdir()
    finished = {("label-only", 0.25, 0): 0.5, ("label-only", 0.25, 1): 0.6, ("label-only", 1.0, 0): 0.7}
    for (method, fraction, seed), accuracy in finished.items():
        rows = round(400 * fraction)
        run = fake_run(method, seed, rows, accuracy)
        (runs / f"{method}-{fraction:g}-seed{seed}.json").write_text(json.dumps(run))

    def no_training(*args, **kwargs):
        raise AssertionError("--summary_only must not load a model")

    monkeypatch.setattr(sbs, "load_model", no_training)
    sbs.main(["--out", str(tmp_path), "--summary_only", "--fractions", "0.25,0.5,1.0", "--data_dir", str(DATA)])
    report = json.loads((tmp_path / "step_by_step.json").read_text())
    points = {(s["method"], s["fraction"]): s for s in report["summary"]}
    assert set(points) == {("label-only", 0.25), ("label-only", 1.0)}  # nothing at 50%, no step-by-step run
    assert points[("label-only", 0.25)]["accuracy"]["mean"] == pytest.approx(0.55)
    assert points[("label-only", 0.25)]["accuracy"]["spread"] == pytest.approx(0.05)
    assert points[("label-only", 1.0)]["accuracy"]["mean"] == pytest.approx(0.7)
    assert report["total_run_cpu_minutes"] == pytest.approx(6.0)
