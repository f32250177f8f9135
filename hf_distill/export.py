"""GGUF export of a Llama-family student (for llama.cpp, Ollama and transformers' GGUF loader).

`export_gguf(model_dir, output, quant="q4_0")` writes one file holding the weights, the model hyper-parameters, the
byte-level BPE tokenizer (tokens, token types, merges, special ids) and the chat template, with the `gguf` package
(`GGUFWriter`, `TensorNameMap`; tensor names and metadata keys as llama.cpp's `convert_hf_to_gguf.py`).

- Q and K projection rows are permuted as llama.cpp expects for its rotary layout; transformers' GGUF loader undoes
  the permutation, so a round trip gives the source model back.
- `f16`: 2-D weights in float16, norms in float32. `q8_0` / `q4_0`: 2-D weights in GGUF blocks of 32 along their rows
  (one fp16 scale per block), norms in float32. In a `q4_0` file the output matrix (and the token embeddings when they
  are tied to it) is stored as q8_0: llama.cpp keeps that tensor at higher precision too (q6_K, which the `gguf`
  Python package cannot write). A 2-D weight whose rows are not a multiple of 32 (a hidden or intermediate size such
  as 48 or 80) cannot be stored in blocks: the export is refused with the list of such tensors (`block_fallbacks`),
  unless `allow_fallback=True` (`--allow_fallback`), which writes them in f16 and warns once with the list.
- Block scales follow llama.cpp's rule (`d = signed max / -8` for q4_0, `amax / 127` for q8_0), except where a block
  already lies on an integer grid (`amax / k` for an integer `k`, up to the fp16 scale): then that grid's scale is used
  and the block is stored exactly. Weights of a QAT student (`student_quantization=int4w`, group size 32, saved on
  torchao's int4 grid) therefore export to q4_0 without further rounding, and any other weights exactly as llama.cpp
  would quantize them.
"""

import json
import logging
import os
from typing import Any

import numpy as np
import torch


logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM"}  # model_type -> class (SmolLM2, Llama 2/3, TinyLlama, ...)
GGUF_QUANTS = ("f16", "q8_0", "q4_0")
BLOCK = 32
# quant -> (qmin, qmax, grid divisors k tried as scale amax / k)
_GRIDS = {"q4_0": (-8, 7, range(1, 9)), "q8_0": (-128, 127, range(96, 129))}
_EXACT = 2e-3  # a grid scale is used when it reproduces every weight of the block to this fraction of its amax


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("GGUF export needs the `gguf` package: `pip install 'hf-distill[gguf]'`.") from err
    return gguf


