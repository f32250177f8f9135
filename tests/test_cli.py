"""`hf-distill` CLI: help per subcommand, YAML recipes with flag overrides, end-to-end tiny training."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_llama, make_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_distill.cli.main import COMMANDS, main
from hf_distill.cli.train import make_parser
from hf_distill.config import DistillationArguments


ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as err:
        main(["distil-everything"])
    assert err.value.code == 2


def test_train_help_documents_every_distillation_field():
    out = subprocess.run(
        [sys.executable, "-m", "hf_distill.cli.main", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flags = [f"--{f.name}" for f in dataclasses.fields(DistillationArguments)] + ["--dataset_name"]
    missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", out)]
    assert not missing, f"`hf-distill train --help` does not document {missing}"
    assert len(flags) > 30


@pytest.mark.parametrize(
    "recipe",
    sorted((ROOT / "recipes").glob("[kc][de]/*.yaml")) + [ROOT / "recipes/quickstart.yaml"],
    ids=lambda p: p.name,
)
def test_recipes_parse(recipe):
    if not recipe.exists():
        pytest.skip(f"{recipe} not written")
    script_args, args, _ = make_parser().parse_args_and_config(["--config", str(recipe), "--output_dir", "/tmp/x"])
    assert script_args.dataset_name or "quickstart" in recipe.name
    assert args.kd_loss and args.output_dir == "/tmp/x"


@pytest.fixture
def tiny_files(tmp_path):
    tok = make_tokenizer()
    for name, model in {"teacher": make_llama(4, 64, seed=1), "student": make_llama(2, 32)}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = [{"text": t} for t in ["the cat sat on the mat", "a dog ran fast", "one plus two equals three"] * 4]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    chat = [{"question": "two plus two", "equation": "four"}, {"question": "is the cat big", "equation": "no"}] * 4
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    return tmp_path


TWO_STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no"]


def train_argv(output_dir: Path, *args: str) -> list[str]:
    """`hf-distill train ARGS` on CPU into `output_dir`, with reporting off."""
    return ["train", *args, "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "true"]


def chat_pair_args(tiny_files: Path) -> list[str]:
    """The tiny student and teacher of `tiny_files`, on its chat data."""
    return [
        "--model_name_or_path",
        str(tiny_files / "student"),
        "--teacher_model_name_or_path",
        str(tiny_files / "teacher"),
        "--dataset_name",
        str(tiny_files / "chat.jsonl"),
    ]


def test_train_from_yaml_with_overrides(tiny_files):
    recipe = {
        "model_name_or_path": str(tiny_files / "student"),
        "teacher_model_name_or_path": str(tiny_files / "teacher"),
        "dataset_name": str(tiny_files / "data.jsonl"),
        "kd_loss": "reverse_kl",
        "max_steps": 50,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "output_dir": str(tiny_files / "out"),
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
    }
    path = tiny_files / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    main(["train", "--config", str(path), "--max_steps", "2", "--kd_loss", "tvd"])  # flags override YAML
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_files / "out")
    assert reloaded.config.num_hidden_layers == 2
    assert set(load_file(tiny_files / "out" / "model.safetensors")) == set(reloaded.state_dict())
    state = (
        json.loads((tiny_files / "out" / "trainer_state.json").read_text())
        if (tiny_files / "out" / "trainer_state.json").exists()
        else None
    )
    assert state is None or state["global_step"] == 2


def test_train_chat_recipe_style(tiny_files):
    main(
        train_argv(
            tiny_files / "chat_out",
            *chat_pair_args(tiny_files),
            "--rename_columns",
            '{"question": "prompt", "equation": "completion"}',
            "--chat_format",
            "true",
            *TWO_STEPS,
        )
    )
    assert (tiny_files / "chat_out" / "model.safetensors").exists()


def test_train_bad_column_name(tiny_files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            train_argv(
                tiny_files / "x",
                *chat_pair_args(tiny_files),
                "--rename_columns",
                '{"nope": "prompt"}',
            )
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "hf-distill train: error: rename_columns names ['nope']" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "student_args",
    [
        ["--student_num_layers", "2"],
        ["--student_config", '{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}'],
    ],
    ids=["layers-from-teacher", "narrow-random"],
)
def test_train_builds_student_from_teacher(tiny_files, student_args):
    out = tiny_files / "built"
    main(
        train_argv(
            out,
            "--teacher_model_name_or_path",
            str(tiny_files / "teacher"),
            *student_args,
            "--dataset_name",
            str(tiny_files / "data.jsonl"),
            "--hint_layers",
            "uniform",
            *TWO_STEPS,
        )
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
    assert not (out / "hint_projectors.safetensors").exists()


def test_student_config_unknown_key(tiny_files):
    argv = train_argv(
        tiny_files / "x",
        "--teacher_model_name_or_path",
        str(tiny_files / "teacher"),
        "--student_config",
        '{"hidden_sise": 32}',
        "--dataset_name",
        str(tiny_files / "data.jsonl"),
    )
    with pytest.raises(ValueError, match="student_config sets 'hidden_sise'"):
        main([*argv, "--debug"])  # --debug: the exception itself, with its traceback
