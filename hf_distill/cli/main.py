"""`hf-distill` entry point: dispatches to one module per subcommand (imported lazily, so `--help` is fast)."""

import importlib
import os
import sys


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


def usage() -> str:
    lines = ["usage: hf-distill <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `hf-distill <command> --help` for a command's options; `--debug` shows tracebacks of errors."]
    return "\n".join(lines)


DEBUG_ENV = "HF_DISTILL_DEBUG"
# Errors that carry a message for the user (bad config, missing file, bad data); anything else is a bug: traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError)  # OSError: unloadable path / Hub id


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-distill: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    try:
        module.run(rest, prog=f"hf-distill {name}")
    except USER_ERRORS as err:
        if debug:
            raise
        print(
            f"hf-distill {name}: error: {err}\n(`hf-distill {name} --help` lists the options; add --debug or set "
            f"{DEBUG_ENV}=1 for the traceback.)",
            file=sys.stderr,
        )
        sys.exit(1)
    from .shutdown import end_distributed_run  # after the command: torch is imported by then

    end_distributed_run()  # multi-process runs: barrier, bounded destroy of the process group, exit 0


if __name__ == "__main__":
    main()
