"""Claim: the fused KD loss needs a fraction of the memory of materialised logits, at no extra time.

For each size (N tokens, V vocab, H = 576 hidden, teacher and student heads of the same shape) and divergence, one
forward + backward of the teacher-logit loss with respect to the student's hidden states and lm_head weight is measured
for three methods, each in a fresh subprocess:

- naive: `h @ W.T` logits for both models, then `hf_distill.losses.logit_distillation_loss`;
- trl:   TRL's `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (its `beta` is 0 for forward KL and 0.5
         for JSD; same mixture convention as ours), mean over tokens;
- ours:  `hf_distill.losses.fused_logit_distillation_loss` (default automatic chunk size unless --chunk-size).

Peak memory is the step's peak increase (CPU: peak RSS over the RSS before the step; CUDA: max_memory_allocated); it
includes the `(V, H)` weight gradient every method must produce. Time is the median of --iters further steps, as wall
time (`ms`) and as process CPU time (`cpu_ms`, the steadier number on a CPU shared with other jobs).
fp32 on CPU; bf16 inputs on CUDA.

`--pair gemma3` measures real models instead of random tensors: the teacher is Gemma 3 270M
(`load_model("gemma3")`, V = 262144, H = 640) and the student its first/last layers
(`init_student_from_teacher(teacher, num_layers=--student-layers)`, same tokenizer); both read `--tokens` tokens of
e-SNLI explanations (../shared/data; random ids if absent), and the step is the loss on their final hidden states
with respect to the student's hidden states and (tied) lm_head weight.

    python benchmarks/kd_loss_memory.py --sizes small --out runs/bench      # smoke run, seconds
    python benchmarks/kd_loss_memory.py --out runs/bench                    # (2048, 49152) and (1024, 151936)
    python benchmarks/kd_loss_memory.py --pair gemma3 --tokens 256 --losses forward_kl --iters 2 --out runs/bench
"""

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, peak_memory, peak_memory_reset, run_isolated, timings, write_json


SIZES = {"small": [(256, 8192)], "full": [(2048, 49152), (1024, 151936)]}
HIDDEN = 576
METHODS = ("naive", "trl", "ours")
TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # TRL's ChunkedDivergenceFunction covers these three
MIB = 2**20


def make_inputs(n: int, vocab: int, hidden: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return {  # scaled in place: no transient above the baseline
        "s_hidden": torch.randn(n, hidden, device=device, dtype=dtype, generator=gen).requires_grad_(),
        "s_weight": torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen).mul_(0.05).requires_grad_(),
        "t_hidden": torch.randn(n, hidden, device=device, dtype=dtype, generator=gen),
        "t_weight": torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen).mul_(0.05),
    }


