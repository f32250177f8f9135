"""Model cards for distilled students: tags `hf-distill` and `distillation`, `base_model`, the teacher (with its
revision or fingerprint), the data, the library versions, the losses, the results and, for CLI runs, the exact
recipe and the command that reproduces it (`hf_distill.recipes.recipe_from_card` reads the recipe back).

The trainer's `create_model_card` (used by `save_model`, checkpoints and `push_to_hub`) writes this card as README.md.
"""

import hashlib
import json
import os
from typing import Any

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from .models import parse_init_kwargs
from .quantization import QAT_METADATA_KEY, describe_quantization
from .recipes import recipe_from_config, snapshot_commit


TAGS = ["hf-distill", "distillation"]

PAPERS = {
    "forward_kl": "Hinton et al. 2015, *Distilling the Knowledge in a Neural Network*",
    "reverse_kl": "Gu et al. 2024, *MiniLLM*; Agarwal et al. 2024, *On-Policy Distillation of Language Models (GKD)*",
    "jsd": "Agarwal et al. 2024, *On-Policy Distillation of Language Models (GKD)*",
    "skew_forward_kl": "Ko et al. 2024, *DistiLLM*",
    "skew_reverse_kl": "Ko et al. 2024, *DistiLLM*",
    "tvd": "Wen et al. 2023, *f-Divergence Minimization for Sequence-Level KD*",
}


def _table(results: dict[str, dict[str, float]] | None) -> str:
    if not results:
        return "_No evaluation results recorded._"
    columns = sorted({k for row in results.values() for k in row})
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), (int, float)) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SHORTHANDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # teacher shorthands -> their Hub ids


def hub_id(name: Any) -> str | None:
    """`name` when it reads as a Hub repo id (`namespace/name`, no such local path), a shorthand's id, else None."""
    if not isinstance(name, str):
        return None
    name = SHORTHANDS.get(name, name)
    if name.count("/") != 1 or os.path.exists(name) or name.startswith((".", "/")):
        return None
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return None
    return name


