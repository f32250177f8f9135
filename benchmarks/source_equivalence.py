"""The same losses before and after a change to how teacher sources are built: 4 training steps on each of the live
fused, live dense, cache, cross-tokenizer, EMA and peers paths, run on two checkouts of hf_distill in one script.

Each path trains a tiny seeded random Llama (2 layers, hidden 32) for 4 optimizer steps on the same 8 token rows
(batch 4, lr 1e-3, AdamW) and records, per step, the logged `loss`, `kd_loss` and `ce_loss` (for peers: both peers'
terms). Each checkout runs in a fresh Python process with that checkout first on `sys.path` (its own `hf_distill/`);
the models, tokenizers and data are built by this file, so both processes see identical inputs.

    python benchmarks/source_equivalence.py --before /path/to/old/checkout [--after .] --out runs/bench

Prints one table (path, step, before, after, |difference|) and writes `source_equivalence.json`; exits 1 when any
logged value differs by more than `--atol` (default 0: bit-identical).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PATHS = ("live_fused", "live_dense", "cache", "cross_tokenizer", "ema", "peers")
SENTENCE = "the cat sat on a mat and the dog ran to one big red ball while two small birds sang in green trees near"
WORDS = [*SENTENCE.split(" "), "an", "old", "house", "by", "the", "river"]
TEXTS = [" ".join(WORDS[i : i + 9]) for i in range(0, 40, 5)]


# ----------------------------------------------------------------------------------------------- inside a checkout
def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def _bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 3, vocab_size=300, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def _llama(vocab_size, seed, layers=2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def run_path(path: str, work: str) -> list[dict]:
    """Train one path for 4 steps in the checkout on `sys.path`; returns the logged entries of the 4 steps."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from hf_distill import DistillationConfig, DistillationTrainer

    tok = _tokenizer(WORDS)
    rows = Dataset.from_list([{"input_ids": (ids := tok(t)["input_ids"]), "labels": list(ids)} for t in TEXTS])
    fields = dict(output_dir=os.path.join(work, path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                  logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
                  use_fused_kd_loss=path != "live_dense")  # fmt: skip
    kwargs = dict(train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok, padding=True), processing_class=tok)
    student, teacher = _llama(len(tok), seed=0), _llama(len(tok), seed=1, layers=3)
    if path == "cache":
        try:
            from hf_distill.cache import cache_teacher
        except ImportError:  # the layout before the cache became a package of its own
            from hf_distill.teachers.cache import cache_teacher
        cache_teacher(teacher, rows, tok, os.path.join(work, "cache"), k=len(tok), dtype="float32", batch_size=4)
        trainer = DistillationTrainer(model=student, args=DistillationConfig(**fields,
                                      teacher_cache=os.path.join(work, "cache")), **kwargs)  # fmt: skip
    elif path == "cross_tokenizer":
        t_tok = _bpe_tokenizer()
        args = DistillationConfig(**fields, cross_tokenizer_loss="uld")
        trainer = DistillationTrainer(model=student, teacher_model=_llama(len(t_tok), seed=1, layers=3),
                                      teacher_processing_class=t_tok, args=args, **kwargs)  # fmt: skip
    elif path == "ema":
        trainer = DistillationTrainer(
            model=student, args=DistillationConfig(**fields, teacher_ema_decay=0.9), **kwargs
        )
    elif path == "peers":
        try:
            from hf_distill.student import PeerStudents
        except ImportError:  # before PeerStudents moved to the student side
            from hf_distill.teachers.peers import PeerStudents
        model = PeerStudents([student, _llama(len(tok), seed=2)])
        trainer = DistillationTrainer(model=model, args=DistillationConfig(**fields, kd_weight=1.0), **kwargs)
    else:
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=DistillationConfig(**fields), **kwargs
        )
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e and "step" in e]


# ----------------------------------------------------------------------------------------------- the comparison
def run_checkout(tree: Path, work: Path) -> dict:
    """Every path in a fresh interpreter with `tree` first on sys.path."""
    code = (f"import sys, json; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r}); "
            "import source_equivalence as s; import hf_distill; "
            f"print('RESULT' + json.dumps({{p: s.run_path(p, {str(work)!r}) for p in s.PATHS}}))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         cwd=str(tree))  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{tree} failed:\n{out.stderr[-4000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="checkout of hf_distill before the change (its root folder)")
    parser.add_argument("--after", default=str(ROOT), help="checkout after the change (default: this one)")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--atol", type=float, default=0.0)
    cli = parser.parse_args()
    results = {}
    for label in ("before", "after"):
        with tempfile.TemporaryDirectory() as work:
            results[label] = run_checkout(Path(getattr(cli, label)).resolve(), Path(work))
    rows, worst = [], 0.0
    print(f"{'path':16} {'step':>4} {'key':8} {'before':>14} {'after':>14} {'|diff|':>10}")
    for path in PATHS:
        for b, a in zip(results["before"][path], results["after"][path], strict=True):
            for key in sorted(k for k in b if k.endswith("loss") and isinstance(b[k], float)):
                diff = abs(b[key] - a.get(key, math.nan))
                worst = max(worst, diff) if not math.isnan(diff) else math.inf
                rows.append({"path": path, "step": b["step"], "key": key, "before": b[key], "after": a.get(key),
                             "abs_diff": diff})  # fmt: skip
                print(f"{path:16} {b['step']:>4} {key:8} {b[key]:14.8f} {a.get(key, math.nan):14.8f} {diff:10.2e}")
    print(f"largest |difference|: {worst:.3e} (atol {cli.atol})")
    os.makedirs(cli.out, exist_ok=True)
    with open(os.path.join(cli.out, "source_equivalence.json"), "w") as f:
        json.dump({"before": cli.before, "after": cli.after, "largest_abs_diff": worst, "rows": rows}, f, indent=1)
    sys.exit(0 if worst <= cli.atol else 1)


if __name__ == "__main__":
    main()
