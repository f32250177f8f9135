"""Checks of the distillation config, in one place: every field's range and every combination the run cannot honour
is refused here, each error naming the field, its value and what is allowed (`DistillationArguments.__post_init__`
runs `validate_distillation`; the teacher sources re-check the fields they depend on with the same functions)."""

import importlib.util
import json
import logging
import math
import os
import types
import typing
from typing import Any

from .features.projectors import PROJECTOR_KINDS
from .losses import ATTENTION_LOSSES, HINT_LOSSES, LOGIT_LOSSES, RELATION_LOSSES
from .losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES, GOLD_BETAS
from .losses.features import HINT_NORMALIZATIONS
from .losses.relations import POOLINGS
from .losses.sparse import SPARSE_LOSSES
from .paths import looks_local
from .quantization import STUDENT_GROUP_SIZE, check_scheme


logger = logging.getLogger(__name__)


def validate_divergence_fields(args: Any) -> None:
    """Checks of the TAID, ABKD and AKL fields; each error names the field and what it allows."""
    if not 0.0 <= args.taid_t_start < 1.0:
        raise ValueError(f"`taid_t_start` must be in [0, 1) (TAID's initial t), got {args.taid_t_start}.")
    if not args.taid_t_start < args.taid_t_end <= 1.0:
        raise ValueError(
            f"`taid_t_end` must be in (taid_t_start, 1] = ({args.taid_t_start}, 1], got {args.taid_t_end}."
        )
    if not 0.0 <= args.taid_alpha <= 1.0:
        raise ValueError(f"`taid_alpha` must be in [0, 1] (TAID's adaptive step size), got {args.taid_alpha}.")
    if not 0.0 <= args.taid_beta < 1.0:
        raise ValueError(f"`taid_beta` must be in [0, 1) (TAID's momentum), got {args.taid_beta}.")
    for name in ("ab_alpha", "ab_beta"):
        if not 0 <= getattr(args, name) <= AB_MAX:
            raise ValueError(
                f"`{name}` must be in [0, {AB_MAX}] (ABKD; (ab_alpha, ab_beta) = (1, 0) is forward KL, (0, 1) reverse "
                f"KL; larger exponents make p ** (alpha + beta) underflow to 0 and the KD term vanish), got "
                f"{getattr(args, name)}."
            )
    if not 0.0 < args.akl_mu <= 1.0:
        raise ValueError(f"`akl_mu` must be in (0, 1] (AKL's head threshold), got {args.akl_mu}.")


AB_MAX = 5.0  # ABKD: larger exponents make p ** (alpha + beta) underflow in fp32 and the KD term vanish
TRAINING_NUMBERS = ("learning_rate", "weight_decay", "max_grad_norm", "warmup_ratio", "adam_epsilon")


def _number_kinds(annotation: Any) -> tuple[set[type], bool, bool]:
    """`(number types, None allowed, list of numbers)` of a field's type annotation (empty set: not a number)."""
    args = (
        typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) else ()
    )
    members = (
        set(args)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else {annotation}
    )
    optional = type(None) in members
    for member in members:
        if (
            typing.get_origin(member) is list
            and typing.get_args(member)
            and typing.get_args(member)[0] in (int, float)
        ):
            return {typing.get_args(member)[0]}, optional, True
    return {m for m in members if m in (int, float)}, optional, False


