"""`hf-distill quickstart` end to end on a tiny local teacher (the real SmolLM2 run is `-m slow`)."""

import importlib.util
import json

import pytest
from conftest import make_llama, make_tokenizer
from transformers import AutoModelForCausalLM

from hf_distill.card_sections import check_card
from hf_distill.cli.main import main
from hf_distill.recipes import recipe_from_card


def run_quickstart(teacher_path, out, *extra):
    main(["quickstart", "--teacher", str(teacher_path), "--output_dir", str(out), "--num_layers", "2", *extra])
    return json.loads((out / "results.json").read_text())


def run_tiny_quickstart(tmp_path, steps: int, *extra):
    """`run_quickstart` on the tiny teacher in `tmp_path / "teacher"`: 12 samples of 8 tokens, `steps` steps."""
    return run_quickstart(
        tmp_path / "teacher",
        tmp_path / "qs",
        "--num_samples",
        "12",
        "--max_new_tokens",
        "8",
        "--steps",
        str(steps),
        "--batch_size",
        "4",
        "--generation_batch_size",
        "6",
        *extra,
    )


def test_quickstart_tiny(tmp_path):
    make_llama(4, 64, seed=1).save_pretrained(tmp_path / "teacher")
    make_tokenizer().save_pretrained(tmp_path / "teacher")
    report = run_tiny_quickstart(tmp_path, steps=3)
    assert set(report["results"]) == {"kd_student", "ce_only_student", "teacher"}
    for name in ("kd_student", "ce_only_student"):
        assert report["results"][name]["tokens"] > 0 and report["results"][name]["kl"] > 0
    card = (tmp_path / "qs" / "student" / "README.md").read_text()
    assert "- hf-distill" in card and "- distillation" in card and "kd_student" in card
    assert "hf-distill quickstart --teacher " in card and "(fingerprint " in card  # the command; the teacher's hash
    assert "None" not in card.split("hf-distill quickstart --teacher ")[1].split("\n")[0]  # unset flags stay unset
    assert recipe_from_card(card)["steps"] == 3 and recipe_from_card(card)["num_samples"] == 12
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "qs" / "student").config.num_hidden_layers == 2
    # the CE-only baseline is saved too, with its own card carrying the same reproducing command
    ce_card = (tmp_path / "qs" / "ce_only_student" / "README.md").read_text()
    assert "CE-only student" in ce_card and "| `ce_weight` | 1.0 |" in ce_card and "| `kd_weight` | 0.0 |" in ce_card
    check_card(ce_card)
    assert "- **Training data:** a data-free transfer set sampled from the teacher" in ce_card
    assert f'from_pretrained("{tmp_path / "qs" / "ce_only_student"}")' in ce_card  # the usage snippet loads it
    assert recipe_from_card(ce_card) == recipe_from_card(card)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "qs" / "ce_only_student").config.num_hidden_layers == 2
    assert report["students"] == {"kd_student": str(tmp_path / "qs" / "student"),
                                  "ce_only_student": str(tmp_path / "qs" / "ce_only_student")}  # fmt: skip
    # learning curve: the final point is the reported result
    for name in ("kd_student", "ce_only_student"):
        assert report["curves"][name][-1]["kl"] == report["results"][name]["kl"]
        assert report["curves"][name][-1]["step"] == 3
    # the transfer set is cached: a second run reuses the files on disk instead of generating again
    cache = tmp_path / "qs" / "transfer_set"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    run_tiny_quickstart(tmp_path, steps=1)
    assert before and {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_quickstart_real_teacher_smoke(tmp_path):
    report = run_quickstart(
        "smollm2",
        tmp_path / "qs",
        "--num_samples",
        "16",
        "--max_new_tokens",
        "16",
        "--steps",
        "2",
        "--batch_size",
        "4",
    )
    assert report["results"]["teacher"]["perplexity"] < 100


def test_quickstart_config_is_the_shared_run_and_fields_override():
    import argparse

    from hf_distill.cli.quickstart import quickstart_config

    opts = argparse.Namespace(steps=80, batch_size=8, learning_rate=2e-4, max_length=128, seed=3)
    args = quickstart_config("out", opts, use_gpu=False, kd_weight=0.9, save_strategy="steps")
    assert (args.max_steps, args.per_device_train_batch_size, args.warmup_steps, args.logging_steps) == (80, 8, 4, 8)
    assert (args.lr_scheduler_type.value, args.seed, args.data_seed, args.use_cpu, args.bf16) == (
        "cosine",
        3,
        3,
        True,
        False,
    )
    assert (args.kd_weight, args.save_strategy.value, args.gradient_checkpointing) == (0.9, "steps", False)


def test_quickstart_learning_curve_every_n_steps(tmp_path):
    make_llama(4, 64, seed=1).save_pretrained(tmp_path / "teacher")
    make_tokenizer().save_pretrained(tmp_path / "teacher")
    report = run_tiny_quickstart(tmp_path, 4, "--eval_every", "2")
    for name in ("kd_student", "ce_only_student"):
        curve = report["curves"][name]
        assert [p["step"] for p in curve] == [2, 4]
        assert all(p["kl"] > 0 and p["tokens"] == report["results"][name]["tokens"] for p in curve)
    # the two students share the init and the first steps' batches, but not the loss: their curves differ
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra
        assert report["plot"] == str(tmp_path / "qs" / "kl_curve.png") and (tmp_path / "qs" / "kl_curve.png").exists()
    assert report["curves"]["kd_student"][0]["kl"] != report["curves"]["ce_only_student"][0]["kl"]
