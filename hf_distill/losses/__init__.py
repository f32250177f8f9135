"""Loss families. Each family is a module of pure functions plus a name -> function table; config `choices` are
read from these tables, so a new loss is a function, a table entry and a test."""

from .fused import fused_logit_distillation_loss
from .logits import LOGIT_LOSSES, logit_distillation_loss, logit_divergence


__all__ = ["LOGIT_LOSSES", "fused_logit_distillation_loss", "logit_distillation_loss", "logit_divergence"]
