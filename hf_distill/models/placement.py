"""Placing a frozen model (the teacher) for inference beside the student under DDP, FSDP and DeepSpeed ZeRO, through
accelerate's and TRL's own functions."""

import contextlib
from typing import Any

import torch
from torch import nn


def shared_parameter_names(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Names (in the teacher) of parameters that are the very same tensors in the student, e.g. after
    `get_peft_model(base)` injected the student's adapters into a `base` that is also passed as the teacher."""
    student_ids = {id(p) for p in student.parameters()}
    return [name for name, p in teacher.named_parameters() if id(p) in student_ids]


def check_teacher_fits(teacher: nn.Module, device: torch.device, placement: str, half_precision: bool = False) -> None:
    """Raise a ValueError when a teacher placed whole on a CUDA `device` cannot fit in its free memory.

    Only parameters and buffers not yet on `device` count (a teacher loaded there already holds its memory). Other
    device types are not checked (the copy fails with the backend's own out-of-memory error).

    Args:
        teacher (`nn.Module`): the frozen teacher.
        device (`torch.device`): where it will live.
        placement (`str`): the placement named in the message (e.g. "DDP", "DeepSpeed ZeRO-2").
        half_precision (`bool`): floating tensors will be cast to 2 bytes per element on the way (DeepSpeed fp16/bf16).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    needed = 0
    for tensor in [*teacher.parameters(), *teacher.buffers()]:
        if tensor.device != device and tensor.device.type != "meta":
            size = 2 if half_precision and tensor.is_floating_point() else tensor.element_size()
            needed += tensor.numel() * size
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free:
        gib = 1024**3
        raise ValueError(
            f"The teacher needs {needed / gib:.2f} GiB on {device} but only {free / gib:.2f} GiB are free: under "
            f"{placement} every process holds the whole teacher. Shard it with FSDP "
            "(`accelerate launch --config_file recipes/accelerate/fsdp2.yaml ...`) or DeepSpeed ZeRO-3 "
            "(`recipes/accelerate/zero3.yaml`), load it in bf16 (`teacher_model_init_kwargs: {dtype: bfloat16}`), "
            "or train from an offline teacher cache (`hf-distill cache-teacher`)."
        )


@contextlib.contextmanager
def _fsdp_plugin_restored(plugin: Any):
    """Undo the auto-wrap policy that preparing the teacher writes into accelerate's FSDP plugin, so the student is
    later wrapped by its own layer classes, not the teacher's."""
    saved = {name: getattr(plugin, name) for name in ("auto_wrap_policy", "transformer_cls_names_to_wrap")}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(plugin, name, value)


def prepare_teacher(teacher: nn.Module, trainer: Any) -> nn.Module:
    """Freeze the teacher and place it for inference beside the student, through accelerate's and TRL's APIs.

    - DeepSpeed: `trl.models.prepare_deepspeed`, an engine without optimizer. ZeRO-3 partitions the teacher's
      parameters like the student's; ZeRO-1/2 shard only optimizer state and gradients, which a frozen teacher does not
      have, so the teacher runs at stage 0: whole on every device, in the engine's fp16/bf16.
    - FSDP2: accelerate's `fsdp2_prepare_model`, the function that shards the student: the same units (one per
      decoder layer, embeddings, final norm + head), mixed-precision policy, CPU offload, and the rank-0 broadcast of
      `cpu_ram_efficient_loading` (TRL's `prepare_fsdp` shards only the root module under FSDP2, so the whole teacher
      is gathered for every forward, and it skips that broadcast).
    - FSDP1: `trl.models.prepare_fsdp` (an FSDP wrapper with the plugin's auto-wrap policy and `sync_module_states`).
    - Otherwise (one device, DDP, multi-CPU): `accelerator.prepare_model(evaluation_mode=True)`: moved to the device,
      under the mixed-precision autocast, without a DDP wrapper (a frozen model has nothing to synchronise).

    Under no branch is the teacher registered in `accelerator._models`, so `accelerator.save_state` and the
    Trainer's checkpoints hold the student only (and accelerate never pairs the student's optimizer with the teacher).

    Args:
        teacher (`nn.Module`): the teacher, a `PreTrainedModel` or a `peft.PeftModel` (adapters merged or not).
        trainer (`transformers.Trainer`): the trainer whose `accelerator` and `model` (the student) are set up.

    Returns:
        `nn.Module`: the prepared teacher, in eval mode with `requires_grad=False` everywhere.
    """
    shared = shared_parameter_names(teacher, trainer.model)
    if shared:
        raise ValueError(
            f"The teacher shares {len(shared)} parameter tensors with the student (e.g. {shared[:3]}), so freezing "
            "the teacher would freeze the student and the teacher would change during training. This happens when "
            "the student is `get_peft_model(base, ...)` (PEFT injects adapters into `base` in place) and `base` is "
            "also the teacher: load the teacher separately or pass `copy.deepcopy(base)` made before get_peft_model."
        )
    teacher.eval().requires_grad_(False)
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = ds_config["zero_optimization"]["stage"]
        if stage != 3:
            half = any(ds_config.get(key, {}).get("enabled") is True for key in ("fp16", "bf16"))
            check_teacher_fits(teacher, accelerator.device, f"DeepSpeed ZeRO-{stage}", half_precision=half)
        return prepare_deepspeed(teacher, accelerator)
    if trainer.is_fsdp_enabled:
        plugin = accelerator.state.fsdp_plugin
        with _fsdp_plugin_restored(plugin):
            if plugin.fsdp_version == 2:
                from accelerate.utils.fsdp_utils import fsdp2_prepare_model

                return fsdp2_prepare_model(accelerator, teacher).eval()
            from trl.models import prepare_fsdp

            return prepare_fsdp(teacher, accelerator)
    placement = "DDP" if accelerator.num_processes > 1 else "single-device training"
    check_teacher_fits(teacher, accelerator.device, placement)
    prepared = accelerator.prepare_model(teacher, evaluation_mode=True)
    unregister_model(accelerator, prepared, teacher)  # the teacher is not part of the training state
    return prepared


def unregister_model(accelerator: Any, *modules: nn.Module) -> None:
    """Remove `modules` from the models `accelerator.prepare_model` registered for `save_state` / `load_state`.

    accelerate has no public API for this; it keeps the list in `accelerator._models` (checked against the pinned
    accelerate version by tests/test_placement.py). Used for the teacher and the hint projectors, which are prepared
    (moved, DDP-wrapped) but are not part of the student's training state."""
    accelerator._models[:] = [m for m in accelerator._models if not any(m is module for module in modules)]
