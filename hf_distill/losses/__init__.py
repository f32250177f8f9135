"""Loss families. Each family is a module of pure functions plus a name -> function table; config `choices` are
read from these tables, so a new loss is a function, a table entry and a test. Nothing here imports the rest of
hf_distill; `IGNORE_INDEX` (-100, the label of unsupervised positions) is defined here once.

Return contract per family (N: supervised rows, V: vocabulary, B/T: batch/positions):
- logits (`logits.py`): `logit_divergence(student (N, V), teacher (N, V), loss_type=...)` -> `(N,)` per-row divergence
  in fp32 (the caller sums or means); `logit_distillation_loss` -> the scalar mean (or `reduction=`).
- sparse (`sparse.py`): `sparse_logit_divergence(student (N, V), ids (N, k), logprobs (N, k), tail (N,))` -> `(N,)`.
- fused (`fused.py`): `fused_logit_distillation_loss(student_hidden (N, H_s), student_weight (V, H_s), teacher_hidden
  (N, H_t), teacher_weight (V, H_t), ...)` -> `(kd, ce)` scalars (`reduction="sum"` or `"mean"`; `ce` is None without
  `labels`), values and gradients equal to the dense path.
- features (`features.py`), attention (`attention.py`): `(sum, n)`, an fp32 scalar summed over the `n` positions
  (query rows) the mask selects, so the caller normalises.
- relations (`relations.py`): an fp32 scalar, already a mean (over layer pairs, and the batch's examples or tokens).
"""

from .attention import ATTENTION_LOSSES, attention_loss
from .features import HINT_LOSSES, hint_loss, parse_layer_map, uniform_layer_map
from .fused import IGNORE_INDEX, fused_logit_distillation_loss
from .logits import DIVERGENCE_DEFAULTS, LOGIT_LOSSES, logit_distillation_loss, logit_divergence
from .relations import RELATION_LOSSES, pool, relation_loss
from .sparse import SPARSE_LOSSES, sparse_logit_divergence


__all__ = [
    "ATTENTION_LOSSES",
    "DIVERGENCE_DEFAULTS",
    "HINT_LOSSES",
    "IGNORE_INDEX",
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
