"""EMA self-distillation run used by tests/test_ema.py, on 1 process (`python`) or 2 (`torchrun --nproc_per_node 2`).

    CUDA_VISIBLE_DEVICES= torchrun --nproc_per_node 2 tests/distributed/ema_equivalence.py OUT --batch_size 2
    CUDA_VISIBLE_DEVICES= python tests/distributed/ema_equivalence.py OUT --batch_size 4

A tiny seeded student, no teacher, `teacher_ema_decay` set (the trainer's `ema` source), sequential data, SGD, a
checkpoint at the last step. Writes OUT/result.json (loss trajectory, source and wrapper), OUT/final (the student,
`save_model`) and OUT/ema_rank<r>.safetensors (each process's EMA teacher after training).
"""

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)

from conftest import make_llama, make_tokenizer
from datasets import Dataset
from kd_equivalence import TEXTS, equivalence_args
from safetensors.torch import save_file
from transformers import DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer
from hf_distill.cli.shutdown import end_distributed_run
from hf_distill.teachers.ema import EMATeacher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--dense", action="store_true", help="materialised logits instead of the fused KD loss")
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    tok = make_tokenizer()
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = equivalence_args(
        out,
        cli.batch_size,
        save_strategy="steps",
        save_steps=3,
        teacher_ema_decay=0.7,
        ce_weight=1.0,
        use_fused_kd_loss=not cli.dense,
    )
    trainer = DistillationTrainer(
        model=make_llama(2, 32),
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    source = trainer.teacher_source
    assert isinstance(source, EMATeacher) and trainer.teacher is None
    trainer.train()
    trainer.save_model(str(out / "final"))
    save_file(source.state_dict(), str(out / f"ema_rank{rank}.safetensors"))
    if trainer.accelerator.is_main_process:
        result = {
            "num_processes": trainer.accelerator.num_processes,
            "wrapper": type(trainer.model_wrapped).__name__,
            "source": source.name,
            "log_history": [e for e in trainer.state.log_history if "loss" in e and "step" in e],
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    end_distributed_run()  # barrier + bounded destroy: gloo aborts ranks left to interpreter exit
