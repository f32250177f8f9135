"""`hf-distill train --config recipe.yaml [--field value ...]`: YAML keys are config fields; flags override them.

`--config` also takes a Hub reference (`<namespace>/<repo>/<path>.yaml[@revision]`, see `hf_distill.recipes`).
"""

import json
from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from ..config import DistillationSFTConfig
from ..data.loading import load_any_dataset
from ..data.tasks import TASKS, load_task_model, task_label_kwargs, task_trainer_inputs
from ..models import load_tokenizer, parse_init_kwargs, quantized_student_kwargs
from .recipe_args import parse_args_and_recipe


@dataclass
class TrainScriptArguments:
    """What to train on, and how to build the student."""

    dataset_name: str = field(
        default=None,
        metadata={"help": "Hub dataset id, local .json/.jsonl/.csv/.parquet file or save_to_disk folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate evaluation dataset (same formats as dataset_name)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (defaults to the student's, else the teacher's)."}
    )
    rename_columns: dict | str | None = field(
        default=None,
        metadata={"help": 'Rename dataset columns, as a YAML mapping or JSON: \'{"question": "prompt"}\'.'},
    )
    chat_format: bool = field(
        default=False,
        metadata={
            "help": "Turn string prompt/completion columns into user/assistant messages, so the tokenizer's "
            "chat template is applied (loss on the assistant turn only)."
        },
    )
    student_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Build a randomly initialised student from the teacher's config with these overrides, e.g. "
            '\'{"hidden_size": 288, "num_hidden_layers": 6}\' (TinyBERT-style narrow students).'
        },
    )
    task: str = field(
        default="causal_lm",
        metadata={
            "help": "What the student predicts: causal_lm (SFT data: text, prompt/completion or messages), seq2seq, "
            "sequence_classification, token_classification or masked_lm (tokenized from the columns below).",
            "choices": list(TASKS),
        },
    )
    text_column: str = field(default="text", metadata={"help": "Input text column (non-causal tasks)."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second input text column, e.g. the hypothesis of an NLI pair."}
    )
    label_column: str = field(
        default="label",
        metadata={
            "help": "Class names/ids (classification), tag lists (token classification) or target text (seq2seq)."
        },
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Build the student from the teacher by keeping this many evenly spaced layers (when "
            "model_name_or_path is not given)."
        },
    )


def prepare_columns(dataset, script_args: TrainScriptArguments):
    """Apply `rename_columns` and `chat_format` to a dataset."""
    mapping = script_args.rename_columns
    if isinstance(mapping, str):
        mapping = json.loads(mapping)
    if mapping:
        missing = sorted(set(mapping) - set(dataset.column_names))
        if missing:
            raise ValueError(
                f"rename_columns names {missing}, which the dataset lacks (columns: {dataset.column_names})."
            )
        dataset = dataset.rename_columns(mapping)
    if script_args.chat_format:
        if not {"prompt", "completion"} <= set(dataset.column_names):
            raise ValueError(
                f"chat_format needs `prompt` and `completion` columns; the dataset has "
                f"{dataset.column_names} (use rename_columns)."
            )
        dataset = dataset.map(
            lambda row: {
                "prompt": [{"role": "user", "content": str(row["prompt"])}],
                "completion": [{"role": "assistant", "content": str(row["completion"])}],
            }
        )
    return dataset


def student_from_config(teacher, overrides: dict | str):
    """A randomly initialised model of the teacher's class and config, with `overrides` applied."""
    import copy

    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"student_config sets {key!r}, which {type(config).__name__} does not have.")
        setattr(config, key, value)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if "num_hidden_layers" in overrides and getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: overrides["num_hidden_layers"]]
    return type(teacher)(config)


def make_parser(prog: str | None = None) -> TrlParser:
    parser = TrlParser((TrainScriptArguments, DistillationSFTConfig, ModelConfig), prog=prog)
    return parser


