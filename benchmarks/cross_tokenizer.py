"""Claim: a student can learn from a teacher of another family and tokenizer (Gemma 3 270M -> a SmolLM2 student).

Student: a 10-layer student built from SmolLM2-135M-Instruct's layers (`init_student_from_teacher(num_layers=10)`).
Five ways of training it, with the same steps, seed, data order and optimiser, each run through the teacher-source
interface (`hf_distill.teachers`), so the loop is the same for all:

- `ce`: hard-label cross-entropy only (no teacher);
- `uld`: ULD from Gemma 3 270M (`cross_tokenizer_loss: uld`, vocab 262144 vs 49152);
- `gold`: GOLD's hybrid from Gemma 3 270M (`cross_tokenizer_loss: gold`);
- `alm`: approximate likelihood matching from Gemma 3 270M (`cross_tokenizer_loss: alm`);
- `kd_smollm2`: same-tokenizer forward-KL KD from SmolLM2-135M-Instruct (`LiveTeacher`).

Data: e-SNLI rows from ../shared/data as `Premise: ...\\nHypothesis: ...\\n` (prompt, not supervised) +
`Label: <label>. Explanation: <explanation>` (completion, supervised). Held-out: rows of the validation file.

Reported per run: held-out bits per byte of the completions (student NLL in bits / UTF-8 bytes; does not depend on the
tokenizer), held-out top-1 agreement with SmolLM2 (same tokenizer, every supervised position) and with Gemma 3 (on
aligned spans whose teacher top token has a student twin, the `cross_tokenizer` source's metric). Table: mean and
spread (min..max) over the seeds, and the ratio of the mean bpb to CE-only's. Peak memory: one training step of the
cross-tokenizer source at Gemma's vocabulary, in a fresh process (peak RSS increase over the step,
`_common.peak_memory_reset`), beside the size the dense `[B, T_t, 262144]` teacher logits alone would take.

Budget (defaults, sized for 2 CPU cores shared with other jobs): 20 steps x batch 4, rows cut to 48 tokens, 32
held-out rows, 2 seeds, lr 3e-4 AdamW, fp32 CPU. Short: it shows whether the signal arrives, not converged quality.
Each finished run writes `<out>/runs/<method>_seed<k>.json`; a rerun skips those (resumable).

    nice -n 10 python benchmarks/cross_tokenizer.py --out runs/bench/cross_tokenizer
    python benchmarks/cross_tokenizer.py --steps 2 --eval-rows 8 --seeds 0 --out /tmp/ct_smoke   # smoke run
"""

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_distill, not another install
from _common import format_table, peak_memory_reset, run_isolated, write_json


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "esnli"
METHODS = ("ce", "uld", "gold", "alm", "kd_smollm2")
GEMMA_VOCAB = 262144
MIB = 2**20


def load_rows(name: str) -> list[dict]:
    """The e-SNLI rows of `name` (train / validation) from ../shared/data, or [] when absent."""
    for root in (DATA, Path("/work/shared/data/esnli")):
        path = root / f"{name}.jsonl"
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def encode(tok, row: dict, max_len: int) -> dict:
    """Prompt + completion ids, labels on the completion, and the completion's UTF-8 bytes (for bits per byte)."""
    prompt = f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\n"
    completion = f"Label: {row['label']}. Explanation: {row['explanation']}"
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"][: max(1, max_len - len(p))]
    return {"input_ids": p + c, "labels": [-100] * len(p) + c, "bytes": len(tok.decode(c).encode("utf-8"))}


def collate(examples: list[dict], pad: int) -> dict:
    """Right-padded tensors of `encode` outputs."""
    width = max(len(e["input_ids"]) for e in examples)
    return {
        "input_ids": torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples]),
        "attention_mask": torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
        ),
        "labels": torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples]),
        "bytes": sum(e["bytes"] for e in examples),
    }


def config(method: str):
    from hf_distill import DistillationConfig

    kd = 0.0 if method == "ce" else 0.5
    return DistillationConfig(
        output_dir="/tmp/hf_distill_ct_bench",
        report_to=[],
        kd_weight=kd,
        ce_weight=0.5,
        temperature=1.0,
        cross_tokenizer_loss=method if method in ("uld", "gold", "alm") else None,
        use_cpu=True,
    )


