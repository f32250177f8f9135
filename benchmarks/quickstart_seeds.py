"""The quickstart's KD / CE-only comparison over several seeds: mean +- spread of the held-out KL ratio, and a plot.

Runs `hf-distill quickstart --seed K --output_dir OUT/seedK <quickstart flags>` for every seed in `--seeds` (the seed
sets the transfer-set sampling, the batch order and nothing else: the students start from the same teacher layers),
each in its own process, and skips a seed whose `OUT/seedK/results.json` exists, so the benchmark resumes per seed.
Then it reads every seed's report and writes:

- `OUT/quickstart_seeds.json`: per seed the held-out KL(teacher || student) per token of both students at every
  evaluation step, the KD / CE-only ratio at the end, perplexities, top-1 agreements and the CPU seconds of the run
  (user + system of the quickstart process: the stable number on a shared machine; `null` for a seed run earlier);
  and the mean +- spread (half the range) over the seeds;
- `OUT/quickstart_seeds.png`: held-out KL against steps, one line per student, error bars over the seeds.

Flags after `--` go to `hf-distill quickstart` unchanged (steps, weights, learning rate, ...):

    OMP_NUM_THREADS=1 python benchmarks/quickstart_seeds.py --out runs/bench/quickstart --seeds 0,1 -- --steps 160
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _common import mean_spread, plot_series, write_json  # noqa: E402


STUDENTS = ("kd_student", "ce_only_student")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/quickstart", help="One folder per seed, and the summary.")
    p.add_argument("--seeds", default="0,1", help="Comma-separated seeds.")
    return p.parse_args(argv), extra


def run_seed(seed: int, out: Path, extra: list[str]) -> float | None:
    """Runs the quickstart for `seed` into `out/seed{seed}` unless its report exists; returns its CPU seconds."""
    folder = out / f"seed{seed}"
    if (folder / "results.json").exists():
        print(f"[seed {seed}] done earlier: {folder / 'results.json'}", flush=True)
        return None
    if "--seed" in extra or "--output_dir" in extra:
        raise SystemExit("quickstart_seeds.py sets --seed and --output_dir itself: use --seeds and --out.")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [
        sys.executable,
        "-m",
        "hf_distill.cli.main",
        "quickstart",
        "--seed",
        str(seed),
        "--output_dir",
        str(folder),
    ]
    print(f"[seed {seed}] {' '.join(command + extra)}", flush=True)
    subprocess.run(command + extra, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (folder / "cpu_seconds.json").write_text(json.dumps({"cpu_seconds": seconds}) + "\n")
    return seconds


def summarise(reports: dict[int, dict], cpu: dict[int, float | None]) -> dict:
    """Per-seed rows and mean +- spread over seeds of `reports` (seed -> a quickstart `results.json`)."""
    per_seed = {}
    for seed, report in reports.items():
        per_seed[seed] = {
            "kl_ratio_kd_over_ce": report["kl_ratio_kd_over_ce"],
            "final": {name: report["results"][name] for name in STUDENTS},
            "curves": {name: report["curves"][name] for name in STUDENTS},
            "cpu_seconds": cpu.get(seed),
            "wall_seconds": report["seconds"],
            "settings": report["settings"],
        }
    steps = sorted({p["step"] for r in reports.values() for name in STUDENTS for p in r["curves"][name]})
    curves = {}
    for name in STUDENTS:
        curves[name] = []
        for step in steps:
            values = [p["kl"] for r in reports.values() for p in r["curves"][name] if p["step"] == step]
            if len(values) == len(reports):
                curves[name].append({"step": step, **mean_spread(values)})
    ratios_by_step = []
    for step in steps:
        ratios = []
        for r in reports.values():
            kd = [p["kl"] for p in r["curves"]["kd_student"] if p["step"] == step]
            ce = [p["kl"] for p in r["curves"]["ce_only_student"] if p["step"] == step]
            if kd and ce:
                ratios.append(kd[0] / ce[0])
        if len(ratios) == len(reports):
            ratios_by_step.append({"step": step, **mean_spread(ratios)})
    summary = {
        "seeds": sorted(reports),
        "kl_ratio_kd_over_ce": mean_spread([r["kl_ratio_kd_over_ce"] for r in reports.values()]),
        "kl_ratio_by_step": ratios_by_step,
        "final": {
            name: {
                metric: mean_spread([r["results"][name][metric] for r in reports.values()])
                for metric in ("kl", "top1_agreement", "perplexity")
            }
            for name in STUDENTS
        },
        "curves": curves,
        "teacher_perplexity": mean_spread([r["results"]["teacher"]["perplexity"] for r in reports.values()]),
    }
    return {"summary": summary, "per_seed": per_seed}


def main(argv: list[str] | None = None) -> dict:
    opts, extra = parse_args(argv)
    out = Path(opts.out)
    seeds = [int(s) for s in opts.seeds.split(",")]
    cpu = {}
    for seed in seeds:
        seconds = run_seed(seed, out, extra)
        saved = out / f"seed{seed}" / "cpu_seconds.json"
        cpu[seed] = (
            seconds
            if seconds is not None
            else (json.loads(saved.read_text())["cpu_seconds"] if saved.exists() else None)
        )
    reports = {seed: json.loads((out / f"seed{seed}" / "results.json").read_text()) for seed in seeds}
    result = summarise(reports, cpu)
    summary = result["summary"]
    print(f"\nSeeds {summary['seeds']}: held-out KL(teacher || student) per token, mean +- spread")
    for name in STUDENTS:
        row = "  ".join(f"step {p['step']}: {p['mean']:.3f} +- {p['spread']:.3f}" for p in summary["curves"][name])
        print(f"  {name:<16} {row}")
    ratio = summary["kl_ratio_kd_over_ce"]
    print(
        f"  KD / CE-only at the end: {ratio['mean']:.3f} +- {ratio['spread']:.3f} "
        f"(min {ratio['min']:.3f}, max {ratio['max']:.3f})"
    )
    total = [c for c in cpu.values() if c is not None]
    if total:
        print(f"  CPU minutes of the quickstart runs (as recorded per seed): {sum(total) / 60:.1f}")
    series = {
        name.replace("_", " "): [(p["step"], p["mean"], p["spread"]) for p in summary["curves"][name]]
        for name in STUDENTS
    }
    plot = plot_series(
        out / "quickstart_seeds.png",
        series,
        xlabel="optimizer step",
        ylabel="held-out KL(teacher || student) per token",
        title=f"quickstart, seeds {','.join(map(str, seeds))} (mean +- half range)",
    )
    result["plot"] = str(plot) if plot else None
    write_json(out, "quickstart_seeds", result)
    return result


if __name__ == "__main__":
    main()
