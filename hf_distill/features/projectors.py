"""Learned hint projectors (FitNets' regressors): student hidden states -> teacher width.

The projectors are trained with the student (their parameters must be in the optimizer) and saved beside each
checkpoint as `hint_projectors.safetensors`, so a resumed run continues with them; they are never part of the exported
student model.
"""

import json
import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..checkpoints import CheckpointFileCallback, load_checkpoint_tensors, save_checkpoint_tensors


logger = logging.getLogger(__name__)

PROJECTOR_KINDS = ("identity", "linear", "mlp")
PROJECTORS_FILENAME = "hint_projectors.safetensors"


def _build(kind: str, student_width: int, teacher_width: int, layer: int) -> nn.Module:
    if kind == "identity":
        if student_width != teacher_width:
            raise ValueError(
                f"hint_projector='identity' needs equal widths, but student layer {layer} has width {student_width} "
                f"and its teacher layer {teacher_width}; use hint_projector='linear' (or 'mlp')."
            )
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(student_width, teacher_width)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(student_width, teacher_width), nn.GELU(), nn.Linear(teacher_width, teacher_width)
        )
    raise ValueError(f"Unknown hint_projector {kind!r}; choose one of {list(PROJECTOR_KINDS)}.")


class HintProjectors(nn.Module):
    """One projector per hint pair, keyed by the student layer index (as a string) in an `nn.ModuleDict`.

    Args:
        widths (`Mapping[int, tuple[int, int]]`): `{student layer index: (student_width, teacher_width)}`, one entry
            per hint pair (indices as in `hf_distill.losses.features.parse_layer_map`).
        kind (`str`): `"identity"` (equal widths only, no parameters), `"linear"` (`Linear(H_s, H_t)`) or `"mlp"`
            (`Linear(H_s, H_t) -> GELU -> Linear(H_t, H_t)`). Parameters use PyTorch's default initialisation, so seed
            before building for reproducible runs.

    Example:
        >>> proj = HintProjectors.from_layer_map({1: 2, 2: 4}, student_width=32, teacher_width=64)
        >>> proj(1, torch.zeros(2, 5, 32)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, widths: Mapping[int, tuple[int, int]], kind: str = "linear") -> None:
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"Unknown hint_projector {kind!r}; choose one of {list(PROJECTOR_KINDS)}.")
        self.kind = kind
        self.widths = {int(layer): (int(s), int(t)) for layer, (s, t) in widths.items()}
        self.projectors = nn.ModuleDict(
            {str(layer): _build(kind, s, t, layer) for layer, (s, t) in sorted(self.widths.items())}
        )

    @classmethod
    def from_layer_map(
        cls, layer_map: Mapping[int, int], student_width: int, teacher_width: int, kind: str = "linear"
    ) -> "HintProjectors":
        """Projectors for every student layer of `layer_map` when all layers share one width per model (the usual
        transformer case: `config.hidden_size`)."""
        return cls(dict.fromkeys(layer_map, (student_width, teacher_width)), kind=kind)

    def forward(
        self, layer_key: int | str | Mapping[int | str, torch.Tensor], hidden: torch.Tensor | None = None
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """Project the hidden states of one student layer, or of all hint layers in one call.

        Args:
            layer_key (`int`, `str` or `Mapping`): student layer index of the hint pair; or a mapping
                `{student layer index: hidden states}` (then `hidden` is None), which projects every entry in a single
                forward call (what DDP expects of a wrapped module: one forward per backward).
            hidden (`torch.Tensor`, *optional*): shape `(B, T, H_s)`; cast to the projector's parameter dtype first.

        Returns:
            `torch.Tensor` of shape `(B, T, H_t)`; for a mapping, `dict[int, torch.Tensor]` with the same keys as ints.
        """
        if isinstance(layer_key, Mapping):
            if hidden is not None:
                raise ValueError("Pass either (layer_key, hidden) or one mapping {layer: hidden}, not both.")
            return {int(key): self._project(key, value) for key, value in layer_key.items()}
        if hidden is None:
            raise ValueError(f"No hidden states given for student layer {layer_key}.")
        return self._project(layer_key, hidden)

    def _project(self, layer_key: int | str, hidden: torch.Tensor) -> torch.Tensor:
        key = str(layer_key)
        if key not in self.projectors:
            raise KeyError(f"No hint projector for student layer {key}; configured layers: {list(self.projectors)}.")
        projector = self.projectors[key]
        weight = next(projector.parameters(), None)
        if weight is not None and hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return projector(hidden)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def metadata(self) -> dict[str, str]:
        """String metadata stored in the safetensors header (checked on load)."""
        return {"kind": self.kind, "widths": json.dumps({str(k): list(v) for k, v in sorted(self.widths.items())})}


def save_projectors(module: HintProjectors, directory: str | os.PathLike) -> str:
    """Write `module`'s parameters to `directory/hint_projectors.safetensors` (bit-exact, any dtype).

    Args:
        module (`HintProjectors`): the projectors (unwrap DDP first).
        directory (`str` or `os.PathLike`): checkpoint folder; created if missing.

    Returns:
        `str`: the file written.
    """
    return save_checkpoint_tensors(directory, PROJECTORS_FILENAME, module.state_dict(), module.metadata())


def load_projectors(module: HintProjectors, directory: str | os.PathLike) -> HintProjectors:
    """Load `directory/hint_projectors.safetensors` into `module` in place (onto its current device).

    Args:
        module (`HintProjectors`): projectors built from the same config (layers, widths, kind) as the saved ones.
        directory (`str` or `os.PathLike`): checkpoint folder.

    Returns:
        `HintProjectors`: `module`, for chaining.
    """
    fix = "resume with the same hint_layers and hint_projector."
    state, saved = load_checkpoint_tensors(
        directory,
        PROJECTORS_FILENAME,
        module.state_dict(),
        what="the configured projectors",
        missing="the checkpoint was saved without hint projectors (or by an older run), so it cannot resume a run "
        "with hints.",
        fix=fix,
    )
    expected = module.metadata()
    if saved and saved != expected:
        raise ValueError(
            f"{os.path.join(directory, PROJECTORS_FILENAME)} holds projectors for kind={saved.get('kind')!r}, "
            f"widths={saved.get('widths')} but this run configures kind={expected['kind']!r}, "
            f"widths={expected['widths']}; {fix}"
        )
    module.load_state_dict(state)
    logger.info("Loaded %d hint projector tensors from %s", len(state), directory)
    return module


class ProjectorCallback(CheckpointFileCallback):
    """The projectors' share of the training loop, through Trainer's public callback hooks.

    - `on_step_end`: zeroes their gradients after every optimizer step, as `Trainer` does for the student (it calls
      `model.zero_grad()`; the projectors live outside the student, so without this their `.grad` would keep summing
      over the whole run and a resumed run, starting from zero, would diverge).
    - writes them into each checkpoint folder (`checkpoint-<global_step>` under `output_dir`) before the Trainer's
      `trainer_state.json`, on the process that saves (`checkpoints.CheckpointFileCallback`). Loading them on resume is
      `load_projectors`, called by the trainer's `_load_from_checkpoint` (there is no callback hook that knows the
      checkpoint being resumed).

    Args:
        projectors (`nn.Module`): the projectors (plain or DDP-wrapped).
    """

    def __init__(self, projectors: nn.Module) -> None:
        self.projectors = projectors

    def write(self, folder: str) -> None:
        save_projectors(getattr(self.projectors, "module", self.projectors), folder)

    def on_step_end(self, args, state, control, **kwargs):
        self.projectors.zero_grad(set_to_none=True)