def build_source(method: str, student, tok, models: dict):
    """The teacher source of `method` for `student` (the same interface for all five)."""
    from hf_distill.heads import detect_head
    from hf_distill.teachers.base import SourceContext, TeacherSource
    from hf_distill.teachers.cross_tokenizer import CrossTokenizerTeacher
    from hf_distill.teachers.live import LiveTeacher

    context = SourceContext(config(method), detect_head(student), student, tok)
    if method == "ce":
        return TeacherSource(context)
    if method == "kd_smollm2":
        return LiveTeacher(context, models["smollm2"])
    source = CrossTokenizerTeacher(context, models["gemma3"], models["gemma3_tok"])
    if models.get("shared") is not None:
        source._shared = models["shared"]  # computed once per process (token strings of 262144 ids)
    return source


def step_loss(source, student, batch):
    from hf_distill.terms import SupervisedView

    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = student(**model_inputs, **source.student_forward_kwargs())
    terms = source.terms(
        out, source.outputs(model_inputs, batch), SupervisedView.from_batch(batch, source.context.head)
    )
    return terms.total() / terms.n_items.clamp(min=1), terms


def load_models(need_gemma: bool = True) -> dict:
    from hf_distill.models import load_model, load_tokenizer

    models = {"smollm2": load_model("smollm2").eval(), "tok": load_tokenizer("smollm2")}
    if need_gemma:
        models["gemma3"], models["gemma3_tok"] = load_model("gemma3").eval(), load_tokenizer("gemma3")
    for m in (models["smollm2"], models.get("gemma3")):
        if m is not None:
            m.requires_grad_(False)
    return models


@torch.no_grad()
def evaluate(student, batches: list[dict], models: dict, gemma_eval) -> dict:
    """Held-out bits per byte, top-1 agreement with SmolLM2 and (aligned spans) with Gemma 3."""
    from hf_distill.terms import SupervisedView

    student.eval()
    nll = n_bytes = agree_s = count_s = agree_g = count_g = 0.0
    for i, batch in enumerate(batches):
        model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits = student(**model_inputs).logits
        y = batch["labels"][:, 1:]
        mask = y != -100
        nll += torch.nn.functional.cross_entropy(logits[:, :-1][mask], y[mask], reduction="sum").item()
        n_bytes += batch["bytes"]
        t_top = models["smollm2_eval"][i]
        agree_s += (logits[:, :-1].argmax(-1)[mask] == t_top[mask]).sum().item()
        count_s += mask.sum().item()
        terms = gemma_eval.terms(SimpleOutputs(logits), models["gemma3_eval"][i],
                                 SupervisedView.from_batch(batch, gemma_eval.context.head))  # fmt: skip
        value, count = terms.metrics["top1_agreement"]
        agree_g += float(value)
        count_g += float(count)
    student.train()
    return {"bpb": nll / math.log(2) / n_bytes, "agreement_smollm2": agree_s / count_s,
            "agreement_gemma3": agree_g / max(count_g, 1)}  # fmt: skip


class SimpleOutputs:
    """Student outputs holding logits only (for `terms` at evaluation)."""

    def __init__(self, logits):
        self.logits = logits


