"""Quantization-aware distillation (torchao QAT): config checks, fake-quantized forward/backward, convert == fake
quant, PTQ baseline, the trainer's set-up / save hooks and the model card."""

import copy
import json

import pytest
import torch
from conftest import make_llama, make_tokenizer, tokenized_texts
from torch import nn
from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM


pytest.importorskip("torchao")

from torchao.quantization.qat import FakeQuantizedLinear

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.model_card import trainer_model_card
from hf_distill.quantization import (
    QAT_METADATA_KEY,
    QUANT_SCHEMES,
    convert_qat_student,
    fake_quantized_weights,
    post_training_quantize,
    prepare_qat_student,
    qat_target_names,
)


def _model(seed: int = 0) -> LlamaForCausalLM:
    return make_llama(2, 64, seed=seed).eval()  # Linear inputs 64 and 128: multiples of the group size 32


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _on_grid(weight: torch.Tensor, bits: int, group: int) -> bool:
    """Whether every group of `weight` is `s * q` with integers `q` in `[-2**(bits-1), 2**(bits-1) - 1]`.

    torchao's symmetric scale is `s = amax / (2**bits - 1) * 2` of the latent weights, so after rounding the group's
    largest magnitude is `2**(bits-1) * s` (a negative extreme) or `(2**(bits-1) - 1) * s` (a positive one).
    """
    groups = weight.reshape(-1, group)
    amax = groups.abs().amax(1, keepdim=True)
    ok = torch.zeros(groups.shape[0], dtype=torch.bool)
    for k in (2 ** (bits - 1), 2 ** (bits - 1) - 1):
        q = groups / (amax / k)
        integral = (q - q.round()).abs().amax(1) < 1e-3
        in_range = (q.amin(1) >= -(2 ** (bits - 1)) - 1e-3) & (q.amax(1) <= 2 ** (bits - 1) - 1 + 1e-3)
        ok |= integral & in_range
    return bool(ok.all())


@pytest.mark.parametrize(("field", "value", "match"), [("student_quantization", "int3w", "int8da_int4w")])
def test_config_rejects_unknown_scheme(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})


def test_config_rejects_bad_group_size(tmp_path):
    with pytest.raises(ValueError, match="student_quantization_group_size"):
        DistillationConfig(
            output_dir=str(tmp_path), use_cpu=True, student_quantization="int4w", student_quantization_group_size=0
        )


def test_prepare_fake_quantizes_every_linear_but_the_head_and_trains():
    model = _model()
    reference = copy.deepcopy(model)
    prepare_qat_student(model, "int8da_int4w", 32)
    fake = [n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(fake) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is nn.Linear
    assert getattr(model.config, QAT_METADATA_KEY) == {"scheme": "int8da_int4w", "group_size": 32}
    # same parameters under the same names: checkpoints and optimizers are unchanged
    assert model.state_dict().keys() == reference.state_dict().keys()

    x = _ids()
    logits = model(x, labels=x)
    with torch.no_grad():
        fp_logits = reference(x).logits
    assert not torch.allclose(logits.logits, fp_logits, atol=1e-4)  # the forward really is quantized
    assert (logits.logits - fp_logits).abs().max() < 1.0  # ... but close to the fp model
    logits.loss.backward()
    for name in fake:
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    # the weight quantizer rounds onto torchao's int4 grid, one scale per group of 32 inputs
    layer = model.model.layers[0].self_attn.q_proj
    assert _on_grid(layer.weight_fake_quantizer(layer.weight).detach(), 4, 32)
    assert not _on_grid(layer.weight.detach(), 4, 32)


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_converted_model_equals_fake_quantized_forward(scheme):
    model = prepare_qat_student(_model(), scheme, 32)
    x = _ids(1)
    with torch.no_grad():
        fake = model(x).logits
    convert_qat_student(model)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        real = model(x).logits
    torch.testing.assert_close(real, fake, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_post_training_quantization_matches_untrained_qat(scheme):
    x = _ids(2)
    qat = prepare_qat_student(_model(), scheme, 32)
    ptq = post_training_quantize(_model(), scheme, 32)
    with torch.no_grad():
        torch.testing.assert_close(ptq(x).logits, qat(x).logits, atol=1e-5, rtol=1e-5)


def test_fake_quantized_weights_rounds_then_restores():
    model = prepare_qat_student(_model(), "int4w", 32)
    latent = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _ids(3)
    with torch.no_grad():
        fake = model(x).logits
    with fake_quantized_weights(model):
        for name in qat_target_names(_model()):
            assert _on_grid(model.get_submodule(name).weight.detach(), 4, 32), name
        plain = LlamaForCausalLM(model.config).eval()
        plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, fake, atol=1e-5, rtol=1e-5)  # weight-only: grid weights suffice
    for name, p in model.named_parameters():
        assert torch.equal(p, latent[name]), name


def test_peft_student_gets_a_clear_error():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="PEFT/LoRA"):
        prepare_qat_student(model, "int4w", 32)


def test_group_size_must_divide_every_layer():
    with pytest.raises(ValueError, match="does not divide the input size"):
        prepare_qat_student(_model(), "int4w", 48)


def test_trainer_trains_qat_student_saves_grid_weights_and_states_scheme(tmp_path):
    tok = make_tokenizer()
    texts = ["one two three four five six", "yes no because so", "plus minus equals one two"] * 4
    trainer = DistillationTrainer(
        model=make_llama(2, 64),
        teacher_model=make_llama(4, 64, seed=1),
        args=DistillationConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=4,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="steps",
            save_steps=2,
            learning_rate=1e-2,
            student_quantization="int4w",
            student_quantization_group_size=32,
        ),
        train_dataset=tokenized_texts(tok, texts),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    assert sum(isinstance(m, FakeQuantizedLinear) for m in trainer.model.modules()) == 14
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    model = trainer.model.eval()
    x = _ids(4)
    with torch.no_grad():
        fake = model(x).logits
    latent = model.model.layers[1].mlp.up_proj.weight.detach().clone()

    final = tmp_path / "final"
    trainer.save_model(str(final))
    saved = LlamaForCausalLM.from_pretrained(str(final)).eval()
    assert getattr(saved.config, QAT_METADATA_KEY) == {"scheme": "int4w", "group_size": 32}
    assert json.loads((final / "config.json").read_text())[QAT_METADATA_KEY]["scheme"] == "int4w"
    assert _on_grid(saved.model.layers[1].mlp.up_proj.weight.detach(), 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(saved(x).logits, fake, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, latent)  # training state untouched

    # the checkpoint keeps the latent fp32 weights, so a resumed run continues QAT where it stopped
    checkpoint = LlamaForCausalLM.from_pretrained(str(tmp_path / "out" / "checkpoint-2"))
    torch.testing.assert_close(checkpoint.model.layers[1].mlp.up_proj.weight, latent)

    card = str(trainer_model_card(trainer))
    assert "student_quantization=int4w" in card and "group size 32" in card


def test_trainer_with_lora_student_and_qat_gives_a_clear_error(tmp_path):
    peft = pytest.importorskip("peft")
    tok = make_tokenizer()
    student = peft.get_peft_model(make_llama(2, 64), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="does not support a PEFT/LoRA student"):
        DistillationTrainer(
            model=student,
            teacher_model=make_llama(4, 64, seed=1),
            args=DistillationConfig(
                output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, student_quantization="int4w"
            ),
            train_dataset=tokenized_texts(tok, ["one two three", "yes no"]),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            processing_class=tok,
        )
