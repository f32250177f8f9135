"""Fault sweep: bad inputs and kills, run through the `hf-distill` CLI as a new user would, on tiny local models.

Each case runs `hf-distill ...` in a fresh subprocess and is classified by what the user sees:
- `clear error`: non-zero exit, one message on stderr and no Python traceback;
- `works` / `warns`: exit 0, finite saved weights (and, for `warns`, the expected warning);
- `RAW TRACEBACK`: a Python traceback reached the user for an input mistake;
- `SILENT WRONG`: exit 0 where an error was due, or saved weights with NaN/inf;
- kill cases: a run killed with SIGKILL right after a checkpoint, then resumed, must end with the weights of the
  uninterrupted run (`exact resume`), bit for bit.

    python benchmarks/fault_sweep.py --out runs/bench

Prints one table and writes `fault_sweep.json`. The fast cases are also unit tests (tests/test_bad_inputs.py).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from conftest import WORDS, launcher_env, make_llama, make_t5, make_tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


TEXTS = ["the cat sat on the mat", "a dog ran fast", "one plus two equals three", "the big red dog is slow"] * 3
RUN = ["--report_to", "none", "--use_cpu", "true", "--per_device_train_batch_size", "2", "--max_steps", "2"]
RUN += ["--save_strategy", "no", "--logging_steps", "1", "--seed", "0"]


def lay_out(root: Path) -> dict[str, str]:
    """Tiny models, tokenizers and data files for the cases; returns their paths by name."""
    tok = make_tokenizer()
    other = make_tokenizer(words=list(reversed(WORDS)))  # same size, another token -> id map
    models = {"student": (make_llama(2, 32), tok), "teacher": (make_llama(4, 64, seed=1), tok)}
    models["other_tok_teacher"] = (make_llama(4, 64, seed=1), other)
    models["t5"] = (make_t5(), tok)
    nan_teacher = make_llama(4, 64, seed=1)
    with torch.no_grad():
        nan_teacher.model.norm.weight.fill_(float("inf"))
    models["nan_teacher"] = (nan_teacher, tok)
    paths = {}
    for name, (model, tokenizer) in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    files = {
        "data": "\n".join(json.dumps({"text": t}) for t in TEXTS),
        "long": "\n".join(json.dumps({"text": " ".join(["the cat sat on the mat"] * 30)}) for _ in range(4)),
        "empty": "",
        "blank": "\n\n \n",
        "malformed": "\n".join(json.dumps({"text": t}) for t in TEXTS[:4]) + '\n{"text": "oops"\n',
        "not_objects": '{"text": "a"}\n[1, 2]\n',
        "wrong_columns": "\n".join(json.dumps({"sentence": t}) for t in TEXTS),
    }
    for name, text in files.items():
        (root / f"{name}.jsonl").write_text(text)
        paths[name] = str(root / f"{name}.jsonl")
    (root / "unknown_key.yaml").write_text(f"dataset_name: {paths['data']}\nkd_los: forward_kl\n")
    paths["unknown_key_yaml"] = str(root / "unknown_key.yaml")
    return paths


def cases(p: dict[str, str]) -> list[tuple[str, list[str], str, str | None]]:
    """(name, argv after `hf-distill`, expected outcome: error | works | warns, text the message must contain)."""
    pair = ["--model_name_or_path", p["student"], "--teacher_model_name_or_path", p["teacher"]]
    train = ["train", *pair, *RUN]

    def on_data(teacher: str, *extra: str) -> list[str]:  # the tiny student and data, with another teacher
        student = ["--model_name_or_path", p["student"], "--teacher_model_name_or_path", p[teacher]]
        return ["train", *student, *RUN, "--dataset_name", p["data"], *extra]

    return [
        ("plain run", [*train, "--dataset_name", p["data"]], "works", None),
        ("dataset file missing", [*train, "--dataset_name", "/nonexistent/data.jsonl"], "error", None),
        ("empty JSONL", [*train, "--dataset_name", p["empty"]], "error", "is empty"),
        ("blank-lines JSONL", [*train, "--dataset_name", p["blank"]], "error", "empty"),
        ("malformed JSONL line", [*train, "--dataset_name", p["malformed"]], "error", "line 5: not valid JSON"),
        ("JSONL line not an object", [*train, "--dataset_name", p["not_objects"]], "error", "line 2"),
        ("dataset without text column", [*train, "--dataset_name", p["wrong_columns"]], "error", "columns"),
        ("unknown YAML key", ["train", "--config", p["unknown_key_yaml"], *pair, *RUN], "error", "kd_los"),
        ("config file missing", ["train", "--config", "/nonexistent.yaml", *pair, *RUN], "error", None),
        ("kd_loss not a choice", [*train, "--dataset_name", p["data"], "--kd_loss", "kl"], "error", "invalid choice"),
        ("temperature <= 0", [*train, "--dataset_name", p["data"], "--temperature", "0"], "error", "temperature"),
        ("negative kd_weight", [*train, "--dataset_name", p["data"], "--kd_weight", "-1"], "error", "kd_weight"),
        (
            "teacher path missing",
            [*train, "--dataset_name", p["data"], "--teacher_model_name_or_path", "/no/t"],
            "error",
            None,
        ),
        (
            "T5 teacher, causal student",
            on_data("t5"),
            "error",
            "holds a t5 model",
        ),
        (
            "teacher with another tokenizer",
            on_data("other_tok_teacher"),
            "error",
            "tokenizers differ",
        ),
        (
            "teacher_weights, one teacher",
            [*train, "--dataset_name", p["data"], "--teacher_weights", "1.0"],
            "error",
            "teacher_weights",
        ),
        (
            "rename_columns of a missing column",
            [*train, "--dataset_name", p["data"], "--rename_columns", '{"nope": "text"}'],
            "error",
            "rename_columns",
        ),
        (
            "hint layer out of range",
            [*train, "--dataset_name", p["data"], "--hint_layers", '{"1": 9}'],
            "error",
            "teacher layers",
        ),
        (
            "identity projector, unequal widths",
            [*train, "--dataset_name", p["data"], "--hint_layers", "uniform", "--hint_projector", "identity"],
            "error",
            "widths",
        ),
        (
            "relation loss with batch 1",
            [
                *train,
                "--dataset_name",
                p["data"],
                "--relation_loss",
                "similarity_preserving",
                "--per_device_train_batch_size",
                "1",
            ],
            "error",
            "batch size >= 2",
        ),
        (
            "teacher_cache folder missing",
            [
                "train",
                "--model_name_or_path",
                p["student"],
                *RUN,
                "--dataset_name",
                p["data"],
                "--teacher_cache",
                "/no/cache",
            ],
            "error",
            "/no/cache",
        ),
        (
            "resume from a missing checkpoint",
            [*train, "--dataset_name", p["data"], "--resume_from_checkpoint", "/no/checkpoint-2"],
            "error",
            None,
        ),
        (
            "NaN teacher",
            on_data("nan_teacher"),
            "error",
            "Non-finite teacher outputs",
        ),
        (
            "NaN teacher, nonfinite_teacher=skip",
            on_data("nan_teacher", "--nonfinite_teacher", "skip"),
            "warns",
            "Skipped a micro-batch",
        ),
        (
            "rows beyond max_position_embeddings",
            [*train, "--dataset_name", p["long"], "--max_length", "4096"],
            "warns",
            "max_position_embeddings (128)",
        ),
        ("unknown subcommand", ["trian"], "error", "unknown command"),
    ]


def run_cli(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = launcher_env()
    env.pop("HF_DISTILL_DEBUG", None)
    cmd = [sys.executable, "-m", "hf_distill.cli.main", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def finite_weights(folder: Path) -> bool | None:
    path = folder / "model.safetensors"
    return all(torch.isfinite(v).all() for v in load_file(path).values()) if path.exists() else None


def classify(proc: subprocess.CompletedProcess, expected: str, needle: str | None, out: Path) -> str:
    stderr = proc.stderr + proc.stdout
    if "Traceback (most recent call last)" in proc.stderr:
        return "RAW TRACEBACK"
    if proc.returncode != 0:
        if expected != "error":
            return "FAILED"
        return "clear error" if needle is None or needle in stderr else "error without the expected message"
    if expected == "error" or finite_weights(out) is False:
        return "SILENT WRONG"
    if expected == "warns":
        return "warns" if needle in stderr else "SILENT WRONG (no warning)"
    return "works"


def kill_and_resume(p: dict[str, str], root: Path, name: str, extra: list[str]) -> dict:
    """SIGKILL a 4-step run as soon as checkpoint-2 is complete, resume it, compare with the uninterrupted run."""
    args = ["train", "--model_name_or_path", p["student"], "--teacher_model_name_or_path", p["teacher"]]
    args += ["--dataset_name", p["data"], "--report_to", "none", "--use_cpu", "true", "--seed", "0"]
    args += ["--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2", *extra]
    full, killed = root / f"{name}_full", root / f"{name}_killed"
    run_cli([*args, "--output_dir", str(full)], root).check_returncode()
    env = launcher_env()
    cmd = [sys.executable, "-m", "hf_distill.cli.main", *args, "--output_dir", str(killed)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoint-2" / "trainer_state.json"  # written last in a checkpoint
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    was_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli(
        [*args, "--output_dir", str(killed), "--resume_from_checkpoint", str(killed / "checkpoint-2")], root
    )
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    exact = resumed.returncode == 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    max_diff = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")
    outcome = "exact resume" if exact else ("not killed mid-run" if not was_running else "RESUME DIFFERS")
    return {"case": f"kill + resume: {name}", "outcome": outcome, "max_weight_diff": max_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench")
    cli = parser.parse_args()
    out_dir = Path(cli.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = lay_out(root)
        for i, (name, argv, expected, needle) in enumerate(cases(paths)):
            out = root / f"out{i}"
            argv = [*argv, "--output_dir", str(out)] if argv[0] == "train" else argv
            proc = run_cli(argv, root)
            outcome = classify(proc, expected, needle, out)
            lines = proc.stderr.strip().splitlines() or [""]
            line = next((line for line in lines if "hf-distill " in line and "error:" in line), lines[-1])
            last = line[line.find("hf-distill ") if "error:" in line else 0 :][:160]  # the message itself
            result = {"case": name, "expected": expected, "outcome": outcome, "exit": proc.returncode}
            results.append({**result, "last_line": last})
            print(f"{name:<40} {outcome:<36} {last[:90]}", flush=True)
        hints = ["--hint_layers", "uniform", "--hint_projector", "linear", "--attention_weight", "1.0"]
        hints += ["--relation_loss", "similarity_preserving"]
        for name, extra in (("plain", []), ("hints + attention + relations", hints)):
            result = kill_and_resume(paths, root, name.split()[0], extra)
            results.append(result)
            print(
                f"{result['case']:<40} {result['outcome']:<36} max |w_full - w_resumed| = {result['max_weight_diff']}"
            )
    bad = [r for r in results if r["outcome"] not in ("clear error", "works", "warns", "exact resume")]
    summary = {
        "cases": len(results),
        "clear_errors": sum(r["outcome"] == "clear error" for r in results),
        "worked_or_warned": sum(r["outcome"] in ("works", "warns") for r in results),
        "exact_resumes": sum(r["outcome"] == "exact resume" for r in results),
        "bad": [r["case"] for r in bad],
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(summary, indent=1))
    (out_dir / "fault_sweep.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))


if __name__ == "__main__":
    main()