def run(method: str, seed: int, opts, models: dict, train_rows, eval_batches, gemma_eval) -> dict:
    from hf_distill.student import init_student_from_teacher

    tok = models["tok"]
    torch.manual_seed(seed)
    student = init_student_from_teacher(models["smollm2"], num_layers=10).train()
    source = build_source(method, student, tok, models)
    order = random.Random(seed).sample(range(len(train_rows)), opts.steps * opts.batch_size)
    opt = torch.optim.AdamW(student.parameters(), lr=opts.lr, weight_decay=0.0)
    losses, start = [], time.process_time()
    for step in range(opts.steps):
        rows = [train_rows[i] for i in order[step * opts.batch_size : (step + 1) * opts.batch_size]]
        batch = collate([encode(tok, r, opts.max_len) for r in rows], tok.pad_token_id)
        loss, _ = step_loss(source, student, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"  {method} seed {seed} step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    cpu_s = time.process_time() - start
    return {"method": method, "seed": seed, "steps": opts.steps, "batch_size": opts.batch_size,
            "first_loss": losses[0], "last_loss": losses[-1], "train_cpu_s": cpu_s,
            **evaluate(student, eval_batches, models, gemma_eval)}  # fmt: skip


def measure_memory(method: str, batch_size: int, max_len: int) -> dict:
    """Peak RSS increase of one training step (student forward + backward, teacher forward, terms), fresh process."""
    models = load_models(need_gemma=method in ("uld", "gold"))
    from hf_distill.student import init_student_from_teacher

    tok = models["tok"]
    student = init_student_from_teacher(models["smollm2"], num_layers=10).train()
    source = build_source(method, student, tok, models)
    if method in ("uld", "gold"):
        source.shared_ids(torch.device("cpu"))  # once per run, not per step
    rows = load_rows("train")[:batch_size]
    batch = collate([encode(tok, r, max_len) for r in rows], tok.pad_token_id)
    teacher_tokens = 0
    if method in ("uld", "gold"):
        out = source.outputs({k: batch[k] for k in ("input_ids", "attention_mask")}, batch)
        teacher_tokens = int(out.input_ids.numel())
        del out

    def step():
        loss, _ = step_loss(source, student, batch)
        loss.backward()

    mem = peak_memory_reset(step)
    return {"method": method, "batch_size": batch_size, "student_tokens": int(batch["input_ids"].numel()),
            "teacher_tokens": teacher_tokens, **mem}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-methods", nargs="+", default=["ce", "uld", "gold"], choices=["ce", "uld", "gold"])
    opts = parser.parse_args()
    train_rows, eval_rows = load_rows("train"), load_rows("validation")
    if not train_rows:
        print("e-SNLI data not found under ../shared/data/esnli; nothing to run.")
        return
    out = Path(opts.out)
    todo = [(m, s) for s in opts.seeds for m in opts.methods if not (out / "runs" / f"{m}_seed{s}.json").exists()]
    if todo:
        models = load_models()
        tok = models["tok"]
        eval_batches = [collate([encode(tok, r, opts.max_len) for r in eval_rows[i : i + opts.batch_size]],
                                tok.pad_token_id) for i in range(0, opts.eval_rows, opts.batch_size)]  # fmt: skip
        probe = build_source("gold", copy.deepcopy(models["smollm2"]), tok, models)
        models["shared"] = probe.shared_ids(torch.device("cpu"))
        gemma_eval = probe
        with torch.no_grad():
            models["smollm2_eval"] = [
                models["smollm2"](input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                .argmax(-1) for b in eval_batches
            ]  # fmt: skip
            models["gemma3_eval"] = [
                probe.outputs({k: b[k] for k in ("input_ids", "attention_mask")}, b) for b in eval_batches
            ]
        for method, seed in todo:
            result = run(method, seed, opts, models, train_rows, eval_batches, gemma_eval)
            write_json(out / "runs", f"{method}_seed{seed}", result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    rows = []
    ce_bpb = statistics.mean(r["bpb"] for r in results if r["method"] == "ce") if any(
        r["method"] == "ce" for r in results) else None  # fmt: skip
    for method in METHODS:
        mine = [r for r in results if r["method"] == method]
        if not mine:
            continue
        bpb = [r["bpb"] for r in mine]
        rows.append({
            "method": method, "seeds": len(mine), "bpb_mean": statistics.mean(bpb),
            "bpb_min..max": f"{min(bpb):.4f}..{max(bpb):.4f}",
            "bpb/ce": statistics.mean(bpb) / ce_bpb if ce_bpb else "",
            "agree_smollm2": statistics.mean(r["agreement_smollm2"] for r in mine),
            "agree_gemma3": statistics.mean(r["agreement_gemma3"] for r in mine),
            "train_cpu_s/run": statistics.mean(r["train_cpu_s"] for r in mine),
        })  # fmt: skip
    print(format_table(rows, list(rows[0]) if rows else []))
    memory = []
    if not opts.skip_memory:
        mem_path = out / "memory.json"
        memory = json.loads(mem_path.read_text()) if mem_path.exists() else []
        done = {m["method"] for m in memory}
        for method in opts.memory_methods:
            if method not in done:
                memory.append(run_isolated(__file__, "measure_memory", method=method, batch_size=opts.batch_size,
                                           max_len=opts.max_len))  # fmt: skip
                write_json(out, "memory", memory)
        for m in memory:
            m["peak_mib"] = m["peak_bytes"] / MIB
            m["dense_teacher_logits_mib"] = m["teacher_tokens"] * GEMMA_VOCAB * 4 / MIB
        print(format_table(memory, ["method", "batch_size", "student_tokens", "teacher_tokens", "peak_mib",
                                    "dense_teacher_logits_mib"]))  # fmt: skip
    write_json(out, "cross_tokenizer", {"settings": vars(opts), "table": rows, "runs": results, "memory": memory})


if __name__ == "__main__":
    main()
