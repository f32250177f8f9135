"""Loss families. Each family is a module of pure functions plus a name -> function table; config `choices` are
read from these tables, so a new loss is a function, a table entry and a test."""

from .attention import ATTENTION_LOSSES, attention_loss
from .features import HINT_LOSSES, hint_loss, parse_layer_map, uniform_layer_map
from .fused import fused_logit_distillation_loss
from .logits import LOGIT_LOSSES, logit_distillation_loss, logit_divergence
from .relations import RELATION_LOSSES, pool, relation_loss
from .sparse import SPARSE_LOSSES, sparse_logit_divergence


__all__ = [
    "ATTENTION_LOSSES",
    "HINT_LOSSES",
    "LOGIT_LOSSES",
    "RELATION_LOSSES",
    "SPARSE_LOSSES",
    "attention_loss",
    "fused_logit_distillation_loss",
    "hint_loss",
    "logit_distillation_loss",
    "logit_divergence",
    "parse_layer_map",
    "pool",
    "relation_loss",
    "sparse_logit_divergence",
    "uniform_layer_map",
]
