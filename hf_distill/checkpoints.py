"""Files the trainer adds to every `checkpoint-N` folder beside the student (the EMA teacher, the hint projectors):
the callback that writes them before the Trainer's `trainer_state.json`, and one safetensors reader/writer that
checks a file against the module it is loaded into."""

import os

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
