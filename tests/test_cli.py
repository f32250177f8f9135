"""`hf-distill` CLI: help per subcommand, YAML recipes with flag overrides, end-to-end tiny training."""

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import launcher_env, make_llama, make_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_distill
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
    state = json.loads((tiny_files / "out" / "trainer_state.json").read_text())  # written by `train` after training
    assert state["global_step"] == 2  # the flag's 2 steps, not the YAML's 50


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


SUBCOMMANDS = [
    ["train"],
    ["quickstart"],
    ["rationales", "generate"],
    ["rationales", "train"],
    ["rationales", "evaluate"],
    ["miniplm", "score"],
    ["miniplm", "select"],
    ["cache-teacher"],
    ["chain"],
    ["export"],
    ["draft", "evaluate"],
]


def help_sections(text: str) -> dict[str, str]:
    """`--help` output split at its argument-group titles (`title:` lines): title -> the lines below it."""
    sections, title = {}, ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = ""
        elif title:
            sections[title] += line + "\n"
    return sections


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_lists_config_and_debug(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    common = help_sections(out)["hf-distill options"]
    assert "--config PATH" in common and "--debug" in common and "traceback" in common
    assert out.startswith(f"usage: hf-distill {' '.join(command)} [-h] [--config PATH] [--debug]")


def test_subcommand_list_covers_every_command():
    assert {command[0] for command in SUBCOMMANDS} == set(COMMANDS)


def test_help_groups_fields_by_dataclass(capsys):
    """As TRL's parser does with `_argument_group_name`: one titled group per dataclass that declares fields."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    sections = help_sections(capsys.readouterr().out)
    assert "--dataset_name" in sections["dataset"] and "--kd_loss" not in sections["dataset"]
    assert "--kd_loss" in sections["DistillationArguments"] and "--task" in sections["train: data and student"]
    assert "--learning_rate" in sections["SFTConfig"] and "--model_name_or_path" in sections["ModelConfig"]
    assert "--teacher_api_base" not in sections["dataset"]
    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    sections = help_sections(capsys.readouterr().out)
    api = sections["API teacher (OpenAI-compatible endpoint)"]
    assert "--teacher_api_base" in api and "--num_generations" in api  # both API dataclasses, one group
    assert "This command reads dataset_name" in sections["dataset"]


def test_version(capsys):
    from hf_distill.version import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"hf-distill {__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "hf_distill.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in done.stdout


def all_parsers() -> dict[str, object]:
    from hf_distill.cli import cache_teacher, chain, draft, export, miniplm, quickstart, rationales, train

    return {
        "train": train.make_parser(),
        "quickstart": quickstart.make_parser(),
        "rationales generate": rationales.make_parser(command="generate"),
        "rationales train": rationales.make_parser(command="train"),
        "rationales evaluate": rationales.make_parser(command="evaluate"),
        "miniplm score": miniplm.make_parser(command="score"),
        "miniplm select": miniplm.make_parser(command="select"),
        "cache-teacher": cache_teacher.make_parser(),
        "chain": chain.make_parser(),
        "export": export.make_parser(),
        "draft evaluate": draft.make_parser(),
    }


@pytest.mark.parametrize("name", [" ".join(c) for c in SUBCOMMANDS])
def test_abbreviated_flags_are_refused_everywhere(name):
    parser = all_parsers()[name]
    assert parser.allow_abbrev is False
    flag = max((o for a in parser._actions for o in a.option_strings if o.startswith("--")), key=len)
    for action in parser._actions:  # this test only asks how a flag is read, not for the required ones
        action.required = False
    _, rest = parser.parse_known_args([flag[:-1], "1"])
    assert flag[:-1] in rest  # not taken for `flag`


def test_abbreviated_flag_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="--kd_los"):
        make_parser().parse_args_and_config(["--kd_los", "tvd"])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--kd_los", "tvd", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1 and "--kd_los" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--kd_los", "tvd"],
        ["--temperature", "-1"],
        ["--dataset_name", "data.jsonl"],  # no student named
        ["--dataset_name", "missing.jsonl", "--model_name_or_path", "student"],
        ["--prompt_column", "y", "--dataset_name", "data.jsonl"],
    ],
    ids=["no-args", "abbreviation", "bad-value", "no-student", "missing-data", "rejected-field"],
)
def test_failed_train_writes_nothing(argv, tmp_path, monkeypatch, tiny_files):
    """No output folder (not even `trainer_output/recipe.yaml`) before the arguments parse and the run starts."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "data.jsonl").write_text((tiny_files / "data.jsonl").read_text())
    (work / "student").symlink_to(tiny_files / "student")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 1
    assert sorted(p.name for p in work.iterdir()) == ["data.jsonl", "student"]


def test_dataset_fields_are_declared_once_and_refused_where_unused():
    from hf_distill.cli.arguments import DatasetArguments
    from hf_distill.cli.cache_teacher import make_parser as cache_parser

    declared = {name: [] for name in DatasetArguments.__dataclass_fields__}
    for parser in all_parsers().values():
        for dtype in parser.dataclass_types:
            for klass in dtype.__mro__:
                for name in inspect.get_annotations(klass):
                    if name in declared and klass is not DatasetArguments:
                        declared[name].append(klass.__name__)
    assert not any(declared.values()), declared  # no command re-declares a dataset field
    parser = cache_parser()
    base = ["--teacher", "t", "--output_dir", "o"]
    args, _ = parser.parse_args_and_config([*base, "--dataset", "d.jsonl", "--split", "validation"])
    assert (args.dataset_name, args.dataset_train_split, args.dataset) == ("d.jsonl", "validation", "d.jsonl")
    with pytest.raises(ValueError, match="`label_column`: not read by this command"):
        parser.parse_args_and_config([*base, "--dataset", "d.jsonl", "--label_column", "y"])
    with pytest.raises(ValueError, match="Name the dataset"):
        parser.parse_args_and_config(base)


def test_training_arguments_debug_field_comes_from_the_yaml(tmp_path):
    """`--debug` on the command line is hf-distill's; `TrainingArguments.debug` is still a recipe key."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"debug": "underflow_overflow", "output_dir": str(tmp_path)}))
    _, args, _ = make_parser().parse_args_and_config(["--config", str(recipe)])
    assert [str(option.value) for option in args.debug] == ["underflow_overflow"]
    _, args, _ = make_parser().parse_args_and_config(["--output_dir", str(tmp_path), "--debug"])
    assert args.debug == []


def test_constants_written_for_a_light_help_match_the_library():
    from hf_distill.cli.export import QUANTS
    from hf_distill.cli.train import TASK_NAMES
    from hf_distill.data.tasks import TASKS
    from hf_distill.export import GGUF_QUANTS

    assert list(TASK_NAMES) == list(TASKS) and QUANTS == GGUF_QUANTS


def test_final_evaluation_runs_once(tiny_files, monkeypatch, capsys):
    """`eval_strategy: steps`: the Trainer evaluates at step 2 and at the last step (3); `train` adds none."""
    from transformers import Trainer

    calls = []
    evaluate = Trainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", counted)
    out = tiny_files / "evaluated"
    argv = ["--dataset_test_split", "train", "--eval_strategy", "steps", "--eval_steps", "2"]
    pair = ["--model_name_or_path", str(tiny_files / "student"), "--teacher_model_name_or_path"]
    pair += [str(tiny_files / "teacher"), "--dataset_name", str(tiny_files / "data.jsonl")]
    main(train_argv(out, *pair, *argv, *TWO_STEPS[2:], "--max_steps", "3"))
    assert calls == [2, 3]
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2, 3]
    printed = capsys.readouterr().out
    assert f"'eval_loss': {state['log_history'][-2]['eval_loss']}" in printed  # the last evaluation, reported


HEAVY = ("hf_distill.trainer", "transformers.trainer", "datasets", "peft", "torchao")
PROBE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr))
sys.argv = ["hf-distill", *{argv}]
from hf_distill.cli.main import main
main()
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=" ".join)
def test_help_imports_no_trainer_stack(argv):
    """What `hf-distill --help` / `hf-distill train --help` import (a test of imports, not of wall time)."""
    heavy = HEAVY + (("torch", "transformers") if argv == ["--help"] else ())
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=heavy, argv=argv)], capture_output=True, text=True, check=True
    )
    assert "--debug" in done.stdout or "hf-distill" in done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr


def test_package_imports_lazily():
    code = (
        "import sys, hf_distill; assert hf_distill.__version__; assert 'torch' not in sys.modules; "
        "from hf_distill import DistillationTrainer, RationaleCollator; import hf_distill.trainer as t; "
        "assert DistillationTrainer is t.DistillationTrainer and 'DistillationConfig' in dir(hf_distill)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hf_distill.Nope  # noqa: B018


def test_train_stderr_has_no_known_noise(tiny_files):
    """A `hf-distill train` process imports torchao (through transformers' quantizers) and builds TRL's config: none
    of the messages `hf_distill.cli.logs` silences reach its stderr."""
    pytest.importorskip("torchao")
    pair = ["--model_name_or_path", str(tiny_files / "student"), "--teacher_model_name_or_path"]
    pair += [str(tiny_files / "teacher"), "--dataset_name", str(tiny_files / "data.jsonl")]
    probe = "import sys; from hf_distill.cli.main import main; main(); print('torchao' in sys.modules)"
    argv = train_argv(tiny_files / "quiet", *pair, *TWO_STEPS)
    done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "True"  # the noisy package was imported ...
    for noise in ("Failed to load", "register_constant", "Detected no triton", "gradient_checkpointing"):
        assert noise not in done.stderr  # ... and kept quiet


# ----------------------------------------------------------------------------------------------- user errors
def cli_error(argv: list[str], capsys) -> str:
    """Run `hf-distill ARGV` in-process, expect exit 1 and no traceback; return stderr from the error line on."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"hf-distill {argv[0]}: error: " in err
    return err[err.index(f"hf-distill {argv[0]}: error: ") :]


def _dead_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_api_teacher_error_is_one_line_and_debug_keeps_the_traceback(tmp_path, capsys):
    pytest.importorskip("openai")
    from hf_distill.generation.api import APITeacherError

    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "one plus two", "answer": 3}) + "\n")
    url = _dead_url()
    argv = ["rationales", "generate", "--dataset", str(tmp_path / "rows.jsonl"), "--template", "svamp"]
    argv += ["--teacher_api_base", url, "--teacher_api_model", "m", "--teacher_api_max_retries", "0"]
    argv += ["--output_dir", str(tmp_path / "out")]
    err = cli_error(argv, capsys)
    assert f"{url}/chat/completions could not be reached" in err.splitlines()[0]
    with pytest.raises(APITeacherError):
        main([*argv, "--debug"])


