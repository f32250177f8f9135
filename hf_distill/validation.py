"""Checks of the distillation config, in one place: every field's range and every combination the run cannot honour
is refused here, each error naming the field, its value and what is allowed (`DistillationArguments.__post_init__`
runs `validate_distillation`; the teacher sources re-check the fields they depend on with the same functions)."""

import json
from typing import Any

from .features.projectors import PROJECTOR_KINDS
from .losses import ATTENTION_LOSSES, HINT_LOSSES, LOGIT_LOSSES, RELATION_LOSSES
from .losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES, GOLD_BETAS
from .losses.features import HINT_NORMALIZATIONS
from .losses.relations import POOLINGS
from .losses.sparse import SPARSE_LOSSES
from .quantization import check_scheme


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
        if not getattr(args, name) >= 0:
            raise ValueError(
                f"`{name}` must be >= 0 (ABKD; (ab_alpha, ab_beta) = (1, 0) is forward KL, (0, 1) reverse KL), "
                f"got {getattr(args, name)}."
            )
    if not 0.0 < args.akl_mu <= 1.0:
        raise ValueError(f"`akl_mu` must be in (0, 1] (AKL's head threshold), got {args.akl_mu}.")


def validate_distillation(args: Any) -> None:
    """Check every distillation field; each error names the field, its value and what is allowed."""
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
    validate_learning_schemes(args)
    validate_cross_tokenizer(args)
    validate_context(args)


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
    if not args.generation_temperature > 0:
        raise ValueError(f"`generation_temperature` must be > 0, got {args.generation_temperature}.")
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
