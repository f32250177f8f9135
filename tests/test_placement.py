"""`prepare_teacher` branches, memory check, QLoRA student arguments and mixed precision (single process, CPU)."""

import importlib.util
import types

import pytest
import torch
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from conftest import make_llama
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import DataCollatorForLanguageModeling
from trl import ModelConfig

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.losses import logit_divergence
from hf_distill.models import check_teacher_fits, prepare_teacher, quantized_student_kwargs
from hf_distill.models import placement as teacher_module


TEXTS = ["the cat sat on the mat", "a dog ran fast", "the big red dog is slow", "one plus two equals three"]


def make_trainer(tmp_path, tok, student=None, teacher=None, **kw):
    args = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
    }
    args.update(kw)
    data = Dataset.from_dict({"text": TEXTS}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    return DistillationTrainer(
        model=student if student is not None else make_llama(2, 32),
        teacher_model=teacher if teacher is not None else make_llama(4, 64, seed=1),
        args=DistillationConfig(**args),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )


def test_teacher_is_not_part_of_accelerate_state(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    assert trainer.accelerator._models == []  # so evaluate() before train() still prepares the student
    trainer.train()
    assert not any(m is trainer.teacher for m in trainer.accelerator._models)
    trainer.accelerator.save_state(str(tmp_path / "state"))
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert "model.safetensors" in files and not any(name.startswith("model_1") for name in files)
    assert set(load_file(tmp_path / "state" / "model.safetensors")) == set(trainer.model.state_dict())


def test_unregister_model_on_the_pinned_accelerate(tmp_path):
    """`unregister_model` edits accelerate's private `_models` list (no public API); this pins that it still exists
    and still decides what `save_state` writes, so an accelerate upgrade that changes it fails here first."""
    from accelerate import Accelerator

    from hf_distill.models import unregister_model

    accelerator = Accelerator(cpu=True)
    kept, dropped = accelerator.prepare_model(torch.nn.Linear(2, 2)), accelerator.prepare_model(torch.nn.Linear(3, 3))
    assert isinstance(accelerator._models, list) and len(accelerator._models) == 2
    unregister_model(accelerator, dropped)
    assert accelerator._models == [kept]
    accelerator.save_state(str(tmp_path / "state"))
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert "model.safetensors" in files and not any(name.startswith("model_1") for name in files)
    assert set(load_file(tmp_path / "state" / "model.safetensors")) == {"weight", "bias"}


def test_teacher_sharing_the_students_parameters_is_rejected(tmp_path, tokenizer):
    base = make_llama(2, 32)
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))  # injects adapters into `base`
    with pytest.raises(ValueError, match=r"teacher shares \d+ parameter tensors with the student.*deepcopy"):
        make_trainer(tmp_path, tokenizer, student=student, teacher=base)


