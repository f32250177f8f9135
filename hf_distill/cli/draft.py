"""`hf-distill draft evaluate`: how much faster a draft model makes its target generate (speculative decoding).

hf-distill draft evaluate --target smollm2 --draft runs/draft-4l --dataset ../shared/data/svamp/validation.jsonl \
    --prompt_column question --limit 20 --max_new_tokens 64 --num_assistant_tokens 5 --output report.json
hf-distill draft evaluate --target gemma3 --draft smollm2 ...   # another tokenizer: universal assisted generation

Greedy generation of the target alone and with the draft as `assistant_model`, prompt by prompt on the same prompts
(chat template applied when the target's tokenizer has one). The JSON report holds `acceptance_rate` (accepted /
proposed draft tokens), `mean_accepted_tokens` (tokens per target forward pass), tokens/s of both runs, `speedup` and
`identical` (every assisted output equals the target's own greedy output). See docs/draft_models.md.
"""

import json
import os
import time
from dataclasses import dataclass, field

from .arguments import CliParser, DatasetArguments, split_nested_command
from .recipe_args import parse_args_and_recipe


@dataclass
class DraftEvaluateArguments(DatasetArguments):
    """Measure a draft's acceptance rate and speed-up for its target (greedy decoding)."""

    _argument_group_name = "draft evaluate"
    dataset_fields = ("dataset_name", "dataset_config", "dataset_train_split", "prompt_column")
    dataset_required = True

    target: str | None = field(
        default=None, metadata={"help": "Target model: Hub id, local folder, or `smollm2` / `gemma3` (shorthands)."}
    )
    draft: str | None = field(
        default=None, metadata={"help": "Draft (assistant) model: Hub id, local folder, or a shorthand."}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Instead of --prompt_column: a str.format template over the columns, e.g. '{premise}'."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt (fewer at EOS)."})
    limit: int | None = field(default=None, metadata={"help": "Use the first N prompts only."})
    num_assistant_tokens: int = field(default=5, metadata={"help": "Draft tokens proposed per target forward pass."})
    assistant_confidence_threshold: float = field(
        default=0.0,
        metadata={
            "help": "End a draft round early when the draft's top probability falls below this (transformers' "
            "default 0.4); 0 drafts exactly --num_assistant_tokens tokens each round."
        },
    )
    target_tokenizer: str | None = field(default=None, metadata={"help": "Target tokenizer (default: the target's)."})
    draft_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Draft tokenizer (default: the draft's). Another vocabulary than the target's: universal assisted "
            "generation."
        },
    )
    chat_template: str = field(
        default="auto",
        metadata={
            "help": "auto: apply the target tokenizer's chat template when it has one; yes / no force it.",
            "choices": ["auto", "yes", "no"],
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype of both models (float32 on CPU)."})
    output: str | None = field(default=None, metadata={"help": "Write the JSON report here."})
    per_prompt: bool = field(default=False, metadata={"help": "Keep per-prompt counts and timings in the JSON."})
    update_card: bool = field(
        default=False,
        metadata={
            "help": "Write the target and the measured acceptance / speed-up into the draft folder's model card "
            "(README.md, section `## Speculative decoding`)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [f"--{name}" for name in ("target", "draft") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"Name the models: {' and '.join(missing)} (a Hub id, a local folder or a shorthand).")


def make_parser(prog: str | None = None) -> CliParser:
    """Parser of `hf-distill draft evaluate`; accepts `--config recipe.yaml` with flags overriding keys.

    Args:
        prog (`str`, *optional*): the command as typed (`"hf-distill draft evaluate"`), shown in `--help`.
    """
    return CliParser((DraftEvaluateArguments,), prog=prog)


COMMANDS = {"evaluate": "Acceptance rate and speed-up of a draft for its target (greedy; JSON report)."}


def usage(prog: str) -> str:
    lines = [f"usage: {prog} {{{','.join(COMMANDS)}}} [options]", ""]
    lines += [f"  {name:<9} {help_}" for name, help_ in COMMANDS.items()]
    return "\n".join([*lines, "", f"Run `{prog} <command> --help` for its options."])


def evaluate(args: DraftEvaluateArguments) -> dict:
    """Load the models, tokenizers and prompts named by `args`, run `hf_distill.draft.evaluate_draft` and return the
    report as a dict (also written to `args.output` when set)."""
    from ..data.loading import load_any_dataset
    from ..draft import evaluate_draft, prompts_from_dataset
    from ..models import load_model, load_tokenizer

    dataset = load_any_dataset(args.dataset, args.dataset_config, args.split)
    column = None if args.prompt_template is not None else args.prompt_column  # a template replaces the column
    prompts = prompts_from_dataset(dataset, column, prompt_template=args.prompt_template, limit=args.limit)
    tokenizer = load_tokenizer(args.target_tokenizer or args.target)
    draft_tokenizer = load_tokenizer(args.draft_tokenizer or args.draft)
    target = load_model(args.target, dtype=args.dtype)
    draft = load_model(args.draft, dtype=args.dtype)
    chat = {"auto": None, "yes": True, "no": False}[args.chat_template]
    report = evaluate_draft(
        target,
        draft,
        tokenizer,
        prompts,
        draft_tokenizer=draft_tokenizer,
        max_new_tokens=args.max_new_tokens,
        num_assistant_tokens=args.num_assistant_tokens,
        assistant_confidence_threshold=args.assistant_confidence_threshold,
        use_chat_template=chat,
    ).to_dict()
    if not args.per_prompt:
        report.pop("per_prompt")
        report.pop("target_outputs")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = {"target": args.target, "draft": args.draft, "dataset": args.dataset, "date": date, **report}
    if args.update_card:
        if not os.path.isdir(args.draft):
            raise ValueError(f"--update_card writes into a local draft folder; {args.draft!r} is not one.")
        from ..model_card import add_draft_results

        report["card"] = add_draft_results(args.draft, report, args.target)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def run(argv: list[str], prog: str = "hf-distill draft") -> None:
    if (nested := split_nested_command(argv, prog, COMMANDS, usage(prog))) is None:
        return
    command, rest = nested
    (args,), _ = parse_args_and_recipe(make_parser(f"{prog} {command}"), rest, f"{prog} {command}")
    report = evaluate(args)
    accepted, proposed = report["accepted_tokens"], report["proposed_tokens"]
    print(
        f"acceptance {report['acceptance_rate']:.3f} ({accepted}/{proposed} draft tokens; "
        f"{report['token_acceptance_rate']:.3f} of the checked ones), "
        f"{report['mean_accepted_tokens']:.2f} tokens per target forward; "
        f"target {report['target_tokens_per_s']:.1f} tok/s, assisted {report['assisted_tokens_per_s']:.1f} tok/s, "
        f"speed-up {report['speedup']:.2f}x; identical outputs: {report['identical']}"
        + (f"; report: {args.output}" if args.output else "")
    )
