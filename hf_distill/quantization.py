"""Quantization-aware distillation with torchao: a low-precision student trained against a full-precision teacher.

`prepare_qat_student` swaps the student's decoder `nn.Linear` layers for torchao's `FakeQuantizedLinear` (torchao
`quantize_(model, QATConfig(base, step="prepare"))`): the forward pass rounds the weights (and, for `int8da_int4w`,
the activations) to the target integer grid, the backward pass is straight-through, and the latent weights stay fp32,
so the usual KD terms train the student for the precision it will run at. The embeddings and the `lm_head` stay full
precision (their forward is what the fused KD loss rebuilds from the last hidden state).

After training, two steps give the deployed model:

- `fake_quantized_weights(model)` (used by `DistillationMixin.save_model`) saves the weights rounded onto the int grid
  (`dequantize(quantize(w))`), so the saved checkpoint is a plain transformers model whose `Linear` weights are
  exactly what the int model uses; `hf-distill export --format gguf --quant q4_0` stores them without further loss
  (see `hf_distill.export`). Trainer checkpoints keep the latent fp32 weights, so resuming continues QAT exactly.
- `convert_qat_student(model)` (torchao `step="convert"`) turns the prepared model into real int weights
  (`IntxUnpackedToInt8Tensor`) for torchao kernels; its outputs equal the fake-quantized forward.
"""

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


logger = logging.getLogger(__name__)

# scheme -> (description, weight bits, int8 dynamic activations?)
QUANT_SCHEMES: dict[str, tuple[str, int, bool]] = {
    "int8da_int4w": ("int8 dynamic per-token activations, int4 symmetric per-group weights", 4, True),
    "int4w": ("int4 symmetric per-group weights (weight-only)", 4, False),
    "int8w": ("int8 symmetric per-group weights (weight-only)", 8, False),
}

QAT_METADATA_KEY = "hf_distill_quantization"  # config.json entry written by `save_model` for a QAT student


def _require_torchao():
    try:
        import torchao  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "`student_quantization` needs torchao: `pip install 'hf-distill[quant]'` (torchao>=0.18)."
        ) from err


STUDENT_GROUP_SIZE = 32  # weights per quantization group: GGUF's q4_0 / q8_0 block


def check_scheme(scheme: str, group_size: int) -> None:
    """Raise a `ValueError` naming the problem if `scheme` / `group_size` is not a supported QAT setting."""
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"`student_quantization` must be one of {list(QUANT_SCHEMES)} or None, got {scheme!r}.")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`student_quantization_group_size` must be a positive int, got {group_size!r}.")