def fake_trainer(**accelerator_fields) -> types.SimpleNamespace:
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), _models=[], **accelerator_fields)
    return types.SimpleNamespace(
        accelerator=accelerator, model=make_llama(2, 32), is_deepspeed_enabled=False, is_fsdp_enabled=False
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_branch(monkeypatch, stage):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    trainer = fake_trainer(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    trainer.is_deepspeed_enabled = True
    calls, fits = [], []
    monkeypatch.setattr("trl.models.prepare_deepspeed", lambda model, acc: calls.append((model, acc)) or model)
    monkeypatch.setattr(teacher_module, "check_teacher_fits", lambda *a, **k: fits.append((a[2], k)))
    teacher = make_llama(4, 64, seed=1).train()
    assert prepare_teacher(teacher, trainer) is teacher
    assert calls == [(teacher, trainer.accelerator)]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # ZeRO-1/2 place the teacher whole (stage 0 engine, bf16): checked against free memory; ZeRO-3 partitions it
    assert fits == ([("DeepSpeed ZeRO-2", {"half_precision": True})] if stage == 2 else [])


def test_fsdp1_branch_leaves_the_plugin_as_it_was(monkeypatch):
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1,
        auto_wrap_policy="transformer_based_wrap",
        sync_module_states=False,
        cpu_ram_efficient_loading=False,
    )
    trainer = fake_trainer(state=types.SimpleNamespace(fsdp_plugin=plugin))
    trainer.is_fsdp_enabled = True

    def prepare_fsdp(model, accelerator):  # what trl's helper does to the plugin before wrapping
        accelerator.state.fsdp_plugin.set_auto_wrap_policy(model)
        return model

    monkeypatch.setattr("trl.models.prepare_fsdp", prepare_fsdp)
    teacher = make_llama(4, 64, seed=1)
    assert prepare_teacher(teacher, trainer) is teacher
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None


def test_teacher_too_large_for_whole_placement(monkeypatch):
    teacher = make_llama(4, 64, seed=1)  # fp32
    size = sum(t.numel() * 4 for t in [*teacher.parameters(), *teacher.buffers()])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(0.75 * size), 10 * size))
    with pytest.raises(
        ValueError,
        match=r"needs 0\.\d+ GiB on cuda:0 but only .* under DDP every process holds.*"
        r"fsdp2\.yaml.*zero3\.yaml",
    ):
        check_teacher_fits(teacher, torch.device("cuda", 0), "DDP")
    check_teacher_fits(teacher, torch.device("cuda", 0), "DeepSpeed ZeRO-2", half_precision=True)  # bf16: fits
    check_teacher_fits(teacher, torch.device("cpu"), "DDP")  # other devices are not checked


def test_quantized_student_kwargs(monkeypatch):
    assert quantized_student_kwargs(ModelConfig()) == {}
    with pytest.raises(ValueError, match="set `use_peft: true`"):
        quantized_student_kwargs(ModelConfig(load_in_4bit=True))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantized_student_kwargs(ModelConfig(load_in_4bit=True, use_peft=True))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*drop `load_in_4bit`"):
        quantized_student_kwargs(ModelConfig(load_in_4bit=True, use_peft=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    qlora = ModelConfig(load_in_4bit=True, use_peft=True, dtype="bfloat16", bnb_4bit_quant_storage="bfloat16")
    kwargs = quantized_student_kwargs(qlora)
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": 1}


def test_bf16_autocast_teacher_and_fp32_kd_loss(tmp_path, tokenizer):
    """bf16 mixed precision: both models run under autocast, logits come back fp32, the KD sum is fp32."""
    trainer = make_trainer(tmp_path, tokenizer, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        autocast_logits = trainer.teacher(**inputs).logits
        fp32_logits = trainer.teacher._original_forward(**inputs).logits
    assert autocast_logits.dtype == torch.float32  # accelerate's convert_outputs_to_fp32
    assert 0 < (autocast_logits - fp32_logits).abs().max() < 0.1  # computed in bf16, then upcast
    s, t = fp32_logits[0].bfloat16(), autocast_logits[0].bfloat16()
    kd = logit_divergence(s, t)
    assert kd.dtype == torch.float32
    torch.testing.assert_close(kd, logit_divergence(s.double(), t.double()).float(), atol=1e-6, rtol=1e-5)
    sums, _, _, _ = trainer._loss_terms(trainer.model, batch)
    assert all(v.dtype == torch.float32 for v in sums.values())


def test_load_teacher_checks_tokenizer_head_and_vocabulary(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from hf_distill.models import load_teacher

    path = tmp_path / "teacher"
    make_llama(2, 48, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    student = make_llama(2, 32)
    teacher, vocab = load_teacher(str(path), AutoModelForCausalLM, student, tokenizer)
    assert teacher.config.hidden_size == 48 and vocab in (None, len(tokenizer))
    with pytest.raises(ValueError, match="predict different things"):
        from transformers import BertConfig, BertForSequenceClassification

        load_teacher(BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64)), AutoModelForCausalLM, student)  # fmt: skip
