"""Model cards for distilled students: tags `hf-distill` and `distillation`, the teacher, the losses and results.

The trainer's `create_model_card` (used by `save_model`, checkpoints and `push_to_hub`) writes this card as README.md.
"""

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .quantization import QAT_METADATA_KEY, describe_quantization


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
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a distilled student.

    Args:
        model_name (`str`): name shown in the title.
        teacher (`str`, *optional*): teacher id or path.
        student_description (`str`): e.g. "10-layer Llama (54M parameters) initialised from teacher layers".
        losses (`dict`): loss settings, e.g. `{"kd_loss": "forward_kl", "temperature": 1.0, "kd_weight": 0.5}`.
        results (`dict`, *optional*): `{row name: {metric: value}}`, rendered as a table.
    """
    data = ModelCardData(
        tags=list(TAGS),
        library_name="transformers",
        base_model=base_model,
        datasets=[dataset] if dataset and "/" in dataset and not os.path.exists(dataset) else None,
    )
    loss_lines = "\n".join(f"- `{k}`: {v}" for k, v in losses.items())
    paper = PAPERS.get(str(losses.get("kd_loss")), "")
    body = f"""---
{data.to_yaml()}
---

# {model_name}

A student model distilled with [hf-distill](https://pypi.org/project/hf-distill/).

- **Teacher:** `{teacher or "none (fine-tuned without a teacher)"}`
- **Student:** {student_description}
- **Training data:** {dataset or "not recorded"}

## Losses

{loss_lines}
{f"{chr(10)}Method: {paper}." if paper else ""}

## Results

{_table(results)}
{extra}
"""
    return ModelCard(body)


def trainer_model_card(
    trainer: Any,
    model_name: str | None = None,
    dataset_name: str | None = None,
    results: dict[str, dict[str, float]] | None = None,
) -> ModelCard:
    """The card for a `DistillationMixin` trainer's current state (teacher, loss fields, last logged metrics)."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model, "config", None)
    n_params = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    description = f"{arch}, {layers} layers, {n_params / 1e6:.1f}M parameters"
    teachers = getattr(trainer, "teachers", None) or ([trainer.teacher] if trainer.teacher is not None else [])
    names = list(getattr(args, "teacher_models_name_or_path", None) or [])
    if not names and args.teacher_model_name_or_path:
        names = [args.teacher_model_name_or_path]
    if not names:
        names = [getattr(getattr(t, "config", None), "_name_or_path", None) or type(t).__name__ for t in teachers]
    cache = getattr(trainer, "_teacher_cache", None)
    if not names and cache is not None:
        names = [f"{cache.info['teacher']['name_or_path']} (offline top-{cache.info.get('k')} cache)"]
    teacher_name = ", ".join(n for n in names if n) or None
    losses = {name: getattr(args, name) for name in ("kd_loss", "temperature", "kd_weight", "ce_weight")}
    if args.kd_loss == "jsd":
        losses["beta"] = args.beta
    if args.kd_loss.startswith("skew"):
        losses["skew_alpha"] = args.skew_alpha
    if results is None:
        logged = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
        if logged:
            results = {"student (last evaluation)": {k: v for k, v in logged[-1].items() if k.startswith("eval_")}}
    quantization = getattr(config, QAT_METADATA_KEY, None) if getattr(args, "student_quantization", None) else None
    return build_model_card(
        model_name=model_name or os.path.basename(os.path.normpath(args.output_dir)),
        teacher=teacher_name,
        student_description=description,
        losses=losses,
        results=results,
        dataset=dataset_name,
        extra=describe_quantization(quantization),
    )
