"""Context distillation (`teacher_model_name_or_path: self`, `teacher_system_prompt`, `teacher_context_column`) on this
CPU, with SmolLM2-135M-Instruct (`hf_distill.models.load_model("smollm2")`) and e-SNLI from ../shared/data.

Parts (`--parts`, each resumable: every finished stage writes OUT/context_distillation_runs/<stage>.json):

- `bar`: the first training step's KD term with `self` and nothing extra (must be exactly 0: the teacher is the
  student), with a system prompt, and with a context column (both must be > 0); dense and fused paths.
- `fewshot`: few-shot into weights. The teacher is the model with `--k` labelled demonstrations (drawn per row, labels
  balanced and shuffled, from training rows never used as prompts) in its user message (`teacher_context_template`'s
  default, "{context}\n\n{prompt}"); the student is the same model without them. Unlabeled training prompts get the
  teacher's answer (its likeliest label word) as completion; the student trains `--steps` steps of `--batch_size` on
  them with KD only (`context`: `kd_weight=1, ce_weight=0`; the teacher reads the demonstrations and scores every
  completion token) or, same data and budget, with CE on the teacher's answers (`seq-kd`: `kd_weight=0, ce_weight=1`,
  no teacher at run time). Validation accuracy (`--eval_size` rows; restricted choice: the label whose first token is
  likeliest after the chat prompt, as lm-eval-harness scores small models, since this 135M model rarely starts a free
  answer with a label word, even few-shot) of the model zero-shot, few-shot (the teacher), and each student after
  training (no demonstrations), per seed; and the prompt tokens saved per query (few-shot prompt minus zero-shot
  prompt, mean over the validation rows).
- `system`: a system prompt into weights. The teacher reads a long behaviour prompt (`BEHAVIOUR`: one sentence, then
  `Label: <label>` on its own line) as a system message; completions are its greedy answers to unlabeled training
  prompts; the student trains with KD only, without the prompt. Reported: how often the answer follows the format
  (`follows_format`, a rule on the text) on held-out validation prompts, without the prompt before and after
  training, and for the teacher with it.
- `rationale`: see benchmarks/step_by_step.py `--methods rationale-context` (the human rationale as privileged context
  of an EMA teacher; its own runs), summarised in docs/context_distillation.md with step_by_step's finished results.

Output: OUT/context_distillation.json (all stages, config, CPU minutes, load average) and OUT/context_distillation.png
(validation accuracy per method). `--smoke` runs a tiny configuration (a pipeline check, not a result).

    nice python benchmarks/context_distillation.py --out runs/cd
    python benchmarks/context_distillation.py --smoke --out runs/cd-smoke
"""

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cached_run, mean_spread, write_json  # noqa: E402


LABELS = ("entailment", "neutral", "contradiction")
QUESTION = (
    "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer with one word: "
    "entailment, neutral or contradiction."
)
OPEN_QUESTION = (
    "Premise: {premise}\nHypothesis: {hypothesis}\nWhat is the relation between the premise and the hypothesis?"
)
BEHAVIOUR = (
    "You are a careful annotator of sentence pairs. Whatever the user asks, always reply in exactly this format and "
    "nothing else: first one short sentence that explains how the hypothesis relates to the premise, then a new "
    "line with 'Label: ' followed by one word, entailment, neutral or contradiction. Do not add greetings, lists, "
    "notes or any other text. Example reply:\nA man sleeping cannot be running at the same time.\nLabel: contradiction"
)
FORMAT = re.compile(r"^[^\n]+[.!]\s*\n+\s*label:\s*(entailment|neutral|contradiction)\.?\s*$", re.IGNORECASE)
SMOKE = dict(eval_size=8, train_prompts=8, steps=2, batch_size=4, system_eval_size=4, seeds="0")