def test_vllm_client_error_is_one_line(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    make_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "the cat sat"}) + "\n")
    url = _dead_url()
    argv = ["cache-teacher", "--dataset", str(tmp_path / "rows.jsonl"), "--tokenizer", str(tmp_path / "tok")]
    argv += ["--teacher_api_base", url, "--teacher_api_max_retries", "0", "--output_dir", str(tmp_path / "out")]
    err = cli_error(argv, capsys)
    assert f"GET {url.removesuffix('/v1')}/v1/models failed 1 times" in err.splitlines()[0]


def test_a_yaml_error_from_anywhere_is_one_line():
    """A PyYAML error that escapes `read_yaml` (e.g. a model card's recipe block) is still a user error, in one
    line naming the line; an unexpected error stays a bug (traceback)."""
    from hf_distill.cli.main import error_message, is_user_error

    with pytest.raises(yaml.YAMLError) as info:
        yaml.safe_load("a: b\n  c: d\n")
    message = error_message(info.value)
    assert is_user_error(info.value) and "line 2, column" in message and "\n" not in message
    assert not is_user_error(RuntimeError("a bug")) and not is_user_error(KeyError("a bug"))


BROKEN_YAML = "output_dir: out\nkd_loss: forward_kl\n  temperature: 2\n"  # line 3: an indented key under a scalar


