"""KD training run used by tests/test_distributed.py, on 1 process (`python`) or 2 (`torchrun --nproc_per_node 2`).

    CUDA_VISIBLE_DEVICES= torchrun --nproc_per_node 2 tests/distributed/kd_equivalence.py OUT --batch_size 2
    CUDA_VISIBLE_DEVICES= python tests/distributed/kd_equivalence.py OUT --batch_size 4

Same tiny seeded models and data (sequential order, no dropout) everywhere; the global batch is
`batch_size * processes`. Writes OUT/result.json (loss trajectory, placement facts), OUT/final (the student) and
OUT/saves_rank<r>.json (the `save_pretrained` calls each process made).
"""

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)

import torch
from conftest import make_llama, make_tokenizer
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedModel

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cli.shutdown import end_distributed_run


TEXTS = [
    "the cat sat on the mat",
    "a dog ran fast",
    "the big red dog is slow and the cat is small",
    "one plus two equals three",
    "the blue cat is big",
    "two minus one equals one",
    "a small dog sat on a mat because it is slow",
    "yes",
    "the answer is four",
    "is the cat red no the cat is blue",
    "five plus one equals six",
    "the dog ran to the cat",
    "a big mat",
    "three plus three equals six and two plus two equals four",
    "the label is neutral",
    "so the answer is yes",
]


def equivalence_args(out: Path, batch_size: int, max_steps: int = 3, **fields) -> DistillationConfig:
    """The deterministic run every 1-vs-2-process script compares: `out/run`, CPU, sequential batches of
    `batch_size` per process, SGD at a constant lr 0.5 with clipping at 1.0, a log every step, fixed seeds, no
    reporting, saving or workers, KD 0.6 / CE 0.4 at T = 2; `fields` add or replace config fields."""
    settings = dict(
        output_dir=str(out / "run"),
        use_cpu=True,
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        train_sampling_strategy="sequential",
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        kd_weight=0.6,
        ce_weight=0.4,
        temperature=2.0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return DistillationConfig(**{**settings, **fields})


def record_saves(path: Path) -> None:
    """Make every `save_pretrained` call of this process append its target folder to `path` (JSON list)."""
    original = PreTrainedModel.save_pretrained
    calls: list[str] = []

    def save_pretrained(self, save_directory, *args, **kwargs):
        calls.append(Path(save_directory).name)
        path.write_text(json.dumps(calls))
        return original(self, save_directory, *args, **kwargs)

    PreTrainedModel.save_pretrained = save_pretrained
    path.write_text(json.dumps(calls))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--kd_loss", default="forward_kl", help="kd_loss of the run (e.g. taid: t must move alike)")
    parser.add_argument("--fsdp", action="store_true", help="ask for FSDP2 (fsdp=True, fsdp_config version 2)")
    parser.add_argument("--gpu", action="store_true", help="run on the visible CUDA devices (default: CPU)")
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    record_saves(out / f"saves_rank{rank}.json")

    tok = make_tokenizer()
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = equivalence_args(
        out,
        cli.batch_size,
        max_steps=cli.max_steps,
        use_cpu=not cli.gpu,
        save_strategy="steps",
        save_steps=cli.save_steps,
        kd_loss=cli.kd_loss,
        **({"fsdp": True, "fsdp_config": {"version": 2}} if cli.fsdp else {}),
    )
    trainer = DistillationTrainer(
        model=make_llama(2, 32),
        teacher_model=make_llama(4, 64, seed=1),
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    accelerator = trainer.accelerator
    if cli.fsdp and str(accelerator.distributed_type) != "DistributedType.FSDP":
        if accelerator.is_main_process:  # the caller fails, quoting this
            (out / "result.json").write_text(json.dumps({"distributed_type": str(accelerator.distributed_type)}))
        return
    teacher_registered = any(m is trainer.teacher for m in accelerator._models)
    trainer.train()
    trainer.save_model(str(out / "final"))

    result = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "teacher_type": type(trainer.teacher).__name__,
        "teacher_registered_at_init": teacher_registered,
        "teacher_registered_after_train": any(m is trainer.teacher for m in accelerator._models),
        "teacher_frozen": all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters()),
        "log_history": [e for e in trainer.state.log_history if "loss" in e and "step" in e],
    }
    if accelerator.is_main_process:
        (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    end_distributed_run()  # barrier + bounded destroy, as the CLI ends: gloo aborts ranks left to interpreter exit
