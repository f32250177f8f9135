"""TAID's interpolation parameter `t` as training state (Shing et al., ICLR 2025, arXiv 2501.16937).

`kd_loss="taid"` distils towards `softmax((1 - t) * sg(log p_s) + t * log p_t)` (`hf_distill.losses.logits.taid`);
`t` starts at `taid_t_start` and moves towards `taid_t_end` after every optimizer step by the paper's adaptive rule:

    rel      = (L_prev - L) / (L_prev + 1e-15)             relative change of the TAID loss L
    m        = beta * m + (1 - beta) * rel                 momentum (beta = `taid_beta`)
    t_lin    = t_start + (t_end - t_start) * step / max_steps
    t        = min(t_end, max(t_lin, t + alpha * sigmoid(m) * (1 - t)))   (alpha = `taid_alpha`)

The first step only records L. `taid_adaptive=False` uses `t = t_lin`. L is the KD loss of the whole optimizer step:
its token sum over every micro-batch of the gradient-accumulation window and every process, divided by their token
count, so 2 x 2 accumulation, a batch of 4 and 2 processes move `t` identically. (The reference code updates on each
forward call with the loss of that micro-batch, and feeds its cross-entropy form `-sum p_tgt log p_s`; here L is the
KL divergence, which is what the loss term holds.)

`TaidCallback` holds the state: it is logged as `taid_t`, saved in `trainer_state.json` of each checkpoint (an
`ExportableState`) and restored exactly from it on resume. The trainer hands its current t to the loss with each batch
(`terms.LossState`, `DistillationMixin.loss_state`); it never travels through the config.
"""

import math
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


# TAID's schedule defaults, written once (the config's `taid_*` fields read them).
TAID_DEFAULTS = {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "adaptive": True}


class TaidCallback(TrainerCallback, ExportableState):
    """Moves TAID's t after each optimizer step from that step's mean KD loss; checkpointed with the trainer state.

    Args:
        t_start (`float`): initial t in [0, 1).
        t_end (`float`): largest t, in (t_start, 1].
        alpha (`float`): step size of the adaptive update, in [0, 1].
        beta (`float`): momentum of the relative loss change, in [0, 1).
        adaptive (`bool`): False follows the linear schedule `t_start -> t_end` over `max_steps` only.
    """

    def __init__(
        self,
        t_start: float = TAID_DEFAULTS["t_start"],
        t_end: float = TAID_DEFAULTS["t_end"],
        alpha: float = TAID_DEFAULTS["alpha"],
        beta: float = TAID_DEFAULTS["beta"],
        adaptive: bool = TAID_DEFAULTS["adaptive"],
    ):
        self.t_start, self.t_end, self.alpha, self.beta, self.adaptive = t_start, t_end, alpha, beta, adaptive
        self.t = float(t_start)
        self.prev_loss: float | None = None
        self.momentum = 0.0
        self._window: torch.Tensor | None = None  # [kd sum, token count] of the current optimizer step, all processes

    @classmethod
    def from_args(cls, args: Any) -> "TaidCallback":
        return cls(args.taid_t_start, args.taid_t_end, args.taid_alpha, args.taid_beta, args.taid_adaptive)

    def update(self, loss: float, step: int, num_steps: int) -> float:
        """One update of t from the loss of optimizer step `step` (0-based) of `num_steps`; returns the new t."""
        if not math.isfinite(loss):
            return self.t  # a skipped / overflowed step does not move t
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        t_linear = self.t_start + (self.t_end - self.t_start) * min(step / max(num_steps, 1), 1.0)
        if self.adaptive:
            sigmoid = 1.0 / (1.0 + math.exp(-self.momentum))
            self.t = min(self.t_end, max(t_linear, self.t + self.alpha * sigmoid * (1.0 - self.t)))
        else:
            self.t = min(self.t_end, t_linear)
        self.prev_loss = loss
        return self.t

    def observe(self, kd_sum_and_count: torch.Tensor) -> None:
        """Adds one micro-batch's `[kd sum, token count]` (already summed over processes), shape `(2,)`."""
        pair = kd_sum_and_count.detach().to(torch.float64)
        self._window = pair if self._window is None else self._window + pair

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict) and "attributes" in saved and state.global_step > 0:  # resuming a checkpoint
            for name, value in saved["attributes"].items():
                setattr(self, name, value)
        self._window = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._window is not None and self._window[1] > 0:
            kd_sum, count = self._window.tolist()
            self.update(kd_sum / count, state.global_step - 1, state.max_steps)
        self._window = None

    def state(self) -> dict:
        return {
            "args": {
                "t_start": self.t_start,
                "t_end": self.t_end,
                "alpha": self.alpha,
                "beta": self.beta,
                "adaptive": self.adaptive,
            },
            "attributes": {"t": self.t, "prev_loss": self.prev_loss, "momentum": self.momentum},
        }
