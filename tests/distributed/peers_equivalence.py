"""Mutual-learning run used by tests/test_peers.py, on 1 process (`python`) or 2 (`torchrun --nproc_per_node 2`).

    CUDA_VISIBLE_DEVICES= torchrun --nproc_per_node 2 tests/distributed/peers_equivalence.py OUT --batch_size 2
    CUDA_VISIBLE_DEVICES= python tests/distributed/peers_equivalence.py OUT --batch_size 4

Two tiny seeded peers (`PeerStudents`) trained by `MutualLearning` (the trainer's `peers` source), sequential data,
SGD; writes OUT/result.json (loss trajectory, wrapper type) and OUT/final/peer0, peer1 (`save_model`).
"""

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)

from conftest import make_llama, make_tokenizer
from datasets import Dataset
from kd_equivalence import TEXTS, equivalence_args
from transformers import DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer
from hf_distill.cli.shutdown import end_distributed_run
from hf_distill.student import PeerStudents
from hf_distill.teachers.peers import MutualLearning


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--fused", action="store_true")
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = equivalence_args(
        out,
        cli.batch_size,
        use_fused_kd_loss=cli.fused,
    )
    trainer = DistillationTrainer(
        model=PeerStudents([make_llama(2, 32, seed=0), make_llama(2, 32, seed=1)]),
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    assert isinstance(trainer.teacher_source, MutualLearning)
    trainer.train()
    trainer.save_model(str(out / "final"))
    if trainer.accelerator.is_main_process:
        result = {
            "num_processes": trainer.accelerator.num_processes,
            "wrapper": type(trainer.model_wrapped).__name__,
            "log_history": [e for e in trainer.state.log_history if "loss" in e and "step" in e],
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    end_distributed_run()