def torchao_base_config(scheme: str, group_size: int = STUDENT_GROUP_SIZE) -> Any:
    """The torchao post-training config whose numerics QAT simulates (`QATConfig(base, step=...)`).

    Args:
        scheme (`str`): one of `QUANT_SCHEMES`.
        group_size (`int`): weights per quantization group along the input dimension (32 = GGUF's block).
    """
    check_scheme(scheme, group_size)
    _require_torchao()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    bits = QUANT_SCHEMES[scheme][1]
    dtype = torch.int4 if bits == 4 else torch.int8
    if QUANT_SCHEMES[scheme][2]:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerGroup(group_size))
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group_size))


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def qat_target_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules QAT quantizes: every Linear except the output head (`lm_head`)."""
    head = _output_head(model)
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") or any(hasattr(m, "lora_A") for m in model.modules())


def prepare_qat_student(model: nn.Module, scheme: str, group_size: int = STUDENT_GROUP_SIZE) -> nn.Module:
    """Prepare `model` in place for quantization-aware training (torchao `QATConfig(base, step="prepare")`).

    Every `nn.Linear` but the output head becomes a `FakeQuantizedLinear`: same parameters (so optimizers, state
    dicts and checkpoints are unchanged), forward on the weights rounded to the `scheme`'s grid, straight-through
    gradients.

    Args:
        model (`nn.Module`): the student (a transformers model), not wrapped by PEFT.
        scheme (`str`): `int8da_int4w`, `int4w` or `int8w` (see `QUANT_SCHEMES`).
        group_size (`int`): weights per group; every quantized layer's `in_features` must be a multiple of it.

    Returns:
        The same `model`, with `model.config.hf_distill_quantization = {"scheme": ..., "group_size": ...}`.
    """
    check_scheme(scheme, group_size)
    if _is_peft(model):
        raise ValueError(
            "`student_quantization` does not support a PEFT/LoRA student: torchao's QAT fake-quantizes whole "
            "`nn.Linear` weights, while LoRA trains a full-precision update `B @ A` beside a frozen base, and the "
            "merged weight `W + B @ A` would no longer lie on the grid that was trained for. Train the full student "
            "(no `peft_config`), or merge the adapters (`model.merge_and_unload()`) and run QAT on the merged model."
        )
    names = qat_target_names(model)
    if not names:
        raise ValueError(f"`student_quantization` found no nn.Linear layers to quantize in {type(model).__name__}.")
    modules = dict(model.named_modules())
    bad = [f"{n} (in_features={modules[n].in_features})" for n in names if modules[n].in_features % group_size]
    if bad:
        raise ValueError(
            f"`student_quantization_group_size={group_size}` does not divide the input size of {bad[:3]}"
            f"{' ...' if len(bad) > 3 else ''}; pick a group size that divides every layer's input size (e.g. 32)."
        )
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    targets = set(names)
    quantize_(
        model,
        QATConfig(torchao_base_config(scheme, group_size), step="prepare"),
        filter_fn=lambda module, fqn: fqn in targets,
    )
    if hasattr(model, "config"):
        setattr(model.config, QAT_METADATA_KEY, {"scheme": scheme, "group_size": group_size})
    logger.info("QAT (%s, group size %d): %d Linear layers fake-quantized.", scheme, group_size, len(names))
    return model


def fake_quantized_modules(model: nn.Module) -> list[nn.Module]:
    """The torchao `FakeQuantizedLinear` modules of `model` (empty if it was not prepared for QAT)."""
    try:
        from torchao.quantization.qat import FakeQuantizedLinear
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]


def is_qat_prepared(model: nn.Module) -> bool:
    """Whether `model` holds torchao fake-quantized Linear layers."""
    return bool(fake_quantized_modules(model))


@contextlib.contextmanager
def fake_quantized_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every fake-quantized Linear's weight holds its rounded value `dequant(quant(w))`.

    Used to save a QAT student: the checkpoint is a plain model whose weights lie on the int grid (what the deployed
    int model computes with). The latent fp32 weights are restored on exit. Activation fake quantization
    (`int8da_int4w`) is a runtime step and is not part of the saved weights.
    """
    saved = []
    with torch.no_grad():
        for module in fake_quantized_modules(model):
            quantizer = getattr(module, "weight_fake_quantizer", None)
            if quantizer is None or not getattr(quantizer, "enabled", True):
                continue
            saved.append((module, module.weight.data))
            module.weight.data = quantizer(module.weight.data).detach()
    try:
        yield model
    finally:
        for module, latent in saved:
            module.weight.data = latent


def convert_qat_student(model: nn.Module) -> nn.Module:
    """Convert a QAT-prepared `model` in place to real int weights (torchao `QATConfig(base, step="convert")`).

    The scheme is read from `model.config.hf_distill_quantization` (set by `prepare_qat_student`). The converted
    linear weights are torchao `IntxUnpackedToInt8Tensor`s; outputs equal the fake-quantized forward.
    """
    settings = getattr(getattr(model, "config", None), QAT_METADATA_KEY, None)
    if not settings or not is_qat_prepared(model):
        raise ValueError("The model was not prepared for QAT (`prepare_qat_student` / `student_quantization`).")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    base = torchao_base_config(settings["scheme"], settings["group_size"])
    targets = {name for name, m in model.named_modules() if m in set(fake_quantized_modules(model))}
    quantize_(model, QATConfig(base, step="convert"), filter_fn=lambda module, fqn: fqn in targets)
    return model


def post_training_quantize(model: nn.Module, scheme: str, group_size: int = 32) -> nn.Module:
    """Quantize a full-precision `model` in place with torchao (PTQ, no training): same layers and numerics as QAT's
    `convert`, as a baseline for quantization-aware distillation."""
    check_scheme(scheme, group_size)
    from torchao.quantization import quantize_

    targets = set(qat_target_names(model))
    quantize_(model, torchao_base_config(scheme, group_size), filter_fn=lambda module, fqn: fqn in targets)
    return model


def describe_quantization(settings: dict[str, Any] | None) -> str:
    """One markdown paragraph for the model card stating the QAT scheme (empty string without QAT)."""
    if not settings:
        return ""
    scheme, group = settings["scheme"], settings["group_size"]
    return (
        f"\n## Quantization\n\nQuantization-aware distillation with torchao: `student_quantization={scheme}` "
        f"({QUANT_SCHEMES[scheme][0]}, group size {group}); every Linear layer except the output head was "
        "fake-quantized during training against the full-precision teacher. The saved weights are the rounded "
        "(grid) values; `hf_distill.quantization.convert_qat_student` gives torchao int weights and "
        "`hf-distill export --format gguf --quant q4_0` (int4) or `q8_0` (int8) a GGUF file.\n"
    )
