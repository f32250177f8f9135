"""Bad inputs and faults a new user runs into (issue sweep): each gives one clear error or warning, never a silent
wrong result. The kill-and-resume cases live in benchmarks/fault_sweep.py."""

import json
import logging
import random

import pytest
import torch
from conftest import (
    WORDS,
    distill_sft_config,
    make_llama,
    make_lm_trainer,
    make_t5,
    make_tokenizer,
    tokenized_texts,
)
from safetensors.torch import load_file
from test_cli import train_argv
from test_trainer import TEXTS
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_distill.cli.main import main
from hf_distill.data.loading import load_any_dataset


# ----------------------------------------------------------------------------------------------- non-finite teacher
def poison(teacher):
    """Make the teacher's final norm output inf (hidden states inf, logits NaN): an fp16 overflow, in effect."""
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("inf"))
    return teacher


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_nonfinite_teacher_stops_the_run(tmp_path, tokenizer, fused):
    student = make_llama(2, 32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_lm_trainer(
        tmp_path, tokenizer, TEXTS, student=student, teacher=poison(make_llama(4, 64, seed=1)), use_fused_kd_loss=fused
    )
    with pytest.raises(FloatingPointError, match=r"Non-finite teacher outputs at optimizer step 1 .*NaN or inf"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_nonfinite_teacher_names_fp16_overflow():
    from hf_distill.sanity import nonfinite_teacher_problem

    teacher = make_llama(2, 32).half()
    outputs = type("Out", (), {"logits": torch.tensor([[1.0, float("inf")]], dtype=torch.float16)})()
    problem = nonfinite_teacher_problem(outputs, teacher)
    assert "1 of 2 values" in problem and "float16 overflows" in problem and "bfloat16" in problem
    assert nonfinite_teacher_problem(type("Out", (), {"logits": torch.ones(2, 3)})(), teacher) is None


class _PoisonAfter(TrainerCallback):
    def __init__(self, teacher, step):
        self.teacher, self.step = teacher, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            poison(self.teacher)


def test_nonfinite_teacher_leaves_the_last_checkpoint_untouched(tmp_path, tokenizer):
    teacher = make_llama(4, 64, seed=1)
    trainer = make_lm_trainer(
        tmp_path, tokenizer, TEXTS, teacher=teacher, max_steps=3, save_strategy="steps", save_steps=1
    )
    trainer.add_callback(_PoisonAfter(teacher, step=1))
    with pytest.raises(FloatingPointError, match="optimizer step 2"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoint-1" / "model.safetensors").values())


def test_nonfinite_teacher_skip_drops_batches_with_a_count(tmp_path, tokenizer, caplog):
    student = make_llama(2, 32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_lm_trainer(
        tmp_path,
        tokenizer,
        TEXTS,
        student=student,
        teacher=poison(make_llama(4, 64, seed=1)),
        nonfinite_teacher="skip",
        per_device_train_batch_size=2,
    )
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainer"):
        trainer.train()
    assert "Skipped a micro-batch of 2 rows at optimizer step 2 (2 skipped so far" in caplog.text
    for key, value in trainer.model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(before[key], value), key  # no gradient from them


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_nonfinite_loss_stops_before_the_backward(tmp_path, tokenizer, fused):
    """A student whose outputs overflow (one inf weight in the output layer: logits inf/NaN, the KL NaN) with a finite
    teacher: the step stops naming the non-finite terms, before any weight moves."""
    student = make_llama(2, 32)
    with torch.no_grad():
        student.lm_head.weight[3, 0] = float("inf")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_lm_trainer(
        tmp_path, tokenizer, TEXTS, student=student, teacher=make_llama(4, 64, seed=1), use_fused_kd_loss=fused
    )
    with pytest.raises(FloatingPointError, match=r"Non-finite loss terms: .*kd=nan.* before the backward pass"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "model.safetensors").exists()


def test_nonfinite_gradient_norm_stops_before_the_optimizer_step(tmp_path, tokenizer):
    """Logits of 1e29 keep the loss finite, but the gradient norm is inf: clipping by it would zero or NaN the
    update. The run stops before the optimizer step."""
    student = make_llama(2, 32)
    with torch.no_grad():
        student.lm_head.weight.mul_(1e30)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_lm_trainer(tmp_path, tokenizer, TEXTS, student=student, teacher=make_llama(4, 64, seed=1))
    with pytest.raises(FloatingPointError, match=r"The gradient norm is (inf|nan) at optimizer step 1 although"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_nonfinite_loss_names_corrupted_student_weights():
    from hf_distill.sanity import nonfinite_loss_problem

    student = make_llama(2, 32)
    sums = {"kd": torch.tensor(float("nan")), "ce": torch.tensor(2.5)}
    problem = nonfinite_loss_problem(sums, {"kd": 1.0, "ce": 0.5}, student)
    assert "kd=nan (weight 1.0)" in problem and "ce=2.5" in problem and "already hold NaN" not in problem
    with torch.no_grad():
        student.model.norm.weight[0] = float("nan")
    assert "1 student parameters already hold NaN/inf (e.g. `model.norm.weight`)" in nonfinite_loss_problem(
        sums, {"kd": 1.0, "ce": 0.5}, student
    )
    assert nonfinite_loss_problem({"kd": torch.tensor(0.3)}, {"kd": 1.0}, student) is None


def test_kl_keeps_nan_inputs_nan():
    from hf_distill.losses import logit_divergence

    student, teacher = torch.randn(3, 8), torch.randn(3, 8)
    teacher[1, 2] = float("nan")
    values = logit_divergence(student, teacher, loss_type="forward_kl")
    assert torch.isnan(values[1]) and torch.isfinite(values[[0, 2]]).all()
    assert torch.isfinite(logit_divergence(student, teacher.masked_fill(teacher.isnan(), -1e9))).all()


# ----------------------------------------------------------------------------------------------- tokenizers
def shuffled_tokenizer():
    """Same size and special tokens as `make_tokenizer()`, another token -> id map ('the' is not id 6)."""
    words = list(WORDS)
    random.Random(0).shuffle(words)
    return make_tokenizer(words=words)


def test_teacher_object_with_its_own_tokenizer_folder_is_checked(tmp_path, tokenizer):
    shuffled_tokenizer().save_pretrained(tmp_path / "teacher")
    make_llama(4, 64, seed=1).save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")  # a model object; no teacher_processing_class
    with pytest.raises(ValueError, match="Teacher and student tokenizers differ"):
        make_lm_trainer(tmp_path, tokenizer, TEXTS, teacher=teacher)


def test_teacher_object_without_tokenizer_warns_it_could_not_be_verified(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_distill.models.checks"):
        make_lm_trainer(tmp_path, tokenizer, TEXTS, teacher=make_llama(4, 64, seed=1))
    assert "could not be checked" in caplog.text and "teacher_processing_class=" in caplog.text
    other_eos = make_llama(4, 64, seed=1)
    other_eos.config.eos_token_id = 9
    with pytest.raises(ValueError, match=r"eos_token_id 9 \(teacher config\) vs 3 \(student tokenizer\)"):
        make_lm_trainer(tmp_path, tokenizer, TEXTS, teacher=other_eos)


def test_teacher_object_with_teacher_processing_class_is_checked(tmp_path, tokenizer):
    from conftest import DataCollatorForLanguageModeling, distill_config

    from hf_distill import DistillationTrainer

    with pytest.raises(ValueError, match="Teacher and student tokenizers differ"):
        DistillationTrainer(
            model=make_llama(2, 32),
            teacher_model=make_llama(4, 64, seed=1),
            teacher_processing_class=shuffled_tokenizer(),
            args=distill_config(tmp_path),
            train_dataset=tokenized_texts(tokenizer, TEXTS),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            processing_class=tokenizer,
        )


# ----------------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"empty \(0 bytes\)"),
        ("\n\n  \n", r"empty \(only whitespace\)"),
        (
            '{"text": "a"}\n' * 4 + '{"text": "b"\n' + '{"text": "c"}\n',
            r"line 5: not valid JSON .*'\{\"text\": \"b\"'",
        ),
        ('{"text": "a"}\n[1, 2]\n', r"line 2: a JSON list, not an object"),
    ],
    ids=["empty", "blank", "malformed-line-5", "not-an-object"],
)
def test_broken_jsonl_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_any_dataset(str(path))
    assert str(path) in str(info.value) and info.value.__cause__ is None  # one message, no chained traceback


def train_cli_error(tmp_path, capsys, teacher_folder, data: str | None = None, **models) -> str:
    """`hf-distill train` in-process on a tiny student (and the `models` saved beside it) with the teacher folder
    `teacher_folder`; expects the CLI's exit 1 and returns what it printed on stderr."""
    tok = make_tokenizer()
    for name, model in {"student": make_llama(2, 32), **models}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = "\n".join(json.dumps({"text": t}) for t in TEXTS)
    (tmp_path / "data.jsonl").write_text(rows if data is None else data)
    argv = [
        "--model_name_or_path",
        str(tmp_path / "student"),
        "--teacher_model_name_or_path",
        str(tmp_path / teacher_folder),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tmp_path / "out", *argv, "--dataset_name", str(tmp_path / "data.jsonl")))
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def test_broken_jsonl_through_the_cli_is_one_line(tmp_path, capsys):
    data = '{"text": "the cat"}\n{"text": oops}\n'
    err = train_cli_error(tmp_path, capsys, "teacher", data=data, teacher=make_llama(4, 64, seed=1))
    assert "Traceback" not in err
    assert f"{tmp_path / 'data.jsonl'}, line 2: not valid JSON" in err and "--debug" in err


def test_t5_teacher_folder_with_a_causal_student_on_the_cli(tmp_path, capsys):
    err = train_cli_error(tmp_path, capsys, "t5", t5=make_t5())
    assert "holds a t5 model (T5Config" in err and "AutoModelForCausalLM cannot load" in err
    assert "Traceback" not in err and "Unrecognized configuration class" not in err


def test_missing_teacher_folder_on_the_cli(tmp_path, capsys):
    err = train_cli_error(tmp_path, capsys, "no")
    assert f"--teacher_model_name_or_path not found: {tmp_path / 'no'} (a local path" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- config
def test_teacher_weights_with_one_teacher_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"`teacher_weights` \(\[1.0\]\) weighs several teachers, but 1 teacher"):
        make_lm_trainer(tmp_path, tokenizer, TEXTS, teacher_weights=[1.0])


def test_rows_longer_than_max_position_embeddings_warn_once(tmp_path, tokenizer, caplog):
    long_text = " ".join(["the cat sat on the mat"] * 30)  # 180 tokens; the tiny Llamas have 128 positions
    with caplog.at_level(logging.WARNING, logger="hf_distill.sanity"):
        make_lm_trainer(tmp_path, tokenizer, [long_text] * 4, max_steps=2).train()
    assert caplog.text.count("more than the student's max_position_embeddings (128)") == 1
    assert "sequences of 180 positions" in caplog.text and "Set `max_length` (<= 128)" in caplog.text


def test_cli_config_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hf_distill.cli.main", "train", "--output_dir", str(tmp_path), "--temperature", "-1"]
    plain = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert "`temperature` must be > 0, got -1.0" in plain.stderr and "--help" in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "`temperature` must be > 0" in debug.stderr


def test_teacher_object_loaded_from_the_tokenizers_folder_is_not_warned_about(tmp_path, tokenizer, caplog):
    tokenizer.save_pretrained(tmp_path / "teacher")
    make_llama(4, 64, seed=1).save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    own = type(tokenizer).from_pretrained(tmp_path / "teacher")  # name_or_path = the teacher's folder
    with caplog.at_level(logging.WARNING, logger="hf_distill.models.checks"):
        make_lm_trainer(tmp_path, own, TEXTS, teacher=teacher)
    assert "could not be checked" not in caplog.text


# ------------------------------------------------------------------------------- numbers that are not numbers
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ab_alpha", float("inf"), r"`ab_alpha` must be a finite number, got inf"),
        ("temperature", float("inf"), r"`temperature` must be a finite number, got inf"),
        ("ce_weight", float("inf"), r"`ce_weight` must be a finite number, got inf"),
        ("kd_weight", float("nan"), r"`kd_weight` must be a finite number, got nan"),
        ("ab_alpha", 1e6, r"`ab_alpha` must be in \[0, 5.0\]"),
        ("temperature", [1, 2], r"`temperature` must be a number, got \[1, 2\] \(list\)"),
        ("learning_rate", float("nan"), r"`learning_rate` must be a finite number, got nan"),
        ("student_quantization_group_size", 7, r"`student_quantization_group_size` \(7\) only applies to a quantized"),
        ("max_steps", 0, r"Nothing would be trained: max_steps=0"),
    ],
)
def test_numeric_settings_are_checked(tmp_path, field, value, message):
    """Values that pass `<`/`>` range checks (NaN, inf), values of the wrong type (a YAML list), extremes that make
    the loss vanish and settings that would be ignored are refused, naming the field."""
    from hf_distill import DistillationConfig

    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


