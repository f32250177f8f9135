"""A served-teacher run used by tests/test_served_teacher.py, on 1 process (`python`) or 2 (`torchrun
--nproc_per_node 2`): each process asks the vLLM server for its own rows.

    python tests/distributed/served_equivalence.py OUT URL MODEL FOLDER --batch_size 4

The run of `kd_equivalence.equivalence_args` (deterministic, global batch `batch_size * processes`) with the served
teacher at URL (model MODEL, its tokenizer in FOLDER). Writes OUT/result.json (the loss of every step, on the main
process) and OUT/final (the student).
"""

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_llama
from datasets import Dataset
from kd_equivalence import TEXTS, equivalence_args
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer
from hf_distill.cli.shutdown import end_distributed_run


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("out", "url", "model", "folder"):
        parser.add_argument(name)
    parser.add_argument("--batch_size", type=int, required=True)
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(cli.folder)
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    served = {"teacher_api_base": [cli.url], "teacher_api_model": [cli.model], "teacher_api_top_k": 10}
    args = equivalence_args(out, cli.batch_size, max_steps=3, **served)
    trainer = DistillationTrainer(
        model=make_llama(2, 32, vocab_size=len(tok)),
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    if int(os.environ.get("RANK", "0")) == 0:
        loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        (out / "result.json").write_text(json.dumps({"loss": loss, "processes": trainer.accelerator.num_processes}))
    end_distributed_run()


if __name__ == "__main__":
    main()
