"""The parts of a student's model card that follow the Hub's model card spec
(https://github.com/huggingface/hub-docs/blob/main/modelcard.md): `pipeline_tag` by head kind, the `model-index` of
held-out results (`huggingface_hub.EvalResult`), the usage snippet, the table of distillation settings, and
`check_card`, an offline check of a card's metadata (`ModelCard.validate` posts the card to the Hub instead).
"""

import dataclasses
import json
import math
import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from .models import SHORTHANDS
from .validation import APPLIES_ONLY_WITH


# head kind (`heads.Head.kind`) -> (transformers Auto class, Hub pipeline tag)
HEAD_USAGE = {
    "causal_lm": ("AutoModelForCausalLM", "text-generation"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "text2text-generation"),
    "sequence_classification": ("AutoModelForSequenceClassification", "text-classification"),
    "token_classification": ("AutoModelForTokenClassification", "token-classification"),
    "masked_lm": ("AutoModelForMaskedLM", "fill-mask"),
}
PIPELINE_TAGS = {kind: tag for kind, (_, tag) in HEAD_USAGE.items()}
EXAMPLE_INPUTS = {
    "text-generation": '"Question: What is two plus two?\\nAnswer:"',
    "text2text-generation": '"Question: What is two plus two?"',
    "text-classification": '"This movie was a delight from start to finish."',
    "token-classification": '"My name is Sarah and I live in London."',
    "fill-mask": 'f"Paris is the {tokenizer.mask_token} of France."',
}

# Top-level metadata keys of the Hub's model card spec (hub-docs `modelcard.md`, plus the gating keys).
SPEC_KEYS = frozenset(
    {"language", "license", "license_name", "license_link", "library_name", "tags", "datasets", "metrics",
     "base_model", "base_model_relation", "pipeline_tag", "model-index", "new_version", "inference", "widget",
     "thumbnail", "co2_eq_emissions", "extra_gated_prompt", "extra_gated_fields", "extra_gated_heading",
     "extra_gated_description", "extra_gated_button_content"}
)  # fmt: skip
# License identifiers the Hub accepts (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
    cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
    cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
    cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0
    lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
    openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
    fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other""".split()  # noqa: SIM905
)
# metrics the Trainer logs at evaluation that are timings, not held-out figures
NOT_RESULTS = frozenset({"eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                         "eval_model_preparation_time"})  # fmt: skip


def hub_id(name: Any) -> str | None:
    """`name` when it reads as a Hub repo id (`namespace/name`, no such local path), a shorthand's id, else None."""
    if not isinstance(name, str):
        return None
    name = SHORTHANDS[name].hub_id if name in SHORTHANDS else name
    if name.count("/") != 1 or os.path.exists(name) or name.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return None
    return name


def usage_snippet(head_kind: str | None, target: str, subfolder: str | None = None) -> str:
    """A fenced Python block that loads the student (`target`: its output folder or Hub repo id) with its Auto class
    and runs it through the `transformers` pipeline of its head."""
    auto, task = HEAD_USAGE.get(head_kind or "", HEAD_USAGE["causal_lm"])
    where = json.dumps(target) + (f", subfolder={json.dumps(subfolder)}" if subfolder else "")
    extra = ", max_new_tokens=32" if "generation" in task else ""
    return f"""```python
from transformers import {auto}, AutoTokenizer, pipeline

model = {auto}.from_pretrained({where})
tokenizer = AutoTokenizer.from_pretrained({where})
pipe = pipeline("{task}", model=model, tokenizer=tokenizer)
print(pipe({EXAMPLE_INPUTS[task]}{extra}))
```
"""


def applied_settings(args: Any, with_teacher: bool = True) -> dict[str, Any]:
    """The distillation settings of config `args` that apply to its run, for the card's settings table: the loss
    weights; with a teacher `kd_loss`, `temperature` and the divergence's own parameters; every switch set away from
    its default (hints, attention, relations, on-policy `lmbda`, `seq_kd`, early exits, EMA, cross-tokenizer loss,
    several teachers, rationale weights, QAT) and the fields that apply with it (`validation.APPLIES_ONLY_WITH`)."""
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(args)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    names = ["kd_loss", "temperature", "kd_weight", "ce_weight"] if with_teacher else ["kd_weight", "ce_weight"]
    switches = ("hint_layers", "attention_weight", "relation_loss", "lmbda", "seq_kd", "early_exit_layers",
                "teacher_ema_decay", "cross_tokenizer_loss", "teacher_weights", "multi_teacher_mode", "label_weight",
                "rationale_weight", "student_quantization")  # fmt: skip
    names += [n for n in switches if hasattr(args, n) and getattr(args, n) != defaults.get(n)]
    transport = ("teacher_api_prefetch", "teacher_api_timeout", "teacher_api_max_retries")
    for name, (needs, applies) in APPLIES_ONLY_WITH.items():
        if name in transport or not hasattr(args, name) or (needs.startswith("kd_loss") and not with_teacher):
            continue
        if applies(args):
            names.append(name)
    return {name: getattr(args, name) for name in dict.fromkeys(names)}


