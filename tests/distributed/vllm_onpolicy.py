"""An on-policy run through vLLM used by tests/test_vllm_onpolicy.py, on 1 process (`python`) or 2 (`torchrun
--nproc_per_node 2`): only the main process pushes the LoRA adapter, every process samples its own rows from it.

    python tests/distributed/vllm_onpolicy.py OUT URL FOLDER --batch_size 4

The deterministic run of `kd_equivalence.equivalence_args` (global batch `batch_size * processes`), lmbda 1, greedy,
with a LoRA student over the served model (FOLDER) sampled through the server at URL, a checkpoint every step and
`log_completions`. Writes OUT/initial (the adapter before training), OUT/run (checkpoints, completions.jsonl) and, on
the main process, OUT/result.json (the loss of every step, the processes, the models the server serves afterwards).
"""

import argparse
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from conftest import make_llama
from datasets import Dataset
from kd_equivalence import equivalence_args
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from hf_distill import DistillationTrainer
from hf_distill.cli.shutdown import end_distributed_run
from hf_distill.generation.vllm import VLLMClient


PAIRS = [
    ("question two plus two", "answer four"),
    ("the cat sat on the", "mat"),
    ("is the dog big", "yes the dog is big"),
    ("one plus one", "two"),
    ("the blue cat is", "big and red"),
    ("a dog ran", "fast"),
    ("three minus one", "two"),
    ("is the cat small", "no the cat is big"),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("out", "url", "folder"):
        parser.add_argument(name)
    parser.add_argument("--batch_size", type=int, required=True)
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(cli.folder)
    rows = []
    for prompt, answer in PAIRS:
        p = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
        a = [*tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    student = get_peft_model(AutoModelForCausalLM.from_pretrained(cli.folder, dtype=torch.float32), lora)
    if int(os.environ.get("RANK", "0")) == 0:
        student.save_pretrained(out / "initial")
    onpolicy = {"lmbda": 1.0, "use_vllm": True, "vllm_server_base_url": cli.url, "generation_temperature": 0.0,
                "max_new_tokens": 6, "log_completions": True, "save_strategy": "steps", "save_steps": 1}  # fmt: skip
    trainer = DistillationTrainer(
        model=student,
        teacher_model=make_llama(4, 64, vocab_size=len(tok), seed=1),
        args=equivalence_args(out, cli.batch_size, max_steps=2, **onpolicy),
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        processing_class=tok,
    )
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        result = {
            "loss": loss,
            "processes": trainer.accelerator.num_processes,
            "served": list(VLLMClient(cli.url).models()),
        }
        (out / "result.json").write_text(json.dumps(result))
    end_distributed_run()


if __name__ == "__main__":
    main()
