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

    python benchmarks/kd_loss_memory.py --sizes small --out runs/bench      # smoke run, seconds
    python benchmarks/kd_loss_memory.py --out runs/bench                    # (2048, 49152) and (1024, 151936)
"""

import argparse
import gc
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, peak_memory, run_isolated, timings, write_json


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
    method: str, n: int, vocab: int, loss_type: str, device: str, dtype: str, iters: int, chunk_size: int | None
) -> dict:
    """One case, meant to run in a fresh process (see `_common.run_isolated`)."""
    torch_dtype = getattr(torch, dtype)
    make_step(method, make_inputs(16, 256, HIDDEN, device, torch_dtype), loss_type, chunk_size)()  # library warm-up
    gc.collect()
    x = make_inputs(n, vocab, HIDDEN, device, torch_dtype)
    step = make_step(method, x, loss_type, chunk_size)
    memory = peak_memory(step, device)
    times = timings(step, device=device, warmup=0, iters=iters)
    loss = step()
    return {
        "method": method, "n": n, "vocab": vocab, "hidden": HIDDEN, "loss_type": loss_type, "device": device,
        "dtype": dtype, "peak_mib": memory["peak_bytes"] / MIB,
        "baseline_slack_mib": memory["baseline_slack_bytes"] / MIB, **times, "loss": loss.item(),
        "grad_weight_norm": x["s_weight"].grad.float().norm().item(),
        "grad_hidden_norm": x["s_hidden"].grad.float().norm().item(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument("--losses", default="forward_kl,jsd", help="comma-separated; each of " + ", ".join(TRL_BETA))
    parser.add_argument("--iters", type=int, default=3, help="timed steps per case (after the memory step)")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for ours (default: automatic)")
    parser.add_argument("--out", default="runs/bench", help="writes OUT/kd_loss_memory.json")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    losses = args.losses.split(",")
    rows, summary = [], []
    for n, vocab in SIZES[args.sizes]:
        for loss_type in losses:
            case = {}
            for method in METHODS:
                print(f"[kd_loss_memory] N={n} V={vocab} {loss_type} {method} ...", file=sys.stderr, flush=True)
                case[method] = run_isolated(
                    __file__, "measure", method=method, n=n, vocab=vocab, loss_type=loss_type, device=device,
                    dtype=dtype, iters=args.iters, chunk_size=args.chunk_size,
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

    print(f"device={device} dtype={dtype} hidden={HIDDEN} torch={torch.__version__}")
    print(
        format_table(
            rows, ["n", "vocab", "loss_type", "method", "peak_mib", "ms", "cpu_ms", "loss", "loss_rel_err_vs_naive"]
        )
    )
    print()
    print(format_table(summary, list(summary[0])))
    path = write_json(
        args.out, "kd_loss_memory",
        {"device": device, "dtype": dtype, "hidden": HIDDEN, "torch": torch.__version__, "chunk_size": args.chunk_size,
         "iters": args.iters, "results": rows, "summary": summary},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
