"""`hf-distill` entry point: dispatches to one module per subcommand (imported lazily, so `--help` is fast)."""

import importlib.abc
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

from . import help_cache


# subcommand -> (module, one-line help). A nested command ("miniplm score") is handled by its module.
COMMANDS = {
    "train": ("hf_distill.cli.train", "Distil a student from a teacher with a YAML recipe (flags override keys)."),
    "quickstart": ("hf_distill.cli.quickstart", "SmolLM2-135M teacher -> 10-layer student: KD vs CE-only report."),
    "rationales": ("hf_distill.cli.rationales", "Generate teacher rationales (distilling step-by-step)."),
    "miniplm": ("hf_distill.cli.miniplm", "MiniPLM Difference Sampling: `miniplm score` and `miniplm select`."),
    "cache-teacher": ("hf_distill.cli.cache_teacher", "Store the teacher's top-k log-probs for offline KD."),
    "chain": ("hf_distill.cli.chain", "Teacher-assistant chains / born-again generations: one train run per stage."),
    "export": ("hf_distill.cli.export", "Write a saved Llama-family student as a GGUF file (f16, q8_0, q4_0)."),
    "draft": ("hf_distill.cli.draft", "Speculative-decoding drafts: `draft evaluate` (acceptance, speed-up)."),
}
HELP_FLAGS = ("-h", "--help")
VERSION_FLAGS = ("-V", "--version")


def usage() -> str:
    """The top-level `hf-distill --help` text: the commands and the options every command takes."""
    lines = ["usage: hf-distill [--version] <command> [--config PATH] [options] [--debug]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "Run `hf-distill <command> --help` for a command's options. Every command takes `--config PATH` (a YAML file",
        "of its options; flags override its keys) and `--debug` (tracebacks of errors).",
    ]
    return "\n".join(lines)


DEBUG_ENV = "HF_DISTILL_DEBUG"
# Errors that carry a message for the user (bad config, missing file, bad data); anything else is a bug: traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError)  # OSError: unloadable path / Hub id
# The same for errors of modules that `--help` must not import (torch, openai, ...), as "module:Class": an error can
# only be one of these when its module is loaded, so they are looked up in `sys.modules`, never imported here.
LAZY_USER_ERRORS = (
    "hf_distill.generation.api:APITeacherError",  # the text API teacher failed for good (refused, 4xx, retries spent)
    "hf_distill.generation.vllm:VLLMClientError",  # a vLLM server (served teacher, on-policy sampling) failed
    "yaml:YAMLError",  # a YAML file that is not valid YAML
)


def is_user_error(err: BaseException) -> bool:
    """Whether `err` carries a message for the user (`USER_ERRORS`, `LAZY_USER_ERRORS`) rather than a bug's
    traceback; imports nothing."""
    if isinstance(err, USER_ERRORS):
        return True
    for spec in LAZY_USER_ERRORS:
        module, _, name = spec.partition(":")
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


def error_message(err: BaseException) -> str:
    """The line printed for a user error: its message (a PyYAML error in one line, naming the file and line)."""
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(err, yaml.YAMLError):
        from .recipe_args import yaml_error_message

        return yaml_error_message(None, err)
    return str(err)


class _NoPeftForHelp(importlib.abc.MetaPathFinder):
    """While a command only prints its `--help`: when `transformers.trainer_utils` is imported (by
    `TrainingArguments`, which the parsers of `train` and `rationales train` need), transformers' optional `peft`
    import there is switched off. That import loads peft, which loads transformers' models and torchao: seconds of
    the help's wall time, for a process that exits after printing."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        """Switch off `is_peft_available` just before `transformers.trainer_utils` runs; finds nothing itself."""
        utils = sys.modules.get("transformers.utils")
        if name == "transformers.trainer_utils" and utils is not None and hasattr(utils, "is_peft_available"):
            utils.is_peft_available = lambda: False


@contextmanager
def _help_imports(argv: list[str], from_command_line: bool) -> Iterator[None]:
    """`_NoPeftForHelp` on the import path while `argv` asks for help, only for the console script (whose process
    ends after printing): an in-process caller of `main(argv)` keeps an unchanged transformers."""
    if not (from_command_line and set(HELP_FLAGS) & set(argv)) or "transformers.trainer_utils" in sys.modules:
        yield
        return
    finder = _NoPeftForHelp()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


@contextmanager
def _cached_help(argv: list[str], active: bool) -> Iterator[None]:
    """While `active` (the console script asked only for a command's help): the command's output is collected,
    printed, and stored by `help_cache` when the command exits cleanly, so the next `--help` imports nothing."""
    if not active:
        yield
        return
    buffer, clean = io.StringIO(), False
    try:
        with redirect_stdout(buffer):
            yield
        clean = True
    except SystemExit as exited:  # argparse's help exits 0 after printing
        clean = exited.code in (0, None)
        raise
    finally:
        text = buffer.getvalue()
        sys.stdout.write(text)
        if clean:
            help_cache.write_help(argv, text)


def main(argv: list[str] | None = None) -> None:
    """Run `hf-distill <command> [options]`.

    Args:
        argv (`list[str]`, *optional*): the arguments after `hf-distill`; default `sys.argv[1:]`.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in HELP_FLAGS:
        print(usage())
        return
    if argv[0] in VERSION_FLAGS:
        from ..version import __version__

        print(f"hf-distill {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-distill: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    help_request = from_command_line and help_cache.is_help_request(argv, HELP_FLAGS)
    if help_request and (text := help_cache.read_help(argv)) is not None:
        sys.stdout.write(text)  # printed before, with the same package, dependencies and terminal width
        return
    from .logs import configure_logging

    configure_logging(debug)  # before the command imports torchao & co: their known noise is filtered
    try:
        with _help_imports(rest, from_command_line), _cached_help(argv, help_request):
            module = importlib.import_module(COMMANDS[name][0])
            module.run(rest, prog=f"hf-distill {name}")
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(
            f"hf-distill {name}: error: {error_message(err)}\n(`hf-distill {name} --help` lists the options; add "
            f"--debug or set {DEBUG_ENV}=1 for the traceback.)",
            file=sys.stderr,
        )
        sys.exit(1)
    if "torch" in sys.modules:  # a command that ran a model (not one that only printed its usage)
        from .shutdown import end_distributed_run

        end_distributed_run()  # multi-process runs: barrier, bounded destroy of the process group, exit 0


if __name__ == "__main__":
    main()