@pytest.mark.parametrize("command", ["train", "chain", "export"])
def test_yaml_syntax_error_names_the_file_and_line(command, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BROKEN_YAML)
    err = cli_error([command, "--config", str(recipe)], capsys)
    first = err.splitlines()[0]
    assert f"{recipe}, line 3" in first and "not valid YAML" in first


def test_an_unquoted_no_for_a_word_field_names_the_field_and_the_quoted_form(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nsave_strategy: no\nresume_from_checkpoint: false\n")
    first = cli_error(["train", "--config", str(recipe)], capsys).splitlines()[0]
    assert f"{recipe}: `save_strategy` was read as the boolean false" in first and '`save_strategy: "no"`' in first
    assert "resume_from_checkpoint" not in first  # a str field that gives booleans a meaning is left alone


def _missing_path_cases(files: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (`hf-distill` argv naming one missing local path, the argument the error must name)."""
    student, teacher = ["--model_name_or_path", str(files / "student")], ["--teacher_model_name_or_path"]
    teacher.append(str(files / "teacher"))
    data, out = ["--dataset_name", str(files / "data.jsonl")], ["--output_dir", str(files / "out")]
    train = ["train", *data, *out]
    cases = {
        "student": ([*train, *teacher, "--model_name_or_path", "./no_student"], "--model_name_or_path"),
        "student-under-a-folder": ([*train, *teacher, "--model_name_or_path", "work/no"], "--model_name_or_path"),
        "teacher": ([*train, *student, "--teacher_model_name_or_path", "./no"], "--teacher_model_name_or_path"),
        "teacher-tokenizer": (
            [*train, *student, *teacher, "--cross_tokenizer_loss", "uld", "--teacher_tokenizer_name_or_path", "./no"],
            "--teacher_tokenizer_name_or_path",
        ),
        "tokenizer": ([*train, *student, *teacher, "--tokenizer_name_or_path", "../no"], "--tokenizer_name_or_path"),
        "dataset": (["train", *out, *student, *teacher, "--dataset_name", "no_data.jsonl"], "--dataset_name"),
        "eval-dataset": ([*train, *student, *teacher, "--eval_dataset_name", "work/no"], "--eval_dataset_name"),
        "export": (["export", "--model", "./no_student", "--output", "m.gguf"], "--model"),
        "cache-teacher": (["cache-teacher", "--teacher", "~/no_teacher", *data, *out], "--teacher"),
        "cache-teacher-data": (["cache-teacher", "--teacher", "t", "--dataset", "no.csv", *out], "--dataset_name"),
        "miniplm": (
            ["miniplm", "score", "--teacher", str(files / "teacher"), "--reference", "./no_ref", *data, *out],
            "--reference",
        ),
        "rationales": (["rationales", "evaluate", "--model", "./no_student", *data], "--model"),
    }
    return cases


@pytest.mark.parametrize("case", list(_missing_path_cases(Path("."))))
def test_a_missing_local_path_is_named_with_its_argument(case, tiny_files, monkeypatch, capsys):
    """Before anything loads: `--<argument> not found: <path>`, not `Repo id must be in the form ...` or a Hub
    lookup of a local data file."""
    monkeypatch.chdir(tiny_files)
    (tiny_files / "work").mkdir()
    argv, argument = _missing_path_cases(tiny_files)[case]
    err = cli_error(argv, capsys)
    first = err.splitlines()[0]
    assert f"error: {argument} not found: " in first and "Repo id" not in err and "Hub" in first
    assert not (tiny_files / "out").exists()


def test_a_served_model_name_is_not_taken_for_a_missing_path(tmp_path, capsys):
    """With --teacher_api_base, `--teacher` is the served model's name, which vLLM takes from the path it was started
    with (`vllm serve /models/teacher`): not a path to check here."""
    pytest.importorskip("openai")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "one plus two", "answer": 3}) + "\n")
    url = _dead_url()
    argv = ["rationales", "generate", "--dataset", str(tmp_path / "rows.jsonl"), "--template", "svamp"]
    argv += ["--teacher_api_base", url, "--teacher", "/models/teacher", "--teacher_api_max_retries", "0"]
    err = cli_error([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert "could not be reached" in err.splitlines()[0] and "not found" not in err


HELP_PROBE = """
import sys
sys.argv = ["hf-distill", *sys.argv[1:]]
from hf_distill.cli.main import main
try:
    main()
finally:
    print("TORCH_LOADED" if "torch" in sys.modules else "TORCH_NOT_LOADED", file=sys.stderr)
"""


def test_a_commands_help_is_cached_and_then_printed_without_heavy_imports(tmp_path):
    """The console script's first `train --help` builds the text (torch + transformers) and stores it; the second
    prints the same text importing neither. Another width or command is another entry; `HF_DISTILL_HELP_CACHE=0`
    turns the cache off."""
    from hf_distill.cli import help_cache
    from hf_distill.cli.main import HELP_FLAGS

    env = {**launcher_env(), "HF_DISTILL_HELP_CACHE": str(tmp_path / "help"), "COLUMNS": "100"}

    def probe(*argv, **extra):
        return subprocess.run([sys.executable, "-c", HELP_PROBE, *argv], env={**env, **extra}, capture_output=True,
                              text=True, check=True)  # fmt: skip

    first, second = probe("train", "--help"), probe("train", "-h")
    assert first.stdout.startswith("usage: hf-distill train") and "--kd_loss" in first.stdout
    assert "TORCH_LOADED" in first.stderr and "TORCH_NOT_LOADED" in second.stderr
    assert second.stdout == first.stdout and len(list((tmp_path / "help").iterdir())) == 1
    narrow = probe("train", "--help", COLUMNS="60")
    assert "TORCH_LOADED" in narrow.stderr and narrow.stdout != first.stdout
    assert "TORCH_LOADED" in probe("train", "--help", HF_DISTILL_HELP_CACHE="0").stderr
    assert not help_cache.is_help_request(["train", "--config", "x.yaml", "--help"], HELP_FLAGS)
    assert help_cache.is_help_request(["miniplm", "score", "-h"], HELP_FLAGS)
    assert help_cache.help_key(["miniplm", "score"]) != help_cache.help_key(["miniplm", "select"])