def quantize_blocks(weights: np.ndarray, quant: str) -> np.ndarray:
    """GGUF `q4_0` / `q8_0` bytes of a float matrix (see the module docstring for the choice of block scales).

    Args:
        weights (`np.ndarray`): float32, shape `(R, C)` with `C % 32 == 0`.
        quant (`str`): `"q4_0"` or `"q8_0"`.

    Returns:
        `np.ndarray` of uint8, shape `(R, C // 32 * bytes_per_block)` (18 for q4_0, 34 for q8_0), the layout of
        `gguf.quants.quantize` (fp16 scale, then the packed integers). Values equal llama.cpp's quantization except
        for blocks that lie exactly on an integer grid, which are kept exact.
    """
    if quant not in _GRIDS:
        raise ValueError(f"`quant` must be 'q4_0' or 'q8_0', got {quant!r}.")
    rows, cols = weights.shape
    if cols % BLOCK:
        raise ValueError(f"Rows of length {cols} do not split into GGUF blocks of {BLOCK}.")
    qmin, qmax, divisors = _GRIDS[quant]
    blocks = weights.astype(np.float32).reshape(-1, BLOCK)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if quant == "q4_0":  # llama.cpp: the signed value of largest magnitude maps to -8
        signed = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
        candidates = [signed / -8]
    else:
        candidates = [amax / 127]
    candidates += [amax / k for k in divisors]
    # llama.cpp's rule (as `gguf.quants`: integers from the fp32 scale, the scale stored in fp16), kept for every
    # block unless a grid scale reproduces it exactly
    with np.errstate(divide="ignore"):
        inverse = np.where(candidates[0] == 0, 0, 1 / candidates[0])
    if quant == "q4_0":
        best_q = np.trunc(blocks * inverse + np.float32(8.5)).clip(0, 15) - 8
    else:
        scaled = blocks * inverse
        best_q = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
    best_d = candidates[0].astype(np.float16).astype(np.float32)
    for d in candidates[1:]:
        d16 = d.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d16 == 0, 0, np.rint(blocks / np.where(d16 == 0, 1, d16))).clip(qmin, qmax)
        exact = np.abs(q * d16 - blocks).max(axis=1, keepdims=True) <= _EXACT * amax
        best_d, best_q = np.where(exact, d16, best_d), np.where(exact, q, best_q)
    scale = best_d.astype(np.float16).view(np.uint8)  # (n_blocks, 2)
    if quant == "q4_0":
        nibbles = (best_q + 8).astype(np.uint8)
        packed = nibbles[:, : BLOCK // 2] | (nibbles[:, BLOCK // 2 :] << np.uint8(4))
    else:
        packed = best_q.astype(np.int8).view(np.uint8)
    return np.concatenate([scale, packed], axis=1).reshape(rows, -1)


def block_fallbacks(shapes: dict[str, tuple[int, ...]], quant: str) -> list[tuple[str, tuple[int, ...]]]:
    """The 2-D tensors that a block type (`q8_0`, `q4_0`) cannot store: rows whose length is not a multiple of 32.

    Args:
        shapes (`dict`): tensor name -> shape, e.g. `{"model.layers.0.mlp.down_proj.weight": (H, I)}` (2-D weights
            are `(rows, row length)`; 1-D tensors are always stored as f32 and never listed).
        quant (`str`): the file's type; `f16` has no blocks (nothing listed).

    Returns:
        `list[tuple[str, tuple]]`: `(name, shape)` of each tensor that would fall back to f16, in `shapes`' order.
    """
    if quant not in _GRIDS:
        return []
    return [(name, tuple(shape)) for name, shape in shapes.items() if len(shape) == 2 and shape[1] % BLOCK]


def _describe_fallbacks(fallbacks: list[tuple[str, tuple[int, ...]]], total: int, quant: str) -> str:
    """`block_fallbacks`' list in words: how many, the row lengths, and the tensors (the first 12)."""
    widths = sorted({shape[1] for _, shape in fallbacks})
    listed = ", ".join(f"{name} {shape}" for name, shape in fallbacks[:12])
    more = f" and {len(fallbacks) - 12} more" if len(fallbacks) > 12 else ""
    return (
        f"{len(fallbacks)} of the {total} 2-D tensors have rows of length {widths}, which blocks of {BLOCK} do not "
        f"divide, so they cannot be stored as {quant}: {listed}{more}"
    )


def _permute_qk(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for Q / K projections, shape `(n_head * head_dim, H)` (`convert_hf_to_gguf`)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _check_architecture(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports the Llama family only ({', '.join(SUPPORTED_ARCHITECTURES.values())}, "
            f"model_type {sorted(SUPPORTED_ARCHITECTURES)}); this model is {model_type!r} "
            f"({(getattr(config, 'architectures', None) or ['?'])[0]})."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export supports plain RoPE only; this model uses rope_type {rope['rope_type']!r}.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("GGUF export supports Llama models without attention / MLP biases.")


def _pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level pre-tokenizer (JSON of `tokenizers`)."""
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    logger.warning("Pre-tokenizer %s has no llama.cpp name; writing 'default'.", kinds)
    return "default"


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    gguf = _gguf()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or not any(
        "ByteLevel" in json.dumps(backend.get(k)) for k in ("pre_tokenizer", "decoder")
    ):
        raise ValueError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 / SmolLM2 / Llama 3 style, `tokenizer.ggml.model = "
            f"gpt2`); this tokenizer is a {model.get('type')!r} model without a ByteLevel pre-tokenizer."
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"The tokenizer has {len(vocab)} tokens but the model's vocabulary is {vocab_size}.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, name, None) is not None:
            add(getattr(tokenizer, name))
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(
        bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    )
    if tokenizer.chat_template:
        template = tokenizer.chat_template
        writer.add_chat_template(template if isinstance(template, str) else template.get("default"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def _check_tokenizer_files(folder: str) -> None:
    """A ValueError naming the files looked for when the local folder `folder` holds no tokenizer (else transformers
    asks to install sentencepiece, as if a slow tokenizer were there to convert)."""
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"No tokenizer in {folder}: none of {', '.join(TOKENIZER_FILES)} is there, and a GGUF file carries the "
            f"tokenizer. Save the student's tokenizer beside it (`tokenizer.save_pretrained({folder!r})`; `hf-distill "
            "train` does), or name the folder that holds it with `tokenizer_dir` (`--tokenizer`)."
        )


def export_gguf(
    model_dir: str,
    output: str,
    quant: str = "f16",
    tokenizer_dir: str | None = None,
    name: str | None = None,
    allow_fallback: bool = False,
) -> dict[str, Any]:
    """Write a Llama-family causal LM saved with `save_pretrained` (weights + tokenizer) as one GGUF file.

    Args:
        model_dir (`str`): folder with the model (`config.json` + safetensors), e.g. a distilled student.
        output (`str`): path of the `.gguf` file to write (its folder is created).
        quant (`str`): `f16`, `q8_0` or `q4_0` (see the module docstring).
        tokenizer_dir (`str`, *optional*): tokenizer folder when it is not `model_dir`.
        name (`str`, *optional*): `general.name` (default: the folder name).
        allow_fallback (`bool`): with `q8_0` / `q4_0`, write the 2-D tensors whose rows are not a multiple of 32 in f16
            (warned once, with their list) instead of refusing the export.

    Returns:
        `{"path", "quant", "bytes", "tensors": {gguf name: type}, "fallback": [(name, shape)]}`.

    Raises:
        `ValueError`: with `q8_0` / `q4_0`, some 2-D tensor cannot take blocks of 32 and `allow_fallback` is False
            (the tensors are listed, name and shape; nothing is written).
    """
    if quant not in GGUF_QUANTS:
        raise ValueError(f"`quant` must be one of {list(GGUF_QUANTS)}, got {quant!r}.")
    gguf = _gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    _check_architecture(config)
    _check_tokenizer_files(tokenizer_dir or model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    fallbacks = block_fallbacks({k: tuple(v.shape) for k, v in state.items()}, quant)
    if fallbacks:
        described = _describe_fallbacks(fallbacks, sum(v.ndim == 2 for v in state.values()), quant)
        if not allow_fallback:
            raise ValueError(
                f"{described}. Pass --allow_fallback (`allow_fallback=True`) to write them in f16 (the file is then "
                f"only partly {quant}), export with --quant f16, or use a model whose hidden and intermediate sizes "
                f"are multiples of {BLOCK}."
            )
        logger.warning("%s; writing them in f16 (--allow_fallback).", described)
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.TensorNameMap(arch, config.num_hidden_layers)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    ftype["q4_0"] = gguf.LlamaFileType.MOSTLY_Q4_0

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    writer = gguf.GGUFWriter(output, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or os.path.basename(os.path.normpath(model_dir)))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype[quant])
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    kinds: dict[str, str] = {}
    for hf_name, tensor in state.items():  # a tied lm_head is left out: llama.cpp reads it from token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"No GGUF name for tensor {hf_name!r} of a Llama model.")
        data = tensor.detach().float()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_qk(data, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_qk(data, n_kv)
        array = data.numpy()
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        kind = quant if quant != "q4_0" or not is_output else "q8_0"
        if array.ndim != 2 or kind == "f16" or array.shape[1] % BLOCK:
            kind = "f32" if array.ndim == 1 else "f16"
        if kind in _GRIDS:
            raw = gguf.GGMLQuantizationType.Q4_0 if kind == "q4_0" else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, quantize_blocks(array, kind), raw_dtype=raw)
        else:
            writer.add_tensor(gguf_name, array.astype(np.float32 if kind == "f32" else np.float16))
        kinds[gguf_name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    size = os.path.getsize(output)
    logger.info("Wrote %s (%s, %.1f MB, %d tensors).", output, quant, size / 1e6, len(kinds))
    return {"path": output, "quant": quant, "bytes": size, "tensors": kinds, "fallback": fallbacks}
