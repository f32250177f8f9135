"""`hf-distill export`: write a saved student as one GGUF file (weights, tokenizer, chat template) for llama.cpp,
Ollama or transformers' GGUF loader.

hf-distill export --model runs/student --format gguf --quant q4_0 --output runs/student.gguf

Llama-family models only (SmolLM2, Llama 2/3, TinyLlama, ...); others get an error naming the supported ones. A
student trained with `student_quantization=int4w` (group size 32) exports to q4_0 without further rounding. With q8_0
or q4_0, weights whose rows are not a multiple of 32 are refused, listed, unless `--allow_fallback` (then f16).
"""

from dataclasses import dataclass, field

from .arguments import CliParser
from .recipe_args import parse_args_and_recipe


QUANTS = ("f16", "q8_0", "q4_0")  # `hf_distill.export.GGUF_QUANTS`, written here so that `--help` imports no torch


@dataclass(kw_only=True)
class ExportArguments:
    """Which saved model to write, how, and where."""

    _argument_group_name = "export"

    model: str = field(metadata={"help": "Folder of the saved model (save_pretrained) and its tokenizer."})
    format: str = field(default="gguf", metadata={"help": "Output format.", "choices": ["gguf"]})
    quant: str = field(default="f16", metadata={"help": "Weight type of the 2-D tensors.", "choices": list(QUANTS)})
    output: str = field(metadata={"help": "Path of the file to write, e.g. model.gguf."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder when it is not --model."})
    name: str | None = field(
        default=None, metadata={"help": "general.name stored in the file (default: the folder name)."}
    )
    allow_fallback: bool = field(
        default=False,
        metadata={
            "help": "With q8_0 / q4_0: write the 2-D tensors whose rows are not a multiple of 32 in f16 (warned, "
            "listed) instead of refusing the export."
        },
    )


def make_parser(prog: str | None = None) -> CliParser:
    """Parser of `hf-distill export`.

    Args:
        prog (`str`, *optional*): the command as typed, shown in `--help`.

    Returns:
        `CliParser`: `parse_args_and_config(argv)` gives `(ExportArguments,)`.
    """
    return CliParser((ExportArguments,), prog=prog, description=__doc__)


def run(argv: list[str], prog: str = "hf-distill export") -> None:
    """`hf-distill export`: write the GGUF file and print what it holds.

    Args:
        argv (`list[str]`): the arguments after `export`.
        prog (`str`): the command as typed.
    """
    (opts,), _ = parse_args_and_recipe(make_parser(prog), argv, prog)
    from ..export import export_gguf

    result = export_gguf(opts.model, opts.output, quant=opts.quant, tokenizer_dir=opts.tokenizer, name=opts.name,
                         allow_fallback=opts.allow_fallback)  # fmt: skip
    counts: dict[str, int] = {}
    for kind in result["tensors"].values():
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"Wrote {result['path']} ({result['bytes'] / 1e6:.1f} MB; tensors: {summary}).")
