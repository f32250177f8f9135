"""Cross-tokenizer KD run used by tests/test_distributed.py, on 1 process (`python`) or 2 (`torchrun`).

    torchrun --nproc_per_node 2 tests/distributed/cross_tokenizer_equivalence.py OUT --batch_size 2
    python tests/distributed/cross_tokenizer_equivalence.py OUT --batch_size 4

A word-level student and a byte-level BPE teacher (tokenizers built locally: tests/test_cross_tokenizer_teacher.py),
`cross_tokenizer_loss` (gold by default), the same seeded models and data in sequential order everywhere; the global
batch is `batch_size * processes`. Writes OUT/result.json (loss trajectory, source name) and OUT/final (the student).
"""

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)

from conftest import make_llama
from kd_equivalence import equivalence_args
from test_cross_tokenizer_teacher import tiny_cross_pair
from transformers import DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer
from hf_distill.cli.shutdown import end_distributed_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--loss", default="gold", help="cross_tokenizer_loss")
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)

    s_tok, t_tok, data, teacher = tiny_cross_pair()
    args = equivalence_args(
        out,
        cli.batch_size,
        max_steps=cli.max_steps,
        cross_tokenizer_loss=cli.loss,
    )
    trainer = DistillationTrainer(
        model=make_llama(vocab_size=len(s_tok), seed=0),
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(s_tok, mlm=False),
        processing_class=s_tok,
        teacher_processing_class=t_tok,
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "source": trainer.teacher_source.name,
        "rank": int(os.environ.get("RANK", "0")),
        "log_history": [e for e in trainer.state.log_history if "loss" in e and "step" in e],
    }
    if trainer.accelerator.is_main_process:
        (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    end_distributed_run()  # barrier + bounded destroy, as the CLI ends: gloo aborts ranks left to interpreter exit