def check_numbers(args: Any, annotations: dict[str, Any]) -> None:
    """Every numeric field holds a finite number of its type: NaN and inf pass `<` / `>` range checks (a NaN weight
    silently drops its term, an inf one turns the student into NaN), and a YAML list or string in a number field would
    fail deep inside with no field named. Also the numbers of the training arguments the loss depends on.

    Args:
        args: the config. annotations (`dict`): field name -> its type annotation (`DistillationArguments`' fields).
    """
    for name, annotation in annotations.items():
        kinds, optional, is_list = _number_kinds(annotation)
        if not kinds:
            continue
        value = getattr(args, name)
        if value is None and optional:
            continue
        values = value if is_list and isinstance(value, list | tuple) else [value]
        expected = "numbers" if is_list else ("an integer" if kinds == {int} else "a number")
        for item in values:
            if (
                isinstance(item, bool)
                or not isinstance(item, int | float)
                or (kinds == {int} and isinstance(item, float))
            ):
                raise ValueError(f"`{name}` must be {expected}, got {value!r} ({type(value).__name__}).")
            if not math.isfinite(item):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    for name in TRAINING_NUMBERS:
        value = getattr(args, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


# field -> (what makes it apply, does it apply to this config?): a field set away from its default that does not
# apply is warned about once (`ignored_settings`); a new field that only works with another belongs here.
APPLIES_ONLY_WITH: dict[str, tuple[str, Any]] = {
    "beta": ("kd_loss: jsd", lambda a: a.kd_loss == "jsd"),
    "skew_alpha": ("kd_loss: skew_forward_kl or skew_reverse_kl", lambda a: a.kd_loss.startswith("skew_")),
    **dict.fromkeys(
        ("taid_t_start", "taid_t_end", "taid_alpha", "taid_beta", "taid_adaptive"),
        ("kd_loss: taid", lambda a: a.kd_loss == "taid"),
    ),
    **dict.fromkeys(("ab_alpha", "ab_beta"), ("kd_loss: ab_divergence", lambda a: a.kd_loss == "ab_divergence")),
    "akl_mu": ("kd_loss: akl", lambda a: a.kd_loss == "akl"),
    **dict.fromkeys(
        ("hint_loss", "hint_weight", "hint_projector", "hint_normalize"),
        ("hint_layers", lambda a: bool(a.hint_layers)),
    ),
    "attention_loss": ("attention_weight > 0", lambda a: a.attention_weight > 0),
    **dict.fromkeys(("relation_weight", "relation_pooling"), ("relation_loss", lambda a: a.relation_loss is not None)),
    "cross_tokenizer_top_k": ("cross_tokenizer_loss", lambda a: a.cross_tokenizer_loss is not None),
    **dict.fromkeys(
        ("max_new_tokens", "generation_temperature"), ("lmbda > 0 or seq_kd", lambda a: a.lmbda > 0 or a.seq_kd)
    ),
    "seq_kd_do_sample": ("seq_kd", lambda a: a.seq_kd),
    "early_exit_weight": ("early_exit_layers", lambda a: bool(a.early_exit_layers)),
    **dict.fromkeys(
        ("teacher_api_top_k", "teacher_api_prefetch", "teacher_api_timeout", "teacher_api_max_retries"),
        ("teacher_api_base", lambda a: a.teacher_api_base is not None),
    ),
}


def ignored_settings(args: Any, defaults: dict[str, Any]) -> list[str]:
    """The fields set away from their default that this config does not use (`APPLIES_ONLY_WITH`), each as a
    sentence naming what would make it apply.

    Args:
        args: the config. defaults (`dict`): field name -> its default value.
    """
    found = []
    for name, (needs, applies) in APPLIES_ONLY_WITH.items():
        if name in defaults and getattr(args, name, defaults[name]) != defaults[name] and not applies(args):
            found.append(f"`{name}` ({getattr(args, name)!r}) has no effect without {needs}")
    return found


def validate_distillation(
    args: Any, annotations: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> None:
    """Check every distillation field; each error names the field, its value and what is allowed. Fields that are
    set but have no effect in this config are warned about once.

    Args:
        args: the config (`DistillationArguments`).
        annotations (`dict`, *optional*): the distillation fields' type annotations, for `check_numbers`.
        defaults (`dict`, *optional*): the distillation fields' defaults, for `ignored_settings`.
    """
    if annotations:
        check_numbers(args, annotations)
    for problem in ignored_settings(args, defaults or {}):
        logger.warning_once(f"{problem}: it is ignored. Drop it, or set what it needs.")
    if getattr(args, "max_steps", -1) == 0 or (
        getattr(args, "max_steps", -1) < 0 and getattr(args, "num_train_epochs", 1) <= 0
    ):
        raise ValueError(
            f"Nothing would be trained: max_steps={args.max_steps} and num_train_epochs={args.num_train_epochs}. "
            "Set `max_steps` > 0, or `num_train_epochs` > 0 with max_steps unset (-1)."
        )
    if args.student_quantization is None and args.student_quantization_group_size != STUDENT_GROUP_SIZE:
        raise ValueError(
            f"`student_quantization_group_size` ({args.student_quantization_group_size}) only applies to a "
            "quantized student: set `student_quantization` (int8da_int4w, int4w, int8w), or drop the group size."
        )
    if args.student_quantization is not None:
        check_scheme(args.student_quantization, args.student_quantization_group_size)
    if args.kd_loss not in LOGIT_LOSSES:
        raise ValueError(f"`kd_loss` must be one of {list(LOGIT_LOSSES)}, got {args.kd_loss!r}.")
    if args.nonfinite_teacher not in ("error", "skip"):
        raise ValueError(f"`nonfinite_teacher` must be 'error' or 'skip', got {args.nonfinite_teacher!r}.")
    if not args.temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {args.temperature}.")
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {args.beta}.")
    if not 0.0 <= args.skew_alpha < 1.0:
        raise ValueError(f"`skew_alpha` must be in [0, 1), got {args.skew_alpha}.")
    validate_divergence_fields(args)
    for name in ("kd_weight", "ce_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"`{name}` must be >= 0, got {getattr(args, name)}.")
    for name in ("label_weight", "rationale_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"`{name}` must be >= 0, got {getattr(args, name)}.")
    if args.label_weight == 0 and args.rationale_weight == 0:
        raise ValueError("`label_weight` and `rationale_weight` are both 0; set at least one > 0.")
    for name, table in (
        ("hint_loss", HINT_LOSSES),
        ("hint_projector", PROJECTOR_KINDS),
        ("hint_normalize", HINT_NORMALIZATIONS),
        ("attention_loss", ATTENTION_LOSSES),
        ("relation_pooling", POOLINGS),
    ):
        if getattr(args, name) not in table:
            raise ValueError(f"`{name}` must be one of {list(table)}, got {getattr(args, name)!r}.")
    if args.relation_loss is not None and args.relation_loss not in RELATION_LOSSES:
        raise ValueError(
            f"`relation_loss` must be one of {list(RELATION_LOSSES)} or None, got {args.relation_loss!r}."
        )
    for name in ("hint_weight", "attention_weight", "relation_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"`{name}` must be >= 0, got {getattr(args, name)}.")
    if isinstance(args.hint_layers, str) and args.hint_layers.strip().startswith("{"):
        try:
            args.hint_layers = json.loads(args.hint_layers)
        except json.JSONDecodeError as err:
            raise ValueError(f"`hint_layers` is neither 'uniform' nor a JSON mapping: {args.hint_layers!r}.") from err
    elif isinstance(args.hint_layers, str) and args.hint_layers != "uniform":
        raise ValueError(
            f"`hint_layers` must be 'uniform' or a mapping student layer -> teacher layer, got {args.hint_layers!r}."
        )
    if args.kd_chunk_size is not None and args.kd_chunk_size < 1:
        raise ValueError(f"`kd_chunk_size` must be >= 1 or None, got {args.kd_chunk_size}.")
    if args.kd_weight == 0 and args.ce_weight == 0 and not args.uses_features:
        raise ValueError("`kd_weight` and `ce_weight` are both 0, so nothing would be trained; set at least one > 0.")
    if isinstance(args.teacher_model_init_kwargs, str):
        try:
            args.teacher_model_init_kwargs = json.loads(args.teacher_model_init_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"`teacher_model_init_kwargs` must be a dict or a JSON object string, got "
                f"{args.teacher_model_init_kwargs!r} ({err})."
            ) from err
    validate_teacher_sources(args)
    validate_vllm_sampling(args)
    validate_learning_schemes(args)
    validate_cross_tokenizer(args)
    validate_context(args)


def check_mixture_fractions(fractions: list[Any]) -> None:
    """Each `fraction` of a dataset mixture (`datasets:`) is unset or a finite number >= 0: a YAML string or a NaN
    share otherwise fails inside the size computation with no dataset named (`'<' not supported`, `min() arg is an
    empty sequence`).

    Args:
        fractions (`list`): each dataset's `fraction`, in the order of `datasets`.
    """
    for index, value in enumerate(fractions):
        if value is None:
            continue
        number = not isinstance(value, bool) and isinstance(value, int | float)
        if not number or not math.isfinite(value) or value < 0:
            kind = "" if number else f" ({type(value).__name__})"
            raise ValueError(
                f"datasets[{index}]: `fraction` must be a finite number >= 0 (the dataset's share of the mixture), "
                f"got {value!r}{kind}."
            )


def validate_context(args: Any) -> None:
    """Checks of the context-distillation fields (`teacher_model_name_or_path: self`, `teacher_system_prompt`,
    `teacher_context_column`, `teacher_context_template`)."""
    from .data.context import DEFAULT_CONTEXT_TEMPLATE, check_context_template, read_system_prompt

    names = args.teacher_model_name_or_path
    is_self = names == "self"
    if isinstance(names, list) and "self" in names:
        raise ValueError("`teacher_model_name_or_path: self` is one teacher (the student itself); not in a list.")
    check_context_template(args.teacher_context_template)
    if args.teacher_context_template != DEFAULT_CONTEXT_TEMPLATE and args.teacher_context_column is None:
        raise ValueError("`teacher_context_template` is set but `teacher_context_column` is not, so it is never read.")
    if args.teacher_context_column is not None and not str(args.teacher_context_column).strip():
        raise ValueError("`teacher_context_column` must name a dataset column, got an empty name.")
    check_system_prompt_file(args.teacher_system_prompt)
    read_system_prompt(args.teacher_system_prompt)  # an empty prompt or file raises here
    context = args.teacher_system_prompt is not None or args.teacher_context_column is not None
    if not (context or is_self):
        return
    what = "`teacher_model_name_or_path: self`" if is_self else "`teacher_system_prompt` / `teacher_context_column`"
    if args.kd_weight == 0:
        raise ValueError(f"{what} only acts through the KD term, but `kd_weight` is 0: set `kd_weight` > 0.")
    if args.teacher_cache is not None or args.teacher_api_base:
        raise ValueError(
            f"{what} needs a teacher run in process (it reads its own prompt); a `teacher_cache` / served teacher "
            "scored the student's tokens only."
        )
    if is_self and args.cross_tokenizer_loss is not None:
        raise ValueError(
            "`teacher_model_name_or_path: self` shares the student's tokenizer: unset `cross_tokenizer_loss`."
        )
    if isinstance(names, list) and context:
        raise ValueError(f"{what} takes one teacher, got several in `teacher_model_name_or_path`.")
    if context and (args.seq_kd or args.uses_features):
        raise ValueError(
            f"{what} does not support `seq_kd` (its generations would not read the context) or hidden-state terms "
            "(`hint_layers`, `attention_weight`, `relation_loss`: the two sides' positions differ)."
        )


PROMPT_FILE_EXTENSIONS = (".txt", ".md", ".prompt", ".jinja", ".j2")


def check_system_prompt_file(value: Any) -> None:
    """`teacher_system_prompt` is the prompt's text, or a file's path when that file exists. A value that can only be
    a path (one word that starts with `/`, `.` or `~`, names an existing folder first, or ends in .txt / .md / ...)
    and names no file would be read as the prompt itself, so it is refused, naming the path.

    Raises:
        `FileNotFoundError`: the value looks like a file's path and nothing exists there.
    """
    if not isinstance(value, str) or os.path.isfile(value) or any(c.isspace() for c in value.strip()):
        return
    if looks_local(value) or value.lower().endswith(PROMPT_FILE_EXTENSIONS):
        raise FileNotFoundError(
            f"`teacher_system_prompt` file not found: {value} (nothing at {os.path.abspath(value)}), and a path is "
            "not read as the prompt's text. Fix the path (relative paths are read from the current folder), or give "
            "the prompt's text itself."
        )


def validate_cross_tokenizer(args: Any) -> None:
    """Checks of the cross-tokenizer fields."""
    if args.cross_tokenizer_loss is None:
        if args.teacher_tokenizer_name_or_path is not None:
            raise ValueError(
                "`teacher_tokenizer_name_or_path` is only read for a teacher with another tokenizer: set "
                f"`cross_tokenizer_loss` to one of {list(CROSS_TOKENIZER_LOSSES)}, or unset it."
            )
        return
    if args.cross_tokenizer_loss not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(
            f"`cross_tokenizer_loss` must be one of {list(CROSS_TOKENIZER_LOSSES)} or None, got "
            f"{args.cross_tokenizer_loss!r}."
        )
    if args.cross_tokenizer_loss == "gold" and args.kd_loss not in (*GOLD_BETAS, "jsd"):
        raise ValueError(
            "`cross_tokenizer_loss: gold` takes the `kd_loss` divergence on the shared tokens, as TRL's GOLD "
            f"does: forward_kl, reverse_kl or jsd (with `beta`); got kd_loss={args.kd_loss!r}."
        )
    if args.cross_tokenizer_top_k is not None and args.cross_tokenizer_top_k < 1:
        raise ValueError(f"`cross_tokenizer_top_k` must be >= 1 or None, got {args.cross_tokenizer_top_k}.")
    several_teachers = isinstance(args.teacher_model_name_or_path, list)
    if several_teachers:
        raise ValueError(
            "`cross_tokenizer_loss` runs one teacher: give one `teacher_model_name_or_path` (several "
            "cross-tokenizer teachers are not supported yet), or a `teacher_cache` built with its tokenizer."
        )
    if args.lmbda > 0 or args.seq_kd:
        raise ValueError("`cross_tokenizer_loss` does not support on-policy batches (`lmbda` > 0) or `seq_kd` yet.")
    if args.uses_features:
        raise ValueError(
            "`cross_tokenizer_loss` distils output distributions only: unset `hint_layers`, `attention_weight` "
            "and `relation_loss` (the two models' positions do not correspond one to one)."
        )


def validate_teacher_sources(args: Any) -> None:
    """Checks of the cache, on-policy, seq_kd and multi-teacher fields."""
    if not 0.0 <= args.lmbda <= 1.0:
        raise ValueError(f"`lmbda` must be in [0, 1] (probability of on-policy batches), got {args.lmbda}.")
    if args.max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {args.max_new_tokens}.")
    if not args.generation_temperature >= 0:
        raise ValueError(f"`generation_temperature` must be >= 0 (0 = greedy), got {args.generation_temperature}.")
    if args.multi_teacher_mode not in ("mixture", "sum"):
        raise ValueError(f"`multi_teacher_mode` must be 'mixture' or 'sum', got {args.multi_teacher_mode!r}.")
    name = args.teacher_model_name_or_path
    if isinstance(name, list | tuple):  # argparse gives a list; one teacher is a str
        if not name or not all(isinstance(n, str) and n for n in name):
            raise ValueError(f"`teacher_model_name_or_path` must be a name or a list of names, got {name!r}.")
        args.teacher_model_name_or_path = name[0] if len(name) == 1 else list(name)
    if args.teacher_weights is not None:
        if any(w < 0 for w in args.teacher_weights) or sum(args.teacher_weights) <= 0:
            raise ValueError(f"`teacher_weights` must be >= 0 with a positive sum, got {args.teacher_weights}.")
        names = args.teacher_model_name_or_path
        n = len(names) if isinstance(names, list) else 0
        if n and len(args.teacher_weights) != n:
            raise ValueError(
                f"`teacher_weights` has {len(args.teacher_weights)} entries for {n} teachers in "
                "`teacher_model_name_or_path`; give one weight per teacher."
            )
    if isinstance(args.teacher_api_base, str):  # one URL from YAML / Python: a list of one
        args.teacher_api_base = [args.teacher_api_base]
    if isinstance(args.teacher_api_model, str):
        args.teacher_api_model = [args.teacher_api_model]
    if args.teacher_api_base:
        check_served_config(args)
    if args.teacher_cache is not None:
        if args.teacher_model_name_or_path is not None:
            raise ValueError("`teacher_cache` replaces the live teacher: unset `teacher_model_name_or_path`.")
        check_cache_config(args)


def validate_vllm_sampling(args: Any) -> None:
    """Checks of the on-policy vLLM fields (`use_vllm`, `vllm_*`) and of `log_completions`."""
    if args.vllm_mode not in ("server", "colocate"):
        raise ValueError(f"`vllm_mode` must be 'server' or 'colocate', got {args.vllm_mode!r}.")
    if args.vllm_sync_steps < 1:
        raise ValueError(
            f"`vllm_sync_steps` must be >= 1 (optimizer steps between syncs), got {args.vllm_sync_steps}."
        )
    if not args.vllm_server_timeout > 0 or args.vllm_max_retries < 0:
        raise ValueError(
            f"`vllm_server_timeout` must be > 0 and `vllm_max_retries` >= 0, got {args.vllm_server_timeout} and "
            f"{args.vllm_max_retries}."
        )
    if args.num_completions_to_print is not None and args.num_completions_to_print < 0:
        raise ValueError(f"`num_completions_to_print` must be >= 0 or None, got {args.num_completions_to_print}.")
    if args.log_completions and not args.lmbda > 0:
        raise ValueError("`log_completions` writes the on-policy samples: set `lmbda` > 0 (or unset it).")
    if not args.use_vllm:
        return
    if not args.lmbda > 0:
        raise ValueError(
            f"`use_vllm` draws the on-policy samples from vLLM, but `lmbda` is {args.lmbda}, so none are drawn: set "
            "`lmbda` > 0 (the fraction of on-policy micro-batches), or unset `use_vllm`."
        )
    if args.vllm_mode == "colocate":
        where = (
            "vLLM is importable here, but colocated sampling is not implemented yet"
            if importlib.util.find_spec("vllm") is not None
            else "it needs vLLM installed in the training venv, and vLLM 0.32 pins transformers < 5.20, so it lives "
            "in its own venv (`make setup-vllm`)"
        )
        raise ValueError(
            f"`vllm_mode: colocate` runs vLLM inside the training process: {where}. Start a vLLM server instead "
            "(docs/onpolicy.md) and set `vllm_mode: server` with `vllm_server_base_url`."
        )
    url = args.vllm_server_base_url
    if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise ValueError(
            f"`use_vllm` with `vllm_mode: server` needs `vllm_server_base_url`, the URL of the vLLM server (e.g. "
            f"http://127.0.0.1:8000), got {url!r}."
        )


def validate_learning_schemes(args: Any) -> None:
    """Checks of the EMA-teacher and early-exit fields."""
    if args.teacher_ema_decay is not None and not 0.0 < args.teacher_ema_decay < 1.0:
        raise ValueError(
            f"`teacher_ema_decay` must be in (0, 1) (e.g. 0.999; None turns the EMA teacher off), got "
            f"{args.teacher_ema_decay}."
        )
    if args.early_exit_weight < 0:
        raise ValueError(f"`early_exit_weight` must be >= 0, got {args.early_exit_weight}.")
    if args.early_exit_layers is not None:
        from .features.early_exit import parse_exit_layers

        args.early_exit_layers = parse_exit_layers(args.early_exit_layers)


def check_cache_config(args: Any) -> None:
    """Settings that cannot work without a live teacher, checked for `teacher_cache` runs (also by the cache
    sources, on the config they are given)."""
    check_sparse_teacher(args, "a teacher cache")
    if args.lmbda > 0 or args.seq_kd:
        raise ValueError(
            "A teacher cache holds the teacher's distributions on the dataset's tokens only, so it cannot score "
            "on-policy samples (`lmbda` > 0) or generate targets (`seq_kd`); use a live teacher, or build the cache "
            "with `hf-distill cache-teacher --generate` for offline sequence-level KD."
        )


def check_sparse_teacher(args: Any, what: str) -> None:
    """Settings that a teacher given as top-k log-probs (`what`: a cache, a served teacher) cannot serve: a `kd_loss`
    without a sparse form, and hidden-state terms."""
    if args.kd_loss not in SPARSE_LOSSES:
        raise ValueError(f"kd_loss={args.kd_loss!r} has no sparse form for {what}; use one of {SPARSE_LOSSES}.")
    if args.uses_features:
        raise ValueError(f"Hints, attention and relation losses need the teacher's hidden states: not in {what}.")


def check_served_config(args: Any) -> None:
    """The served teacher's fields (`teacher_api_*`), checked for `teacher_api_base` runs."""
    check_sparse_teacher(args, "a served teacher")
    urls = args.teacher_api_base
    if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
        raise ValueError(f"`teacher_api_base` must be http(s) URLs such as http://127.0.0.1:8000/v1, got {urls}.")
    models = args.teacher_api_model or []
    if len(models) not in (0, 1, len(urls)):
        raise ValueError(
            f"`teacher_api_model` names {len(models)} models for {len(urls)} servers (`teacher_api_base`): give one "
            "name for all, or one per server."
        )
    if args.teacher_api_top_k < 1:
        raise ValueError(f"`teacher_api_top_k` must be >= 1 (log-probs per position), got {args.teacher_api_top_k}.")
    if args.seq_kd:
        raise ValueError(
            "`seq_kd` with a served teacher is not supported yet: write its generations first (`hf-distill "
            "cache-teacher --generate`, or the API teacher's completions) and train on them."
        )
    if args.teacher_model_name_or_path is not None or args.teacher_cache is not None:
        raise ValueError(
            "`teacher_api_base` (a served teacher) replaces `teacher_model_name_or_path` / `teacher_cache`: set one."
        )
    if args.cross_tokenizer_loss is not None:
        raise ValueError(
            "`cross_tokenizer_loss` with a served teacher is not supported: its top-k ids must be the student's token "
            "ids. Load the teacher in process (or cache it with `--teacher_tokenizer`) for cross-tokenizer KD."
        )
