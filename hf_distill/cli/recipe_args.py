"""`--config` for every subcommand that takes one: a local YAML file or a Hub reference (see `hf_distill.recipes`).

`parse_args_and_recipe(parser, argv, prog)` replaces `TrlParser.parse_args_and_config(argv)`: it resolves the
`--config` value (a local path wins; else `huggingface_hub.hf_hub_download`, offline mode and cache included), prints
the commit a Hub reference resolved to, parses as TRL does (YAML keys are fields, flags override them) and returns the
run's `Recipe`: the YAML mapping with the flags given on the command line folded in, and the command that reproduces
the run (the reference pinned to its commit).
"""

import argparse
import dataclasses
import json
from typing import Any

import yaml

from ..paths import check_local_path
from ..recipes import Recipe, command_line, resolve_recipe


# Every field of any command that names a model, a tokenizer or a dataset (a Hub id or a local path) -> which
PATH_FIELDS = {
    "model_name_or_path": "model",
    "teacher_model_name_or_path": "model",
    "teacher": "model",
    "reference": "model",
    "model": "model",
    "tokenizer_name_or_path": "tokenizer",
    "teacher_tokenizer_name_or_path": "tokenizer",
    "tokenizer": "tokenizer",
    "teacher_tokenizer": "tokenizer",
    "reference_tokenizer": "tokenizer",
    "dataset_name": "dataset",
    "eval_dataset_name": "dataset",
}


def check_path_arguments(parsed: tuple, skip: tuple[str, ...] = ()) -> None:
    """`check_local_path` on every `PATH_FIELDS` field of a command's parsed dataclasses, before anything is loaded:
    a missing local path is reported as `--<field> not found: <path>`, not as an invalid Hub id.

    Args:
        parsed (`tuple`): the dataclasses `parse_args_and_config` returned.
        skip (`tuple[str, ...]`): values not to check (a chain stage's teacher: an earlier stage's folder, written
            before this stage runs).

    `teacher` is not checked when a served teacher is asked for (`teacher_api_base`): it is the served model's name.
    """
    served = any(getattr(obj, "teacher_api_base", None) for obj in parsed)
    for obj in parsed:
        names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        for name in sorted(names & PATH_FIELDS.keys()):
            if served and name == "teacher":
                continue
            value = getattr(obj, name)
            for item in value if isinstance(value, list | tuple) else [value]:
                if isinstance(item, str) and item not in skip:
                    check_local_path(item, f"--{name}", data_file=PATH_FIELDS[name] == "dataset")


def read_yaml(path: str) -> Any:
    """The YAML file `path` parsed with `yaml.safe_load` (None when empty).

    Raises:
        `ValueError`: the file is not valid YAML; one line naming the file, the line and column, and PyYAML's problem.
    """
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(yaml_error_message(path, err)) from None


