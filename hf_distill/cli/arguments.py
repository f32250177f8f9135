"""What every `hf-distill` subcommand parses with: `CliParser` (a `trl.TrlParser`) and the shared `DatasetArguments`.

Each command module exposes `make_parser(prog)` returning a `CliParser` over its dataclasses, as TRL's scripts do
(`trl/scripts/sft.py`): YAML `--config` whose keys are the fields, command-line flags overriding them, unknown keys
refused. On top of `TrlParser`, a `CliParser`

- refuses abbreviated flags (`allow_abbrev=False`: `--kd_los` is an error, never `--kd_loss`);
- documents `--config` and `--debug` (handled by `recipe_args.parse_args_and_recipe` and `main`) in `--help`;
- groups the fields in `--help` by the dataclass that declares them (a class's `_argument_group_name` is the title,
  as `transformers.HfArgumentParser` reads it; else the class name);
- takes a field's flag aliases (`--dataset` for `--dataset_name`) as YAML keys too.

`DatasetArguments` holds every dataset field once (TRL's `ScriptArguments` names). It is not TRL's own
`ScriptArguments`: that one evaluates on a `test` split by default and has fields we do not read (`dataset_streaming`,
`ignore_bias_buffers`), and lacks the evaluation dataset and the column fields. A command's arguments inherit it and
name the fields they read in `dataset_fields`; another dataset field set to a value is refused, not ignored.
"""

import argparse
import dataclasses
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from trl import TrlParser


CONFIG_HELP = (
    "YAML recipe whose keys are this command's fields (flags on the command line override them): a local file, or a "
    "Hub reference `<namespace>/<repo>/<path>.yaml[@revision]`."
)
DEBUG_HELP = "Show the traceback of an error instead of a one-line message (or set HF_DISTILL_DEBUG=1)."


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (examples keep their lines) and every option's default."""


def _group_title(cls: type) -> str:
    return cls.__dict__.get("_argument_group_name") or cls.__name__


def _declaring_class(dtype: type, name: str) -> type:
    """The most derived class in `dtype`'s MRO whose own annotations declare the field `name`."""
    return next(c for c in dtype.__mro__ if name in inspect.get_annotations(c))


