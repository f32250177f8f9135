"""Files the trainer adds to every `checkpoint-N` folder beside the student (the EMA teacher, the hint projectors):
the callback that writes them before the Trainer's `trainer_state.json`, and one safetensors reader/writer that
checks a file against the module it is loaded into."""

import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback


class CheckpointFileCallback(TrainerCallback):
    """Base of the callbacks that add a file of their own to every `checkpoint-N` folder (the EMA teacher, the hint
    projectors); a subclass implements `write(folder)`.

    `DistillationTrainer.save_model` calls `write_checkpoint` for every checkpoint, right after the model's weights
    and before the Trainer writes the checkpoint's `trainer_state.json`, which it writes last, whatever the save
    strategy (`steps`, `epoch`, `best`): a checkpoint with `trainer_state.json` is complete, this file included, even
    when a kill cut the next one short. Under a plain `Trainer`, `on_save` writes it (after `trainer_state.json`).
    Only the process that saves (`args.should_save`) writes.
    """

    _written_step: int | None = None

    def write(self, folder: str) -> None:
        """Write this callback's file into the checkpoint folder `folder` (created if missing)."""
        raise NotImplementedError

    def write_checkpoint(self, args, state, folder: str | None = None) -> None:
        """Write this callback's file for the checkpoint of `state.global_step` (default folder
        `output_dir/checkpoint-N`), once per step, on the process that saves."""
        if self._written_step == state.global_step:
            return
        if args.should_save:
            self.write(folder or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        self._written_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        self.write_checkpoint(args, state)


def save_checkpoint_tensors(
    folder: str | os.PathLike, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write `tensors` bit-exactly to `folder/filename` (safetensors, CPU, contiguous copies: tied weights become
    separate entries) with string `metadata` in its header; the folder is created if missing. Returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    save_file({name: t.detach().cpu().clone().contiguous() for name, t in tensors.items()}, path, metadata=metadata)
    return path


def load_checkpoint_tensors(
    folder: str | os.PathLike, filename: str, own: dict[str, torch.Tensor], *, what: str, missing: str, fix: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read `folder/filename` for the module whose state dict is `own`, checking that it holds the same tensor names
    and shapes.

    Args:
        folder (`str`): the checkpoint folder.
        filename (`str`): the file in it.
        own (`dict`): the state dict it will be loaded into.
        what (`str`): what the file should hold, for the error ("an EMA of this student").
        missing (`str`): why the file matters, for the error when it is absent.
        fix (`str`): what to do when it does not match.

    Returns:
        `(tensors, metadata)`.

    Raises:
        `FileNotFoundError`: no such file. `ValueError`: names or shapes differ (the message lists them).
    """
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {filename} in {folder}: {missing}")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    state = load_file(path)
    absent, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if absent or unexpected or wrong:
        raise ValueError(
            f"{path} does not hold {what}: missing {absent[:5]}, unexpected {unexpected[:5]}, shape mismatch "
            f"{wrong[:5]}; {fix}"
        )
    return state, metadata