def yaml_error_message(path: str | None, err: Exception) -> str:
    """One line for a PyYAML error: `<file>, line L, column C: not valid YAML (<problem>)` and how to fix it."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = path or getattr(mark, "name", None) or "the YAML file"
    if mark is not None:
        where += f", line {mark.line + 1}, column {mark.column + 1}"
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    context = getattr(err, "context", None)
    detail = f"{context}: {problem}" if context else problem
    return (
        f"{where}: not valid YAML ({detail}). Fix that line: each key is `key: value`, nested keys are indented "
        "under a mapping, and a value with `: ` or `#` in it is quoted."
    )


def check_yaml_booleans(parser: argparse.ArgumentParser, config: dict[str, Any], path: str) -> None:
    """Refuse a YAML boolean given to a field that takes one of some words: YAML 1.1 (PyYAML) reads an unquoted `no`,
    `yes`, `on` or `off` as a boolean, so `save_strategy: no` arrives as `False` and would fail far from the line.

    Raises:
        `ValueError`: naming the file, the field, the choices, and the quoted form that works.
    """
    actions = {action.dest: action for action in parser._actions}
    for key, value in config.items():
        action = actions.get(key)
        if not isinstance(value, bool) or action is None:
            continue
        choices = [c for c in (action.choices or []) if not isinstance(c, bool)]
        if choices:  # a word field (str fields such as resume_from_checkpoint or fsdp give booleans a meaning)
            word = "no" if not value and "no" in choices else choices[0]
            raise ValueError(
                f"{path}: `{key}` was read as the boolean {str(value).lower()} (YAML reads an unquoted no / yes / on "
                f'/ off as a boolean), but it takes one of {choices}: quote the word, e.g. `{key}: "{word}"`.'
            )


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """`(--config value or None, the other arguments)`; accepts `--config X` and `--config=X`."""
    rest, source, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("`--config` needs a value: a local YAML file or a Hub reference.")
            source, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            source = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return source, rest


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The fields set on the command line, with their parsed values (not the defaults, not the YAML's)."""
    saved = [(action, action.default, action.required) for action in parser._actions]
    try:
        for action in parser._actions:
            action.default, action.required = argparse.SUPPRESS, False
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
    fields = {action.dest for action in parser._actions} - {"help", *getattr(parser, "OWN_DESTS", ())}
    return {name: value for name, value in vars(namespace).items() if name in fields}


def remote_code_keys(config: dict[str, Any]) -> list[str]:
    """The keys of a recipe that switch on `trust_remote_code`, at the top or inside a kwargs mapping / JSON string."""
    found = []
    for key, value in config.items():
        if key == "trust_remote_code" and value:
            found.append(key)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, dict) and value.get("trust_remote_code"):
            found.append(key)
    return found


def parse_args_and_recipe(parser: Any, argv: list[str], prog: str) -> tuple[tuple, Recipe]:
    """Parse `argv` with a `TrlParser`, reading `--config` from a local file or the Hub.

    Args:
        parser (`trl.TrlParser`): the subcommand's parser.
        argv (`list[str]`): the subcommand's arguments.
        prog (`str`): the subcommand as typed, e.g. `"hf-distill train"` (the start of the reproducing command).

    Returns:
        `(dataclasses, recipe)`: what `parse_args_and_config` returns, and the run's `hf_distill.recipes.Recipe`.
    """
    source, flags = split_config(list(argv))
    resolved = resolve_recipe(source) if source is not None else None
    if resolved is not None and resolved.hub is not None:
        print(f"Recipe {source} -> {resolved.hub.repo_id} commit {resolved.commit} ({resolved.path})")
    overrides = {} if {"-h", "--help"} & set(flags) else explicit_flags(parser, flags)
    config = {}
    if resolved is not None:
        config = read_yaml(resolved.path) or {}
    if isinstance(config, dict) and hasattr(parser, "canonical_keys"):  # `dataset:` is recorded as `dataset_name:`
        config = parser.canonical_keys(config)
    if isinstance(config, dict):
        check_yaml_booleans(parser, config, resolved.path if resolved is not None else "the recipe")
    remote = [key for key in remote_code_keys(config if isinstance(config, dict) else {}) if key not in overrides]
    if resolved is not None and resolved.hub is not None and remote:
        raise ValueError(
            f"The Hub recipe {source!r} switches on trust_remote_code ({', '.join(remote)}): it would run code from "
            f"the repos it names. Read it, then allow it on the command line: "
            + " ".join(f"--{key} ..." if key != "trust_remote_code" else "--trust_remote_code true" for key in remote)
            + "."
        )
    outputs = parser.parse_args_and_config(["--config", resolved.path, *flags] if resolved else flags)
    check_path_arguments(outputs)
    config.update(overrides)
    command = command_line(prog, (["--config", resolved.pinned] if resolved else []) + flags)
    return outputs, Recipe(config, command, resolved, rerun=f"{prog} --config recipe.yaml")
