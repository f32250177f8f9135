"""Model cards for distilled students: tags `hf-distill` and `distillation`, the teacher as the run's teacher source
describes it (`TeacherSource.card_teacher`), `base_model` / `license` / `pipeline_tag` / `datasets` metadata, a usage
snippet, the distillation settings, a `model-index` of the held-out results and, for CLI runs, the exact recipe and
the command that reproduces it (`hf_distill.recipes.recipe_from_card` reads the recipe back).

The trainer's `create_model_card` (used by `save_model`, checkpoints and `push_to_hub`) writes this card as README.md.
`check_card` checks a card offline against the Hub's metadata spec (what `ModelCard.validate` asks the Hub to do).
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache

from .card_sections import (  # noqa: F401 (hub_id and check_card are this module's API too)
    HUB_LICENSES,
    NOT_RESULTS,
    PIPELINE_TAGS,
    applied_settings,
    check_card,
    eval_results,
    hub_id,
    settings_table,
    usage_snippet,
)
from .models import SHORTHANDS, parse_init_kwargs, shorthand_of
from .quantization import QAT_METADATA_KEY, describe_quantization
from .recipes import recipe_from_config, snapshot_commit


TAGS = ["hf-distill", "distillation"]
NO_TEACHER = "none: trained on the labels alone (hard-label cross-entropy)"

PAPERS = {
    "forward_kl": "Hinton et al. 2015, *Distilling the Knowledge in a Neural Network*",
    "reverse_kl": "Gu et al. 2024, *MiniLLM*; Agarwal et al. 2024, *On-Policy Distillation of Language Models (GKD)*",
    "jsd": "Agarwal et al. 2024, *On-Policy Distillation of Language Models (GKD)*",
    "skew_forward_kl": "Ko et al. 2024, *DistiLLM*",
    "skew_reverse_kl": "Ko et al. 2024, *DistiLLM*",
    "tvd": "Wen et al. 2023, *f-Divergence Minimization for Sequence-Level KD*",
}


@dataclass
class CardTeacher:
    """What a model card says about a run's teacher: `TeacherSource.card_teacher()` returns one (None: no teacher).

    Attributes:
        description (`str`): one Markdown line, e.g. ``"`ns/teacher` (revision 1a2b...)"``; no URL and no key.
        base_models (`list[str]`): the teachers' names (Hub ids, shorthands such as `smollm2`, local folders, served
            model names) the card's `base_model` lineage may come from (`lineage` turns each into a Hub id or None).
        student_subfolder (`str`, *optional*): the folder inside the output that holds a loadable student (the first
            peer of mutual learning), for the usage snippet.
    """

    description: str
    base_models: list[str] = field(default_factory=list)
    student_subfolder: str | None = None


def _card_data(folder: Any) -> ModelCardData | None:
    path = os.path.join(folder, "README.md") if isinstance(folder, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data
    except (ValueError, yaml.YAMLError):  # a README whose metadata block is not a model card's
        return None


def card_base_model(folder: Any) -> str | None:
    """The Hub `base_model` named in the model card (`README.md`) of local model folder `folder`, else None: a
    student distilled from a local student (a chain's later stage) keeps the lineage of the Hub model it came from."""
    data = _card_data(folder)
    base = getattr(data, "base_model", None)
    return hub_id(base[0] if isinstance(base, list) and len(base) == 1 else base)


def lineage(name: Any) -> str | None:
    """The Hub id a model named `name` comes from: a shorthand's (also for a model loaded from its wheel's folder), a
    Hub id itself, or the `base_model` of a local folder's model card; else None."""
    short = shorthand_of(name)
    return SHORTHANDS[short].hub_id if short else hub_id(name) or card_base_model(name)


def card_license(name: Any) -> str | None:
    """The license of model `name` where it is known offline: a shorthand's (the table in `hf_distill.models`), a
    local folder's model card, or the README of a Hub id in the local Hub cache; else None."""
    short = shorthand_of(name) or next((k for k, s in SHORTHANDS.items() if s.hub_id == name), None)
    if short:
        return SHORTHANDS[short].license
    data = _card_data(name)
    if data is None and hub_id(name):
        path = try_to_load_from_cache(hub_id(name), "README.md", cache_dir=os.environ.get("HF_HUB_CACHE"))
        data = _card_data(os.path.dirname(path)) if isinstance(path, str) else None
    return getattr(data, "license", None) if isinstance(getattr(data, "license", None), str) else None


def name_line(name: str) -> str:
    """`name` in backticks, with the Hub id and wheel a shorthand (or its wheel's folder) stands for."""
    short = shorthand_of(name)
    if short is None:
        return f"`{name}`"
    return f"`{short}` ({SHORTHANDS[short].hub_id}: {SHORTHANDS[short].description})"


def hub_commit(name: Any, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The commit of Hub model `name` at `revision` in the local Hub cache (what `from_pretrained` loaded), or None
    when `name` is not a Hub id (shorthands such as `smollm2` load other files) or is not cached. Reads the cache
    only, never the network."""
    repo_id = hub_id(name) if name not in SHORTHANDS else None
    if repo_id is None:
        return None
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE")
    path = try_to_load_from_cache(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
    return snapshot_commit(path, "config.json") if isinstance(path, str) else None


def teacher_fingerprint(
    model: Any, name: str | None = None, revision: str | None = None, cache_dir: str | None = None
) -> str:
    """`revision <commit>` for a teacher loaded from the Hub (`name`, at `revision`, found in the local Hub cache),
    else `fingerprint <16 hex>`: a hash of its config and a strided sample (64 values) of every weight (config only
    when the weights are sharded across processes)."""
    config = getattr(model, "config", None)
    commit = hub_commit(name or getattr(config, "_name_or_path", None), revision, cache_dir)
    if commit:
        return f"revision {commit}"
    digest = hashlib.sha256()
    as_dict = config.to_dict() if config is not None else {}
    volatile = ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype")
    digest.update(
        json.dumps({k: v for k, v in as_dict.items() if k not in volatile}, sort_keys=True, default=str).encode()
    )
    params = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
    local = all(
        type(p.data) is torch.Tensor and p.numel() > 0 and p.device.type != "meta" and not hasattr(p, "ds_id")
        for _, p in params
    )
    if not local:  # FSDP DTensors / ZeRO-3 shards / meta tensors: no local values to read
        return f"config fingerprint {digest.hexdigest()[:16]}"
    for key, param in params:
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
        digest.update(f"{key}{tuple(param.shape)}".encode() + sample.numpy().tobytes())
    return f"fingerprint {digest.hexdigest()[:16]}"


def teacher_names(args: Any, models: list[Any]) -> list[str]:
    """The names of a run's live teachers: `teacher_model_name_or_path` (one per model), else each model's
    `config._name_or_path`, else its class name."""
    given = args.teacher_model_name_or_path
    given = [given] if isinstance(given, str) else list(given or [])
    if len(given) == len(models):
        return [str(name) for name in given]
    return [getattr(getattr(m, "config", None), "_name_or_path", None) or type(m).__name__ for m in models]


def live_teachers(args: Any, models: list[Any]) -> CardTeacher:
    """`CardTeacher` of teacher models run in process: each named (`teacher_names`, `name_line`) with its Hub
    revision or weight fingerprint (`teacher_fingerprint`)."""
    names = teacher_names(args, models)
    init = parse_init_kwargs(args.teacher_model_init_kwargs)
    lines = [
        f"{name_line(name)} ({teacher_fingerprint(model, name, init.get('revision'), init.get('cache_dir'))})"
        for model, name in zip(models, names)
    ]
    return CardTeacher("; ".join(lines), names)


def cached_teacher(info: dict[str, Any]) -> CardTeacher:
    """`CardTeacher` of the teacher recorded in a teacher cache's `cache_info.json` (a model, or served models)."""
    teacher = info.get("teacher") or {}
    names = [str(n) for n in teacher.get("served") or []] or [str(teacher.get("name_or_path") or "unrecorded")]
    served = " (served over an OpenAI-compatible HTTP API)" if teacher.get("served") else ""
    sha = teacher.get("config_sha256")
    line = ", ".join(name_line(n) for n in names) + served + (f" (config fingerprint {sha[:16]})" if sha else "")
    return CardTeacher(f"{line}, read from an offline top-{info.get('k')} teacher cache (`hf-distill cache-teacher`)",
                       names)  # fmt: skip


def data_writer(dataset: Any) -> str | None:
    """Who wrote the training data, when it is the `dataset/` folder of `hf-distill rationales generate` (its
    settings, `meta.json`, sit one folder up): the API model or the local teacher; else None."""
    from .data.rationales import META_FILE

    if not isinstance(dataset, str) or not os.path.isdir(dataset):
        return None
    path = os.path.join(os.path.dirname(os.path.normpath(dataset)), META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    teacher = meta.get("teacher") if isinstance(meta, dict) else None
    if not isinstance(teacher, str):
        return None
    template = f", template `{meta['template']}`" if meta.get("template") else ""
    if teacher.startswith("api:"):
        return f"rationales written by `{teacher[4:]}` through an OpenAI-compatible API (`hf-distill rationales " \
               f"generate`{template})"  # fmt: skip
    return f"rationales written by the teacher {name_line(teacher)} (`hf-distill rationales generate`{template})"


def dataset_list(dataset: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The training data as a list of names: one dataset (`dataset_name`), or every dataset of a mixture (`datasets:`
    entries' `path`s, as `hf-distill train` passes them), duplicates dropped; `[]` when none is recorded."""
    names = [dataset] if isinstance(dataset, str) else list(dataset or [])
    return [str(name) for name in dict.fromkeys(names) if name]


def dataset_lines(datasets: list[str]) -> str:
    """The card's "Training data" text: each Hub dataset as a link, each local one by its file or folder name,
    marked as not on the Hub (its path is not recorded); a mixture says how many datasets it mixes."""
    if not datasets:
        return "not recorded"
    lines = [
        f"[{name}](https://huggingface.co/datasets/{name})"
        if hub_id(name)
        else f"local data `{os.path.basename(os.path.normpath(name))}` (not on the Hub)"
        for name in datasets
    ]
    return lines[0] if len(lines) == 1 else f"a mixture of {len(lines)} datasets: " + ", ".join(lines)


def _table(results: dict[str, dict[str, float]] | None) -> str:
    if not results:
        return "_No evaluation results recorded._"
    columns = sorted({k for row in results.values() for k in row})
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), (int, float)) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def library_versions() -> str:
    """`hf-distill X (transformers Y, trl Z, torch W)`."""
    import transformers
    import trl

    from .version import __version__

    versions = f"transformers {transformers.__version__}, trl {trl.__version__}, torch {torch.__version__}"
    return f"hf-distill {__version__} ({versions})"


def build_model_card(
    *,
    model_name: str,
    teacher: CardTeacher | str | None,
    student_description: str,
    losses: dict[str, Any],
    results: dict[str, dict[str, float]] | None = None,
    dataset: str | list[str] | None = None,
    base_model: str | list[str] | None = None,
    extra: str = "",
    teacher_revision: str | None = None,
    recipe: Any = None,
    head_kind: str | None = "causal_lm",
    evaluation: list[EvalResult] | None = None,
    usage_target: str | None = None,
    data_note: str | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a distilled student.

    Args:
        model_name (`str`): name shown in the title (and the `model-index` name).
        teacher (`CardTeacher` or `str`, *optional*): the teacher (`TeacherSource.card_teacher`), or a teacher id or
            path; None: trained without a teacher.
        student_description (`str`): e.g. "10-layer Llama (54M parameters) initialised from teacher layers".
        losses (`dict`): the distillation settings, rendered as a table (`card_sections.settings_table`).
        results (`dict`, *optional*): `{row name: {metric: value}}`, rendered as a table.
        dataset (`str` or `list[str]`, *optional*): the training data, one dataset or the datasets of a mixture;
            the Hub ids among them go in the metadata (`datasets`), local ones are named in the body only.
        base_model (`str` or `list[str]`, *optional*): the model(s) the student came from (any name `lineage` reads);
            default: the teacher's (`CardTeacher.base_models`). Only Hub ids reach the metadata.
        teacher_revision (`str`, *optional*): e.g. `revision <commit>` (`teacher_fingerprint`), for a `str` teacher.
        recipe (`hf_distill.recipes.Recipe`, *optional*): embedded as YAML with the command that reproduces it.
        head_kind (`str`, *optional*): the student's head (`heads.Head.kind`): `pipeline_tag` and usage snippet.
        evaluation (`list[EvalResult]`, *optional*): the `model-index` (`card_sections.eval_results`).
        usage_target (`str`, *optional*): the folder or Hub id the usage snippet loads.
        data_note (`str`, *optional*): who wrote the training data (`data_writer`), or what it is when it is no
            dataset (the quickstart's transfer set).
    """
    if isinstance(teacher, str):
        line = f"{name_line(teacher)}" + (f" ({teacher_revision})" if teacher_revision else "")
        teacher = CardTeacher(line, [teacher])
    datasets = dataset_list(dataset)
    names = [base_model] if isinstance(base_model, str) else list(base_model or [])
    bases = [b for b in dict.fromkeys(lineage(n) for n in names) if b]
    if not bases and teacher is not None:  # a student not from a Hub model: the lineage of its teacher(s)
        names = list(teacher.base_models)
        bases = [b for b in dict.fromkeys(lineage(n) for n in names) if b]
    licenses = sorted({lic for lic in (card_license(n) for n in [*names, *bases]) if lic})
    license_ = licenses[0] if len(licenses) == 1 and licenses[0] in HUB_LICENSES else None
    data = ModelCardData(
        tags=list(TAGS),
        library_name="transformers",
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        license=license_,
        pipeline_tag=PIPELINE_TAGS.get(head_kind or ""),
        datasets=[name for name in datasets if hub_id(name)] or None,
        model_name=model_name if evaluation else None,
        eval_results=evaluation or None,
    )
    paper = PAPERS.get(str(losses.get("kd_loss")), "") if teacher else ""
    license_line = f"\n- **License:** {', '.join(licenses)} (inherited from the base model)" if licenses else ""
    subfolder = teacher.student_subfolder if teacher else None
    data_line = "; ".join(part for part in (datasets and dataset_lines(datasets), data_note) if part) or "not recorded"
    body = f"""---
{data.to_yaml()}
---

# {model_name}

A student model distilled with [hf-distill](https://pypi.org/project/hf-distill/).

- **Teacher:** {teacher.description if teacher else NO_TEACHER}
- **Student:** {student_description}
- **Training data:** {data_line}{license_line}
- **Library:** {library_versions()}

## Usage

{usage_snippet(head_kind, usage_target or model_name, subfolder)}
## Distillation settings

{settings_table(losses)}
{f"{chr(10)}Method: {paper}." if paper else ""}

## Results

{_table(results)}
{extra}
{recipe.card_section() if recipe is not None else ""}"""
    return ModelCard(body)


def trainer_model_card(
    trainer: Any,
    model_name: str | None = None,
    dataset_name: str | list[str] | None = None,
    results: dict[str, dict[str, float]] | None = None,
) -> ModelCard:
    """The card for a `DistillationMixin` trainer's current state: its teacher source's `card_teacher()`, the
    distillation settings, the last evaluation's metrics (table and `model-index`), with the trainer's `recipe` (set
    by the CLI) embedded.

    Args:
        trainer (`DistillationMixin`): the trainer.
        model_name (`str`, *optional*): the title; default the output folder's name.
        dataset_name (`str` or `list[str]`, *optional*): the training data, or every dataset of a mixture; default
            the recipe's `dataset_name`, or the `path` of each entry of its `datasets:` mixture.
        results (`dict`, *optional*): `{row name: {metric: value}}`; default the last evaluation's metrics.
    """
    args = trainer.args
    source = trainer.teacher_source
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model, "config", None)
    n_params = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    description = f"{arch}, {layers} layers, {n_params / 1e6:.1f}M parameters"
    teacher = source.card_teacher()
    recipe = getattr(trainer, "recipe", None) or recipe_from_config(args)
    config_of_run = recipe.config if recipe is not None else {}
    mixture = [entry.get("path") for entry in config_of_run.get("datasets") or [] if isinstance(entry, dict)]
    recorded = config_of_run.get("dataset_name") or config_of_run.get("dataset") or mixture
    datasets = dataset_list(dataset_name or recorded)
    logged = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    metrics = {k: v for k, v in logged[-1].items() if k.startswith("eval_")} if logged else {}
    if results is None and metrics:
        results = {"student (last evaluation)": {k: v for k, v in metrics.items() if k not in NOT_RESULTS}}
    name = model_name or os.path.basename(os.path.normpath(args.output_dir))
    head_kind = source.context.head.kind
    if config_of_run.get("eval_dataset_name"):  # its `train` split is read
        eval_data, split = config_of_run["eval_dataset_name"], "train"
    elif len(datasets) > 1 or config_of_run.get("test_split_size") is not None:  # a mixture's held-out share
        eval_data, split = datasets, "test"
    elif config_of_run.get("dataset_test_split"):
        eval_data, split = datasets, config_of_run["dataset_test_split"]
    else:
        eval_data, split = None, None
    pushed = args.push_to_hub and args.hub_model_id
    students = [config_of_run.get("model_name_or_path"), getattr(config, "_name_or_path", None)]
    quantization = getattr(config, QAT_METADATA_KEY, None) if args.student_quantization else None
    return build_model_card(
        model_name=name,
        teacher=teacher,
        student_description=description,
        losses=applied_settings(args, teacher is not None),
        results=results,
        dataset=datasets,
        base_model=[s for s in students if s],
        recipe=recipe,
        extra=describe_quantization(quantization),
        head_kind=head_kind,
        evaluation=eval_results(metrics, head_kind, eval_data, split),
        usage_target=args.hub_model_id if pushed else args.output_dir,
        data_note="; ".join(note for note in map(data_writer, datasets) if note) or None,
    )


DRAFT_TAGS = ["speculative-decoding", "draft-model"]
DRAFT_SECTION = "## Speculative decoding"


def draft_card_section(report: dict[str, Any], target: str) -> str:
    """The model-card section of a draft model: its target and what `hf-distill draft evaluate` measured.

    Args:
        report (`dict`): the JSON of `hf-distill draft evaluate --output` (`hf_distill.draft.DraftReport.to_dict()`,
            optionally with `dataset`, `date` and `machine` entries).
        target (`str`): the target model the draft was measured with.
    """
    settings = report.get("settings", {})
    rows = [
        ("acceptance rate (accepted / proposed draft tokens)", f"{report['acceptance_rate']:.3f}"),
        ("acceptance per checked draft token", f"{report['token_acceptance_rate']:.3f}"),
        ("tokens per target forward pass", f"{report['mean_accepted_tokens']:.2f}"),
        ("speed-up over the target alone", f"{report['speedup']:.2f}x"),
        (
            "tokens/s, target alone / with this draft",
            f"{report['target_tokens_per_s']:.1f} / {report['assisted_tokens_per_s']:.1f}",
        ),
        ("outputs identical to the target's own (greedy)", str(report["identical"])),
    ]
    where = ", ".join(
        f"{k} {v}" for k, v in (("prompts", report.get("num_prompts")), ("from", report.get("dataset"))) if v
    )
    how = ", ".join(
        f"{k} {settings[k]}" for k in ("max_new_tokens", "num_assistant_tokens", "device") if k in settings
    )
    measured = " ".join(str(report[k]) for k in ("date", "machine") if report.get(k))
    return "\n".join(
        [
            DRAFT_SECTION,
            "",
            (
                f"A draft (assistant) model for speculative decoding with **`{target}`** as the target: "
                "`target.generate(**inputs, assistant_model=draft)` gives the target's own greedy output, faster the "
                "more of the draft's tokens the target accepts."
            ),
            "",
            "| measured | value |",
            "|---|---:|",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            f"Greedy decoding, batch 1 ({how}); {where}." + (f" Measured {measured}." if measured else ""),
            "",
        ]
    )


def add_draft_results(folder: str, report: dict[str, Any], target: str) -> str:
    """Write a draft's target and measured acceptance / speed-up into the model card (`README.md`) of its folder.

    The card the trainer wrote is kept; its `## Speculative decoding` section is replaced (or added) and the tags
    `speculative-decoding` and `draft-model` added. A folder without a card gets a minimal one.

    Args:
        folder (`str`): the draft's local model folder.
        report (`dict`): `hf-distill draft evaluate`'s JSON report.
        target (`str`): the target model.

    Returns:
        `str`: the path of the card.
    """
    path = os.path.join(folder, "README.md")
    if os.path.isfile(path):
        card = ModelCard.load(path)
    else:
        card = ModelCard(
            f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n\n# {os.path.basename(folder)}\n"
        )
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *TAGS, *DRAFT_TAGS]))
    text = card.text
    section = draft_card_section(report, target)
    if DRAFT_SECTION in text:
        start = text.index(DRAFT_SECTION)
        nxt = text.find("\n## ", start + len(DRAFT_SECTION))
        text = text[:start] + section + (text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.text = text
    card.save(path)
    return path
