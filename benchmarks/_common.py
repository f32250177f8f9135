"""Helpers shared by the benchmark scripts: median timing, peak memory of one step, fresh subprocesses, JSON.

Typical use (see `kd_loss_memory.py`): the parent calls `run_isolated(__file__, "measure", **case)` once per case, so
every measurement starts in a fresh interpreter; `measure` builds its inputs, then calls `peak_memory(step, device)`
and `median_ms(step, device=device)` and returns a JSON-serialisable dict.

Memory on CPU is the increase of the process's peak resident set size (`ru_maxrss`) over the resident set size just
before the step. This is what the operating system charges (allocator overhead included), and because the process is
fresh and its inputs are created directly (no larger transient), the peak before the step equals the current size;
`peak_memory` reports that slack so a reader can check it. On CUDA it is `torch.cuda.max_memory_allocated()` minus the
memory allocated before the step.
"""

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


_RESULT_MARK = "@@BENCH_RESULT@@"


def sync(device: str | torch.device) -> None:
    """Waits for queued device work, so that a clock read after it covers the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timings(
    step: Callable[[], object], *, device: str | torch.device = "cpu", warmup: int = 1, iters: int = 3
) -> dict[str, float]:
    """Median wall time (`ms`) and median process CPU time (`cpu_ms`) of `step()` over `iters` runs after `warmup`.

    Wall time is device-synchronised. CPU time (all threads of this process) is the steadier number for CPU work on a
    machine shared with other jobs, where waiting for a core inflates wall time but not CPU time.
    """
    wall, cpu = [], []
    for i in range(warmup + iters):
        sync(device)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync(device)
        if i >= warmup:
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    return {"ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu)}


def median_ms(
    step: Callable[[], object], *, device: str | torch.device = "cpu", warmup: int = 1, iters: int = 3
) -> float:
    """Median wall time of `step()` in milliseconds over `iters` runs after `warmup` runs (device-synchronised)."""
    return timings(step, device=device, warmup=warmup, iters=iters)["ms"]


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (`ru_maxrss` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (Linux `/proc/self/status` `VmHWM`).

    Unlike `ru_maxrss`, which Linux carries over `execve` (a child started by `subprocess` reports at least its
    parent's peak), `VmHWM` belongs to the process's own address space, so a fresh interpreter starts
    from its own size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?): cannot read the peak RSS.")


def peak_memory(step: Callable[[], object], device: str | torch.device = "cpu") -> dict[str, int]:
    """Runs `step()` once and returns `{"peak_bytes": ..., "baseline_slack_bytes": ...}`.

    `peak_bytes` is the peak memory added by the step (see the module docstring). `baseline_slack_bytes` is how far the
    process's earlier peak lay above its size before the step (CPU only); a step whose own peak is below that slack
    is under-reported, so callers should keep it near 0 by measuring in a fresh process.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "baseline_slack_bytes": 0}
    before = current_rss_bytes()
    slack = max_rss_bytes() - before
    step()
    return {"peak_bytes": max_rss_bytes() - before, "baseline_slack_bytes": slack}


def peak_memory_reset(step: Callable[[], object]) -> dict[str, object]:
    """`peak_memory` on CPU with the process's high-water mark reset first (`/proc/self/clear_refs`), so that model
    loading before the step (freed again) cannot hide the step's own peak; falls back to `peak_memory` (which reports
    that slack) where the reset is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return {**peak_memory(step), "how": "ru_maxrss"}

    def status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    before = status_kib("VmRSS")
    step()
    return {"peak_bytes": (status_kib("VmHWM") - before) * 1024, "baseline_slack_bytes": 0, "how": "VmHWM reset"}


def run_isolated(script: str | Path, function: str, timeout: float | None = None, **kwargs: object) -> dict:
    """Calls `function(**kwargs)` of the file `script` in a fresh Python process and returns its dict result.

    The function's result must be JSON-serialisable; its own output goes to this process's stderr.
    """
    code = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('_bench_target', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "result = getattr(module, sys.argv[2])(**json.loads(sys.argv[3]))\n"
        f"print({_RESULT_MARK!r} + json.dumps(result), flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(script), function, json.dumps(kwargs)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{function}({kwargs}) failed in a subprocess with exit code {proc.returncode}.")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if not lines:
        raise RuntimeError(f"{function}({kwargs}) printed no result.")
    return json.loads(lines[-1][len(_RESULT_MARK) :])


@torch.no_grad()
def greedy_ids(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None = None,
    batch: int = 8,
) -> list[list[int]]:
    """Greedy continuations of `prompt_ids` (token ids, no batch dimension) in left-padded batches of `batch`: one list
    of at most `max_new_tokens` new ids per prompt. `eos_token_id` stops generation and cuts each row after its first
    EOS; `None` keeps the model's generation config (its stop tokens) and returns the rows as generated (padded)."""
    out = []
    for i in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        stop = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_token_id, **stop,
        )  # fmt: skip
        for row in gen[:, width:].tolist():
            cut = row.index(eos_token_id) + 1 if eos_token_id is not None and eos_token_id in row else len(row)
            out.append(row[:cut])
    return out