# ------------------------------------------------------------------------------------------------ empty data
def test_rows_all_cut_by_max_length_are_refused_with_counts(tmp_path, tokenizer):
    from datasets import Dataset

    from hf_distill import DistillationSFTTrainer

    rows = {"prompt": [" ".join(WORDS[:12])] * 3, "completion": ["cat"] * 3}
    args = distill_sft_config(tmp_path, max_length=8, max_steps=1)
    with pytest.raises(ValueError, match=r"all 3 rows were dropped .* max_length=8: the prompts fill it"):
        DistillationSFTTrainer(
            model=make_llama(2, 32), teacher_model=make_llama(4, 64, seed=1), args=args,
            train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
        )  # fmt: skip


def test_some_rows_cut_by_max_length_are_counted(tmp_path, tokenizer, caplog):
    from datasets import Dataset

    from hf_distill import DistillationSFTTrainer

    rows = {"prompt": [" ".join(WORDS[:12]), "the"], "completion": ["cat", "cat"]}
    args = distill_sft_config(tmp_path, max_length=8, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="hf_distill.sanity"):
        DistillationSFTTrainer(
            model=make_llama(2, 32), teacher_model=make_llama(4, 64, seed=1), args=args,
            train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
        )  # fmt: skip
    assert "1 of 2 train rows were dropped" in caplog.text


