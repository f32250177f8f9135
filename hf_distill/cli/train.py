"""`hf-distill train --config recipe.yaml [--field value ...]`: YAML keys are config fields; flags override them.

`--config` also takes a Hub reference (`<namespace>/<repo>/<path>.yaml[@revision]`, see `hf_distill.recipes`).
"""

import json
import logging
from dataclasses import dataclass, field

from trl import ModelConfig

from ..config import DistillationSFTConfig
from ..data.mixture import DatasetMixtureArguments, MixtureDataset
from .arguments import CliParser, DatasetArguments
from .recipe_args import parse_args_and_recipe


logger = logging.getLogger(__name__)
# the keys of `hf_distill.data.tasks.TASKS`, written here so that `--help` does not import the model classes (a test
# checks that both agree)
TASK_NAMES = ("causal_lm", "seq2seq", "sequence_classification", "token_classification", "masked_lm")


@dataclass
class TrainScriptArguments(DatasetArguments):
    """What to train on, and how to build the student."""

    _argument_group_name = "train: data and student"
    dataset_fields = (
        "dataset_name",
        "dataset_config",
        "dataset_train_split",
        "dataset_test_split",
        "eval_dataset_name",
        "text_column",
        "text_pair_column",
        "label_column",
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
            "sequence_classification, token_classification or masked_lm (tokenized from the dataset's "
            "text/label columns).",
            "choices": list(TASK_NAMES),
        },
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Build the student from the teacher by keeping this many evenly spaced layers (when "
            "model_name_or_path is not given)."
        },
    )
    datasets: list[MixtureDataset] = field(
        default_factory=list,
        metadata={
            "help": "Several datasets trained together, instead of `dataset_name`: a YAML list of {path, name, "
            "data_dir, data_files, split, columns, fraction, rename_columns} (TRL's mixture format; `fraction`: "
            "each dataset's share of the rows). See hf_distill/data/mixture.py."
        },
    )
    test_split_size: float | None = field(
        default=None,
        metadata={"help": "With `datasets`: hold out this share (or number) of the mixture's rows for evaluation."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mixture = DatasetMixtureArguments(datasets=self.datasets, test_split_size=self.test_split_size)
        self.datasets = self.mixture.datasets
        if self.datasets and self.dataset_name is not None:
            raise ValueError("Pass either `dataset_name` or `datasets` (a mixture), not both: drop one of them.")
        if self.test_split_size is not None and not self.datasets:
            raise ValueError(
                "`test_split_size` splits a `datasets` mixture; with `dataset_name` use `dataset_test_split`."
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


def make_parser(prog: str | None = None) -> CliParser:
    """Parser of `hf-distill train`: the script's, the training config's and the student model's fields.

    Args:
        prog (`str`, *optional*): the command as typed (`"hf-distill train"`), shown in `--help`.

    Returns:
        `CliParser`: `parse_args_and_config(argv)` gives `(TrainScriptArguments, DistillationSFTConfig, ModelConfig)`.
    """
    return CliParser((TrainScriptArguments, DistillationSFTConfig, ModelConfig), prog=prog, description=__doc__)


def check_arguments(script_args: TrainScriptArguments, args: DistillationSFTConfig, model_args: ModelConfig) -> None:
    """What `build_trainer` needs named, checked before anything is loaded: the dataset and the student.

    Raises:
        `ValueError`: naming the missing field.
    """
    if script_args.dataset_name is None and not script_args.datasets:
        raise ValueError(
            "Set `dataset_name` (a Hub id, a local data file or a save_to_disk folder), or `datasets` (a mixture)."
        )
    teacher = args.teacher_model_name_or_path
    derived = teacher is not None and (script_args.student_num_layers, script_args.student_config) != (None, None)
    if model_args.model_name_or_path is None and not derived:
        raise ValueError(
            "Name the student: `model_name_or_path`, or `student_num_layers` / `student_config` with a teacher."
        )


def build_trainer(script_args: TrainScriptArguments, args: DistillationSFTConfig, model_args: ModelConfig):
    """Load tokenizer, student, teacher and datasets named by the parsed configs and return the trainer."""
    from transformers import AutoTokenizer
    from trl import get_peft_config

    from ..data.loading import load_any_dataset
    from ..data.mixture import load_mixture
    from ..data.tasks import load_task_model, task_label_kwargs, task_trainer_inputs
    from ..models import load_tokenizer, parse_init_kwargs, quantized_student_kwargs
    from ..trainer import DistillationSFTTrainer, DistillationTrainer

    check_arguments(script_args, args, model_args)

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

    evaluation = None
    if script_args.datasets:
        mixture = load_mixture(script_args.mixture, seed=args.seed)
        train, evaluation = mixture["train"], mixture.get("test")
        logger.info("Dataset mixture: %s rows (%s).", {k: len(v) for k, v in mixture.items()},
                    ", ".join(f"{e.path}: {e.fraction}" for e in script_args.datasets))  # fmt: skip
    else:
        train = load_any_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    if script_args.eval_dataset_name:
        evaluation = load_any_dataset(script_args.eval_dataset_name, split="train")
    elif script_args.dataset_test_split and not script_args.datasets:
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
    elif script_args.student_num_layers is not None:  # with a teacher (check_arguments)
        from ..student import init_student_from_teacher

        teacher = load_task_model(teacher_path, script_args.task, label_kwargs, **teacher_kwargs)
        student = init_student_from_teacher(teacher, num_layers=script_args.student_num_layers)
    else:  # student_config, with a teacher (check_arguments)
        teacher = load_task_model(teacher_path, script_args.task, label_kwargs, **teacher_kwargs)
        student = student_from_config(teacher, script_args.student_config)
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


def final_evaluation(trainer) -> dict[str, float] | None:
    """The metrics of the evaluation at the end of training, run once.

    With `eval_strategy` `steps` or `epoch` the Trainer itself evaluates at the last step (transformers'
    `DefaultFlowCallback`); those logged metrics are returned. Only when no evaluation is logged at the last step is
    `trainer.evaluate()` called.

    Args:
        trainer ([`~transformers.Trainer`]): a trainer after `train()`.

    Returns:
        `dict[str, float]` or `None`: `eval_*` metrics (and `epoch`); `None` without `eval_strategy` or eval dataset.
    """
    if trainer.args.eval_strategy == "no" or trainer.eval_dataset is None:
        return None
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and any(key.startswith("eval_") for key in entry):
            return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def run(argv: list[str], prog: str = "hf-distill train") -> None:
    """`hf-distill train`: parse, build the trainer, then (and only then) write the recipe and train.

    Args:
        argv (`list[str]`): the arguments after `train`.
        prog (`str`): the command as typed.
    """
    (script_args, args, model_args), recipe = parse_args_and_recipe(make_parser(prog), argv, prog)
    trainer = build_trainer(script_args, args, model_args)  # checks the arguments before it loads anything
    recipe.save(args.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
    trainer.recipe = recipe  # embedded in the model card
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: global step and log history of the run, next to the model
    datasets = [entry.path for entry in script_args.datasets] or script_args.dataset_name
    trainer.create_model_card(dataset_name=datasets)
    metrics = final_evaluation(trainer)
    if metrics is not None:
        print(metrics)
    print(f"Saved the student to {args.output_dir}")