def gemma3_inputs(n: int, student_layers: int, data_dir: str, device: str, dtype: torch.dtype) -> dict:
    """`make_inputs` from real models: Gemma 3 270M's and a pruned Gemma 3 student's final hidden states `(N, 640)` on
    `n` tokens of e-SNLI explanations, and their lm_head weights `(262144, 640)` (the student's a fresh leaf)."""
    from hf_distill.heads import decoder_of, lm_head_of
    from hf_distill.models import load_model, load_tokenizer
    from hf_distill.student import init_student_from_teacher

    teacher = load_model("gemma3").float().eval()
    torch.manual_seed(0)
    student = init_student_from_teacher(teacher, num_layers=student_layers).float().eval()
    path = os.path.join(data_dir, "esnli", "train.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            texts = [json.loads(line)["explanation"] for _, line in zip(range(n), f)]
        ids = load_tokenizer("gemma3")(" ".join(texts), return_tensors="pt").input_ids[:, :n]
    else:
        print(f"{path} not found: using random tokens", file=sys.stderr)
        ids = torch.randint(0, 262144, (1, n), generator=torch.Generator().manual_seed(0))
    if ids.shape[1] < n:
        raise ValueError(f"{path} gave {ids.shape[1]} tokens, {n} needed: lower --tokens.")
    with torch.no_grad():
        t_hidden = decoder_of(teacher)(input_ids=ids).last_hidden_state[0]
        s_hidden = decoder_of(student)(input_ids=ids).last_hidden_state[0]
    out = {
        "s_hidden": s_hidden.to(device, dtype).clone().requires_grad_(),
        "s_weight": lm_head_of(student).weight.detach().to(device, dtype).clone().requires_grad_(),
        "t_hidden": t_hidden.to(device, dtype).clone(),
        "t_weight": lm_head_of(teacher).weight.detach().to(device, dtype).clone(),
    }
    del teacher, student
    gc.collect()
    return out


def make_step(method: str, x: dict[str, torch.Tensor], loss_type: str, chunk_size: int | None):
    """A closure running one forward + backward of `method` and returning the detached loss."""
    beta = TRL_BETA[loss_type]
    if method == "naive":
        from hf_distill.losses import logit_distillation_loss

        def loss_fn():
            with torch.no_grad():
                t_logits = x["t_hidden"] @ x["t_weight"].T
            return logit_distillation_loss(x["s_hidden"] @ x["s_weight"].T, t_logits, loss_type=loss_type, beta=beta)
    elif method == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def loss_fn():
            divergence, _ = ChunkedDivergenceFunction.apply(
                x["s_hidden"], x["s_weight"], None, x["t_hidden"], x["t_weight"], None, beta
            )
            return divergence.mean()
    elif method == "ours":
        from hf_distill.losses import fused_logit_distillation_loss

        def loss_fn():
            return fused_logit_distillation_loss(
                x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"], loss_type=loss_type, beta=beta,
                chunk_size=chunk_size,
            )  # fmt: skip
    else:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")

    def step():
        x["s_hidden"].grad = x["s_weight"].grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return step


def measure(
    method: str,
    n: int,
    vocab: int,
    loss_type: str,
    device: str,
    dtype: str,
    iters: int,
    chunk_size: int | None,
    pair: str | None = None,
    student_layers: int = 6,
    data_dir: str = "",
) -> dict:
    """One case, meant to run in a fresh process (see `_common.run_isolated`); `pair="gemma3"`: real models."""
    torch_dtype = getattr(torch, dtype)
    hidden = 640 if pair == "gemma3" else HIDDEN
    make_step(method, make_inputs(16, 256, hidden, device, torch_dtype), loss_type, chunk_size)()  # library warm-up
    gc.collect()
    if pair == "gemma3":
        x = gemma3_inputs(n, student_layers, data_dir, device, torch_dtype)
    else:
        x = make_inputs(n, vocab, HIDDEN, device, torch_dtype)
    step = make_step(method, x, loss_type, chunk_size)
    # real models were loaded (and freed) to build the inputs: reset the high-water mark so they cannot hide the peak
    memory = peak_memory_reset(step) if pair == "gemma3" and device == "cpu" else peak_memory(step, device)
    times = timings(step, device=device, warmup=0, iters=iters)
    loss = step()
    return {
        "method": method, "pair": pair or "random", "n": n, "vocab": vocab, "hidden": hidden, "loss_type": loss_type,
        "device": device, "dtype": dtype, "peak_mib": memory["peak_bytes"] / MIB,
        "baseline_slack_mib": memory["baseline_slack_bytes"] / MIB, "memory_how": memory.get("how", "ru_maxrss"),
        **times, "loss": loss.item(),
        "grad_weight_norm": x["s_weight"].grad.float().norm().item(),
        "grad_hidden_norm": x["s_hidden"].grad.float().norm().item(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument("--losses", default="forward_kl,jsd", help="comma-separated; each of " + ", ".join(TRL_BETA))
    parser.add_argument("--iters", type=int, default=3, help="timed steps per case (after the memory step)")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for ours (default: automatic)")
    parser.add_argument(
        "--pair",
        choices=["gemma3"],
        default=None,
        help="real models: Gemma 3 270M -> a pruned Gemma 3 (V 262144); replaces --sizes",
    )
    parser.add_argument("--tokens", type=int, default=256, help="N with --pair gemma3")
    parser.add_argument("--student-layers", type=int, default=6, help="student layers with --pair gemma3")
    parser.add_argument("--data", default=None, help="folder with esnli/train.jsonl (default: ../shared/data)")
    parser.add_argument("--out", default="runs/bench", help="writes OUT/kd_loss_memory.json")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    if args.data is None:  # ../shared/data beside the checkout (main) or beside its parent folder (worktrees)
        found = [p for p in (root.parent, root.parents[1]) if (p / "shared" / "data" / "esnli").is_dir()]
        args.data = str((found[0] if found else root.parent) / "shared" / "data")
    sizes = [(args.tokens, 262144)] if args.pair == "gemma3" else SIZES[args.sizes]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    losses = args.losses.split(",")
    rows, summary = [], []
    for n, vocab in sizes:
        for loss_type in losses:
            case = {}
            for method in METHODS:
                print(f"[kd_loss_memory] N={n} V={vocab} {loss_type} {method} ...", file=sys.stderr, flush=True)
                case[method] = run_isolated(
                    __file__, "measure", method=method, n=n, vocab=vocab, loss_type=loss_type, device=device,
                    dtype=dtype, iters=args.iters, chunk_size=args.chunk_size, pair=args.pair,
                    student_layers=args.student_layers, data_dir=args.data,
                )  # fmt: skip
            naive, trl, ours = case["naive"], case["trl"], case["ours"]
            for r in (naive, trl, ours):
                r["loss_rel_err_vs_naive"] = abs(r["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-30)
                r["grad_norm_rel_err_vs_naive"] = abs(r["grad_weight_norm"] - naive["grad_weight_norm"]) / max(
                    naive["grad_weight_norm"], 1e-30
                )
                rows.append(r)
            summary.append({
                "n": n, "vocab": vocab, "loss_type": loss_type,
                "mem_ours/naive": ours["peak_mib"] / naive["peak_mib"],
                "mem_ours/trl": ours["peak_mib"] / trl["peak_mib"],
                "time_ours/naive": ours["ms"] / naive["ms"],
                "time_ours/trl": ours["ms"] / trl["ms"],
                "cpu_time_ours/naive": ours["cpu_ms"] / naive["cpu_ms"],
                "cpu_time_ours/trl": ours["cpu_ms"] / trl["cpu_ms"],
            })  # fmt: skip
            s = summary[-1]
            s["mem_target_met"] = s["mem_ours/naive"] <= 0.25 and s["mem_ours/trl"] <= 1.0
            s["time_target_met"] = s["time_ours/naive"] <= 1.2
            s["cpu_time_target_met"] = s["cpu_time_ours/naive"] <= 1.2

    print(f"device={device} dtype={dtype} pair={args.pair or 'random'} torch={torch.__version__}")
    print(
        format_table(
            rows, ["n", "vocab", "loss_type", "method", "peak_mib", "ms", "cpu_ms", "loss", "loss_rel_err_vs_naive"]
        )
    )
    print()
    print(format_table(summary, list(summary[0])))
    path = write_json(
        args.out, "kd_loss_memory" + (f"_{args.pair}" if args.pair else ""),
        {"device": device, "dtype": dtype, "pair": args.pair, "hidden": rows[0]["hidden"], "torch": torch.__version__,
         "chunk_size": args.chunk_size,
         "iters": args.iters, "results": rows, "summary": summary},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
