"""vLLM's speculative decoding with a draft model (`--speculative-config`, method `draft_model`) on the CPU build:
the target served with and without the draft, the same greedy requests, and the acceptance vLLM counts in `/metrics`
(`spec_decode_num_accepted_tokens_total / spec_decode_num_draft_tokens_total`, the ratio `hf-distill draft evaluate`
calls `acceptance_rate`). Both servers run from the vLLM venv (tests/vllm_server.py), on 127.0.0.1, always stopped.

    python benchmarks/vllm_speculative.py --target runs/bench/served_teacher_work/teacher \\
        --draft runs/bench/served_teacher_work/student --out docs/benchmarks/vllm_speculative_cpu.json
"""

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vllm_server import VLLMServer  # noqa: E402


PROMPTS = [
    "The capital of France is",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "A man is playing a guitar on stage. Does this mean that a man is performing music?",
    "def fibonacci(n):",
]


def serve_and_complete(target: str, extra: list[str], max_tokens: int, log: Path) -> dict:
    """Start the target (with `extra` server arguments), complete `PROMPTS` greedily in one request, read the
    speculative-decoding counters, stop the server."""
    server = VLLMServer(target, served_model_name="target", lora=False, max_logprobs=20,
                        extra_args=["--max-model-len", "512", *extra], log_path=log)  # fmt: skip
    started = time.time()
    server.start(timeout=600)
    result = {"started_s": time.time() - started}
    try:
        body = {"model": "target", "prompt": PROMPTS, "max_tokens": max_tokens, "temperature": 0}
        request = urllib.request.Request(f"{server.url}/v1/completions", json.dumps(body).encode(),
                                         {"content-type": "application/json"})  # fmt: skip
        started = time.time()
        reply = json.load(urllib.request.urlopen(request, timeout=600))
        result["completion_s"] = time.time() - started
        result["texts"] = [c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])]
        metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
        result["spec"] = {
            line.split("{")[0].split(":")[1]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("vllm:spec_decode_num_") and "_total{" in line and "per_pos" not in line
        }
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="The target's saved folder (fp32 on CPU).")
    parser.add_argument("--draft", required=True, help="The draft's saved folder (the target's vocabulary).")
    parser.add_argument("--num_speculative_tokens", type=int, default=3)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--out", default="runs/vllm_speculative.json")
    args = parser.parse_args()
    spec = {"model": str(Path(args.draft).resolve()), "num_speculative_tokens": args.num_speculative_tokens,
            "method": "draft_model"}  # fmt: skip
    log = Path(args.out).with_suffix(".server.log")
    out = {"date": time.strftime("%Y-%m-%d"), "target": args.target, "draft": args.draft,
           "speculative_config": spec, "max_tokens": args.max_tokens, "prompts": PROMPTS}  # fmt: skip
    with_draft = ["--speculative-config", json.dumps(spec)]
    out["with_draft"] = serve_and_complete(args.target, with_draft, args.max_tokens, log)
    out["target_alone"] = serve_and_complete(args.target, [], args.max_tokens, log)
    out["identical"] = out["with_draft"]["texts"] == out["target_alone"]["texts"]
    counts = out["with_draft"]["spec"]
    out["acceptance_rate"] = counts["spec_decode_num_accepted_tokens_total"] / max(
        1.0, counts["spec_decode_num_draft_tokens_total"]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("identical", "acceptance_rate")}), f"-> {args.out}")


if __name__ == "__main__":
    main()