def test_empty_dataset_is_refused(tmp_path, tokenizer):
    from datasets import Dataset

    with pytest.raises(ValueError, match=r"The train dataset has no rows"):
        make_lm_trainer(tmp_path, tokenizer, Dataset.from_dict({"input_ids": []}))


# ------------------------------------------------------------------------------------------------ bf16 weights
def test_bf16_student_weights_are_warned_once(tmp_path, tokenizer, caplog):
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainer"):
        make_lm_trainer(tmp_path, tokenizer, TEXTS, student=make_llama(2, 32).to(torch.bfloat16))
    assert caplog.text.count("trainable student weights are bfloat16") == 1 and "set `bf16: true`" in caplog.text
    caplog.clear()
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainer"):
        make_lm_trainer(tmp_path, tokenizer, TEXTS, bf16=True)  # fp32 weights, bf16 compute: no warning
    assert "trainable student weights" not in caplog.text


# ------------------------------------------------------------------------------------------- ignored settings
def test_settings_without_effect_are_warned_once(tmp_path, caplog):
    from hf_distill import DistillationConfig
    from hf_distill.validation import ignored_settings

    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hf_distill.validation"):
        args = DistillationConfig(output_dir=str(tmp_path), report_to="none", beta=0.2, hint_weight=3.0)
    assert "`beta` (0.2) has no effect without kd_loss: jsd: it is ignored" in caplog.text
    assert "`hint_weight` (3.0) has no effect without hint_layers" in caplog.text
    defaults = {"beta": 0.5, "hint_weight": 1.0}
    assert len(ignored_settings(args, defaults)) == 2
    args.kd_loss, args.hint_layers = "jsd", {"1": 2}
    assert ignored_settings(args, defaults) == []


