"""Feature hints, attention transfer and relation losses wired into the trainer (FitNets, TinyBERT, BERT-PKD, SP, RKD,
FSP). The losses are the pure functions of `hf_distill.losses.{features,attention,relations}`; this module owns the
layer map, the projectors and how each term is normalised so that it adds up like the KD term:

- hint: per hint pair, the masked sum over supervised positions (hidden position t predicts label t + 1), averaged
  over the pairs; divided by the accumulation window's token count like KD, so it is a per-token mean.
- attention: the same over supervised query rows (keys = the attention mask), for the mapped layers.
- relation: a per-batch value (pooled over supervised tokens, or the first / last token), multiplied by the
  micro-batch's token count so that the trainer's division gives back the value, token-weighted across micro-batches.
"""

import logging
from typing import Any

import torch
from torch import nn

from ..heads import unwrap
from ..losses import attention_loss, hint_loss, parse_layer_map, relation_loss
from ..terms import LossTerms, SupervisedView
from .projectors import HintProjectors


logger = logging.getLogger(__name__)


def _layers_and_width(model: nn.Module) -> tuple[int, int]:
    config = unwrap(model).config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if layers is None or width is None:
        raise ValueError(f"Cannot read the layer count / hidden size of {type(model).__name__} for hint losses.")
    return int(layers), int(width)


def _heads(model: nn.Module) -> int:
    return int(unwrap(model).config.num_attention_heads)


def use_eager_attention(model: nn.Module, name: str) -> None:
    """Attention maps need eager attention (sdpa / flash return none): switch, with a warning, only when needed."""
    model = unwrap(model)
    if getattr(model.config, "_attn_implementation", None) != "eager":
        logger.warning(
            "attention_weight > 0 needs attention probabilities: switching the %s from %s to eager attention.",
            name,
            model.config._attn_implementation,
        )
        model.set_attn_implementation("eager")


def feature_forward_kwargs(args: Any) -> dict[str, bool] | None:
    """The forward arguments the feature terms need from the student and the teacher (hidden states; attention maps
    when `attention_weight > 0`), or None when no hint, attention or relation term is on."""
    if not args.uses_features:
        return None
    kwargs = {"output_hidden_states": True}
    if args.attention_weight > 0:
        kwargs["output_attentions"] = True
    return kwargs


class HintDistiller(nn.Module):
    """Layer map + projectors + the three term families for one student/teacher pair.

    Args:
        args: a `DistillationArguments` (fields `hint_layers`, `hint_loss`, `hint_weight`, `hint_projector`,
            `hint_normalize`, `attention_weight`, `attention_loss`, `relation_loss`, `relation_weight`,
            `relation_pooling`).
    """

    def __init__(self, args: Any, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.args = args
        s_layers, s_width = _layers_and_width(student)
        t_layers, t_width = _layers_and_width(teacher)
        self.layer_map = parse_layer_map(args.hint_layers or "uniform", s_layers, t_layers)
        self.use_hints = args.hint_layers is not None and args.hint_weight > 0
        self.use_attention = args.attention_weight > 0
        self.use_relation = args.relation_loss is not None and args.relation_weight > 0
        if self.use_attention:
            s_heads, t_heads = _heads(student), _heads(teacher)
            if t_heads % s_heads:
                raise ValueError(
                    f"attention_loss needs the teacher's head count ({t_heads}) to be a multiple of the student's "
                    f"({s_heads}) so that teacher heads can be averaged in groups; set attention_weight=0 or pick a "
                    "student with a dividing head count."
                )
            use_eager_attention(student, "student")
            use_eager_attention(teacher, "teacher")
        needs_projection = self.use_hints or (self.use_relation and args.relation_loss == "fsp")
        self.projectors = (
            HintProjectors.from_layer_map(self.layer_map, s_width, t_width, args.hint_projector)
            if needs_projection
            else None
        )

    def forward_kwargs(self) -> dict[str, bool]:
        """What both models' forward must return for these terms (`feature_forward_kwargs`)."""
        return feature_forward_kwargs(self.args) or {}

    def terms(self, outputs: Any, teacher_outputs: Any, view: SupervisedView) -> LossTerms:
        """Summed hint / attention / relation terms with their weights (see the module docstring), on the
        supervised positions of `view` (its `batch` gives the attention mask)."""
        args = self.args
        attn = view.batch.get("attention_mask")
        if view.labels.dim() == 1:  # sequence classification: one label per example, every real token carries the hint
            attn = attn.bool() if attn is not None else torch.ones_like(view.batch["input_ids"], dtype=torch.bool)
            sup = attn
        else:
            sup = view.hidden_mask()  # hidden position t predicts label t + 1 (causal LMs)
            attn = attn.bool() if attn is not None else torch.ones_like(sup)
        s_states, t_states = outputs.hidden_states, teacher_outputs.hidden_states
        pairs = list(self.layer_map.items())
        projected = self.projectors({i: s_states[i] for i, _ in pairs}) if self.projectors is not None else None
        sums, weights = {}, {}
        if self.use_hints:
            total = sum(
                hint_loss(projected[i], t_states[j], sup, loss_type=args.hint_loss, normalize=args.hint_normalize)[0]
                for i, j in pairs
            )
            sums["hint"], weights["hint"] = total / len(pairs), args.hint_weight
        if self.use_attention:
            att_pairs = [(i, j) for i, j in pairs if i >= 1 and j >= 1]  # attentions[k - 1] belongs to layer k
            total = sum(
                attention_loss(
                    outputs.attentions[i - 1],
                    teacher_outputs.attentions[j - 1],
                    sup,
                    key_mask=attn,
                    loss_type=args.attention_loss,
                )[0]
                for i, j in att_pairs
            )
            sums["attention"], weights["attention"] = total / max(len(att_pairs), 1), args.attention_weight
        if self.use_relation:
            if args.relation_loss == "fsp":
                students = [projected[i] for i, _ in pairs]
            else:
                students = [s_states[i] for i, _ in pairs]
            mask = sup if args.relation_pooling == "mean" else attn
            value = relation_loss(
                students,
                [t_states[j] for _, j in pairs],
                mask,
                loss_type=args.relation_loss,
                pooling=args.relation_pooling,
            )
            sums["relation"], weights["relation"] = value * view.n_items, args.relation_weight
        return LossTerms(sums, weights, view.n_items)