def build_trainer(script_args: TrainScriptArguments, args: DistillationSFTConfig, model_args: ModelConfig):
    """Load tokenizer, student, teacher and datasets named by the parsed configs and return the trainer."""
    from ..trainer import DistillationSFTTrainer, DistillationTrainer

    if script_args.dataset_name is None:
        raise ValueError("Set `dataset_name` (a Hub id, a local data file or a save_to_disk folder).")
    teacher_path = args.teacher_model_name_or_path
    teacher_kwargs = parse_init_kwargs(args.teacher_model_init_kwargs)
    model_kwargs = {"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}
    if model_args.attn_implementation:
        model_kwargs["attn_implementation"] = model_args.attn_implementation

    if isinstance(teacher_path, list):
        teacher_path = teacher_path[0]  # several teachers share one tokenizer
    if teacher_path == "self":  # context distillation: the student as it starts is the teacher, no model to load
        if model_args.model_name_or_path is None:
            raise ValueError("`teacher_model_name_or_path: self` is the student itself: set `model_name_or_path`.")
        teacher_path = None
    tok_path = script_args.tokenizer_name_or_path or model_args.model_name_or_path or teacher_path
    if tok_path is None and args.teacher_cache:
        from ..cache import TeacherCache

        tok_path = TeacherCache(args.teacher_cache).info["tokenizer"]["name_or_path"]
    if tok_path is None:
        raise ValueError("Set `model_name_or_path` (the student) or `teacher_model_name_or_path`.")
    if tok_path == teacher_path:
        tokenizer = load_tokenizer(teacher_path, gguf_file=teacher_kwargs.get("gguf_file"))
    elif tok_path == "smollm2":
        tokenizer = load_tokenizer("smollm2")
    else:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    train = load_any_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    evaluation = None
    if script_args.eval_dataset_name:
        evaluation = load_any_dataset(script_args.eval_dataset_name, split="train")
    elif script_args.dataset_test_split:
        evaluation = load_any_dataset(
            script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split
        )
    train = prepare_columns(train, script_args)
    evaluation = prepare_columns(evaluation, script_args) if evaluation is not None else None
    label_kwargs = task_label_kwargs(train, script_args.task, script_args.label_column)

    teacher = None  # the trainer loads `teacher_model_name_or_path` (one name or several)
    if model_args.model_name_or_path is not None:
        model_kwargs.update(quantized_student_kwargs(model_args))  # QLoRA: {} unless load_in_4bit / load_in_8bit
        student = load_task_model(model_args.model_name_or_path, script_args.task, label_kwargs, **model_kwargs)
    elif script_args.student_num_layers is not None and teacher_path is not None:
        from ..student import init_student_from_teacher

        teacher = load_task_model(teacher_path, script_args.task, label_kwargs, **teacher_kwargs)
        student = init_student_from_teacher(teacher, num_layers=script_args.student_num_layers)
    elif script_args.student_config is not None and teacher_path is not None:
        teacher = load_task_model(teacher_path, script_args.task, label_kwargs, **teacher_kwargs)
        student = student_from_config(teacher, script_args.student_config)
    else:
        raise ValueError(
            "Name the student: `model_name_or_path`, or `student_num_layers` / `student_config` with a teacher."
        )
    if script_args.task != "causal_lm":
        if model_args.use_peft:
            raise ValueError("`use_peft` is supported for task causal_lm only.")
        inputs = task_trainer_inputs(script_args, args, student, tokenizer, train, evaluation)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, **inputs)
    return DistillationSFTTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


def run(argv: list[str], prog: str = "hf-distill train") -> None:
    (script_args, args, model_args), recipe = parse_args_and_recipe(make_parser(prog), argv, prog)
    recipe.save(args.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
    trainer = build_trainer(script_args, args, model_args)
    trainer.recipe = recipe  # embedded in the model card
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    if args.eval_strategy != "no" and trainer.eval_dataset is not None:
        print(trainer.evaluate())
    print(f"Saved the student to {args.output_dir}")