def write_json(out_dir: str | Path, name: str, payload: object) -> Path:
    """Writes `payload` to `out_dir/name.json` (creating the folder) and returns the path."""
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of `rows` (dicts) with the given columns, floats to 3 significant digits."""

    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def mean_spread(values: list[float]) -> dict[str, float]:
    """`{"mean", "spread", "min", "max", "n"}` of `values`; `spread` is half the range (max - min) / 2, so with 2 seeds
    "mean +- spread" covers both runs exactly."""
    if not values:
        raise ValueError("mean_spread needs at least one value.")
    low, high = min(values), max(values)
    return {"mean": statistics.fmean(values), "spread": (high - low) / 2, "min": low, "max": high, "n": len(values)}


def cached_run(path: str | Path, compute: Callable[[], dict], settings: dict | None = None) -> dict:
    """`compute()` once: its JSON result is written to `path` and read back on later runs (one file per finished run,
    so an interrupted benchmark resumes at the first run without a file).

    With `settings` (the arguments the result depends on), they are stored with the result under `run_settings`, and a
    file written with other settings is refused rather than mixed into a summary of this invocation's settings; a file
    from before settings were recorded is read back with a note."""
    path = Path(path)
    wanted = None if settings is None else json.loads(json.dumps(settings))
    if path.exists():
        result = json.loads(path.read_text())
        stored = result.get("run_settings")
        if wanted is not None and stored is not None and stored != wanted:
            changed = sorted(k for k in {*stored, *wanted} if stored.get(k) != wanted.get(k))
            detail = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now" for k in changed)
            raise ValueError(
                f"{path} was run with other settings ({detail}); pass another --out for these settings, or delete "
                "the file to run it again."
            )
        note = " (written before its settings were recorded)" if wanted is not None and stored is None else ""
        print(f"  (cached) {path}{note}", flush=True)
        return result
    result = compute()
    if wanted is not None:
        result = {**result, "run_settings": wanted}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return result


def plot_series(
    path: str | Path,
    series: dict[str, list[tuple[float, float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    hline: dict[str, float] | None = None,
    logx: bool = False,
) -> Path | None:
    """Line plot with error bars: `series` maps a label to `(x, mean, spread)` points; `hline` adds dashed reference
    lines (e.g. the teacher, chance). Writes a PNG at `path`; returns `None` (and prints why) without matplotlib
    (`pip install hf-distill[bench]`)."""
    return plot_panels(path, {title: series}, xlabel=xlabel, ylabel=ylabel, hline=hline, logx=logx)


def plot_panels(
    path: str | Path,
    panels: dict[str, dict[str, list[tuple[float, float, float]]]],
    *,
    xlabel: str,
    ylabel: str,
    suptitle: str | None = None,
    hline: dict[str, float] | None = None,
    logx: bool = False,
) -> Path | None:
    """`plot_series` for several panels side by side sharing the y axis: `panels` maps a panel title to its series.
    A label keeps its colour in every panel (one legend entry per label, under the panels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf-distill[bench]'): no plot written", flush=True)
        return None
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colours = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(6.4 if n == 1 else 4.2 * n, 4.2), sharey=True, squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            xs, ys, es = zip(*points) if points else ((), (), ())
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, color=colours[label])
        for label, y in (hline or {}).items():
            ax.axhline(y, linestyle="--", linewidth=1, color="grey")
            ax.annotate(label, (ax.get_xlim()[0], y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        if logx:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, title=title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if n == 1:
        axes[0][0].legend(fontsize=8)
    else:
        handles = [plt.Line2D([], [], color=colours[label], marker="o") for label in labels]
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(labels) - 1) // 3) if n > 1 else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