# ------------------------------------------------------------------------------------------- context distillation
@pytest.mark.parametrize("value", ["./prompts/system.txt", "/no/such/system.txt", "system_prompt.md", "~/p.txt"])
def test_missing_system_prompt_file_is_refused_not_read_as_text(tmp_path, value):
    """A `teacher_system_prompt` that can only be a path, and names no file, was used as the prompt's text itself."""
    from hf_distill import DistillationConfig

    with pytest.raises(FileNotFoundError, match=r"`teacher_system_prompt` file not found: .*Fix the path"):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", teacher_model_name_or_path="self",
                           teacher_system_prompt=value)  # fmt: skip


def test_system_prompt_text_and_existing_files_are_kept(tmp_path):
    from hf_distill import DistillationConfig

    (tmp_path / "system.txt").write_text("Answer in one word.")
    for value in ("Answer in one word.", "Concise.", str(tmp_path / "system.txt")):
        args = DistillationConfig(output_dir=str(tmp_path), report_to="none", teacher_model_name_or_path="self",
                                  teacher_system_prompt=value)  # fmt: skip
        assert args.teacher_system_prompt == value


def test_empty_json_list_file_is_named_empty(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"rows.json holds an empty JSON list: it has no rows") as info:
        load_any_dataset(str(path))
    assert info.value.__cause__ is None