def default_data_dir() -> Path:
    candidates = [ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data"]
    return next((c for c in candidates if (c / "esnli").is_dir()), candidates[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(default_data_dir()))
    parser.add_argument("--out", default="runs/cd")
    parser.add_argument("--parts", default="bar,fewshot,system")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--k", type=int, default=3, help="Demonstrations (one per label, cycling).")
    parser.add_argument("--eval_size", type=int, default=300, help="Validation rows scored (fewshot).")
    parser.add_argument("--system_eval_size", type=int, default=60, help="Validation rows scored (system).")
    parser.add_argument("--train_prompts", type=int, default=320, help="Unlabeled training prompts.")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per student run.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--summary_only", action="store_true", help="Tables and JSON from the finished stages only.")
    parser.add_argument("--rationale_plot", nargs=2, metavar=("REFERENCE_JSON", "RATIONALE_JSON"), default=None,
                        help="Plot step_by_step.py's label-only / step-by-step results beside its rationale-context "
                        "results into OUT/context_distillation_rationale.png, and stop.")  # fmt: skip
    parser.add_argument("--methods", default="context,seq-kd", help="fewshot: which student runs.")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------- text helpers
def question(row: dict, template: str = QUESTION) -> str:
    return template.format(premise=row["premise"], hypothesis=row["hypothesis"])


def demonstrations(rows, k: int) -> str:
    """k labelled examples in the question's format, one per label in turn."""
    picked, want = [], list(LABELS) * k
    for row in rows:
        if len(picked) == k:
            break
        if row["label"] == want[len(picked)]:
            picked.append(f"{question(row)}\nAnswer: {row['label']}")
    return "Solved examples:\n\n" + "\n\n".join(picked)


def row_demonstrations(pool, k: int, count: int, seed: int) -> list[str]:
    """`count` demonstration blocks, one per row: k labelled examples drawn from `pool` for each row, the labels
    balanced (k // 3 each, the rest at random) and shuffled, so no label is always last (with one fixed block in
    label order, this model answers the last demonstration's label for every row: a recency bias)."""
    import random

    rng = random.Random(seed)
    by_label = {label: [r for r in pool if r["label"] == label] for label in LABELS}
    blocks = []
    for _ in range(count):
        labels = [LABELS[i % 3] for i in range(k)]
        rng.shuffle(labels)
        picked = [rng.choice(by_label[label]) for label in labels]
        blocks.append("Solved examples:\n\n" + "\n\n".join(f"{question(r)}\nAnswer: {r['label']}" for r in picked))
    return blocks


def chat_text(tokenizer, user: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def first_label(text: str) -> str | None:
    found = [(text.lower().find(label), label) for label in LABELS if label in text.lower()]
    return min(found)[1] if found else None


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of chat-rendered `texts` (left-padded batches)."""
    model.eval()
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return out


@torch.no_grad()
def label_choices(model, tokenizer, texts: list[str], batch_size: int) -> tuple[list[str], list[float]]:
    """The label whose first token is likeliest right after each chat-rendered prompt (restricted choice, as
    lm-eval-harness scores small models; the three first tokens differ), and the mass on the three."""
    model.eval()
    first = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    tokenizer.padding_side = "left"
    labels, masses = [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        probs = model(**enc, use_cache=False).logits[:, -1].float().softmax(-1)[:, first]  # (B, 3)
        labels += [LABELS[i] for i in probs.argmax(-1).tolist()]
        masses += probs.sum(-1).tolist()
    tokenizer.padding_side = "right"
    return labels, masses


def accuracy(model, tokenizer, rows, args, context: str | list[str] | None = None) -> dict:
    """Restricted-choice accuracy (`label_choices`) of chat prompts, with `context` (one text, or one per row) before
    the question, or none."""
    contexts = context if isinstance(context, list) else [context] * len(rows)
    users = [question(r) if c is None else f"{c}\n\n{question(r)}" for r, c in zip(rows, contexts)]
    texts = [chat_text(tokenizer, user) for user in users]
    predicted, masses = label_choices(model, tokenizer, texts, args.eval_batch_size)
    correct = sum(p == r["label"] for p, r in zip(predicted, rows))
    counts = {label: predicted.count(label) for label in LABELS}
    prompt_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows), "predicted": counts,
            "mean_label_mass": mean(masses), "mean_prompt_tokens": mean(prompt_tokens)}  # fmt: skip


# ----------------------------------------------------------------------------------------------- training
def train(base, tokenizer, data, args, seed: int, out_dir: Path, **fields) -> tuple:
    from hf_distill import DistillationSFTConfig, DistillationSFTTrainer

    student = copy.deepcopy(base)
    config = DistillationSFTConfig(
        output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=args.steps // 8,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], use_cpu=True, seed=seed,
        data_seed=seed, disable_tqdm=True, max_length=1024, **fields,
    )  # fmt: skip
    trainer = DistillationSFTTrainer(model=student, args=config, train_dataset=data, processing_class=tokenizer)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    logs = [{k: v for k, v in e.items() if k.endswith("loss") or k == "step"} for e in trainer.state.log_history]
    timing = {
        "train_minutes": (time.perf_counter() - start) / 60,
        "train_cpu_minutes": (time.process_time() - cpu) / 60,
    }
    return student.eval(), {"source": trainer.teacher_source.name, "logs": logs, **timing}


def prompt_completion(tokenizer, rows, answers: list[str], user_template: str = QUESTION, **columns):
    from datasets import Dataset

    records = []
    for i, (row, answer) in enumerate(zip(rows, answers)):
        record = {"prompt": [{"role": "user", "content": question(row, user_template)}],
                  "completion": [{"role": "assistant", "content": answer.strip()}]}  # fmt: skip
        record.update({name: values[i] if isinstance(values, list) else values for name, values in columns.items()})
        records.append(record)
    return Dataset.from_list(records)


# ----------------------------------------------------------------------------------------------- parts
def part_bar(base, tokenizer, train_rows, args, runs: Path) -> dict:
    """The first step's KD with `self` and nothing extra / a system prompt / a context column, dense and fused."""

    def compute() -> dict:
        rows = train_rows.select(range(8))
        data = prompt_completion(tokenizer, rows, [r["label"] for r in rows], demos=demonstrations(train_rows, 3))
        out = {}
        for fused in (True, False):
            cases = (("self, nothing extra", {}), ("self + system prompt", {"teacher_system_prompt": BEHAVIOUR}),
                     ("self + context column", {"teacher_context_column": "demos"}))  # fmt: skip
            for name, fields in cases:
                one = argparse.Namespace(**{**vars(args), "steps": 1, "batch_size": 4})
                _, info = train(base, tokenizer, data, one, 0, runs / "bar", teacher_model_name_or_path="self",
                                kd_weight=1.0, ce_weight=0.0, use_fused_kd_loss=fused, **fields)  # fmt: skip
                kd = next(e["kd_loss"] for e in info["logs"] if "kd_loss" in e)
                out[f"{name} ({'fused' if fused else 'dense'})"] = {"kd_first_step": kd, "source": info["source"]}
                print(f"[bar] {name} ({'fused' if fused else 'dense'}): first-step KD {kd!r}", flush=True)
        return out

    return cached_run(runs / "bar.json", compute, {"model": "smollm2"})


def part_fewshot(base, tokenizer, train_rows, val_rows, args, runs: Path) -> dict:
    settings = {
        k: getattr(args, k) for k in ("k", "eval_size", "train_prompts", "steps", "batch_size", "learning_rate")
    } | {"demos": "per row"}
    demo_pool = train_rows.select(range(len(train_rows) - 200, len(train_rows)))  # never used as prompts
    prompts = train_rows.select(range(args.train_prompts))
    val_demos = row_demonstrations(demo_pool, args.k, len(val_rows), seed=1234)
    demos = row_demonstrations(demo_pool, args.k, len(prompts), seed=4321)  # the teacher's, per training prompt
    result = {"demonstrations_example": demos[0], "settings": settings}
    zero_shot = lambda: accuracy(base, tokenizer, val_rows, args)  # noqa: E731
    result["zero_shot"] = cached_run(runs / "fewshot-zero_shot.json", zero_shot, {"eval_size": args.eval_size})
    few_shot = lambda: accuracy(base, tokenizer, val_rows, args, val_demos)  # noqa: E731
    few_shot_settings = {"eval_size": args.eval_size, "k": args.k, "demos": "per row"}
    result["few_shot_teacher"] = cached_run(runs / "fewshot-teacher.json", few_shot, few_shot_settings)
    print(f"[fewshot] zero-shot {result['zero_shot']['accuracy']:.3f}, few-shot teacher "
          f"{result['few_shot_teacher']['accuracy']:.3f}", flush=True)  # fmt: skip

    def teacher_answers() -> dict:
        texts = [chat_text(tokenizer, f"{d}\n\n{question(r)}") for d, r in zip(demos, prompts)]
        return {"answers": label_choices(base, tokenizer, texts, args.eval_batch_size)[0]}

    answer_settings = {"k": args.k, "train_prompts": args.train_prompts, "demos": "per row"}
    answers = cached_run(runs / "fewshot-answers.json", teacher_answers, answer_settings)["answers"]
    result["teacher_answers_label_accuracy"] = sum(
        first_label(a) == r["label"] for a, r in zip(answers, prompts)
    ) / len(prompts)
    data = prompt_completion(tokenizer, prompts, answers, demos=demos)
    methods = {
        "context": {"teacher_model_name_or_path": "self", "teacher_context_column": "demos", "kd_weight": 1.0,
                    "ce_weight": 0.0},
        "seq-kd": {"kd_weight": 0.0, "ce_weight": 1.0},
    }  # fmt: skip
    result["students"] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method, fields in methods.items():
            if method not in args.methods.split(","):
                continue

            def run(method=method, fields=fields, seed=seed) -> dict:
                print(f"[fewshot] training {method}, seed {seed}", flush=True)
                torch.manual_seed(seed)
                student, info = train(base, tokenizer, data, args, seed, runs / f"fewshot-{method}-{seed}", **fields)
                return {"method": method, "seed": seed, **accuracy(student, tokenizer, val_rows, args), **info}

            run_result = cached_run(runs / f"fewshot-{method}-seed{seed}.json", run, settings)
            print(f"[fewshot] {method} seed {seed}: accuracy {run_result['accuracy']:.3f}", flush=True)
            result["students"].append(run_result)
    zero, few = result["zero_shot"]["mean_prompt_tokens"], result["few_shot_teacher"]["mean_prompt_tokens"]
    result["prompt_tokens"] = {"zero_shot": zero, "few_shot": few, "saved_per_query": few - zero}
    return result


def follows_format(text: str) -> bool:
    """One sentence (one line ending with '.' or '!'), then a line `Label: <entailment|neutral|contradiction>`."""
    match = FORMAT.match(text.strip())
    return bool(match) and text.strip().split("\n")[0].count(". ") == 0


def part_system(base, tokenizer, train_rows, val_rows, args, runs: Path) -> dict:
    settings = {k: getattr(args, k) for k in ("system_eval_size", "train_prompts", "steps", "batch_size",
                                              "learning_rate")}  # fmt: skip
    held_out = val_rows.select(range(args.system_eval_size))
    prompts = train_rows.select(range(args.train_prompts))

    def rate(model, rows, system: str | None) -> dict:
        texts = [chat_text(tokenizer, question(r, OPEN_QUESTION), system) for r in rows]
        answers = generate(model, tokenizer, texts, 32, args.eval_batch_size)
        follows = [follows_format(a) for a in answers]
        labelled = sum(first_label(a) is not None for a in answers) / len(rows)
        words = sum(len(a.split()) for a in answers) / len(rows)
        return {"follows_format": sum(follows) / len(rows), "mentions_a_label": labelled, "mean_words": words,
                "answers": answers}  # fmt: skip

    result = {"system_prompt": BEHAVIOUR, "settings": settings}
    result["before"] = cached_run(runs / "system-before.json", lambda: rate(base, held_out, None), settings)
    result["teacher"] = cached_run(runs / "system-teacher.json", lambda: rate(base, held_out, BEHAVIOUR), settings)
    print(f"[system] follows the format: before {result['before']['follows_format']:.2f}, teacher (with the prompt) "
          f"{result['teacher']['follows_format']:.2f}", flush=True)  # fmt: skip

    def answers() -> dict:
        texts = [chat_text(tokenizer, question(r, OPEN_QUESTION), BEHAVIOUR) for r in prompts]
        return {"answers": generate(base, tokenizer, texts, 32, args.eval_batch_size)}

    completions = cached_run(runs / "system-answers.json", answers, settings)["answers"]
    result["teacher_answers_follow_format"] = sum(map(follows_format, completions)) / len(completions)
    data = prompt_completion(tokenizer, prompts, completions, OPEN_QUESTION)
    result["students"] = []
    for seed in [int(s) for s in args.seeds.split(",")][:1]:

        def run(seed=seed) -> dict:
            print(f"[system] training, seed {seed}", flush=True)
            torch.manual_seed(seed)
            student, info = train(base, tokenizer, data, args, seed, runs / f"system-{seed}",
                                  teacher_model_name_or_path="self", teacher_system_prompt=BEHAVIOUR, kd_weight=1.0,
                                  ce_weight=0.0)  # fmt: skip
            return {"seed": seed, **rate(student, held_out, None), **info}

        result["students"].append(cached_run(runs / f"system-after-seed{seed}.json", run, settings))
        print(f"[system] after, seed {seed}: {result['students'][-1]['follows_format']:.2f}", flush=True)
    teacher = result["teacher"]["answers"]
    for entry in (result["before"], *result["students"]):  # the prompt's effect in the weights: the teacher's reply
        entry["same_start_as_teacher"] = sum(same_start(a, t) for a, t in zip(entry["answers"], teacher)) / len(
            teacher
        )
    return result


def same_start(a: str, b: str, words: int = 8) -> bool:
    """Whether two replies begin with the same `words` words."""
    return a.split()[:words] == b.split()[:words]


def plot(path: Path, fewshot: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install hf-distill[bench])")
        return None
    names = ["zero-shot", f"few-shot teacher (k={fewshot['settings']['k']})", "context distillation", "seq-KD (CE)"]
    values = [[fewshot["zero_shot"]["accuracy"]], [fewshot["few_shot_teacher"]["accuracy"]]]
    values += [[s["accuracy"] for s in fewshot["students"] if s["method"] == m] for m in ("context", "seq-kd")]
    fig, ax = plt.subplots(figsize=(7, 4))
    means = [sum(v) / len(v) if v else 0 for v in values]
    ax.bar(range(4), means, color=["#999", "#555", "#1f77b4", "#ff7f0e"])
    for i, v in enumerate(values):
        ax.scatter([i] * len(v), v, color="k", zorder=3, s=12)
    ax.axhline(1 / 3, ls="--", color="r", lw=1, label="chance (1/3)")
    ax.set_xticks(range(4), names, fontsize=8)
    ax.set_ylabel(f"e-SNLI accuracy, {fewshot['settings']['eval_size']} validation rows")
    ax.set_title("SmolLM2-135M-Instruct: few-shot into weights (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def rationale_plot(path: Path, reference: Path, runs: Path) -> str | None:
    """Report accuracy against training rows for label-only and step-by-step (`reference`, a step_by_step.json) and
    rationale-as-context (`runs`, step_by_step.py's JSON of `--methods rationale-context`): mean and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(reference.read_text())["results"] + json.loads(runs.read_text())["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("label-only", "step-by-step", "rationale-context"):
        by_rows: dict[int, list[float]] = {}
        for r in results:
            if r["method"] == method:
                by_rows.setdefault(r["train_rows"], []).append(r["accuracy"])
        rows = sorted(by_rows)
        line = ax.plot(rows, [sum(by_rows[n]) / len(by_rows[n]) for n in rows], marker="o", label=method)[0]
        for n in rows:
            ax.scatter([n] * len(by_rows[n]), by_rows[n], color=line.get_color(), s=10, alpha=0.6)
    ax.set_xlabel("training rows (e-SNLI)")
    ax.set_ylabel("label accuracy, 200 validation rows")
    ax.set_title("the human rationale as the teacher's context (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def tables(results: dict) -> str:
    """Markdown tables of the finished parts."""
    out = []
    if "bar" in results:
        out += [
            "| setting (SmolLM2-135M, first step, 4 rows) | KD per supervised token | source |",
            "|---|---:|---|",
        ]
        cases = {name: v for name, v in results["bar"].items() if name != "run_settings"}  # cached_run's record
        out += [f"| {name} | {v['kd_first_step']!r} | {v['source']} |" for name, v in cases.items()]
        out.append("")
    if "fewshot" in results:
        f = results["fewshot"]
        rows = f["zero_shot"]["total"]
        out += [f"| model (no demonstrations unless said) | accuracy ({rows} rows) | per seed | predicted e / n / c |",
                "|---|---:|---|---|"]  # fmt: skip
        counts = lambda r: " / ".join(str(r["predicted"][label]) for label in LABELS)  # noqa: E731
        out.append(f"| zero-shot (before) | {f['zero_shot']['accuracy']:.3f} | | {counts(f['zero_shot'])} |")
        teacher = f["few_shot_teacher"]
        out.append(f"| few-shot teacher (k={f['settings']['k']}) | {teacher['accuracy']:.3f} | | {counts(teacher)} |")
        for method, name in (("context", "context distillation (KD)"), ("seq-kd", "seq-KD (CE on teacher answers)")):
            runs = [r for r in f["students"] if r["method"] == method]
            if runs:
                acc = mean_spread([r["accuracy"] for r in runs])
                seeds = ", ".join(f"{r['accuracy']:.3f}" for r in runs)
                out.append(f"| {name} | {acc['mean']:.3f} ± {acc['spread']:.3f} | {seeds} | "
                           f"{'; '.join(counts(r) for r in runs)} |")  # fmt: skip
        tokens = f["prompt_tokens"]
        out.append(f"\nPrompt tokens per query: {tokens['few_shot']:.1f} few-shot vs {tokens['zero_shot']:.1f} "
                   f"zero-shot: {tokens['saved_per_query']:.1f} saved.\n")  # fmt: skip
    if "system" in results:
        sy = results["system"]
        header = "| model | system prompt | follows the format | mentions a label | same start as teacher | words |"
        out += [header, "|---|---|---:|---:|---:|---:|"]
        rows = [("before", "no", sy["before"]), ("teacher", "yes", sy["teacher"])]
        rows += [(f"after (seed {r['seed']})", "no", r) for r in sy["students"]]
        for name, prompt, r in rows:
            same = r.get("same_start_as_teacher", 1.0 if name == "teacher" else float("nan"))
            out.append(f"| {name} | {prompt} | {r['follows_format']:.3f} | {r['mentions_a_label']:.3f} | {same:.3f} | "
                       f"{r['mean_words']:.1f} |")  # fmt: skip
    return "\n".join(out)


def read_finished(runs: Path, args) -> dict:
    """The parts' results from the finished stage files alone (`--summary_only`: no model is loaded, nothing run)."""
    load = lambda name: json.loads((runs / name).read_text()) if (runs / name).exists() else None  # noqa: E731
    results = {}
    if load("bar.json"):
        results["bar"] = {k: v for k, v in load("bar.json").items() if k != "run_settings"}
    zero, teacher = load("fewshot-zero_shot.json"), load("fewshot-teacher.json")
    if zero and teacher:
        students = [load(f.name) for f in sorted(runs.glob("fewshot-*-seed*.json"))]
        results["fewshot"] = {"settings": {"k": args.k, "eval_size": args.eval_size, **teacher["run_settings"]},
                              "zero_shot": zero, "few_shot_teacher": teacher, "students": students,
                              "prompt_tokens": {"zero_shot": zero["mean_prompt_tokens"],
                                                "few_shot": teacher["mean_prompt_tokens"],
                                                "saved_per_query": teacher["mean_prompt_tokens"]
                                                - zero["mean_prompt_tokens"]}}  # fmt: skip
        if load("fewshot-answers.json"):
            results["fewshot"]["teacher_answers"] = {label: load("fewshot-answers.json")["answers"].count(label)
                                                     for label in LABELS}  # fmt: skip
    before, teacher = load("system-before.json"), load("system-teacher.json")
    if before and teacher:
        students = [load(f.name) for f in sorted(runs.glob("system-after-seed*.json"))]
        results["system"] = {"system_prompt": BEHAVIOUR, "before": before, "teacher": teacher, "students": students}
        for entry in (before, *students):
            same = sum(same_start(a, t) for a, t in zip(entry["answers"], teacher["answers"]))
            entry["same_start_as_teacher"] = same / len(teacher["answers"])
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rationale_plot:
        reference, runs = map(Path, args.rationale_plot)
        print(f"Wrote {rationale_plot(Path(args.out) / 'context_distillation_rationale.png', reference, runs)}")
        return
    if args.summary_only:
        runs = Path(args.out) / "context_distillation_runs"
        results = read_finished(runs, args)
        students = results.get("fewshot", {}).get("students")
        png = plot(Path(args.out) / "context_distillation.png", results["fewshot"]) if students else None
        payload = {"config": vars(args), "results": results, "tables": tables(results), "plot": png,
                   "load_average": os.getloadavg()}  # fmt: skip
        print(payload["tables"])
        print(f"Wrote {write_json(args.out, 'context_distillation', payload)}")
        return
    from hf_distill.data.loading import load_any_dataset
    from hf_distill.models import load_model, load_tokenizer

    data = Path(args.data_dir) / "esnli"
    if not (data / "train.jsonl").exists():
        print(f"SKIP: {data}/train.jsonl not found (pass --data_dir).")
        return
    wall, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    train_rows = load_any_dataset(str(data / "train.jsonl"))
    val_rows = load_any_dataset(str(data / "validation.jsonl")).select(range(args.eval_size))
    tokenizer, base = load_tokenizer("smollm2"), load_model("smollm2").float().eval()
    runs = Path(args.out) / ("context_distillation_smoke_runs" if args.smoke else "context_distillation_runs")
    results = {}
    parts = args.parts.split(",")
    if "bar" in parts:
        results["bar"] = part_bar(base, tokenizer, train_rows, args, runs)
    if "fewshot" in parts:
        results["fewshot"] = part_fewshot(base, tokenizer, train_rows, val_rows, args, runs)
        results["fewshot"]["summary"] = {
            m: mean_spread([s["accuracy"] for s in results["fewshot"]["students"] if s["method"] == m])
            for m in ("context", "seq-kd")
        }
    if "system" in parts:
        results["system"] = part_system(base, tokenizer, train_rows, val_rows, args, runs)
    png = plot(Path(args.out) / "context_distillation.png", results["fewshot"]) if "fewshot" in results else None
    previous = Path(args.out) / "context_distillation.json"  # parts run by other invocations are kept
    if previous.exists():
        results = {**json.loads(previous.read_text()).get("results", {}), **results}
    payload = {"config": vars(args), "results": results, "plot": png, "torch_threads": torch.get_num_threads(),
               "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
               "this_invocation_minutes": (time.perf_counter() - wall) / 60,
               "this_invocation_cpu_minutes": (time.process_time() - cpu) / 60}  # fmt: skip
    payload["tables"] = tables(results)
    print(payload["tables"])
    print(f"Wrote {write_json(args.out, 'context_distillation', payload)}")


if __name__ == "__main__":
    main()