def card_base_model(folder: Any) -> str | None:
    """The Hub `base_model` named in the model card (`README.md`) of local model folder `folder`, else None: a
    student distilled from a local student (a chain's later stage) keeps the lineage of the Hub model it came from."""
    path = os.path.join(folder, "README.md") if isinstance(folder, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        base = ModelCard.load(path).data.base_model
    except (ValueError, yaml.YAMLError):  # a README whose metadata block is not a model card's
        return None
    return hub_id(base[0] if isinstance(base, list) and len(base) == 1 else base)


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
    teacher: str | None,
    student_description: str,
    losses: dict[str, Any],
    results: dict[str, dict[str, float]] | None = None,
    dataset: str | None = None,
    base_model: str | None = None,
    extra: str = "",
    teacher_revision: str | None = None,
    recipe: Any = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a distilled student.

    Args:
        model_name (`str`): name shown in the title.
        teacher (`str`, *optional*): teacher id or path.
        student_description (`str`): e.g. "10-layer Llama (54M parameters) initialised from teacher layers".
        losses (`dict`): loss settings, e.g. `{"kd_loss": "forward_kl", "temperature": 1.0, "kd_weight": 0.5}`.
        results (`dict`, *optional*): `{row name: {metric: value}}`, rendered as a table.
        dataset (`str`, *optional*): the training data; listed in the metadata when it is a Hub id.
        base_model (`str`, *optional*): the model the student was initialised from (metadata `base_model`, kept
            only when it is a Hub id: the Hub rejects other values); default: the teacher's Hub id, or for a local
            teacher folder the `base_model` of its own card (`card_base_model`).
        teacher_revision (`str`, *optional*): e.g. `revision <commit>` or `fingerprint <hash>` (`teacher_fingerprint`).
        recipe (`hf_distill.recipes.Recipe`, *optional*): embedded as YAML with the command that reproduces it.
    """
    base_model = hub_id(base_model) or hub_id(teacher) or card_base_model(base_model) or card_base_model(teacher)
    teacher_line = f"`{teacher}`" if teacher else "none (fine-tuned without a teacher)"
    teacher_line += f" ({teacher_revision})" if teacher_revision else ""
    data = ModelCardData(
        tags=list(TAGS),
        library_name="transformers",
        base_model=base_model,
        datasets=[dataset] if hub_id(dataset) else None,
    )
    loss_lines = "\n".join(f"- `{k}`: {v}" for k, v in losses.items())
    paper = PAPERS.get(str(losses.get("kd_loss")), "")
    body = f"""---
{data.to_yaml()}
---

# {model_name}

A student model distilled with [hf-distill](https://pypi.org/project/hf-distill/).

- **Teacher:** {teacher_line}
- **Student:** {student_description}
- **Training data:** {dataset or "not recorded"}
- **Library:** {library_versions()}

## Losses

{loss_lines}
{f"{chr(10)}Method: {paper}." if paper else ""}

## Results

{_table(results)}
{extra}
{recipe.card_section() if recipe is not None else ""}"""
    return ModelCard(body)


def trainer_model_card(
    trainer: Any,
    model_name: str | None = None,
    dataset_name: str | None = None,
    results: dict[str, dict[str, float]] | None = None,
) -> ModelCard:
    """The card for a `DistillationMixin` trainer's current state (teacher, loss fields, last logged metrics), with the
    trainer's `recipe` (set by the CLI) embedded."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model, "config", None)
    n_params = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    description = f"{arch}, {layers} layers, {n_params / 1e6:.1f}M parameters"
    teachers = getattr(trainer, "teachers", None) or ([trainer.teacher] if trainer.teacher is not None else [])
    names = args.teacher_model_name_or_path or []
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        names = [getattr(getattr(t, "config", None), "_name_or_path", None) or type(t).__name__ for t in teachers]
    cache = getattr(trainer, "teacher_cache", None)
    if not names and cache is not None:
        names = [f"{cache.info['teacher']['name_or_path']} (offline top-{cache.info.get('k')} cache)"]
    teacher_name = ", ".join(n for n in names if n) or None
    init = parse_init_kwargs(args.teacher_model_init_kwargs)
    paired = zip(teachers, names if len(names) == len(teachers) else [None] * len(teachers), strict=True)
    revisions = [
        teacher_fingerprint(t, n, init.get("revision"), init.get("cache_dir"))
        for t, n in paired
        if hasattr(t, "parameters")
    ]
    if not revisions and cache is not None:
        revisions = [f"config fingerprint {cache.info['teacher'].get('config_sha256', '')[:16]}"]
    recipe = getattr(trainer, "recipe", None) or recipe_from_config(args)
    if dataset_name is None and recipe is not None:
        dataset_name = recipe.config.get("dataset_name") or recipe.config.get("dataset")
    losses = {name: getattr(args, name) for name in ("kd_loss", "temperature", "kd_weight", "ce_weight")}
    if args.kd_loss == "jsd":
        losses["beta"] = args.beta
    if args.kd_loss.startswith("skew"):
        losses["skew_alpha"] = args.skew_alpha
    if results is None:
        logged = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
        if logged:
            results = {"student (last evaluation)": {k: v for k, v in logged[-1].items() if k.startswith("eval_")}}
    quantization = getattr(config, QAT_METADATA_KEY, None) if args.student_quantization else None
    return build_model_card(
        model_name=model_name or os.path.basename(os.path.normpath(args.output_dir)),
        teacher=teacher_name,
        student_description=description,
        losses=losses,
        results=results,
        dataset=dataset_name,
        base_model=getattr(config, "_name_or_path", None),
        teacher_revision=", ".join(revisions) or None,
        recipe=recipe,
        extra=describe_quantization(quantization),
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