# ------------------------------------------------------------------------------------------------ mixtures
@pytest.mark.parametrize(
    "fraction, message",
    [
        ("half", r"datasets\[0\]: `fraction` must be a finite number >= 0 .*got 'half' \(str\)"),
        (float("nan"), r"datasets\[0\]: `fraction` must be a finite number >= 0 .*got nan\."),
        (-0.5, r"datasets\[0\]: `fraction` must be a finite number >= 0 .*got -0.5\."),
    ],
)
def test_mixture_fractions_are_checked_when_parsed(fraction, message):
    """A string or NaN share used to fail inside the size computation (`'<' not supported`, `min() arg is an empty
    sequence`), naming no dataset."""
    from hf_distill.data.mixture import DatasetMixtureArguments

    with pytest.raises(ValueError, match=message):
        DatasetMixtureArguments(
            datasets=[{"path": "a.jsonl", "fraction": fraction}, {"path": "b.jsonl", "fraction": 1}]
        )


# ------------------------------------------------------------------------------------------------ draft evaluate
def test_draft_whose_tokenizer_is_longer_than_its_embedding_is_refused(tokenizer):
    """A draft with 40 embedding rows read through a 55-token tokenizer got transformers' 'The main and assistant
    models have different tokenizers', although both tokenizers are the same."""
    from hf_distill.draft import evaluate_draft

    target, draft = make_llama(2, 32), make_llama(1, 32, vocab_size=40, seed=5)
    refused = r"draft's tokenizer .* 55 tokens but the draft's output embedding has only 40 rows.*`--draft_tokenizer`"
    with pytest.raises(ValueError, match=refused):
        evaluate_draft(target, draft, tokenizer, ["the cat"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"target's tokenizer .* 55 tokens but the target's .* only 40 rows"):
        evaluate_draft(draft, target, tokenizer, ["the cat"], max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ cache-teacher
def test_cache_teacher_with_k_0_is_refused(tmp_path, tokenizer):
    """`cache_teacher(k=0)` was accepted (a cache of top-0 log-probs)."""
    from hf_distill.cache import cache_teacher

    rows = tokenized_texts(tokenizer, TEXTS[:2])
    with pytest.raises(ValueError, match=r"`k` must be an integer >= 1 .* got 0"):
        cache_teacher(make_llama(4, 64, seed=1), rows, tokenizer, tmp_path / "cache", k=0)
    assert not (tmp_path / "cache" / "cache_info.json").exists()


def test_cache_teacher_cli_k_0_is_refused_not_replaced_by_the_default(tmp_path, tokenizer, capsys):
    """`--k 0` was read as "not given" (`args.k or 64`) and a 64-entry cache was written."""
    make_llama(4, 64, seed=1).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:2]))
    argv = ["cache-teacher", "--teacher", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output_dir", str(tmp_path / "cache"), "--use_cpu", "true", "--k", "0"])
    assert exit_info.value.code == 1 and "`k` must be an integer >= 1" in capsys.readouterr().err
