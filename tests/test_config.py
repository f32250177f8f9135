"""The shared distillation fields: defined once, shadow nothing, validated with clear messages."""

import dataclasses

import pytest
import torch
from transformers import TrainingArguments
from trl import ModelConfig, SFTConfig

from hf_distill import DistillationArguments, DistillationConfig, DistillationSFTConfig
from hf_distill.losses import LOGIT_LOSSES


def names(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_no_field_shadows_sft_training_or_model_config():
    ours = names(DistillationArguments)
    assert ours, "no distillation fields found"
    assert not ours & names(SFTConfig)
    assert not ours & names(TrainingArguments)
    assert not ours & names(ModelConfig)


def test_both_configs_share_one_definition():
    for cls in (DistillationConfig, DistillationSFTConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(DistillationArguments):
            assert fields[f.name].default == f.default
    assert DistillationConfig(output_dir="x", report_to=[]).kd_loss == "forward_kl"


def test_defaults_are_forward_kl_plus_ce():
    args = DistillationSFTConfig(output_dir="x", report_to=[])
    assert (args.kd_loss, args.temperature, args.kd_weight > 0, args.ce_weight > 0) == ("forward_kl", 1.0, True, True)
    # bf16 exactly where it is fast: a bf16-capable CUDA GPU (bf16 matmuls on CPU are ~400x slower)
    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert DistillationConfig(output_dir="x", report_to=[], bf16=False).bf16 is False  # an explicit value wins


def test_choices_come_from_the_loss_table():
    field = {f.name: f for f in dataclasses.fields(DistillationArguments)}["kd_loss"]
    assert field.metadata["choices"] == list(LOGIT_LOSSES)


@pytest.mark.parametrize("cls", [DistillationConfig, DistillationSFTConfig])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kd_loss": "kl"}, r"`kd_loss` must be one of \['forward_kl'"),
        ({"temperature": 0.0}, r"`temperature` must be > 0, got 0.0"),
        ({"temperature": -1.0}, r"`temperature` must be > 0"),
        ({"beta": 1.5}, r"`beta` must be in \[0, 1\]"),
        ({"skew_alpha": 1.0}, r"`skew_alpha` must be in \[0, 1\)"),
        ({"kd_weight": -0.1}, r"`kd_weight` must be >= 0"),
        ({"kd_weight": 0.0, "ce_weight": 0.0}, r"both 0"),
        ({"teacher_model_init_kwargs": "{not json"}, r"`teacher_model_init_kwargs` must be a dict or a JSON object"),
        ({"taid_t_start": 1.0}, r"`taid_t_start` must be in \[0, 1\)"),
        ({"taid_t_start": 0.5, "taid_t_end": 0.5}, r"`taid_t_end` must be in \(taid_t_start, 1\] = \(0.5, 1\]"),
        ({"taid_t_end": 1.2}, r"`taid_t_end` must be in"),
        ({"taid_alpha": -1e-3}, r"`taid_alpha` must be in \[0, 1\]"),
        ({"taid_beta": 1.0}, r"`taid_beta` must be in \[0, 1\)"),
        ({"ab_alpha": -0.5}, r"`ab_alpha` must be in \[0, 5.0\] \(ABKD"),
        ({"ab_beta": 80.0}, r"`ab_beta` must be in \[0, 5.0\] \(ABKD"),
        ({"ab_beta": float("nan")}, r"`ab_beta` must be a finite number, got nan"),
        ({"akl_mu": 0.0}, r"`akl_mu` must be in \(0, 1\]"),
    ],
)
def test_validation_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(output_dir="x", report_to=[], **kwargs)


def test_init_kwargs_json_string_is_parsed():
    args = DistillationConfig(output_dir="x", report_to=[], teacher_model_init_kwargs='{"gguf_file": "m.gguf"}')
    assert args.teacher_model_init_kwargs == {"gguf_file": "m.gguf"}