class CliParser(TrlParser):
    """`TrlParser` for one `hf-distill` subcommand: no abbreviations, `--config` / `--debug` documented, fields grouped
    by the dataclass that declares them.

    `--debug` on the command line is hf-distill's (tracebacks; `main` reads it). A dataclass field named `debug`
    (`TrainingArguments.debug`: `underflow_overflow`, `tpu_metrics_debug`) is therefore set in the YAML recipe only.

    Args:
        dataclass_types (`tuple[type, ...]`): the dataclasses to parse into, in the order `parse_args_and_config`
            returns them.
        prog (`str`, *optional*): the command as typed, e.g. `"hf-distill train"`.
        description (`str`, *optional*): shown above the options (the command module's docstring).
        config_help (`str`, *optional*): help of `--config` (default: a YAML recipe of this command's fields).
    """

    OWN_DESTS = ("config", "hf_distill_debug")  # the dests of `--config` and `--debug`: no dataclass field

    def __init__(
        self,
        dataclass_types: tuple[type, ...],
        prog: str | None = None,
        description: str | None = None,
        config_help: str = CONFIG_HELP,
    ):
        self._config_help = config_help
        self._groups: dict[str, argparse._ArgumentGroup] = {}
        self._yaml_only: dict[str, Any] = {}  # field -> value: fields whose flag is taken by `--config` / `--debug`
        super().__init__(
            dataclass_types, prog=prog, description=description, formatter_class=HelpFormatter, allow_abbrev=False
        )
        if not self._groups:  # no dataclass at all: the common options still go first
            self._add_common_options()

    def _add_common_options(self) -> None:
        group = self.add_argument_group("hf-distill options")
        group.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help=self._config_help)
        group.add_argument(
            "--debug", action="store_true", dest="hf_distill_debug", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
        self._groups[""] = group

    def _add_dataclass_arguments(self, dtype: type) -> None:
        """Add `dtype`'s fields, each to the argument group of the class that declares it (most derived first)."""
        if not self._groups:
            self._add_common_options()
        hints = get_type_hints(dtype)
        owners = {f.name: _declaring_class(dtype, f.name) for f in dataclasses.fields(dtype) if f.init}
        order = [c for c in dtype.__mro__ if c in owners.values()]
        for owner in order:
            title = _group_title(owner)
            if title not in self._groups:
                describe = owner.argument_group_description if "argument_group_description" in owner.__dict__ else None
                self._groups[title] = self.add_argument_group(title, describe(dtype) if describe else None)
            for f in dataclasses.fields(dtype):
                if not f.init or owners[f.name] is not owner:
                    continue
                if f.name == "debug":  # `--debug` is hf-distill's: this field comes from the YAML recipe only
                    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                    self._yaml_only[f.name] = default
                    continue
                f.type = hints[f.name]
                self._parse_dataclass_field(self._groups[title], f)

    def parse_args_and_config(self, args: Any = None, **kwargs: Any) -> tuple:
        """TRL's (YAML `--config`, flags override its keys), also with the `--config=PATH` spelling."""
        if args is not None:
            args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
        return super().parse_args_and_config(args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """`argparse`'s, without the entries of `--config` and `--debug`, with the YAML-only fields' values."""
        parsed, rest = super().parse_known_args(args, namespace)
        for name in self.OWN_DESTS:
            parsed.__dict__.pop(name, None)
        for name, value in self._yaml_only.items():
            if not hasattr(parsed, name) or parsed.__dict__.get(name) is argparse.SUPPRESS:
                setattr(parsed, name, value)
        return parsed, rest

    def field_names(self) -> dict[str, str]:
        """Every spelling of every flag without its dashes (`dataset`, `dataset-name`, `dataset_name`) -> field."""
        names = {}
        for action in self._actions:
            for option in action.option_strings:
                if option.startswith("--") and action.dest not in ("help", *self.OWN_DESTS):
                    names[option[2:]] = action.dest
        return names

    def canonical_keys(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` with each key that is a flag alias (`dataset`) renamed to its field (`dataset_name`); other keys
        as they are. Raises a ValueError when two keys name the same field."""
        names, out, source = self.field_names(), {}, {}
        for key, value in config.items():
            name = names.get(key, key)
            if name in out:
                raise ValueError(f"`{source[name]}` and `{key}` set the same field `{name}`; keep one.")
            out[name], source[name] = value, key
        return out

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """TRL's, with flag aliases accepted as YAML keys (`dataset:` for `dataset_name:`) and the YAML-only fields."""
        kwargs = self.canonical_keys(kwargs)
        for name in self._yaml_only.keys() & kwargs.keys():
            self._yaml_only[name] = kwargs.pop(name)
        return super().set_defaults_with_config(**kwargs)


@dataclass
class DatasetArguments:
    """The dataset a command reads: every dataset field of every `hf-distill` command, declared once.

    Flag aliases: `--dataset` = `--dataset_name` and `--split` = `--dataset_train_split` (the names `cache-teacher`,
    `miniplm` and `rationales generate|evaluate` use), also as YAML keys.
    """

    _argument_group_name = "dataset"
    # class attributes, not fields (no annotation): the fields the command reads (None: all), and whether
    # `dataset_name` must be set
    dataset_fields = None
    dataset_required = False

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, local .json/.jsonl/.csv/.parquet/.txt file or save_to_disk folder.",
            "aliases": ["--dataset"],
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_train_split: str = field(
        default="train",
        metadata={"help": "Split to train on (or to read: score, cache, generate, evaluate).", "aliases": ["--split"]},
    )
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on during training (optional)."}
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Separate evaluation dataset (same formats as dataset_name; its `train` split is read)."},
    )
    text_column: str = field(
        default="text",
        metadata={
            "help": "Text column: the input of non-causal tasks (train), the text of a plain-text dataset "
            "(cache-teacher, miniplm; when absent, `input_ids` is used)."
        },
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second input text column, e.g. the hypothesis of an NLI pair."}
    )
    label_column: str = field(
        default="label",
        metadata={
            "help": "Class names/ids (classification), tag lists (token classification) or target text (seq2seq)."
        },
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of a text dataset."})
    completion_column: str = field(default="completion", metadata={"help": "Completion column of a text dataset."})
    rationale_column: str = field(
        default="rationale",
        metadata={
            "help": "Column with the rationales: `rationale` (teacher, from `rationales generate`) or a human "
            "explanation column (`explanation`; `explanation_1` in the Hub's esnli)."
        },
    )
    id_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of unique row ids (default: the row index; cache-teacher stores it as `row_id`). "
            "MiniPLM instance ids are `<row id>:<chunk>`."
        },
    )

    def __post_init__(self) -> None:
        if self.dataset_required and self.dataset_name is None:
            raise ValueError("Name the dataset: `--dataset` (a Hub id, a local data file or a save_to_disk folder).")
        unused = [
            f.name
            for f in dataclasses.fields(DatasetArguments)
            if self.dataset_fields is not None
            and f.name not in self.dataset_fields
            and getattr(self, f.name) != f.default
        ]
        if unused:
            raise ValueError(
                f"{', '.join(f'`{name}`' for name in unused)}: not read by this command, which reads "
                f"{', '.join(self.dataset_fields)} of the dataset fields."
            )

    @classmethod
    def argument_group_description(cls, dtype: type) -> str | None:
        """`--help` text of the dataset group: which of its fields the command `dtype` reads."""
        read = getattr(dtype, "dataset_fields", None)
        return None if read is None else f"This command reads {', '.join(read)}; the other fields are refused."

    @property
    def dataset(self) -> str | None:
        """`dataset_name`, under the name `cache-teacher`, `miniplm` and `rationales generate|evaluate` used."""
        return self.dataset_name

    @property
    def split(self) -> str:
        """`dataset_train_split`, under the name `cache-teacher`, `miniplm` and `rationales` used."""
        return self.dataset_train_split


def split_nested_command(argv: list[str], prog: str, commands: Any, usage: str) -> tuple[str, list[str]] | None:
    """A command with subcommands (`miniplm score|select`, `draft evaluate`): `(subcommand, its arguments)`, or None
    after printing `usage` for no argument / `-h` / `--help`; an unknown subcommand prints `usage` to stderr and exits
    with 2 (argparse's code for a usage error)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return None
    if argv[0] not in commands:
        print(f"{prog}: unknown command {argv[0]!r}.\n\n{usage}", file=sys.stderr)
        sys.exit(2)
    return argv[0], argv[1:]