def settings_table(settings: dict[str, Any]) -> str:
    """`| setting | value |` Markdown rows, one per setting."""
    if not settings:
        return "_No settings recorded._"
    rows = [f"| `{name}` | {value} |" for name, value in settings.items()]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def eval_results(
    metrics: dict[str, Any],
    head_kind: str | None,
    dataset: str | list[str] | None = None,
    split: str | None = None,
) -> list[EvalResult]:
    """The `model-index` entries of the held-out figures a run measured: one `EvalResult` per numeric `eval_*`
    metric of its last evaluation (timings left out), on `dataset`: a Hub id, local data (named by its file, type
    `local`), or the datasets of a mixture whose held-out share was evaluated (type `mixture`)."""
    task = PIPELINE_TAGS.get(head_kind or "", "text-generation")
    names = [dataset] if isinstance(dataset, str) else list(dataset or [])
    if len(names) > 1:
        repo = None
        kind, name = "mixture", f"held-out share of a mixture of {len(names)} datasets"
    else:
        repo = hub_id(names[0]) if names else None
        kind = repo or "local"
        name = repo or (f"{os.path.basename(os.path.normpath(names[0]))} (local)" if names else "held-out set")
    found = []
    for key, value in metrics.items():
        if not key.startswith("eval_") or key in NOT_RESULTS or isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            metric = key.removeprefix("eval_")
            found.append(EvalResult(task_type=task, dataset_type=kind, dataset_name=name, dataset_split=split,
                                    metric_type=metric, metric_value=float(value),
                                    metric_name=f"held-out {metric}"))  # fmt: skip
    return found


def check_card(card: ModelCard | str) -> ModelCardData:
    """Check a model card's metadata offline, as the Hub's validation would, and return it parsed.

    Checks: the YAML block parses (`ModelCard`), its keys are keys of the Hub's model card spec (`SPEC_KEYS`), the
    `model-index` converts to `EvalResult`s and back unchanged (and names the model), `ModelCardData` round-trips the
    metadata, `license` is a Hub license id, `pipeline_tag` a task a student head gives, `base_model` and `datasets`
    are Hub repo ids (never local paths), and the tags include `hf-distill` and `distillation`.

    Raises:
        `ValueError`: naming the first key that breaks the spec and what it must be.
    """
    card = ModelCard(card if isinstance(card, str) else str(card), ignore_metadata_errors=False)
    raw = card.data.to_dict()
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"Model card metadata keys {unknown} are not in the Hub's model card spec; remove them.")
    again = ModelCardData(**raw).to_dict()
    if again != raw:
        raise ValueError(f"The model card metadata does not round-trip through ModelCardData: {raw} != {again}.")
    if "model-index" in raw:
        model_name, results = model_index_to_eval_results(raw["model-index"])
        if not model_name or not results:
            raise ValueError("The `model-index` names no model or holds no result; set `model_name` and results.")
    if raw.get("license") is not None and raw["license"] not in HUB_LICENSES:
        raise ValueError(f"`license: {raw['license']}` is not a Hub license id; use one of the Hub's, or `other`.")
    if raw.get("pipeline_tag") is not None and raw["pipeline_tag"] not in set(PIPELINE_TAGS.values()):
        raise ValueError(f"`pipeline_tag: {raw['pipeline_tag']}` is not one of {sorted(set(PIPELINE_TAGS.values()))}.")
    for key in ("base_model", "datasets"):
        values = raw.get(key)
        for value in [values] if isinstance(values, str) else list(values or []):
            if hub_id(value) != value:
                raise ValueError(f"`{key}` lists {value!r}, which is not a Hub repo id (local data goes in the body).")
    missing = {"hf-distill", "distillation"} - set(raw.get("tags") or [])
    if missing:
        raise ValueError(f"The model card's tags lack {sorted(missing)}.")
    return card.data
